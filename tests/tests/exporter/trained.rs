//! int8 and int4 bundles of a model trained by `trainer fit` (tiny preset, synthetic catalog):
//! greedy descriptions of held-out images, in ONNX Runtime, against the fp32 bundle.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use exporter::verify::{f32_raw, i64_input, open, run, Out};
use exporter::{export_onnx, ExportOptions, Quantize};
use moda_models::preprocess::{ImageLimits, ImageProcessor};
use moda_sdk::manifest::{Manifest, MANIFEST_FILE};
use moda_tests::TempDir;
use trainer::data::{CaptionTemplate, CatalogSource};
use trainer::fit::{fit, FitConfig, FitOptions};

fn images_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            images_under(&p, out);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("jpg" | "jpeg" | "png")
        ) {
            out.push(p);
        }
    }
}

fn to_tensor(o: &Out) -> Tensor {
    Tensor::from_vec(o.data.clone(), o.shape.as_slice(), &Device::Cpu).expect("tensor")
}

/// Greedy decoding of `pixel_values [b, 3, s, s]` through the whole bundle, `steps` tokens.
fn describe(bundle: &Path, pixels: &Tensor, steps: usize) -> Vec<Vec<i64>> {
    let m: Manifest =
        serde_json::from_str(&std::fs::read_to_string(bundle.join(MANIFEST_FILE)).expect("m"))
            .expect("manifest");
    let b = pixels.dim(0).expect("b");
    let mut enc = open(bundle, "encoder.onnx").expect("encoder");
    let pix = exporter::verify::f32_input("e", pixels).expect("pix");
    let emb = run(
        &mut enc,
        "encoder",
        vec![("pixel_values".into(), pix)],
        &["image_embeds".into()],
    )
    .expect("encoder runs");
    let mut proj = open(bundle, "projector.onnx").expect("projector");
    let e = exporter::verify::f32_input("p", &to_tensor(&emb[0])).expect("emb");
    let prefix = run(
        &mut proj,
        "projector",
        vec![("image_embeds".into(), e)],
        &["prefix_embeds".into()],
    )
    .expect("projector runs");
    let mut tok = open(bundle, "embed_tokens.onnx").expect("embed_tokens");
    let mut embed = |ids: &Tensor| {
        let out = run(
            &mut tok,
            "embed_tokens",
            vec![("input_ids".into(), i64_input("t", ids).expect("ids"))],
            &["inputs_embeds".into()],
        )
        .expect("embed runs");
        to_tensor(&out[0])
    };
    let bos = Tensor::full(m.special_tokens.bos as i64, (b, 1), &Device::Cpu).expect("bos");
    let mut input = Tensor::cat(&[&to_tensor(&prefix[0]), &embed(&bos)], 1).expect("cat");
    let mut dec = open(bundle, "decoder.onnx").expect("decoder");
    let d = m.model;
    let mut past: Vec<Out> = (0..2 * d.num_layers)
        .map(|_| Out {
            shape: vec![b, d.num_heads, 0, d.head_dim],
            data: Vec::new(),
        })
        .collect();
    let mut names = vec!["logits".to_string()];
    for i in 0..d.num_layers {
        names.push(format!("present.{i}.key"));
        names.push(format!("present.{i}.value"));
    }
    let mut total = 0;
    let mut out = vec![Vec::new(); b];
    for _ in 0..steps {
        total += input.dim(1).expect("t");
        let mask = Tensor::ones((b, total), DType::I64, &Device::Cpu).expect("mask");
        let mut inputs = vec![
            (
                "inputs_embeds".to_string(),
                exporter::verify::f32_input("d", &input).expect("x"),
            ),
            (
                "attention_mask".to_string(),
                i64_input("d", &mask).expect("m"),
            ),
        ];
        for (i, p) in past.drain(..).enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            let shape = p.shape.iter().map(|&x| x as i64).collect();
            inputs.push((
                format!("past_key_values.{}.{kind}", i / 2),
                f32_raw("d", shape, p.data).expect("p"),
            ));
        }
        let mut got = run(&mut dec, "decoder", inputs, &names).expect("decoder runs");
        past = got.split_off(1);
        let logits = to_tensor(&got[0]);
        let last = logits.i((.., logits.dim(1).expect("t") - 1)).expect("last");
        let next = last
            .argmax(1)
            .expect("argmax")
            .to_dtype(DType::I64)
            .expect("i64");
        for (row, t) in next.to_vec1::<i64>().expect("ids").into_iter().enumerate() {
            out[row].push(t);
        }
        input = embed(&next.unsqueeze(1).expect("col"));
    }
    // Cut each row after its first </s>.
    for row in &mut out {
        if let Some(p) = row.iter().position(|&t| t == m.special_tokens.eos as i64) {
            row.truncate(p + 1);
        }
    }
    out
}

/// Share of fp32's tokens that the other output has at the same position.
fn agreement(fp32: &[Vec<i64>], other: &[Vec<i64>]) -> f64 {
    let (mut same, mut total) = (0usize, 0usize);
    for (a, b) in fp32.iter().zip(other) {
        total += a.len();
        same += a.iter().zip(b).filter(|(x, y)| x == y).count();
    }
    same as f64 / total.max(1) as f64
}

