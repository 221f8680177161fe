//! The training side of `trainer`: one optimisation step against PyTorch, the checkpoint
//! directory against the original recipe's `.pth`, exact resume, a short end-to-end run on a
//! synthetic catalog, and a clear error for an output directory that cannot be written.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use moda_models::checkpoint::{self, CheckpointConfig, CheckpointContents, EncoderInfo};
use moda_models::preprocess::ImageProcessorConfig;
use moda_models::tokenizer::ModaTokenizer;
use moda_models::{ClipVisionConfig, Moda, OptConfig, ProjectorConfig, Weights};
use moda_tests::training::{evaluate_val, fit_options, run_fit, step_records, synth_catalog};
use moda_tests::{fixture, get, load_refs, max_abs_diff, TempDir};
use trainer::fit::{fit, FitConfig};

#[test]
fn two_adamw_steps_match_pytorch() {
    moda_tests::parity::two_adamw_steps(&Device::Cpu);
}

fn recipe_checkpoint_config() -> CheckpointConfig {
    let enc = fixture("clip_gelu");
    let dcfg = OptConfig::from_file(&fixture("opt_preln/config.json")).expect("opt config");
    let ecfg = ClipVisionConfig::from_file(&enc.join("config.json")).expect("clip config");
    let pcfg = ProjectorConfig::new(ecfg.projection_dim, dcfg.embed_dim());
    CheckpointConfig::new(
        EncoderInfo {
            config: ecfg,
            source: enc.display().to_string(),
            embedded: false,
            trained: false,
        },
        dcfg,
        pcfg,
        ImageProcessorConfig::from_dir_or_default(&enc).expect("preprocessor"),
    )
}

fn reference_logits(model: &Moda) -> Tensor {
    let refs = load_refs("moda/reference.safetensors");
    let ids = get(&refs, "input_ids");
    let t = ids.dim(1).expect("t");
    let text_mask = get(&refs, "attention_mask").narrow(1, 1, t).expect("mask");
    let prefix = model.project(get(&refs, "image_embeds")).expect("prefix");
    let batch = model.build_batch(&prefix, ids, &text_mask).expect("batch");
    model.logits(&batch).expect("logits")
}

