//! Rough per-token decode time of a bundle's decoder in ONNX Runtime (CPU): a prefill of
//! `[prefix, BOS]`, then one token at a time, the cache fed back from `present.*` (copied, as a
//! simple runtime would; the SDK's IO binding is a later improvement).
//!
//! `cargo run --release -p exporter --example decode_bench -- BUNDLE [STEPS]`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use exporter::verify::{f32_raw, open, run, Out};
use moda_sdk::manifest::{Manifest, MANIFEST_FILE};
use ort::value::Tensor as OrtTensor;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let bundle = PathBuf::from(args.next().context("usage: decode_bench BUNDLE [STEPS]")?);
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let manifest = bundle.join(MANIFEST_FILE);
    let text =
        moda_models::files::read_text_bounded(&manifest, moda_models::files::TEXT_FILE_MAX_BYTES)
            .with_context(|| format!("reading {}", manifest.display()))?;
    let m: Manifest = serde_json::from_str(&text)?;
    let d = m.model;
    let _ = open(&bundle, "embed_tokens.onnx")?;
    let mut dec = open(&bundle, "decoder.onnx")?;
    let mut names = vec!["logits".to_string()];
    for i in 0..d.num_layers {
        names.push(format!("present.{i}.key"));
        names.push(format!("present.{i}.value"));
    }
    let mut past: Vec<Out> = (0..2 * d.num_layers)
        .map(|_| Out {
            shape: vec![1, d.num_heads, 0, d.head_dim],
            data: Vec::new(),
        })
        .collect();
    let mut seq = 2;
    let mut total = 0;
    let mut times = Vec::new();
    for step in 0..steps {
        total += seq;
        let embeds = vec![0.01f32; seq * d.embed_dim];
        let mut inputs = vec![
            (
                "inputs_embeds".to_string(),
                f32_raw("d", vec![1, seq as i64, d.embed_dim as i64], embeds)?,
            ),
            (
                "attention_mask".to_string(),
                OrtTensor::from_array((vec![1i64, total as i64], vec![1i64; total]))?.into(),
            ),
        ];
        for (i, p) in past.drain(..).enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            let shape = p.shape.iter().map(|&x| x as i64).collect();
            inputs.push((
                format!("past_key_values.{}.{kind}", i / 2),
                f32_raw("d", shape, p.data)?,
            ));
        }
        let t = Instant::now();
        let mut out = run(&mut dec, "decoder", inputs, &names)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if step > 0 {
            times.push(ms);
        }
        past = out.split_off(1);
        seq = 1;
    }
    let avg = |r: std::ops::Range<usize>| {
        let s = &times[r.clone()];
        s.iter().sum::<f64>() / s.len() as f64
    };
    let n = times.len();
    println!(
        "per-token decode: {:.1} ms (steps 1-8), {:.1} ms (last 8 of {n}), {:.1} ms overall",
        avg(0..8.min(n)),
        avg(n.saturating_sub(8)..n),
        avg(0..n)
    );
    Ok(())
}
