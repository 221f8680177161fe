//! A bundle of the real architecture with random weights, for speed and memory measurements on
//! machines without the model hub (and without PyTorch): CLIP ViT-B/32 as in FashionCLIP (its
//! 512-wide projection), the recipe's projector and OPT-125m, initialised as candle's layers
//! initialise themselves, with the byte-level BPE tokenizer of `tests/fixtures/tokenizer` and
//! CLIP's preprocessing. The descriptions are noise; the shapes, and so the times, are those of
//! the real model.
//!
//! `cargo run --release -p exporter --example random_bundle -- OUT [none|int8|int4] [--verify]
//! [--catalog CSV] [--block-size N] [--tokenizer FILE]`
//!
//! then `moda-sdk bench --model OUT IMAGE`. `--catalog` gives the bundle the caption schema of
//! the recipe's template with that catalog's values (for constrained decoding). `--tokenizer`
//! takes another `tokenizer.json` (at most OPT's 50,272 ids): the fixture's has 597 tokens, and
//! loading a tokenizer and compiling a schema for it cost in proportion to its vocabulary
//! (`scripts/train_bpe.py` trains one of OPT-125m's 50,265 tokens where the hub is out of
//! reach).

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use exporter::{write_bundle, BundleOptions, BundleSources, Quantize, DEFAULT_MAX_NEW_TOKENS};
use moda_models::preprocess::ImageProcessorConfig;
use moda_models::tokenizer::ModaTokenizer;
use moda_models::{
    CaptionModel, ClipVision, ClipVisionConfig, Opt, OptConfig, Projector, ProjectorConfig,
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage =
        "usage: random_bundle OUT [none|int8|int4] [--verify] [--catalog CSV] [--block-size N] \
         [--tokenizer FILE]";
    let out = PathBuf::from(args.next().context(usage)?);
    let mut quantize = Quantize::None;
    let mut verify = false;
    let mut catalog = None;
    let mut block_size = None;
    let mut tokenizer_json = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "none" => quantize = Quantize::None,
            "int8" => quantize = Quantize::Int8,
            "int4" => quantize = Quantize::Int4,
            "--verify" => verify = true,
            "--catalog" => catalog = Some(PathBuf::from(args.next().context(usage)?)),
            "--block-size" => block_size = Some(args.next().context(usage)?.parse()?),
            "--tokenizer" => tokenizer_json = Some(PathBuf::from(args.next().context(usage)?)),
            other => anyhow::bail!("unknown argument {other:?}; {usage}"),
        }
    }
    let dev = Device::Cpu;
    // Each part draws its weights from candle's own initialisers (Kaiming-uniform linear
    // layers, unit layer norms), which keep activations finite through every layer.
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let ecfg = ClipVisionConfig::default();
    let dcfg = OptConfig::default();
    let encoder = ClipVision::new(&ecfg, vb.pp("clip"))?;
    let projector = Projector::new(
        &ProjectorConfig::new(
            ecfg.projection_dim,
            dcfg.word_embed_proj_dim.unwrap_or(dcfg.hidden_size),
        ),
        vb.pp("projection"),
    )?;
    let decoder = Opt::new(&dcfg, vb.pp("opt"))?;
    let model = CaptionModel::new(encoder, projector, decoder)?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let sources = BundleSources {
        tokenizer: match &tokenizer_json {
            Some(file) => ModaTokenizer::from_tokenizer_json(file)?,
            None => ModaTokenizer::from_dir(&fixtures.join("tokenizer"))?,
        },
        preprocessing: ImageProcessorConfig::default(),
        encoder: "random CLIP ViT-B/32 (exporter example random_bundle)".into(),
        decoder: "random OPT-125m (exporter example random_bundle)".into(),
        schema: exporter::schema_from_flags(None, catalog.as_deref())?,
        stop_strings: Vec::new(),
    };
    let options = BundleOptions {
        force: true,
        verify,
        quantize,
        block_size,
        max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
    };
    let report = write_bundle(&model, &sources, &out, &options)?;
    for (name, bytes) in &report.files {
        println!("{name:24} {:10.1} MB", *bytes as f64 / 1e6);
    }
    println!(
        "wrote {} in {:.1} s",
        report.out.display(),
        report.write_seconds
    );
    Ok(())
}
