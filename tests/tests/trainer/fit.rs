//! The training side of `trainer`: one optimisation step against PyTorch, the checkpoint
//! directory against the original recipe's `.pth`, exact resume, a short end-to-end run on a
//! synthetic catalog, and a clear error for an output directory that cannot be written.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use moda_models::checkpoint::{self, CheckpointConfig, CheckpointContents, EncoderInfo};
use moda_models::preprocess::ImageProcessorConfig;
use moda_models::tokenizer::ModaTokenizer;
use moda_models::{CaptionModel, ClipVisionConfig, OptConfig, ProjectorConfig, Weights};
use moda_tests::training::{evaluate_val, fit_options, run_fit, step_records, synth_catalog};
use moda_tests::{fixture, get, load_refs, max_abs_diff, TempDir};
use trainer::data::{load_catalog, CaptionTemplate, CatalogSource, LoadOptions, Split, KAGGLE_CSV};
use trainer::eval::{evaluate, EvalOptions, EvalSplit};
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

fn reference_logits(model: &CaptionModel) -> Tensor {
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
    let from_pth = CaptionModel::from_recipe_checkpoint(
        &pth,
        &fixture("clip_gelu"),
        &fixture("opt_preln"),
        &dev,
    )
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
        augment_rotate: 0.0,
        augment_scale: 0.0,
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
/// them for training, and a budget of 70 samples give ceil(70 / 32) = 3 epochs, not 270.
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
    assert_eq!(cfg.epochs, 270);
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
    let epochs: Vec<serde_json::Value> = metrics
        .lines()
        .filter(|l| l.contains("\"kind\":\"epoch\""))
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect();
    assert_eq!(epochs.len(), 4, "{metrics}");
    // Each epoch says where its time went: the parts measured add up to no more than the
    // epoch's wall time, the micro-batches take some of it, and the CPU shares (read from
    // /proc/stat on Linux) are shares.
    for e in &epochs {
        let p = &e["profile"];
        let part = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("{k} in {e}"));
        let seconds = e["seconds"].as_f64().expect("seconds");
        let parts = part("micro_batches_s") + part("optimizer_s") + part("validation_s");
        assert!(
            part("micro_batches_s") > 0.0 && part("validation_s") > 0.0,
            "{e}"
        );
        assert!(parts <= seconds + 1e-6, "{e}");
        assert!((parts + part("other_s") - seconds).abs() < 0.05, "{e}");
        for k in ["cpu_busy", "cpu_steal"] {
            let share = part(k);
            assert!((0.0..=1.0).contains(&share), "{k} {share} in {e}");
        }
        assert!(part("cpus") >= 1.0, "{e}");
    }

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

/// Rewrites the catalog's `fashion.csv` with `ProductId` set by `id(row index)`.
fn set_product_ids(dir: &Path, id: impl Fn(usize) -> String) {
    let csv_path = dir.join(KAGGLE_CSV);
    let mut r = csv::Reader::from_path(&csv_path).expect("csv");
    let headers = r.headers().expect("headers").clone();
    let col = headers
        .iter()
        .position(|h| h == "ProductId")
        .expect("ProductId");
    let records: Vec<csv::StringRecord> = r.records().map(|x| x.expect("record")).collect();
    let mut w = csv::Writer::from_path(&csv_path).expect("csv writer");
    w.write_record(&headers).expect("header");
    for (i, rec) in records.iter().enumerate() {
        let row: Vec<String> = rec
            .iter()
            .enumerate()
            .map(|(j, v)| if j == col { id(i) } else { v.to_string() })
            .collect();
        w.write_record(&row).expect("row");
    }
    w.flush().expect("flush");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let p = e.expect("entry").path();
        let dest = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).expect("copy");
        }
    }
}

