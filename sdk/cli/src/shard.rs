//! `--shard auto`: which shard this process runs, read from the job scheduler's environment,
//! so that one script or manifest serves every task of a job array.
//!
//! - **Slurm job arrays** (`sbatch --array=0-7`): the index is `SLURM_ARRAY_TASK_ID` minus
//!   `SLURM_ARRAY_TASK_MIN` (divided by `SLURM_ARRAY_TASK_STEP` for `--array=0-14:2`), the
//!   count `SLURM_ARRAY_TASK_COUNT`. An array that is not one regular range (`--array=1,3,7`)
//!   has no such mapping and is refused.
//! - **Kubernetes Indexed Jobs** (`completionMode: Indexed`): the index is
//!   `JOB_COMPLETION_INDEX`. Kubernetes does not export the number of completions, so the
//!   count comes from `--shard-count N` or `MODA_SHARD_COUNT`.
//!
//! A count given with `--shard-count` or `MODA_SHARD_COUNT` under Slurm must agree with the
//! array's. Missing, non-numeric or inconsistent values are errors that name the variables,
//! never a guess: a wrong shard would silently run another process's images.

use std::str::FromStr;

use crate::catalog::Shard;

/// The value of `--shard`: `i/n`, or `auto` (from the scheduler's environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardArg {
    /// `i/n` as given.
    Fixed(Shard),
    /// `auto`.
    Auto,
}

impl FromStr for ShardArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(ShardArg::Auto);
        }
        s.parse::<Shard>().map(ShardArg::Fixed).map_err(|_| {
            format!(
                "invalid shard {s:?}: expected i/n with 0 <= i < n (e.g. 0/4 for the first of \
                 4), or auto (from Slurm's or Kubernetes' environment)"
            )
        })
    }
}

/// Environment variables read by [`resolve`].
pub mod vars {
    /// Slurm: this task's id in the array.
    pub const SLURM_ID: &str = "SLURM_ARRAY_TASK_ID";
    /// Slurm: the smallest task id of the array.
    pub const SLURM_MIN: &str = "SLURM_ARRAY_TASK_MIN";
    /// Slurm: the largest task id of the array.
    pub const SLURM_MAX: &str = "SLURM_ARRAY_TASK_MAX";
    /// Slurm: the step between task ids (`--array=0-14:2`).
    pub const SLURM_STEP: &str = "SLURM_ARRAY_TASK_STEP";
    /// Slurm: the number of tasks in the array.
    pub const SLURM_COUNT: &str = "SLURM_ARRAY_TASK_COUNT";
    /// Kubernetes Indexed Job: this pod's completion index.
    pub const K8S_INDEX: &str = "JOB_COMPLETION_INDEX";
    /// The shard count where the scheduler does not export one (Kubernetes).
    pub const COUNT: &str = "MODA_SHARD_COUNT";
}

/// A shard resolved from the environment, and where it came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The shard.
    pub shard: Shard,
    /// Where it came from, in words, e.g. `SLURM_ARRAY_TASK_ID=5 - SLURM_ARRAY_TASK_MIN=1`.
    pub source: String,
}

