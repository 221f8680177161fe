//! `trainer fit --resume` through the binary: a resumed run keeps its recorded length (the
//! `--epochs` default does not stretch it), and only an explicit `--epochs` changes it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moda-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .env("RAYON_NUM_THREADS", "1")
        .args(args)
        .output()
        .expect("run the trainer binary")
}

fn check(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
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
fn resume_without_epochs_ends_where_the_run_was_set_to_end() {
    let dir = scratch("resume-epochs");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let catalog = dir.join("catalog");
    check(&trainer(&[
        "synth",
        "--out",
        &s(&catalog),
        "--count",
        "24",
        "--seed",
        "5",
    ]));
    let cache = dir.join("embeddings");
    let fit = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "fit".to_string(),
            "--data".into(),
            s(&catalog),
            "--out".into(),
            s(out),
            "--quiet".into(),
            "--cache-dir".into(),
            s(&cache),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        trainer(&args)
    };
    // 19 training samples in batches of 8: 3 steps per epoch, 6 in the 2-epoch run.
    let run = ["--preset", "tiny", "--epochs", "2", "--batch-size", "8"];
    let straight = dir.join("straight");
    check(&fit(&straight, &run));
    let split = dir.join("split");
    check(&fit(&split, &[&run[..], &["--max-steps", "2"]].concat()));
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
    let _ = std::fs::remove_dir_all(&dir);
}