fn eval_options(checkpoint: &Path, catalog: &Path, cache: &Path) -> EvalOptions {
    EvalOptions {
        checkpoint: checkpoint.to_path_buf(),
        source: CatalogSource::Kaggle {
            dir: catalog.to_path_buf(),
            template: CaptionTemplate::default(),
        },
        template: None,
        split: EvalSplit::Val,
        predictions: checkpoint.join("predictions.csv"),
        device: Device::Cpu,
        cache_dir: cache.to_path_buf(),
        max_new_tokens: 8,
        num_beams: 1,
        constrain: moda_models::generate::Constrain::Auto,
        batch_size: 16,
        progress: false,
    }
}

/// A catalog whose ids repeat (rows 2k and 2k+1 share one): `fit` warns, naming the ids and
/// their rows, holds out 8 of 40 rows and records them, and `eval` scores exactly those 8 (it
/// scored every row of a held-out id, training rows among them). A checkpoint of an older
/// trainer (ids only) gets its run's split back from the seed on the same catalog, or, on a
/// changed one, the id-based split with warnings; a checkpoint without a training state says
/// it records no split and what to pass instead.
#[test]
fn repeated_ids_keep_the_recorded_split() {
    let tmp = TempDir::new("dup-ids-fit");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 40, 4);
    set_product_ids(&cat, |i| format!("P{}", i / 2));
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("run");
    let cfg = FitConfig {
        epochs: 1,
        batch_size: 16,
        sample_budget: None,
        ..FitConfig::tiny()
    };
    let report = fit(&cfg, &fit_options(&cat, &out, &cache, None, &Device::Cpu)).expect("fit");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("20 id(s)") && w.contains("\"P0\" (2 rows)")),
        "{:?}",
        report.warnings
    );
    let state = trainer::fit::read_state(&out.join("last")).expect("state");
    assert_eq!(state.validation_rows.len(), 8);
    let catalog = load_catalog(
        &CatalogSource::Kaggle {
            dir: cat.clone(),
            template: CaptionTemplate::default(),
        },
        &LoadOptions::default(),
    )
    .expect("catalog");
    let by_id = Split::from_ids(&catalog, &state.validation_ids).0;
    assert!(by_id.validation.len() > 8, "the ids leak: {by_id:?}");

    let report = evaluate(&eval_options(&out.join("last"), &cat, &cache)).expect("eval");
    assert_eq!(report.samples, 8);
    let predicted: Vec<String> = csv::Reader::from_path(out.join("last/predictions.csv"))
        .expect("predictions")
        .records()
        .map(|r| r.expect("row")[1].to_string())
        .collect();
    let held_out: Vec<String> = state
        .validation_rows
        .iter()
        .map(|k| catalog.samples[k.row].image.display().to_string())
        .collect();
    assert_eq!(predicted, held_out);

    // Resumed for one more epoch: the same rows, still recorded as rows.
    let mut opts = fit_options(&cat, &out, &cache, Some(&out.join("last")), &Device::Cpu);
    opts.resume_epochs = Some(2);
    fit(&cfg, &opts).expect("resume");
    let resumed = trainer::fit::read_state(&out.join("last")).expect("state");
    assert_eq!(resumed.epoch, 2);
    assert_eq!(resumed.validation_rows, state.validation_rows);

    // An older trainer's checkpoint: validation ids only.
    let legacy = tmp.path().join("legacy");
    copy_dir(&out.join("last"), &legacy);
    let state_path = legacy.join(trainer::fit::STATE_FILE);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).expect("read")).expect("json");
    json.as_object_mut()
        .expect("object")
        .remove("validation_rows");
    std::fs::write(&state_path, json.to_string()).expect("write");
    let report = evaluate(&eval_options(&legacy, &cat, &cache)).expect("eval legacy");
    assert_eq!(report.samples, 8, "the run's split, from its seed");
    assert!(report.warnings.iter().all(|w| !w.contains("older")));
    // ... on a changed catalog (a training row whose id is not held out removed): by id, with
    // warnings that say so and name the shared ids.
    let held: Vec<&str> = state.validation_ids.iter().map(String::as_str).collect();
    let gone = (0..40)
        .find(|&i| !held.contains(&format!("P{}", i / 2).as_str()))
        .expect("a training pair");
    let text = std::fs::read_to_string(cat.join(KAGGLE_CSV)).expect("csv");
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(n, _)| *n != gone + 1)
        .map(|(_, l)| l)
        .collect();
    std::fs::write(cat.join(KAGGLE_CSV), kept.join("\n") + "\n").expect("write csv");
    let report = evaluate(&eval_options(&legacy, &cat, &cache)).expect("eval legacy");
    assert_eq!(report.samples, by_id.validation.len());
    let all = report.warnings.join("\n");
    assert!(all.contains("older trainer"), "{all}");
    assert!(
        all.contains("(2 rows)") && all.contains("rows the run trained on"),
        "{all}"
    );
    // ... and the new checkpoint on that changed catalog: the rows moved, an error that says
    // which.
    let err = evaluate(&eval_options(&out.join("best"), &cat, &cache)).expect_err("moved rows");
    assert!(matches!(err, trainer::Error::SplitMismatch(_)), "{err}");
    assert!(err.to_string().contains("--split all"), "{err}");

    // No training state: no recorded split, and what to do instead.
    let bare = tmp.path().join("bare");
    copy_dir(&out.join("last"), &bare);
    std::fs::remove_file(bare.join(trainer::fit::STATE_FILE)).expect("rm state");
    let err = evaluate(&eval_options(&bare, &cat, &cache)).expect_err("no split");
    let msg = err.to_string();
    assert!(
        matches!(err, trainer::Error::NoRecordedSplit { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("no recorded train/validation split") && msg.contains("--split all"),
        "{msg}"
    );
    assert!(!msg.contains("resume"), "{msg}");
    let mut all_opts = eval_options(&bare, &cat, &cache);
    all_opts.split = EvalSplit::All;
    assert_eq!(evaluate(&all_opts).expect("--split all").samples, 39);
}

/// Metric records without timings, for comparing runs.
fn metric_records(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    assert!(text.ends_with('\n'), "whole lines only");
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("a record per line");
            let o = v.as_object_mut().expect("object");
            // Timings differ between any two runs.
            o.remove("seconds");
            o.remove("samples_per_s");
            o.remove("profile");
            v
        })
        .collect()
}