/// The shard of `arg`: `i/n` as it is (with `count_flag`, which belongs to `auto`, refused),
/// `auto` from the environment `env` (a lookup such as `|k| std::env::var(k).ok()`, so that
/// tests pass their own), with the count from `count_flag` (`--shard-count`) where the
/// scheduler gives none.
pub fn resolve(
    arg: Option<ShardArg>,
    count_flag: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Resolved>, String> {
    match arg {
        None if count_flag.is_some() => Err("--shard-count goes with --shard auto".to_string()),
        None => Ok(None),
        Some(ShardArg::Fixed(_)) if count_flag.is_some() => Err(
            "--shard-count goes with --shard auto (--shard i/n already names the count)"
                .to_string(),
        ),
        Some(ShardArg::Fixed(shard)) => Ok(Some(Resolved {
            shard,
            source: "--shard".to_string(),
        })),
        Some(ShardArg::Auto) => auto(count_flag, env).map(Some),
    }
}

/// A variable's value, trimmed; an empty one counts as unset.
fn get(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A variable as a whole number, or an error naming it.
fn number(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>, String> {
    match get(env, name) {
        None => Ok(None),
        Some(v) => v.parse::<usize>().map(Some).map_err(|_| {
            format!("--shard auto: {name}={v:?} is not a whole number (0, 1, 2, ...)")
        }),
    }
}

/// The count asked for outside the scheduler: `--shard-count`, else `MODA_SHARD_COUNT`
/// (both given and different is an error), with its source.
fn asked_count(
    count_flag: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(usize, String)>, String> {
    let from_env = number(env, vars::COUNT)?;
    let asked = match (count_flag, from_env) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "--shard auto: --shard-count {a} and {}={b} disagree",
                vars::COUNT
            ))
        }
        (Some(a), _) => Some((a, format!("--shard-count {a}"))),
        (None, Some(b)) => Some((b, format!("{}={b}", vars::COUNT))),
        (None, None) => None,
    };
    if let Some((0, from)) = &asked {
        return Err(format!(
            "--shard auto: {from}: the count must be at least 1"
        ));
    }
    Ok(asked)
}

