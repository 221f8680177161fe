//! The output directory of a run: the checks that it is apart from the inputs and holds only a
//! run's files, the metrics file (one JSON record per optimizer step and per epoch, appended
//! so that a crash tears at most the last line) and its repair when a run resumes.

use std::io::Write;
use std::path::Path;

use moda_models::checkpoint::{self, CheckpointConfig};

use crate::error::{Error, Result};

use super::config::FitConfig;
use super::state::TrainState;
use super::{FitOptions, Log};

/// The metrics file in the output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The loss plot in the output directory.
pub const PLOT_FILE: &str = "loss.png";

/// Refuses an output directory that is, contains or lies inside what the run reads (the
/// catalog, a local encoder or decoder, the checkpoint it resumes, unless that is the run's
/// own `best/` or `last/`), and an existing one that holds anything but a run's files: the run
/// replaces `best/` and `last/` and rewrites the metrics and the plot.
pub(super) fn check_run_dir(
    cfg: &FitConfig,
    opts: &FitOptions,
    resume: Option<&Path>,
) -> Result<()> {
    let out = &opts.out;
    let apart = |what: &str, input: &Path| -> Result<()> {
        match moda_models::files::overlap(out, input) {
            None => Ok(()),
            Some(relation) => Err(Error::OutputOverlapsInput {
                flag: "--out",
                out: out.clone(),
                relation,
                what: what.to_string(),
                input: input.to_path_buf(),
            }),
        }
    };
    for (what, input) in opts.source.inputs() {
        apart(what, &input)?;
    }
    match resume {
        Some(dir) => {
            // `--resume OUT/last` (or `OUT/best`, or the `.last.old` a crash left) continues a
            // run in its own directory: the checkpoint is read whole before it is replaced.
            let own = ["best", "last", ".best.old", ".last.old"]
                .iter()
                .any(|n| moda_models::files::overlap(&out.join(n), dir) == Some("is"));
            if !own {
                apart("checkpoint being resumed", dir)?;
            }
            if let Ok(ck) = CheckpointConfig::from_dir(dir) {
                let source = Path::new(&ck.encoder.source);
                if !ck.encoder.embedded && source.exists() {
                    apart("encoder of the checkpoint being resumed", source)?;
                }
            }
        }
        None if cfg.preset.is_none() => {
            for (what, name) in [("encoder", &cfg.encoder), ("decoder", &cfg.decoder)] {
                let path = Path::new(name);
                if path.exists() {
                    apart(what, path)?;
                }
            }
        }
        None => {}
    }
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    let foreign: Vec<String> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            match name.as_ref() {
                // Temporaries (checkpoints being written, metrics being repaired).
                n if n.starts_with('.') => false,
                "best" | "last" => !e.path().join(checkpoint::CONFIG_FILE).is_file(),
                METRICS_FILE | PLOT_FILE => !e.path().is_file(),
                _ => true,
            }
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if let Some(first) = foreign.first() {
        return Err(Error::OutputNotReplaceable {
            path: out.clone(),
            msg: format!(
                "not a training run's directory: it holds {first:?}{} (a run's directory holds \
                 only the checkpoints best/ and last/, {METRICS_FILE} and {PLOT_FILE}); \
                 `trainer fit` would write among them and replace any best/ or last/: choose a \
                 new or empty --out",
                match foreign.len() {
                    1 => String::new(),
                    n => format!(" and {} other entries", n - 1),
                }
            ),
        });
    }
    Ok(())
}

pub(super) fn ensure_writable(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| Error::OutputNotWritable {
        path: out.to_path_buf(),
        source,
    })?;
    let probe = out.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|source| Error::OutputNotWritable {
        path: out.to_path_buf(),
        source,
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Appends one record to the metrics file as one line written by one `write_all` of the
/// whole line, newline included, on an unbuffered file opened for appending: a crash leaves
/// either the whole line or a torn last line, which [`repair_metrics`] drops, never two
/// records glued together.
pub(super) fn append_metric(out: &Path, value: &serde_json::Value) -> Result<()> {
    let path = out.join(METRICS_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    write_record(&mut f, value).map_err(|e| Error::io(&path, e))
}

/// Writes `value` and a newline with a single `write_all`.
pub(super) fn write_record(w: &mut impl Write, value: &serde_json::Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())
}

/// What [`repair_metrics`] dropped from a metrics file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsRepair {
    /// The step the file was cut back to.
    pub step: u64,
    /// Records kept.
    pub kept: usize,
    /// Complete records after the state (step or epoch beyond it).
    pub after: usize,
    /// A last line without its newline (a write cut short).
    pub torn: bool,
    /// Complete lines that are not a record (not JSON, or no `step`).
    pub unreadable: usize,
}

impl MetricsRepair {
    /// A line for the log, when anything was dropped.
    pub fn message(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.after > 0 {
            parts.push(format!(
                "{} record(s) after step {}, where this run starts",
                self.after, self.step
            ));
        }
        if self.unreadable > 0 {
            parts.push(format!("{} unreadable line(s)", self.unreadable));
        }
        if self.torn {
            parts.push("a torn last line".to_string());
        }
        (!parts.is_empty()).then(|| format!("{METRICS_FILE}: dropped {}", parts.join(", ")))
    }
}