/// A run stopped at step 3 of 8 whose metrics file then got records beyond that step (as a
/// crash after the checkpoint leaves) and a torn last line: resumed with a `FitConfig` of 20
/// epochs and no explicit length, it ends after its own 2 epochs, and its metrics file equals
/// an uninterrupted run's, every step once.
#[test]
fn resume_keeps_the_run_length_and_repairs_the_metrics() {
    let tmp = TempDir::new("resume-metrics");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 40, 6);
    let cache = tmp.path().join("cache");
    // 32 training samples in batches of 8: 4 steps per epoch.
    let cfg = FitConfig {
        epochs: 2,
        batch_size: 8,
        grad_accum: 1,
        sample_budget: None,
        ..FitConfig::tiny()
    };
    let straight = tmp.path().join("straight");
    run_fit(&cat, &straight, &cache, &cfg, None, &Device::Cpu);
    let split = tmp.path().join("split");
    let half = FitConfig {
        max_steps: Some(3),
        ..cfg.clone()
    };
    run_fit(&cat, &split, &cache, &half, None, &Device::Cpu);
    let metrics = split.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).expect("metrics");
    assert_eq!(text.lines().count(), 3);
    text.push_str("{\"kind\":\"step\",\"epoch\":1,\"step\":4,\"loss\":9.0}\n");
    text.push_str("{\"kind\":\"epoch\",\"epoch\":1,\"step\":4,\"val_loss\":9.0}\n");
    text.push_str("{\"kind\":\"step\",\"epoch\":2,\"st");
    std::fs::write(&metrics, text).expect("write");

    let longer_default = FitConfig {
        epochs: 20,
        max_steps: None,
        ..cfg.clone()
    };
    let opts = fit_options(
        &cat,
        &split,
        &cache,
        Some(&split.join("last")),
        &Device::Cpu,
    );
    let report = fit(&longer_default, &opts).expect("resume");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("dropped 2 record(s) after step 3") && w.contains("torn")),
        "{:?}",
        report.warnings
    );
    let (a, b) = (
        trainer::fit::read_state(&straight.join("last")).expect("a"),
        trainer::fit::read_state(&split.join("last")).expect("b"),
    );
    assert_eq!((b.epoch, b.config.epochs, b.step), (2, 2, 8));
    let losses = |s: &trainer::fit::TrainState| -> Vec<(f64, f64)> {
        s.history
            .iter()
            .map(|h| (h.train_loss, h.val_loss))
            .collect()
    };
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(metric_records(&straight), metric_records(&split));
    assert_eq!(metric_records(&split).len(), 8 + 2);
}