#[test]
fn recipe_pth_and_our_checkpoint_load_the_same_model() {
    let dev = Device::Cpu;
    let tmp = TempDir::new("ckpt");
    let pth = fixture("moda/fashion_opt.pth");
    let from_pth =
        Moda::from_recipe_checkpoint(&pth, &fixture("clip_gelu"), &fixture("opt_preln"), &dev)
            .expect("pth");
    let weights = Weights::from_file(&pth).expect("weights");
    let tensors = checkpoint::recipe_state_dict(&weights, true).expect("state dict");
    let tokenizer = ModaTokenizer::from_dir(&fixture("opt_preln")).expect("tokenizer");
    let cfg = recipe_checkpoint_config();
    let dir = tmp.path().join("ckpt");
    let contents = CheckpointContents {
        config: &cfg,
        model: &tensors,
        encoder: None,
        tokenizer: &tokenizer,
        extra_files: vec![],
        extra_tensors: vec![],
    };
    checkpoint::save(&dir, &contents).expect("save");
    // Saved again over itself: replaced atomically, no temporary left behind.
    checkpoint::save(&dir, &contents).expect("save again");
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["ckpt".to_string()]);

    // The recipe's names; the tied head and the `embed_tokens` alias are not stored.
    let stored = Weights::from_file(&dir.join(checkpoint::MODEL_FILE)).expect("stored");
    assert!(stored.contains("opt.model.decoder.embed_tokens.weight"));
    assert!(stored.contains("projection.2.bias"));
    assert!(!stored.contains("opt.lm_head.weight") && !stored.contains("embed_tokens.weight"));

    let loaded = checkpoint::load(&dir, &dev).expect("load");
    assert_eq!(loaded.config, cfg);
    let a = reference_logits(&from_pth);
    let b = reference_logits(&loaded.model);
    assert_eq!(max_abs_diff(&a, &b), 0.0, "logits differ");
    let ids = loaded
        .tokenizer
        .encode("Blue Casual Jeans")
        .expect("encode");
    assert_eq!(ids, tokenizer.encode("Blue Casual Jeans").expect("encode"));

    // An embedded encoder (as the tiny preset or --train-encoder write) loads to the same.
    let enc_w = Weights::from_dir(&fixture("clip_gelu")).expect("clip weights");
    let enc: BTreeMap<String, Tensor> = enc_w
        .names()
        .into_iter()
        .filter(|n| {
            (n.starts_with("vision_model.") || n == "visual_projection.weight")
                && !n.ends_with("position_ids")
        })
        .map(|n| {
            use candle_nn::var_builder::SimpleBackend;
            let t = enc_w.get_unchecked(&n, DType::F32, &dev).expect("tensor");
            (n, t)
        })
        .collect();
    let mut cfg2 = cfg.clone();
    cfg2.encoder.embedded = true;
    cfg2.encoder.source = checkpoint::ENCODER_DIR.into();
    let dir2 = tmp.path().join("embedded");
    checkpoint::save(
        &dir2,
        &CheckpointContents {
            config: &cfg2,
            model: &tensors,
            encoder: Some(&enc),
            tokenizer: &tokenizer,
            extra_files: vec![],
            extra_tensors: vec![],
        },
    )
    .expect("save embedded");
    let loaded2 = checkpoint::load(&dir2, &dev).expect("load embedded");
    let refs = load_refs("clip_gelu/reference.safetensors");
    let px = get(&refs, "pixel_values.photo.jpg");
    let d = max_abs_diff(
        &from_pth.encode_images(px).expect("a"),
        &loaded2.model.encode_images(px).expect("b"),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn resume_continues_exactly() {
    let tmp = TempDir::new("resume");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 48, 3);
    let cache = tmp.path().join("cache");
    // 38 training samples, batches of 8: 5 micro-batches, 3 steps per epoch. Dropout on, so
    // its generator's state must be restored too, and the encoder trains, so its weights and
    // moments must be, with the images augmented (flips and shifts drawn per micro-batch).
    // Stop mid-epoch 2.
    let cfg = FitConfig {
        epochs: 4,
        batch_size: 8,
        grad_accum: 2,
        dropout: Some(0.1),
        train_encoder: true,
        augment: true,
        max_steps: Some(8),
        ..FitConfig::tiny()
    };
    let straight = tmp.path().join("straight");
    run_fit(&cat, &straight, &cache, &cfg, None, &Device::Cpu);
    let split = tmp.path().join("split");
    let half = FitConfig {
        max_steps: Some(4),
        ..cfg.clone()
    };
    run_fit(&cat, &split, &cache, &half, None, &Device::Cpu);
    let state = trainer::fit::read_state(&split.join("last")).expect("state");
    assert_eq!((state.step, state.epoch, state.batch_pos), (4, 1, 2));
    run_fit(
        &cat,
        &split,
        &cache,
        &cfg,
        Some(&split.join("last")),
        &Device::Cpu,
    );

    for file in [
        "model.safetensors",
        "encoder/model.safetensors",
        "optimizer.safetensors",
    ] {
        let a = Weights::from_file(&straight.join("last").join(file)).expect("a");
        let b = Weights::from_file(&split.join("last").join(file)).expect("b");
        assert_eq!(a.names(), b.names());
        use candle_nn::var_builder::SimpleBackend;
        for n in a.names() {
            let x = a.get_unchecked(&n, DType::F32, &Device::Cpu).expect("x");
            let y = b.get_unchecked(&n, DType::F32, &Device::Cpu).expect("y");
            assert_eq!(
                max_abs_diff(&x, &y),
                0.0,
                "{file}: {n} differs after resume"
            );
        }
    }
    let sa = trainer::fit::read_state(&straight.join("last")).expect("a");
    let sb = trainer::fit::read_state(&split.join("last")).expect("b");
    assert_eq!(sa.step, 8);
    assert_eq!(
        (sa.step, sa.epoch, sa.batch_pos, sa.dropout_state),
        (sb.step, sb.epoch, sb.batch_pos, sb.dropout_state)
    );
}