#[test]
fn quantized_bundles_of_a_trained_model_describe_like_fp32() {
    let tmp = TempDir::new("export-trained");
    let cat = tmp.path().join("catalog");
    trainer::synth::synth(&trainer::synth::SynthArgs::new(&cat, 160, 11)).expect("synth");
    let run_dir = tmp.path().join("run");
    let cfg = FitConfig {
        epochs: 4,
        ..FitConfig::tiny()
    };
    fit(
        &cfg,
        &FitOptions {
            source: CatalogSource::Kaggle {
                dir: cat.clone(),
                template: CaptionTemplate::default(),
            },
            out: run_dir.clone(),
            resume: None,
            resume_epochs: None,
            device: Device::Cpu,
            cache_dir: tmp.path().join("cache"),
            progress: false,
            stop: Arc::new(AtomicBool::new(false)),
        },
    )
    .expect("fit");
    let schema = check_recorded_schema(&cat, &run_dir.join("best"));

    let mut bundles = Vec::new();
    for q in [Quantize::None, Quantize::Int8, Quantize::Int4] {
        let out = tmp.path().join(format!("bundle-{}", q.name()));
        let report = export_onnx(&ExportOptions {
            checkpoint: run_dir.join("best"),
            out: out.clone(),
            encoder: String::new(),
            decoder: String::new(),
            quantize: q,
            block_size: None,
            force: false,
            verify: true,
            max_new_tokens: exporter::DEFAULT_MAX_NEW_TOKENS,
            caption_template: None,
            catalog: None,
        })
        .expect("export the trained checkpoint");
        if let Some(m) = report
            .verification
            .as_ref()
            .and_then(|m| m.min_logits_cosine)
        {
            eprintln!("{}: min logits cosine on the probes {m:.4}", q.name());
        }
        // The schema travels from the checkpoint into moda.json as it is; a trainer
        // checkpoint has no default stop strings.
        let m = moda_sdk::read_manifest(&out).expect("manifest");
        assert_eq!(m.schema.as_ref(), Some(&schema), "{}", q.name());
        assert!(m.generation.stop_strings.is_empty());
        bundles.push(out);
    }
    // The SDK reads every held-out description back with it (the trained model writes
    // the template's words, so the fields are read, here checked on one image).
    let moda = moda_sdk::Moda::open(&bundles[0], &moda_sdk::OpenOptions::default()).expect("open");

    // Held-out images: a fresh synthetic catalog the model never saw.
    let held_out = tmp.path().join("held_out");
    trainer::synth::synth(&trainer::synth::SynthArgs::new(&held_out, 24, 99)).expect("synth");
    let mut paths = Vec::new();
    images_under(&held_out, &mut paths);
    assert!(!paths.is_empty());
    let m: Manifest = serde_json::from_str(
        &std::fs::read_to_string(bundles[0].join(MANIFEST_FILE)).expect("manifest"),
    )
    .expect("manifest");
    let proc = ImageProcessor::new(m.preprocessing).expect("processor");
    let s = m.model.image_size;
    let mut data = Vec::new();
    for p in &paths {
        data.extend(
            proc.preprocess_path(p, &ImageLimits::default())
                .expect("image"),
        );
    }
    let pixels = Tensor::from_vec(data, (paths.len(), 3, s, s), &Device::Cpu).expect("pixels");
    let d = moda
        .describe(
            &moda_sdk::ImageInput::Path(&paths[0]),
            &moda_sdk::GenerationOptions::default(),
        )
        .expect("describe");
    let attributes = d
        .attributes
        .expect("a bundle with a schema gives attributes");
    let names: Vec<&str> = attributes.keys().map(String::as_str).collect();
    let mut want = schema.template.columns();
    want.sort_unstable();
    assert_eq!(names, want);
    assert_eq!(
        attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.as_ref().map(|a| a.value.clone())))
            .collect::<std::collections::BTreeMap<_, _>>(),
        schema.parse(&d.text),
        "{}",
        d.text
    );

    let fp32 = describe(&bundles[0], &pixels, 24);
    let int8 = describe(&bundles[1], &pixels, 24);
    let int4 = describe(&bundles[2], &pixels, 24);
    let (a8, a4) = (agreement(&fp32, &int8), agreement(&fp32, &int4));
    eprintln!(
        "{} held-out images, greedy token agreement with fp32: int8 {:.1}%, int4 {:.1}%",
        paths.len(),
        100.0 * a8,
        100.0 * a4
    );
    assert!(a8 >= 0.9, "int8 agreement {a8}");
    assert!(a4 >= 0.6, "int4 agreement {a4}");
}

/// The checkpoint's caption schema: the recipe's template, and for every field the values of
/// the run's training rows (its recorded split) with their counts. Returns it.
fn check_recorded_schema(catalog: &Path, checkpoint: &Path) -> moda_models::schema::CaptionSchema {
    let config = moda_models::checkpoint::CheckpointConfig::from_dir(checkpoint).expect("config");
    let schema = config.schema.expect("fit records the caption schema");
    assert_eq!(schema.template, CaptionTemplate::default());
    let source = CatalogSource::Kaggle {
        dir: catalog.to_path_buf(),
        template: CaptionTemplate::default(),
    };
    let cat = trainer::data::load_catalog(&source, &Default::default()).expect("catalog");
    let state = trainer::fit::TrainState::from_dir(checkpoint).expect("state");
    let (split, _) = trainer::fit::recorded_split(&cat, &state).expect("split");
    assert!(!split.validation.is_empty());
    for field in &schema.fields {
        let mut want: std::collections::BTreeMap<&str, u64> = Default::default();
        for &i in &split.train {
            *want
                .entry(cat.samples[i].attributes[&field.name].as_str())
                .or_default() += 1;
        }
        let got: std::collections::BTreeMap<&str, u64> = field
            .values
            .iter()
            .map(|v| (v.value.as_str(), v.count))
            .collect();
        assert_eq!(got, want, "{}", field.name);
        // Most frequent first.
        assert!(field.values.windows(2).all(|w| w[0].count >= w[1].count));
    }
    // The schema JSON is in config.json, beside the rest.
    let text = std::fs::read_to_string(checkpoint.join("config.json")).expect("config.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        v["schema"]["template"],
        moda_models::schema::DEFAULT_TEMPLATE
    );
    schema
}