/// A trainer killed while writing a checkpoint leaves `.<name>.tmp-<pid>`, a whole checkpoint:
/// the next save of that checkpoint removes those of processes that are gone (and an older
/// version's `.<name>.tmp`), and keeps those of running processes.
#[test]
fn checkpoint_save_removes_stale_temporaries() {
    let tmp = TempDir::new("ckpt-stale");
    let dead = moda_tests::dead_pid();
    let sleeper = moda_tests::LiveProcess::start();
    let stale = tmp.path().join(format!(".ckpt.tmp-{dead}"));
    let legacy = tmp.path().join(".ckpt.tmp");
    let live = tmp.path().join(format!(".ckpt.tmp-{}", sleeper.id()));
    let other = tmp.path().join(format!(".other.tmp-{dead}"));
    for d in [&stale, &legacy, &live, &other] {
        std::fs::create_dir_all(d).expect("fake temporary");
        std::fs::write(d.join("model.safetensors"), b"partial").expect("fake file");
    }
    let found = checkpoint::remove_stale_temporaries(&tmp.path().join("ckpt"));
    drop(sleeper);
    let paths: Vec<&Path> = found.iter().map(|s| s.path.as_path()).collect();
    assert_eq!(paths, vec![stale.as_path(), legacy.as_path()]);
    assert!(found.iter().all(|s| s.error.is_none()));
    assert!(
        found[0].to_string().contains(&format!("process {dead}")),
        "{}",
        found[0]
    );
    assert!(!stale.exists() && !legacy.exists());
    assert!(live.exists(), "a running process's checkpoint is kept");
    assert!(
        other.exists(),
        "another checkpoint's temporary is left to it"
    );

    // `save` does the same before it writes.
    std::fs::create_dir_all(&stale).expect("fake temporary");
    let pth = fixture("moda/fashion_opt.pth");
    let weights = Weights::from_file(&pth).expect("weights");
    let tensors = checkpoint::recipe_state_dict(&weights, true).expect("state dict");
    let tokenizer = ModaTokenizer::from_dir(&fixture("opt_preln")).expect("tokenizer");
    let cfg = recipe_checkpoint_config();
    let contents = CheckpointContents {
        config: &cfg,
        model: &tensors,
        encoder: None,
        tokenizer: &tokenizer,
        extra_files: vec![],
        extra_tensors: vec![],
    };
    checkpoint::save(&tmp.path().join("ckpt"), &contents).expect("save");
    assert!(!stale.exists());
    assert!(tmp.path().join("ckpt/config.json").is_file());
}