/// `--data-parallel`: a micro-batch split into shards on threads has the loss and gradients
/// of the whole (dropout and augmentation off, so that only the arithmetic differs). Checked
/// through the logged step loss and gradient norm (before clipping, so it sees the gradients'
/// scale and the shards' weights): step 1 runs on the same weights, so it differs only by
/// summation order (f32 sums over ~400 tokens: relative 1e-5); the next steps run on weights
/// after AdamW updates from those gradients, where sign-like updates of near-zero gradients may
/// differ (relative 1e-3).
#[test]
fn data_parallel_shards_equal_one_batch() {
    let tmp = TempDir::new("shards");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 40, 5);
    let cache = tmp.path().join("cache");
    let base = FitConfig {
        epochs: 1,
        batch_size: 11,
        grad_accum: 1,
        dropout: Some(0.0),
        augment: false,
        max_steps: Some(3),
        ..FitConfig::tiny()
    };
    let mut records = Vec::new();
    for shards in [1, 3] {
        let out = tmp.path().join(format!("run{shards}"));
        let cfg = FitConfig {
            data_parallel: shards,
            ..base.clone()
        };
        run_fit(&cat, &out, &cache, &cfg, None, &Device::Cpu);
        records.push(step_records(&out));
    }
    let (one, three) = (&records[0], &records[1]);
    assert_eq!((one.len(), three.len()), (3, 3));
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
    assert!(
        rel(one[0].0, three[0].0) <= 1e-5,
        "step 1 loss {one:?} vs {three:?}"
    );
    assert!(
        rel(one[0].1, three[0].1) <= 1e-5,
        "step 1 grad norm {one:?} vs {three:?}"
    );
    for k in 1..3 {
        assert!(
            rel(one[k].0, three[k].0) <= 1e-3,
            "step {} loss {one:?} vs {three:?}",
            k + 1
        );
        assert!(
            rel(one[k].1, three[k].1) <= 1e-3,
            "step {} norm {one:?} vs {three:?}",
            k + 1
        );
    }
}

/// The preset's sample budget sets the epochs from the catalog's size: 40 products, 32 of
/// them for training, and a budget of 70 samples give ceil(70 / 32) = 3 epochs, not 180.
#[test]
fn sample_budget_sets_the_epochs() {
    let tmp = TempDir::new("budget");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 40, 8);
    let out = tmp.path().join("run");
    let cfg = FitConfig {
        sample_budget: Some(70),
        batch_size: 16,
        ..FitConfig::tiny()
    };
    assert_eq!(cfg.epochs, 180);
    let cache = tmp.path().join("cache");
    run_fit(&cat, &out, &cache, &cfg, None, &Device::Cpu);
    let state = trainer::fit::read_state(&out.join("last")).expect("state");
    assert_eq!((state.config.epochs, state.history.len()), (3, 3));
}

#[test]
fn tiny_preset_learns_on_a_synthetic_catalog() {
    let tmp = TempDir::new("e2e");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 160, 11);
    let out = tmp.path().join("run");
    let cfg = FitConfig {
        epochs: 4,
        ..FitConfig::tiny()
    };
    let cache = tmp.path().join("cache");
    run_fit(&cat, &out, &cache, &cfg, None, &Device::Cpu);
    let state = trainer::fit::read_state(&out.join("last")).expect("state");
    assert_eq!(state.history.len(), 4);
    let first = state.history[0].val_loss;
    let last = state.history[3].val_loss;
    assert!(last < 0.8 * first, "validation loss {first} -> {last}");
    assert!(out.join("loss.png").is_file() && out.join("metrics.jsonl").is_file());
    assert!(out.join("best/config.json").is_file());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    let epochs = metrics
        .lines()
        .filter(|l| l.contains("\"kind\":\"epoch\""))
        .count();
    assert_eq!(epochs, 4, "{metrics}");

    // The checkpoint evaluates (greedy descriptions, scores, predictions CSV).
    let report = evaluate_val(&out.join("best"), &cat, &cache, &Device::Cpu);
    assert_eq!(report.samples, 32);
    assert_eq!(report.attributes.len(), 6);
    assert!(out.join("predictions.csv").is_file());
}

#[test]
fn unwritable_output_directory_is_a_clear_error() {
    let tmp = TempDir::new("readonly");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 8, 1);
    // /proc refuses new directories even to root.
    let out = Path::new("/proc/moda-trainer-test/out");
    let opts = fit_options(&cat, out, &tmp.path().join("cache"), None, &Device::Cpu);
    let err = fit(&FitConfig::tiny(), &opts).expect_err("must fail");
    let msg = err.to_string();
    assert!(
        matches!(err, trainer::Error::OutputNotWritable { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("/proc/moda-trainer-test/out") && msg.contains("cannot be created or written")
    );
}

#[test]
fn non_finite_loss_stops_with_a_clear_error() {
    let tmp = TempDir::new("nan");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 24, 2);
    let out = tmp.path().join("run");
    // An absurd learning rate: the weights explode after the first step.
    let cfg = FitConfig {
        lr: 1e30,
        batch_size: 4,
        grad_accum: 1,
        ..FitConfig::tiny()
    };
    let opts = fit_options(&cat, &out, &tmp.path().join("cache"), None, &Device::Cpu);
    let err = fit(&cfg, &opts).expect_err("must stop");
    assert!(matches!(err, trainer::Error::NonFiniteLoss { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("stopped without saving"), "{msg}");
    assert!(!out.join("last").exists());
}
