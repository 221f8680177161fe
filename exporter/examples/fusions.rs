//! Which fusions ONNX Runtime applies to a bundle's graphs: loads each graph with full
//! optimisation, saves the optimised model (`optimized_model_filepath`) and prints the op types
//! before and after.
//!
//! `cargo run -p exporter --example fusions -- BUNDLE`

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use moda_sdk::runtime::{session_from_file, SessionOptions};
use prost::Message;

fn op_counts(path: &std::path::Path) -> anyhow::Result<BTreeMap<String, usize>> {
    // A regular file of at most 4 GiB (a FIFO or a device is refused, not read without end).
    let bytes = moda_models::files::read_bounded(path, 4 << 30)
        .with_context(|| format!("reading {}", path.display()))?;
    let model = candle_onnx::onnx::ModelProto::decode(bytes.as_slice())?;
    let mut counts = BTreeMap::new();
    for n in model.graph.map(|g| g.node).unwrap_or_default() {
        let key = if n.domain.is_empty() {
            n.op_type
        } else {
            format!("{}:{}", n.domain, n.op_type)
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    Ok(counts)
}

fn main() -> anyhow::Result<()> {
    let bundle = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: fusions BUNDLE_DIR")?,
    );
    let tmp = std::env::temp_dir().join(format!("moda-fusions-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    for file in [
        "encoder.onnx",
        "projector.onnx",
        "embed_tokens.onnx",
        "decoder.onnx",
    ] {
        let src = bundle.join(file);
        let opt = tmp.join(file);
        let options = SessionOptions {
            intra_threads: Some(1),
            optimized_model_path: Some(opt.clone()),
            ..Default::default()
        };
        drop(session_from_file(&src, &options)?);
        let before = op_counts(&src)?;
        let after = op_counts(&opt)?;
        println!("{file}");
        println!("  written:   {before:?}");
        println!("  optimised: {after:?}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