/// Every setting is checked before anything runs, the error naming the flag: `--max-steps 0`
/// ran one step, `--lr-gamma nan`, `--dropout 1`, `nan` or `1.5` trained until the loss
/// became NaN, and `--max-grad-norm nan` turned clipping off without a word.
#[test]
fn settings_are_checked_naming_the_flag() {
    let tmp = TempDir::new("fit-flags");
    let out = tmp.path().join("run");
    let opts = fit_options(
        &tmp.path().join("no-catalog"),
        &out,
        &tmp.path().join("cache"),
        None,
        &Device::Cpu,
    );
    let base = FitConfig::tiny();
    let cases: Vec<(&str, FitConfig)> = vec![
        (
            "--max-steps",
            FitConfig {
                max_steps: Some(0),
                ..base.clone()
            },
        ),
        (
            "--lr-gamma",
            FitConfig {
                lr_gamma: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "--lr-gamma",
            FitConfig {
                lr_gamma: 0.0,
                ..base.clone()
            },
        ),
        (
            "--dropout",
            FitConfig {
                dropout: Some(1.0),
                ..base.clone()
            },
        ),
        (
            "--dropout",
            FitConfig {
                dropout: Some(f64::NAN),
                ..base.clone()
            },
        ),
        (
            "--dropout",
            FitConfig {
                dropout: Some(1.5),
                ..base.clone()
            },
        ),
        (
            "--dropout",
            FitConfig {
                dropout: Some(-0.1),
                ..base.clone()
            },
        ),
        (
            "--max-grad-norm",
            FitConfig {
                max_grad_norm: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "--max-grad-norm",
            FitConfig {
                max_grad_norm: -1.0,
                ..base.clone()
            },
        ),
        (
            "--weight-decay",
            FitConfig {
                weight_decay: f64::INFINITY,
                ..base.clone()
            },
        ),
        (
            "--lr",
            FitConfig {
                lr: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "--warmup-epochs",
            FitConfig {
                warmup_epochs: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "--val-fraction",
            FitConfig {
                val_fraction: f64::NAN,
                ..base.clone()
            },
        ),
        (
            "--lr-step-epochs",
            FitConfig {
                lr_step_epochs: 0,
                ..base.clone()
            },
        ),
        (
            "--epochs",
            FitConfig {
                epochs: 0,
                ..base.clone()
            },
        ),
    ];
    for (flag, cfg) in cases {
        let err = fit(&cfg, &opts).expect_err(flag);
        assert!(
            matches!(err, trainer::Error::InvalidArgument(_)),
            "{flag}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(flag), "{flag}: {msg}");
        assert!(!out.exists(), "{flag}: nothing is written");
    }
    // The boundaries that are allowed.
    for cfg in [
        FitConfig {
            dropout: Some(0.0),
            max_grad_norm: 0.0,
            weight_decay: 0.0,
            warmup_epochs: 0.0,
            max_steps: Some(1),
            ..base.clone()
        },
        FitConfig::default(),
    ] {
        cfg.check().expect("valid settings");
    }
}

/// Runs `f` on a thread and waits at most a minute for it: a blocking open of a FIFO hung
/// these commands.
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("must not hang")
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Lists every path under `dir` (directories too) with file sizes.
fn tree(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let meta = std::fs::symlink_metadata(e.path()).expect("metadata");
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), if meta.is_file() { meta.len() } else { 0 }));
        }
    }
    out.sort();
    out
}

