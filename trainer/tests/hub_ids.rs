//! `trainer fit --encoder ID --decoder ID` with Hugging Face hub ids, resolved offline from a
//! hub cache laid out as `huggingface_hub` writes it (`models--owner--name/refs/main` naming a
//! snapshot directory). The models are the tiny CLIP and OPT fixtures of `tests/fixtures`.

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

/// Runs the trainer binary offline against `cache`, with no other hub settings inherited.
fn trainer(cache: &Path, args: &[&str]) -> Output {
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
        .args(args)
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

#[test]
fn fit_resolves_hub_ids_from_the_cache_and_fails_clearly_on_an_absent_one() {
    let dir = scratch("hub-ids");
    let cache = dir.join("hub");
    add_to_cache(&cache, "moda-test/tiny-clip", "clip_quick");
    add_to_cache(&cache, "moda-test/tiny-opt", "opt_preln");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let catalog = dir.join("catalog");
    let out = trainer(
        &cache,
        &[
            "synth",
            "--out",
            &s(&catalog),
            "--count",
            "20",
            "--seed",
            "3",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

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
    assert!(out.status.success(), "{}", text(&out));
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

    // An id that is not in the cache, offline: a clear error naming it, and no output left.
    let absent_run = dir.join("absent-run");
    let out = fit("moda-test/absent", &absent_run);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("moda-test/absent"), "{}", text(&out));
    assert!(err.contains("offline"), "{}", text(&out));
    assert!(!err.contains("panicked"), "{}", text(&out));
    assert!(
        !absent_run.exists(),
        "an empty output directory was left behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
