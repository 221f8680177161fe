//! Bad input gets a clear error that names the file and the problem, never a panic.

use candle_core::{DType, Device};
use moda_models::opt::OptConfig;
use moda_models::preprocess::{load_image, ImageLimits};
use moda_models::{CaptionModel, ClipVision, Error, Opt};
use moda_tests::{fixture, TempDir};

fn copy_dir(from: &str, to: &std::path::Path) {
    for entry in std::fs::read_dir(fixture(from)).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

fn edit_json(path: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).expect("json")).expect("write");
}

#[test]
fn missing_config_json_is_named() {
    let dir = TempDir::new("noconfig");
    copy_dir("opt_preln", dir.path());
    std::fs::remove_file(dir.path().join("config.json")).expect("rm");
    let err = Opt::from_dir(dir.path(), DType::F32, &Device::Cpu).expect_err("must fail");
    assert!(matches!(err, Error::MissingFile { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn wrong_tensor_shape_names_the_tensor_and_both_shapes() {
    let dir = TempDir::new("shape");
    copy_dir("opt_preln", dir.path());
    let cfg_path = dir.path().join("config.json");
    let ffn = OptConfig::from_file(&cfg_path).expect("config").ffn_dim;
    edit_json(&cfg_path, |v| v["ffn_dim"] = (2 * ffn).into());
    let err = Opt::from_dir(dir.path(), DType::F32, &Device::Cpu).expect_err("must fail");
    let msg = err.to_string();
    match &err {
        Error::TensorShape {
            name,
            expected,
            got,
            ..
        } => {
            assert_eq!(name, "model.decoder.layers.0.fc1.weight");
            assert_eq!(expected[0], 2 * ffn);
            assert_eq!(got[0], ffn);
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert!(
        msg.contains("fc1.weight") && msg.contains(&format!("{}", 2 * ffn)),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_is_an_error() {
    let dir = TempDir::new("trunc");
    copy_dir("opt_preln", dir.path());
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).expect("read");
    std::fs::write(&st, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = Opt::from_dir(dir.path(), DType::F32, &Device::Cpu).expect_err("must fail");
    assert!(matches!(err, Error::BadWeights { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn pth_with_unexpected_keys_lists_them() {
    let err = CaptionModel::from_recipe_checkpoint(
        &fixture("moda/fashion_opt_extra_keys.pth"),
        &fixture("clip_gelu"),
        &fixture("opt_preln"),
        &Device::Cpu,
    )
    .expect_err("must fail");
    match &err {
        Error::UnexpectedKeys { keys, .. } => {
            assert_eq!(
                keys,
                &["extra.bias".to_string(), "extra.weight".to_string()]
            );
        }
        other => panic!("expected unexpected keys, got {other:?}"),
    }
    assert!(
        err.to_string().contains("fashion_opt_extra_keys.pth"),
        "{err}"
    );
}

#[test]
fn garbage_pth_is_an_error_not_a_panic() {
    let dir = TempDir::new("pth");
    let p = dir.path().join("bad.pth");
    // A zip local-file header followed by garbage.
    let mut bytes = b"PK\x03\x04".to_vec();
    bytes.extend(std::iter::repeat_n(0xAB, 200));
    std::fs::write(&p, &bytes).expect("write");
    let err = CaptionModel::from_recipe_checkpoint(
        &p,
        &fixture("clip_gelu"),
        &fixture("opt_preln"),
        &Device::Cpu,
    )
    .expect_err("must fail");
    assert!(err.to_string().contains("bad.pth"), "{err}");
}

#[test]
fn unsupported_hidden_act_is_named() {
    let dir = TempDir::new("act");
    copy_dir("clip_gelu", dir.path());
    edit_json(&dir.path().join("config.json"), |v| {
        v["vision_config"]["hidden_act"] = "swish".into()
    });
    let err = ClipVision::from_dir(dir.path(), DType::F32, &Device::Cpu).expect_err("must fail");
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("hidden_act") && msg.contains("swish") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn a_file_that_is_not_an_image_is_named() {
    let p = fixture("images/not_an_image.jpg");
    let err = load_image(&p, &ImageLimits::default()).expect_err("must fail");
    assert!(matches!(err, Error::Image { .. }), "{err:?}");
    assert!(err.to_string().contains("not_an_image.jpg"), "{err}");
}

/// Every input of the fuzz corpora and of the crashes found by fuzzing
/// (`tests/fuzz/corpus/<target>/`, `tests/fuzz/regressions/<target>/`) goes through its
/// target's body again (`moda_tests::fuzz`): each must return; a panic fails this test. A
/// target without a non-empty corpus fails it too, so that no target goes unreplayed.
#[test]
fn fuzz_corpora_and_regressions_replay() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let files = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.retain(|p| p.is_file());
        v.sort();
        v
    };
    let mut declared: Vec<String> = files(&fuzz.join("fuzz_targets"))
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    declared.sort();
    let mut known: Vec<String> = moda_tests::fuzz::TARGETS
        .iter()
        .map(|(name, _)| name.to_string())
        .collect();
    known.sort();
    assert_eq!(
        declared, known,
        "tests/fuzz/fuzz_targets/ and moda_tests::fuzz::TARGETS differ"
    );
    for (name, target) in moda_tests::fuzz::TARGETS {
        let corpus = files(&fuzz.join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "the fuzz target {name} has no corpus in tests/fuzz/corpus/{name}/"
        );
        let regressions = files(&fuzz.join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("read a fuzz input");
            let run = std::panic::catch_unwind(|| target(&data));
            assert!(
                run.is_ok(),
                "fuzz target {name} panicked on {}",
                path.display()
            );
        }
        eprintln!(
            "fuzz target {name}: {} corpus inputs, {} regressions",
            corpus.len(),
            regressions.len()
        );
    }
    moda_tests::fuzz::remove_scratch_dir();
}