/// One short run, then what must be refused around it: a checkpoint whose files are FIFOs or
/// devices (`--resume` and `eval` hung on them), outputs that are, contain or lie inside what
/// the command reads, an output directory of other files, and `--max-steps` already reached.
/// Nothing on disk changes.
#[test]
fn hostile_run_files_and_overlapping_outputs_are_refused() {
    let tmp = TempDir::new("fit-hostile");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 20, 8);
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("run");
    let cfg = FitConfig {
        epochs: 1,
        batch_size: 8,
        max_steps: Some(1),
        sample_budget: None,
        ..FitConfig::tiny()
    };
    run_fit(&cat, &out, &cache, &cfg, None, &Device::Cpu);
    let last = out.join("last");
    assert!(last.join("optimizer.safetensors").is_file());

    // --max-steps already reached: refused (it ran one more step).
    let err = fit(
        &cfg,
        &fit_options(&cat, &out, &cache, Some(&last), &Device::Cpu),
    )
    .expect_err("--max-steps 1 reached");
    assert!(
        err.to_string().contains("--max-steps 1") && err.to_string().contains("already"),
        "{err}"
    );

    // Outputs overlapping inputs.
    let before = tree(tmp.path());
    let overlapping = [
        (cat.clone(), None, "is", "catalog"),
        (cat.join("run"), None, "is inside", "catalog"),
        (tmp.path().to_path_buf(), None, "contains", "catalog"),
        (
            last.clone(),
            Some(last.clone()),
            "is",
            "checkpoint being resumed",
        ),
        (
            last.join("sub"),
            Some(last.clone()),
            "is inside",
            "checkpoint being resumed",
        ),
    ];
    for (o, resume, relation, what) in overlapping {
        let opts = fit_options(&cat, &o, &cache, resume.as_deref(), &Device::Cpu);
        let err = fit(
            &FitConfig {
                max_steps: Some(5),
                ..cfg.clone()
            },
            &opts,
        )
        .expect_err("overlapping output");
        match &err {
            trainer::Error::OutputOverlapsInput {
                relation: r,
                what: w,
                ..
            } => assert_eq!((*r, w.as_str()), (relation, what), "{o:?}: {err}"),
            other => panic!("{o:?}: expected OutputOverlapsInput, got {other}"),
        }
    }
    // A local encoder directory as --out (the recipe's settings, no preset).
    let encoder = tmp.path().join("encoder");
    copy_dir(&fixture("clip_gelu"), &encoder);
    let recipe = FitConfig {
        encoder: encoder.display().to_string(),
        decoder: fixture("opt_preln").display().to_string(),
        ..FitConfig::default()
    };
    let err = fit(
        &recipe,
        &fit_options(&cat, &encoder.join("run"), &cache, None, &Device::Cpu),
    )
    .expect_err("inside the encoder");
    assert!(err.to_string().contains("is inside the encoder"), "{err}");
    std::fs::remove_dir_all(&encoder).expect("rm encoder");
    assert_eq!(tree(tmp.path()), before, "nothing was written or removed");

    // An output directory holding other files, or a best/ that is no checkpoint.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(other.join("best")).expect("mkdir");
    std::fs::write(other.join("best/photo.jpg"), "mine").expect("write");
    let err = fit(&cfg, &fit_options(&cat, &other, &cache, None, &Device::Cpu))
        .expect_err("best/ is not a checkpoint");
    assert!(
        matches!(err, trainer::Error::OutputNotReplaceable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("\"best\""), "{err}");
    std::fs::remove_dir_all(other.join("best")).expect("rm");
    std::fs::write(other.join("notes.txt"), "mine").expect("write");
    let err =
        fit(&cfg, &fit_options(&cat, &other, &cache, None, &Device::Cpu)).expect_err("other files");
    assert!(err.to_string().contains("notes.txt"), "{err}");
    assert_eq!(
        std::fs::read_dir(&other).expect("ls").count(),
        1,
        "nothing written"
    );

    // --predictions over what `eval` reads.
    let mut eval_opts = eval_options(&last, &cat, &cache);
    eval_opts.split = EvalSplit::All;
    let image = load_catalog(
        &CatalogSource::Kaggle {
            dir: cat.clone(),
            template: CaptionTemplate::default(),
        },
        &LoadOptions::default(),
    )
    .expect("catalog")
    .samples[0]
        .image
        .clone();
    let before = tree(tmp.path());
    for (predictions, what) in [
        (cat.join(KAGGLE_CSV), "catalog CSV"),
        (last.join("model.safetensors"), "checkpoint file"),
        (last.join("encoder/config.json"), "encoder directory"),
        (image, "catalog image"),
        (out.clone(), "checkpoint"),
    ] {
        let opts = EvalOptions {
            predictions: predictions.clone(),
            ..eval_opts.clone()
        };
        let err = evaluate(&opts).expect_err("over an input");
        assert!(
            matches!(err, trainer::Error::OutputOverlapsInput { .. })
                && err.to_string().contains(what),
            "{predictions:?}: {err}"
        );
    }
    assert_eq!(tree(tmp.path()), before, "nothing was written");

    // Run files that are FIFOs or devices: refused at once, not waited on.
    #[cfg(unix)]
    for (file, kind) in [
        ("optimizer.safetensors", "FIFO"),
        ("optimizer.safetensors", "character device"),
        ("config.json", "FIFO"),
        ("config.json", "character device"),
    ] {
        let ckpt = tmp.path().join("hostile");
        let _ = std::fs::remove_dir_all(&ckpt);
        copy_dir(&last, &ckpt);
        let path = ckpt.join(file);
        if kind == "FIFO" {
            mkfifo(&path);
        } else {
            std::fs::remove_file(&path).expect("rm");
            std::os::unix::fs::symlink("/dev/zero", &path).expect("symlink");
        }
        let resumed = {
            let opts = fit_options(
                &cat,
                &tmp.path().join("resumed"),
                &cache,
                Some(&ckpt),
                &Device::Cpu,
            );
            let cfg = FitConfig {
                max_steps: Some(5),
                ..cfg.clone()
            };
            within_a_minute(move || fit(&cfg, &opts).map(|_| ()).map_err(|e| e.to_string()))
        };
        let msg = resumed.expect_err("a hostile checkpoint file");
        assert!(
            msg.contains(file) && msg.contains(kind),
            "{file} {kind}: {msg}"
        );
        if file == "config.json" {
            let opts = EvalOptions {
                predictions: tmp.path().join("predictions.csv"),
                ..eval_options(&ckpt, &cat, &cache)
            };
            let msg =
                within_a_minute(move || evaluate(&opts).map(|_| ()).map_err(|e| e.to_string()))
                    .expect_err("a hostile config");
            assert!(
                msg.contains(file) && msg.contains(kind),
                "eval {kind}: {msg}"
            );
        }
    }
}