/// Cuts a metrics file back to a run state of `step` optimizer steps and `epochs` finished
/// epochs: keeps the step records up to `step` and the epoch records up to `epochs`, and drops
/// the rest, a torn last line and lines that are not records. A run resumed from a checkpoint
/// then writes each step's record once; a new run (`0, 0`) starts an empty file. The file is
/// rewritten (a temporary file renamed over it) only when something is dropped.
pub fn repair_metrics(path: &Path, step: u64, epochs: usize) -> Result<MetricsRepair> {
    // A regular file only (a FIFO or a device in the output directory is refused), of at
    // most 1 GiB (millions of steps).
    let bytes = match moda_models::files::read_bounded(path, 1 << 30) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(MetricsRepair::default()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut repair = MetricsRepair {
        step,
        ..MetricsRepair::default()
    };
    let mut kept = Vec::with_capacity(bytes.len());
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            repair.torn = true;
            break;
        };
        let (line, tail) = rest.split_at(end + 1);
        rest = tail;
        let record: Option<serde_json::Value> = serde_json::from_slice(line).ok();
        let at = record.as_ref().and_then(|v| {
            let step = v.get("step")?.as_u64()?;
            let epoch = v.get("epoch").and_then(serde_json::Value::as_u64);
            Some((
                v.get("kind").and_then(serde_json::Value::as_str) == Some("epoch"),
                step,
                epoch,
            ))
        });
        match at {
            None => repair.unreadable += 1,
            Some((is_epoch, s, e)) => {
                let keep = if is_epoch {
                    e.is_some_and(|e| e <= epochs as u64) && s <= step
                } else {
                    s <= step
                };
                if keep {
                    kept.extend_from_slice(line);
                    repair.kept += 1;
                } else {
                    repair.after += 1;
                }
            }
        }
    }
    if repair.message().is_some() {
        let tmp = path.with_file_name(format!(".{METRICS_FILE}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, &kept).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })?;
    }
    Ok(repair)
}

/// Removes what a run killed while writing left in the output directory (temporary
/// checkpoints and metrics files), and cuts the metrics file back to where the state stands:
/// records after it (written after the checkpoint, or by an earlier run in this directory)
/// and a torn last line go.
pub(super) fn clean_output(opts: &FitOptions, state: &TrainState, log: &mut Log) -> Result<()> {
    let metrics_tmp = format!(".{METRICS_FILE}.tmp-");
    for stale in ["best", "last"]
        .into_iter()
        .flat_map(|d| checkpoint::remove_stale_temporaries(&opts.out.join(d)))
        .chain(moda_models::files::remove_stale(&opts.out, &metrics_tmp))
    {
        log.warn(stale.to_string());
    }
    let repair = repair_metrics(&opts.out.join(METRICS_FILE), state.step, state.epoch)?;
    if let Some(msg) = repair.message() {
        log.warn(msg);
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Counts the `write` calls it gets.
    struct CountingWriter {
        bytes: Vec<u8>,
        writes: usize,
    }

    impl Write for CountingWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_metrics_record_is_one_write() {
        let mut w = CountingWriter {
            bytes: Vec::new(),
            writes: 0,
        };
        let value = serde_json::json!({"kind": "step", "epoch": 1, "step": 7, "loss": 0.5});
        write_record(&mut w, &value).unwrap();
        assert_eq!(w.writes, 1, "the line and its newline in one write");
        assert_eq!(String::from_utf8(w.bytes).unwrap(), format!("{value}\n"));
    }

    #[test]
    fn metrics_are_cut_back_to_the_state() {
        let dir = std::env::temp_dir().join(format!("moda-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(METRICS_FILE);
        let step = |s: u64, e: u64| format!("{{\"kind\":\"step\",\"epoch\":{e},\"step\":{s}}}\n");
        let epoch = |e: u64, s: u64| format!("{{\"kind\":\"epoch\",\"epoch\":{e},\"step\":{s}}}\n");
        let kept = [step(1, 1), step(2, 1), epoch(1, 2), step(3, 2)].concat();
        let text = [
            kept.clone(),
            step(4, 2),
            epoch(2, 4),
            "not json\n".to_string(),
            step(5, 3),
            "{\"kind\":\"step\",\"ep".to_string(),
        ]
        .concat();
        std::fs::write(&path, &text).unwrap();
        // A state at step 3, one epoch finished.
        let r = repair_metrics(&path, 3, 1).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), kept);
        assert_eq!((r.kept, r.after, r.unreadable, r.torn), (4, 3, 1, true));
        let msg = r.message().unwrap();
        assert!(
            msg.contains("3 record(s) after step 3") && msg.contains("torn"),
            "{msg}"
        );
        // Nothing to drop: the file is left alone.
        let r = repair_metrics(&path, 3, 1).unwrap();
        assert_eq!((r.kept, r.message()), (4, None));
        // An epoch record is kept only when its epoch is finished in the state, even at the
        // state's step (the run stopped at the epoch's last step, before validation).
        let r = repair_metrics(&path, 2, 0).unwrap();
        assert_eq!(r.after, 2);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            [step(1, 1), step(2, 1)].concat()
        );
        // A new run starts an empty file; no file is nothing to do.
        repair_metrics(&path, 0, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            repair_metrics(&path, 0, 0).unwrap(),
            MetricsRepair::default()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
