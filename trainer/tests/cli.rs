//! The `trainer` binary end to end, offline: hub ids resolved from a Hugging Face cache laid
//! out as `huggingface_hub` writes it, `--resume` keeping a run's recorded length, the tiny
//! preset refusing backbones it does not read, `trainer eval`'s default output beside the
//! checkpoint, the exit statuses and `--help`. One test binary for all of them: linking one
//! costs more than running these tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SNAPSHOT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moda-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Puts the fixture directory `fixture` into `cache` as the hub repository `owner/name`.
fn add_to_cache(cache: &Path, id: &str, fixture: &str) {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join(SNAPSHOT);
    std::fs::create_dir_all(&snap).expect("snapshot directory");
    std::fs::create_dir_all(repo.join("refs")).expect("refs directory");
    std::fs::write(repo.join("refs/main"), SNAPSHOT).expect("refs/main");
    for entry in std::fs::read_dir(fixtures().join(fixture)).expect("fixture directory") {
        let path = entry.expect("fixture entry").path();
        let name = path.file_name().expect("file name").to_owned();
        // The fixtures' transformers outputs are not part of a model repository.
        if name != "reference.safetensors" {
            std::fs::copy(&path, snap.join(name)).expect("copy into the cache");
        }
    }
}

/// The trainer binary, offline with the hub cache `cache` (which may not exist), no other hub
/// settings inherited, one thread per shard.
fn trainer_command(cache: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
    for var in [
        "HF_HOME",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "TRANSFORMERS_OFFLINE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "1")
        .args(args);
    cmd
}

fn trainer(cache: &Path, args: &[&str]) -> Output {
    trainer_command(cache, args)
        .output()
        .expect("run the trainer binary")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn check(out: &Output) {
    assert!(out.status.success(), "{}", text(out));
}

/// A failed command: exit status 2, an error message and no panic.
fn check_failed(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{}", text(out));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{}", text(out));
    err
}

/// Writes a synthetic catalog of `count` products.
fn synth(cache: &Path, catalog: &Path, count: usize, seed: u64) {
    check(&trainer(
        cache,
        &[
            "synth",
            "--out",
            &s(catalog),
            "--count",
            &count.to_string(),
            "--seed",
            &seed.to_string(),
        ],
    ));
}

/// A scratch directory with a synthetic catalog, an empty hub cache (the tiny preset needs no
/// hub model) and an embedding cache: what the tests of `fit`'s options start from.
struct CatalogRun {
    dir: PathBuf,
    hub: PathBuf,
    catalog: PathBuf,
    cache: PathBuf,
}

impl CatalogRun {
    /// `count` products of synthetic seed `seed` in a new scratch directory `name`.
    fn new(name: &str, count: usize, seed: u64) -> Self {
        let dir = scratch(name);
        let (hub, catalog, cache) = (dir.join("hub"), dir.join("catalog"), dir.join("embeddings"));
        synth(&hub, &catalog, count, seed);
        Self {
            dir,
            hub,
            catalog,
            cache,
        }
    }

    /// `trainer fit` of the catalog into `out`, quietly, with `args` after the data flags.
    fn fit(&self, out: &Path, args: &[&str]) -> Output {
        let (data, out, cache) = (s(&self.catalog), s(out), s(&self.cache));
        let mut all = vec![
            "fit",
            "--data",
            &data,
            "--out",
            &out,
            "--quiet",
            "--cache-dir",
            &cache,
        ];
        all.extend_from_slice(args);
        trainer(&self.hub, &all)
    }
}

impl Drop for CatalogRun {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn state(checkpoint: &Path) -> serde_json::Value {
    let bytes = std::fs::read(checkpoint.join("training_state.json")).expect("training state");
    serde_json::from_slice(&bytes).expect("training state JSON")
}

/// (train loss, validation loss) of each finished epoch.
fn history(state: &serde_json::Value) -> Vec<(f64, f64)> {
    state["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| {
            (
                h["train_loss"].as_f64().expect("train_loss"),
                h["val_loss"].as_f64().expect("val_loss"),
            )
        })
        .collect()
}

#[test]
fn fit_resolves_hub_ids_from_the_cache_and_fails_clearly_on_an_absent_one() {
    let dir = scratch("hub-ids");
    let cache = dir.join("hub");
    add_to_cache(&cache, "moda-test/tiny-clip", "clip_quick");
    add_to_cache(&cache, "moda-test/tiny-opt", "opt_preln");
    let catalog = dir.join("catalog");
    synth(&cache, &catalog, 20, 3);

    let run = dir.join("run");
    let fit = |decoder: &str, run: &Path| {
        trainer(
            &cache,
            &[
                "fit",
                "--data",
                &s(&catalog),
                "--out",
                &s(run),
                "--encoder",
                "moda-test/tiny-clip",
                "--decoder",
                decoder,
                "--max-steps",
                "1",
                "--quiet",
                "--cache-dir",
                &s(&dir.join("embeddings")),
            ],
        )
    };
    let out = fit("moda-test/tiny-opt", &run);
    check(&out);
    // The checkpoint holds the cached decoder's weights, shaped by its config.
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("opt_preln/config.json")).expect("fixture config"),
    )
    .expect("fixture config JSON");
    // OPT's token embeddings are `word_embed_proj_dim` wide (hidden_size when absent).
    let width = config["word_embed_proj_dim"]
        .as_u64()
        .or(config["hidden_size"].as_u64())
        .expect("embedding width") as usize;
    let vocab = config["vocab_size"].as_u64().expect("vocab_size") as usize;
    let bytes = std::fs::read(run.join("last/model.safetensors")).expect("checkpoint weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let names = st.names();
    let embed = names
        .iter()
        .find(|n| n.ends_with("embed_tokens.weight"))
        .unwrap_or_else(|| panic!("no token embedding among {names:?}"));
    assert_eq!(st.tensor(embed).expect("embedding").shape(), [vocab, width]);

    // An id that is not in the cache, offline: a clear error naming it, exit status 2, and
    // no output left.
    let absent_run = dir.join("absent-run");
    let out = fit("moda-test/absent", &absent_run);
    let err = check_failed(&out);
    assert!(err.contains("moda-test/absent"), "{}", text(&out));
    assert!(err.contains("offline"), "{}", text(&out));
    assert!(
        err.contains("hf download moda-test/absent"),
        "{}",
        text(&out)
    );
    assert!(
        !absent_run.exists(),
        "an empty output directory was left behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A resumed run keeps its recorded length (the `--epochs` default does not stretch it), and
/// only an explicit `--epochs` changes it; `trainer eval` of its checkpoint writes its
/// predictions into the current directory, not into the checkpoint.
#[test]
fn resume_without_epochs_ends_where_the_run_was_set_to_end() {
    let run = CatalogRun::new("resume-epochs", 24, 5);
    let fit = |out: &Path, extra: &[&str]| run.fit(out, extra);
    let (dir, hub, catalog, cache) = (&run.dir, &run.hub, &run.catalog, &run.cache);
    // 19 training samples in batches of 8: 3 steps per epoch, 6 in the 2-epoch run.
    let two = ["--preset", "tiny", "--epochs", "2", "--batch-size", "8"];
    let straight = dir.join("straight");
    check(&fit(&straight, &two));
    let split = dir.join("split");
    check(&fit(&split, &[&two[..], &["--max-steps", "2"]].concat()));
    assert_eq!(state(&split.join("last"))["step"], 2);

    // `--resume` alone (the recipe's 20 epochs are only the default of --epochs).
    let last = s(&split.join("last"));
    check(&fit(&split, &["--resume", &last]));
    let (a, b) = (state(&straight.join("last")), state(&split.join("last")));
    assert_eq!(
        (&b["epoch"], &b["config"]["epochs"], &b["step"]),
        (
            &serde_json::json!(2),
            &serde_json::json!(2),
            &serde_json::json!(6)
        )
    );
    assert_eq!(history(&a), history(&b));
    assert_eq!(b["finished"], true);

    // An explicit --epochs does change the length.
    check(&fit(&split, &["--resume", &last, "--epochs", "3"]));
    let c = state(&split.join("last"));
    assert_eq!(
        (&c["epoch"], &c["config"]["epochs"]),
        (&serde_json::json!(3), &serde_json::json!(3))
    );
    assert_eq!(history(&c)[..2], history(&a)[..]);

    // `trainer eval` without --predictions: predictions.csv in the current directory.
    let cwd = dir.join("eval");
    std::fs::create_dir_all(&cwd).expect("eval directory");
    let out = trainer_command(
        hub,
        &[
            "eval",
            "--checkpoint",
            &last,
            "--data",
            &s(catalog),
            "--max-new-tokens",
            "4",
            "--cache-dir",
            &s(cache),
            "--quiet",
        ],
    )
    .current_dir(&cwd)
    .output()
    .expect("run the trainer binary");
    check(&out);
    assert!(cwd.join("predictions.csv").is_file(), "{}", text(&out));
    assert!(
        !split.join("last/predictions.csv").exists(),
        "{}",
        text(&out)
    );
}

/// `--no-augment` turns the preset's whole augmentation off (its rotation and scale with its
/// flips and shifts); a rotation asked for without augmentation is refused, naming the flag.
#[test]
fn no_augment_turns_off_the_presets_rotation_and_scale() {
    let run = CatalogRun::new("no-augment", 24, 6);
    let fit = |out: &Path, extra: &[&str]| {
        let one_step = ["--preset", "tiny", "--max-steps", "1", "--batch-size", "8"];
        run.fit(out, &[&one_step[..], extra].concat())
    };
    let dir = &run.dir;
    // The run's recorded augmentation: whether it augments, its rotation and its scale.
    let augment = |out: &Path| {
        let c = &state(&out.join("last"))["config"];
        serde_json::json!([c["augment"], c["augment_rotate"], c["augment_scale"]])
    };
    let preset = dir.join("preset");
    check(&fit(&preset, &[]));
    assert_eq!(augment(&preset), serde_json::json!([true, 10.0, 0.2]));
    let off = dir.join("off");
    check(&fit(&off, &["--no-augment"]));
    assert_eq!(augment(&off), serde_json::json!([false, 0.0, 0.0]));
    let refused = dir.join("refused");
    let err = check_failed(&fit(&refused, &["--no-augment", "--augment-rotate", "5"]));
    assert!(err.contains("--augment"), "{err}");
}

/// `--preset tiny` builds its own backbones: an `--encoder` or `--decoder` it would not read
/// (here paths that do not exist, and a hub id that is not cached) is an error naming it,
/// exit status 2, with no output directory left; with the default ids (not cached here) the
/// preset trains offline.
#[test]
fn the_tiny_preset_refuses_backbones_it_does_not_read() {
    let run = CatalogRun::new("tiny-backbones", 12, 1);
    let out_dir = run.dir.join("run");
    for (flag, value) in [
        ("--encoder", "does/not/exist"),
        ("--decoder", "/no/such/decoder"),
        ("--encoder", "someone/uncached-clip"),
    ] {
        let out = run.fit(
            &out_dir,
            &["--preset", "tiny", flag, value, "--max-steps", "1"],
        );
        let err = check_failed(&out);
        assert!(
            err.contains(flag) && err.contains(value),
            "{flag} {value}: {}",
            text(&out)
        );
        assert!(!out_dir.exists(), "{flag} {value}: output directory left");
    }
    let out = run.fit(&out_dir, &["--preset", "tiny", "--max-steps", "1"]);
    check(&out);
    assert!(out_dir.join("last/training_state.json").is_file());
}

/// Exit statuses: 2 for a usage error (clap's) and for a command that fails; `--help` lists
/// them, the presets and `eval`'s defaults.
#[test]
fn exit_statuses_and_help() {
    let dir = scratch("exit-statuses");
    let hub = dir.join("hub");
    let help = trainer(&hub, &["--help"]);
    check(&help);
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for needle in ["Exit status", "0 ", "1 ", "2 ", "130 "] {
        assert!(help.contains(needle), "{needle:?} not in:\n{help}");
    }

    let fit_help = trainer(&hub, &["fit", "--help"]);
    check(&fit_help);
    let fit_help = String::from_utf8_lossy(&fit_help.stdout).into_owned();
    assert!(fit_help.contains("tiny"), "{fit_help}");

    let eval_help = trainer(&hub, &["eval", "--help"]);
    check(&eval_help);
    let eval_help = String::from_utf8_lossy(&eval_help.stdout).into_owned();
    assert!(eval_help.contains("[default: 32]"), "{eval_help}");
    assert!(eval_help.contains("current directory"), "{eval_help}");

    // An unknown preset is a usage error listing the known ones.
    let out = trainer(
        &hub,
        &[
            "fit",
            "--data",
            &s(&dir),
            "--out",
            &s(&dir.join("run")),
            "--preset",
            "huge",
        ],
    );
    let err = check_failed(&out);
    assert!(
        err.contains("huge") && err.contains("tiny"),
        "{}",
        text(&out)
    );

    // A catalog that does not exist: the command fails.
    let missing = dir.join("no-such-catalog");
    let out = trainer(
        &hub,
        &[
            "fit",
            "--data",
            &s(&missing),
            "--out",
            &s(&dir.join("run")),
            "--preset",
            "tiny",
            "--quiet",
        ],
    );
    let err = check_failed(&out);
    assert!(err.contains("no-such-catalog"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