/// The caption template travels in the checkpoint: a run trained with its own template
/// records it (with the training split's values), `eval` reads descriptions back with it
/// without being told, builds its targets with it, and `--caption-template` overrides it.
#[test]
fn eval_takes_the_caption_template_from_the_checkpoint() {
    let tmp = TempDir::new("schema-fit");
    let cat = tmp.path().join("catalog");
    synth_catalog(&cat, 40, 5);
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("run");
    let cfg = FitConfig {
        epochs: 1,
        batch_size: 16,
        sample_budget: None,
        ..FitConfig::tiny()
    };
    let template = "{Colour} {ProductType} for {Gender}";
    let mut opts = fit_options(&cat, &out, &cache, None, &Device::Cpu);
    opts.source = CatalogSource::Kaggle {
        dir: cat.clone(),
        template: CaptionTemplate::parse(template).expect("template"),
    };
    fit(&cfg, &opts).expect("fit");
    let config = CheckpointConfig::from_dir(&out.join("best")).expect("config");
    let schema = config.schema.expect("a schema");
    assert_eq!(schema.template.as_str(), template);
    let names: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["Colour", "ProductType", "Gender"]);
    // 32 training rows (8 held out): each field's counts add up to them.
    for f in &schema.fields {
        assert_eq!(
            f.values.iter().map(|v| v.count).sum::<u64>(),
            32,
            "{}",
            f.name
        );
    }

    // The eval source names the recipe's template; the checkpoint's wins unless overridden.
    let report = evaluate(&eval_options(&out.join("best"), &cat, &cache)).expect("eval");
    let scored: Vec<&str> = report.attributes.keys().map(String::as_str).collect();
    assert_eq!(scored, ["Colour", "Gender", "ProductType"]);
    let predictions = std::fs::read_to_string(&report.predictions).expect("predictions");
    let mut rows = csv::Reader::from_reader(predictions.as_bytes());
    let header: Vec<String> = rows
        .headers()
        .expect("header")
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(
        &header[5..],
        ["pred_Colour", "pred_ProductType", "pred_Gender"]
    );
    for row in rows.records() {
        let target = row.expect("row")[2].to_string();
        assert!(
            target.contains(" for ") && !target.contains(" - "),
            "{target}"
        );
    }
    let mut over = eval_options(&out.join("best"), &cat, &cache);
    over.template = Some(trainer::data::DEFAULT_TEMPLATE.to_string());
    over.predictions = tmp.path().join("predictions-default.csv");
    let report = evaluate(&over).expect("eval with the recipe's template");
    assert_eq!(report.attributes.len(), 6);
}
