//! Helpers for the tests that run `trainer::fit::fit` on synthetic catalogs.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use trainer::data::{CaptionTemplate, CatalogSource};
use trainer::eval::{evaluate, EvalOptions, EvalReport, EvalSplit};
use trainer::fit::{fit, FitConfig, FitOptions};

/// A synthetic Kaggle-layout catalog of `count` products at `dir`.
pub fn synth_catalog(dir: &Path, count: usize, seed: u64) {
    trainer::synth::synth(&trainer::synth::SynthArgs::new(dir, count, seed)).expect("synth");
}

/// Options for a quiet run on the Kaggle-layout catalog at `catalog`.
pub fn fit_options(
    catalog: &Path,
    out: &Path,
    cache: &Path,
    resume: Option<&Path>,
    device: &Device,
) -> FitOptions {
    FitOptions {
        source: CatalogSource::Kaggle {
            dir: catalog.to_path_buf(),
            template: CaptionTemplate::default(),
        },
        out: out.to_path_buf(),
        resume: resume.map(Path::to_path_buf),
        resume_epochs: None,
        device: device.clone(),
        cache_dir: cache.to_path_buf(),
        progress: false,
        stop: Arc::new(AtomicBool::new(false)),
    }
}

/// Runs `fit`, panicking with its error.
pub fn run_fit(
    catalog: &Path,
    out: &Path,
    cache: &Path,
    cfg: &FitConfig,
    resume: Option<&Path>,
    device: &Device,
) {
    if let Err(e) = fit(cfg, &fit_options(catalog, out, cache, resume, device)) {
        panic!("fit into {}: {e}", out.display());
    }
}

/// The step records (loss, grad_norm) of a run's metrics file.
pub fn step_records(out: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["kind"] == "step")
        .map(|v| {
            (
                v["loss"].as_f64().expect("loss"),
                v["grad_norm"].as_f64().expect("grad_norm"),
            )
        })
        .collect()
}

/// `trainer eval` of `checkpoint` on the validation split it recorded of the Kaggle-layout
/// catalog at `catalog`: greedy descriptions (up to 32 tokens, batches of 16), scores, and
/// `predictions.csv` beside the checkpoint.
pub fn evaluate_val(
    checkpoint: &Path,
    catalog: &Path,
    cache: &Path,
    device: &Device,
) -> EvalReport {
    let opts = EvalOptions {
        checkpoint: checkpoint.to_path_buf(),
        source: CatalogSource::Kaggle {
            dir: catalog.to_path_buf(),
            template: CaptionTemplate::default(),
        },
        template: None,
        split: EvalSplit::Val,
        predictions: checkpoint.with_file_name("predictions.csv"),
        device: device.clone(),
        cache_dir: cache.to_path_buf(),
        max_new_tokens: 32,
        num_beams: 1,
        constrain: moda_models::generate::Constrain::Auto,
        batch_size: 16,
        progress: false,
    };
    evaluate(&opts).unwrap_or_else(|e| panic!("eval of {}: {e}", checkpoint.display()))
}