fn auto(
    count_flag: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Resolved, String> {
    let asked = asked_count(count_flag, env)?;
    let slurm = get(env, vars::SLURM_ID).is_some();
    let k8s = get(env, vars::K8S_INDEX).is_some();
    match (slurm, k8s) {
        (true, true) => Err(format!(
            "--shard auto: both {} (Slurm) and {} (Kubernetes) are set, so which scheduler \
             runs this is unclear; pass --shard i/n",
            vars::SLURM_ID,
            vars::K8S_INDEX
        )),
        (true, false) => slurm_shard(asked, env),
        (false, true) => k8s_shard(asked, env),
        (false, false) => Err(format!(
            "--shard auto: neither {} (a Slurm job array, sbatch --array) nor {} (a \
             Kubernetes Indexed Job) is set, so this process's shard is unknown; run it as a \
             task of one of those, or pass --shard i/n",
            vars::SLURM_ID,
            vars::K8S_INDEX
        )),
    }
}

fn slurm_shard(
    asked: Option<(usize, String)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Resolved, String> {
    let need = |name: &str| -> Result<usize, String> {
        number(env, name)?.ok_or_else(|| {
            format!(
                "--shard auto: {} is set but {name} is not (Slurm sets both for an array task; \
                 an older Slurm without {name} needs --shard i/n)",
                vars::SLURM_ID
            )
        })
    };
    let id = need(vars::SLURM_ID)?;
    let min = need(vars::SLURM_MIN)?;
    let count = need(vars::SLURM_COUNT)?;
    // MAX tells a regular range from a list (below); every Slurm that sets COUNT sets it.
    let max = need(vars::SLURM_MAX)?;
    let step = number(env, vars::SLURM_STEP)?.unwrap_or(1);
    let values = format!(
        "{}={id}, {}={min}, {}={max}, {}={step}, {}={count}",
        vars::SLURM_ID,
        vars::SLURM_MIN,
        vars::SLURM_MAX,
        vars::SLURM_STEP,
        vars::SLURM_COUNT,
    );
    let irregular = || {
        format!(
            "--shard auto: the Slurm array is not one regular range ({values}); use \
             --array=A-B or --array=A-B:S, or pass --shard i/n"
        )
    };
    if count == 0 || step == 0 || id < min {
        return Err(irregular());
    }
    // A regular range A-B:S has its last id at A + (count-1)*S; an array given as a list
    // (`--array=1,3,7`) does not, and its ids cannot be mapped onto 0..count.
    let last = (count - 1)
        .checked_mul(step)
        .and_then(|span| span.checked_add(min));
    if last != Some(max) {
        return Err(irregular());
    }
    let offset = id - min;
    if offset % step != 0 || offset / step >= count {
        return Err(irregular());
    }
    let shard = Shard {
        index: offset / step,
        count,
    };
    if let Some((n, from)) = asked {
        if n != count {
            return Err(format!(
                "--shard auto: {from} disagrees with the Slurm array's {}={count}",
                vars::SLURM_COUNT
            ));
        }
    }
    Ok(Resolved {
        shard,
        source: values,
    })
}

fn k8s_shard(
    asked: Option<(usize, String)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Resolved, String> {
    let index = number(env, vars::K8S_INDEX)?.unwrap_or_default();
    let Some((count, from)) = asked else {
        return Err(format!(
            "--shard auto: {}={index} (a Kubernetes Indexed Job) gives this shard's index but \
             not how many there are (Kubernetes does not export it): pass --shard-count N or \
             set {} to the Job's spec.completions",
            vars::K8S_INDEX,
            vars::COUNT
        ));
    };
    if index >= count {
        return Err(format!(
            "--shard auto: {}={index} is not below the shard count ({from}); the count must be \
             the Job's spec.completions",
            vars::K8S_INDEX
        ));
    }
    Ok(Resolved {
        shard: Shard { index, count },
        source: format!("{}={index}, {from}", vars::K8S_INDEX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn auto_shard(vars: &[(&str, &str)], flag: Option<usize>) -> Result<Shard, String> {
        resolve(Some(ShardArg::Auto), flag, &with(vars)).map(|r| r.expect("a shard").shard)
    }

    fn sh(index: usize, count: usize) -> Shard {
        Shard { index, count }
    }

    #[test]
    fn parses_fixed_and_auto() {
        assert_eq!("auto".parse::<ShardArg>(), Ok(ShardArg::Auto));
        assert_eq!("AUTO".parse::<ShardArg>(), Ok(ShardArg::Auto));
        assert_eq!("1/4".parse::<ShardArg>(), Ok(ShardArg::Fixed(sh(1, 4))));
        for bad in ["4/4", "autox", "", "1"] {
            let e = bad.parse::<ShardArg>().expect_err("an error");
            assert!(e.contains("i/n") && e.contains("auto"), "{bad}: {e}");
        }
    }

    #[test]
    fn slurm_arrays_map_onto_0_to_count() {
        let slurm = |id: &str, min: &str, max: &str, step: &str, count: &str| {
            vec![
                ("SLURM_ARRAY_TASK_ID", id.to_string()),
                ("SLURM_ARRAY_TASK_MIN", min.to_string()),
                ("SLURM_ARRAY_TASK_MAX", max.to_string()),
                ("SLURM_ARRAY_TASK_STEP", step.to_string()),
                ("SLURM_ARRAY_TASK_COUNT", count.to_string()),
            ]
        };
        let run = |v: Vec<(&str, String)>, flag| {
            let v: Vec<(&str, &str)> = v.iter().map(|(k, x)| (*k, x.as_str())).collect();
            auto_shard(&v, flag)
        };
        assert_eq!(run(slurm("0", "0", "3", "1", "4"), None), Ok(sh(0, 4)));
        assert_eq!(run(slurm("3", "0", "3", "1", "4"), None), Ok(sh(3, 4)));
        // --array=1-4: ids from 1.
        assert_eq!(run(slurm("1", "1", "4", "1", "4"), None), Ok(sh(0, 4)));
        assert_eq!(run(slurm("4", "1", "4", "1", "4"), None), Ok(sh(3, 4)));
        // --array=10-16:3 is ids 10, 13, 16.
        assert_eq!(run(slurm("13", "10", "16", "3", "3"), None), Ok(sh(1, 3)));
        // A matching count asked for is fine, another is not.
        assert_eq!(run(slurm("2", "0", "3", "1", "4"), Some(4)), Ok(sh(2, 4)));
        let e = run(slurm("2", "0", "3", "1", "4"), Some(5)).expect_err("an error");
        assert!(e.contains("--shard-count 5") && e.contains("=4"), "{e}");
        // --array=1,3,7: not a range.
        let e = run(slurm("7", "1", "7", "1", "3"), None).expect_err("an error");
        assert!(e.contains("not one regular range"), "{e}");
        // --array=0,2,4 seen as step 1 (were Slurm to say so) is not a range either.
        let e = run(slurm("2", "0", "4", "1", "3"), None).expect_err("an error");
        assert!(e.contains("not one regular range"), "{e}");
        // Without STEP: 1.
        let v = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "2"),
            ("SLURM_ARRAY_TASK_MAX", "9"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ];
        assert_eq!(auto_shard(&v, None), Ok(sh(3, 8)));
        let e = auto_shard(&v[..3], None).expect_err("an error");
        assert!(e.contains("SLURM_ARRAY_TASK_COUNT is not"), "{e}");
        let e = auto_shard(&[v[0], v[1], v[3]], None).expect_err("an error");
        assert!(e.contains("SLURM_ARRAY_TASK_MAX is not"), "{e}");
        // Ids too large to add up are not a range either (no overflow).
        let big = usize::MAX.to_string();
        let e = run(slurm(&big, "1", "2", &big, "3"), None).expect_err("an error");
        assert!(e.contains("not one regular range"), "{e}");
        let v = [
            ("SLURM_ARRAY_TASK_ID", "x"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        let e = auto_shard(&v, None).expect_err("an error");
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID=\"x\" is not a whole number"),
            "{e}"
        );
    }

    #[test]
    fn kubernetes_needs_the_count_from_outside() {
        let v = [("JOB_COMPLETION_INDEX", "2")];
        let e = auto_shard(&v, None).expect_err("an error");
        assert!(
            e.contains("--shard-count") && e.contains("MODA_SHARD_COUNT"),
            "{e}"
        );
        assert_eq!(auto_shard(&v, Some(3)), Ok(sh(2, 3)));
        let v = [("JOB_COMPLETION_INDEX", "2"), ("MODA_SHARD_COUNT", "3")];
        assert_eq!(auto_shard(&v, None), Ok(sh(2, 3)));
        assert_eq!(auto_shard(&v, Some(3)), Ok(sh(2, 3)));
        assert!(auto_shard(&v, Some(4))
            .expect_err("an error")
            .contains("disagree"));
        let v = [("JOB_COMPLETION_INDEX", "3"), ("MODA_SHARD_COUNT", "3")];
        assert!(auto_shard(&v, None)
            .expect_err("an error")
            .contains("not below"));
        let v = [("JOB_COMPLETION_INDEX", "-1"), ("MODA_SHARD_COUNT", "3")];
        assert!(auto_shard(&v, None)
            .expect_err("an error")
            .contains("whole number"));
        let v = [("JOB_COMPLETION_INDEX", "0"), ("MODA_SHARD_COUNT", "0")];
        assert!(auto_shard(&v, None)
            .expect_err("an error")
            .contains("at least 1"));
    }

    #[test]
    fn nothing_or_both_is_an_error_and_the_count_flag_belongs_to_auto() {
        let e = auto_shard(&[], Some(2)).expect_err("an error");
        assert!(e.contains("neither"), "{e}");
        let v = [
            ("JOB_COMPLETION_INDEX", "0"),
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        assert!(auto_shard(&v, None).expect_err("an error").contains("both"));
        let none = with(&[]);
        assert_eq!(resolve(None, None, &none), Ok(None));
        assert!(resolve(None, Some(2), &none).is_err());
        assert!(resolve(Some(ShardArg::Fixed(sh(0, 2))), Some(2), &none).is_err());
        assert_eq!(
            resolve(Some(ShardArg::Fixed(sh(1, 2))), None, &none)
                .expect("ok")
                .expect("ok")
                .shard,
            sh(1, 2)
        );
    }
}
