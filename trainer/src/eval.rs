//! `trainer eval`: greedy descriptions for the held-out split (recorded in the checkpoint) or
//! the whole catalog, exact-match accuracy, and per attribute (Colour, Usage, ProductType,
//! Gender, Category, SubCategory) accuracy and macro-F1 (as scikit-learn's
//! `f1_score(average="macro")`: over the labels seen in targets or predictions). Attributes
//! are read back from the generated text with the workspace's one parser,
//! `moda_models::schema::CaptionSchema::parse` (the SDK's too): the caption template is the
//! one recorded in the checkpoint (`--caption-template` overrides it, and is what a checkpoint
//! without a schema uses, the recipe's template by default), and the known values are those
//! the checkpoint recorded from training together with those of the evaluated catalog, so that
//! a correct value training never saw still counts. A value outside both reads as no value.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use indicatif::ProgressBar;
use moda_models::checkpoint;
use moda_models::constrain::{self, Constraint};
use moda_models::generate::{Constrain, GenerationOptions};
use moda_models::preprocess::ImageProcessor;
use serde::Serialize;

use moda_models::schema::{Attributes, CaptionSchema, CaptionTemplate};

use crate::data::{load_catalog, CatalogSource, LoadOptions};
use crate::embed_cache::{EmbeddingCache, EncoderFingerprint};
use crate::error::{Error, Result};
use crate::fit::{recorded_split, TrainState, STATE_FILE};

/// Which samples to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalSplit {
    /// The validation samples recorded in the checkpoint.
    Val,
    /// Every sample of the catalog.
    All,
}

/// Options of [`evaluate`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
    /// The catalog.
    pub source: CatalogSource,
    /// The caption template, overriding the checkpoint's (to build the target captions of a
    /// Kaggle catalog and to read attributes back); `None`: the checkpoint's, or the recipe's
    /// template for a checkpoint that records none.
    pub template: Option<String>,
    /// Which samples.
    pub split: EvalSplit,
    /// Where to write the predictions CSV.
    pub predictions: PathBuf,
    /// The device.
    pub device: Device,
    /// Where image embeddings are cached.
    pub cache_dir: PathBuf,
    /// Generation length limit.
    pub max_new_tokens: usize,
    /// Beams for beam search; 1 is greedy search.
    pub num_beams: usize,
    /// Whether decoding is constrained to the checkpoint's caption schema (its template and
    /// the values recorded in training); [`Constrain::Auto`] does when the checkpoint
    /// records one for the template in use.
    pub constrain: Constrain,
    /// Batch size for generation.
    pub batch_size: usize,
    /// Progress bars.
    pub progress: bool,
}

/// Accuracy and macro-F1 of one attribute.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AttributeScore {
    /// Fraction of samples whose value was generated exactly.
    pub accuracy: f64,
    /// Unweighted mean of the per-value F1 scores.
    pub macro_f1: f64,
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Samples evaluated.
    pub samples: usize,
    /// Fraction of descriptions equal to the target.
    pub exact_match: f64,
    /// Whether decoding was constrained to the checkpoint's caption schema.
    pub constrained: bool,
    /// Per attribute.
    pub attributes: BTreeMap<String, AttributeScore>,
    /// The predictions CSV.
    pub predictions: PathBuf,
    /// The warnings printed (repeated ids, a split rebuilt from an older checkpoint's ids).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Macro-F1 over the labels seen in `truth` or `pred` (`None`: nothing parsed).
pub fn macro_f1(truth: &[String], pred: &[Option<String>]) -> f64 {
    let mut labels: BTreeSet<&str> = truth.iter().map(String::as_str).collect();
    labels.extend(pred.iter().flatten().map(String::as_str));
    if labels.is_empty() {
        return 0.0;
    }
    let mut sum = 0.0;
    for l in &labels {
        let (mut tp, mut fp, mut fneg) = (0f64, 0f64, 0f64);
        for (t, p) in truth.iter().zip(pred) {
            let p = p.as_deref();
            match (t == l, p == Some(l)) {
                (true, true) => tp += 1.0,
                (false, true) => fp += 1.0,
                (true, false) => fneg += 1.0,
                _ => {}
            }
        }
        let denom = 2.0 * tp + fp + fneg;
        sum += if denom > 0.0 { 2.0 * tp / denom } else { 0.0 };
    }
    sum / labels.len() as f64
}

/// Refuses a predictions file that would overwrite what the evaluation reads: a file of the
/// checkpoint (a new file inside the checkpoint directory is allowed), anything in or around
/// the encoder's directory, the catalog's CSV or one of its images.
fn check_predictions(
    path: &Path,
    checkpoint_dir: &Path,
    encoder_dir: &Path,
    catalog: &crate::data::Catalog,
) -> Result<()> {
    let refuse = |relation: &'static str, what: &str, input: &Path| {
        Err(Error::OutputOverlapsInput {
            flag: "--predictions",
            out: path.to_path_buf(),
            relation,
            what: what.to_string(),
            input: input.to_path_buf(),
        })
    };
    if let Some(relation) =
        moda_models::files::overlap(path, checkpoint_dir).filter(|r| *r != "is inside")
    {
        return refuse(relation, "checkpoint", checkpoint_dir);
    }
    if let Some(relation) = moda_models::files::overlap(path, encoder_dir) {
        return refuse(relation, "encoder directory", encoder_dir);
    }
    for name in [
        checkpoint::CONFIG_FILE,
        checkpoint::MODEL_FILE,
        checkpoint::TOKENIZER_FILE,
        STATE_FILE,
        crate::fit::OPTIMIZER_FILE,
    ] {
        let file = checkpoint_dir.join(name);
        if let Some(relation) = moda_models::files::overlap(path, &file) {
            return refuse(relation, "checkpoint file", &file);
        }
    }
    if let Some(relation) = moda_models::files::overlap(path, &catalog.csv) {
        return refuse(relation, "catalog CSV", &catalog.csv);
    }
    // Only an existing file can be an image.
    if let Ok(target) = std::fs::canonicalize(path) {
        for s in &catalog.samples {
            if std::fs::canonicalize(&s.image).is_ok_and(|i| i == target) {
                return refuse("is", "catalog image", &s.image);
            }
        }
    }
    Ok(())
}

/// Evaluates a checkpoint on a catalog; see the module docs.
pub fn evaluate(opts: &EvalOptions) -> Result<EvalReport> {
    let device = &opts.device;
    let mut warnings = Vec::new();
    let mut warn = |msg: String| {
        eprintln!("warning: {msg}");
        warnings.push(msg);
    };
    let loaded = checkpoint::load(&opts.checkpoint, device)?;
    let recorded = loaded.config.schema.clone();
    let template = match (&opts.template, &recorded) {
        (Some(t), _) => CaptionTemplate::parse(t)?,
        (None, Some(s)) => s.template.clone(),
        (None, None) => CaptionTemplate::default(),
    };
    let mut source = opts.source.clone();
    if let CatalogSource::Kaggle { template: t, .. } = &mut source {
        *t = template.clone();
    }
    let state = match opts.split {
        EvalSplit::All => None,
        EvalSplit::Val => {
            if !loaded.dir.join(STATE_FILE).exists() {
                return Err(Error::NoRecordedSplit {
                    checkpoint: opts.checkpoint.clone(),
                });
            }
            Some(TrainState::from_dir(&loaded.dir)?)
        }
    };
    let catalog = load_catalog(&source, &LoadOptions::default())?;
    if let Some(w) = catalog.duplicate_warning() {
        warn(w);
    }
    let indices: Vec<usize> = match &state {
        None => (0..catalog.len()).collect(),
        Some(state) => {
            let (split, notes) = recorded_split(&catalog, state).map_err(|msg| {
                Error::SplitMismatch(format!(
                    "{msg}; evaluate with the catalog the run was trained on, or every image \
                     of this one with --split all"
                ))
            })?;
            notes.into_iter().for_each(&mut warn);
            split.validation
        }
    };
    if indices.is_empty() {
        return Err(Error::InvalidArgument("no samples to evaluate".into()));
    }
    let samples: Vec<_> = indices
        .iter()
        .map(|&i| catalog.samples[i].clone())
        .collect();
    // Image embeddings through the cache.
    let enc_dir = checkpoint::encoder_dir(&loaded.dir, &loaded.config)?;
    check_predictions(&opts.predictions, &loaded.dir, &enc_dir, &catalog)?;
    let fingerprint = EncoderFingerprint::from_dir(&enc_dir)?;
    let cache = EmbeddingCache::open(opts.cache_dir.clone(), fingerprint)?;
    let processor = ImageProcessor::new(loaded.config.preprocessor.clone())?;
    let embeds = cache.get_or_compute(
        &samples,
        loaded.model.encoder(),
        &processor,
        device,
        64,
        &ProgressBar::hidden(),
    )?;
    let embeds = embeds.to_dtype(DType::F32)?;
    // Descriptions through the workspace's one search (the SDK's too): greedy unless the
    // options ask for beams. A length limit past the decoder's positions is cut to them, as
    // no description can be longer.
    let pb = if opts.progress {
        ProgressBar::new(samples.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    let generation = GenerationOptions::default()
        .with_max_new_tokens(Some(
            opts.max_new_tokens.min(loaded.model.max_new_tokens_limit()),
        ))
        .with_num_beams(opts.num_beams)
        .with_constrain(opts.constrain);
    // The constraint: the recorded schema, when its template is the one in use.
    let available = recorded
        .as_ref()
        .filter(|r| r.template == template)
        .map(|r| Constraint::new(r, &loaded.tokenizer, loaded.tokenizer.eos_id()));
    let constraint = constrain::resolve(opts.constrain, available.as_ref())
        .map_err(|e| Error::InvalidArgument(format!("--constrain schema: {e}")))?;
    let mut texts = Vec::with_capacity(samples.len());
    for start in (0..samples.len()).step_by(opts.batch_size.max(1)) {
        let n = opts.batch_size.max(1).min(samples.len() - start);
        let e = embeds.narrow(0, start, n)?;
        let prefix = loaded.model.project(&e)?;
        let out = loaded
            .model
            .generate_with(&prefix, &generation, None, None, constraint)?;
        for g in out {
            texts.push(
                loaded
                    .tokenizer
                    .decode(&g.token_ids, true)?
                    .trim()
                    .to_string(),
            );
        }
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    // Scores: the checkpoint's values (when its template is the one in use) and the
    // catalog's.
    let constrained = constraint.is_some();
    let mut schema = match recorded {
        Some(r) if r.template == template => r,
        _ => CaptionSchema::from_template(template),
    };
    for s in &catalog.samples {
        for (k, v) in &s.attributes {
            schema.add_value(k, v);
        }
    }
    let parsed: Vec<Attributes> = texts.iter().map(|t| schema.parse(t)).collect();
    let exact = samples
        .iter()
        .zip(&texts)
        .filter(|(s, t)| s.caption.trim() == t.as_str())
        .count();
    let columns: Vec<String> = schema.fields.iter().map(|f| f.name.clone()).collect();
    let mut attributes = BTreeMap::new();
    for c in &columns {
        let truth: Vec<String> = samples
            .iter()
            .map(|s| {
                s.attributes
                    .get(c)
                    .map_or(String::new(), |v| v.trim().to_string())
            })
            .collect();
        let pred: Vec<Option<String>> =
            parsed.iter().map(|p| p.get(c).cloned().flatten()).collect();
        let correct = truth
            .iter()
            .zip(&pred)
            .filter(|(t, p)| p.as_deref() == Some(t.as_str()))
            .count();
        attributes.insert(
            c.clone(),
            AttributeScore {
                accuracy: correct as f64 / samples.len() as f64,
                macro_f1: macro_f1(&truth, &pred),
            },
        );
    }
    write_predictions(&opts.predictions, &samples, &texts, &parsed, &columns)?;
    Ok(EvalReport {
        samples: samples.len(),
        exact_match: exact as f64 / samples.len() as f64,
        constrained,
        attributes,
        predictions: opts.predictions.clone(),
        warnings,
    })
}

fn write_predictions(
    path: &Path,
    samples: &[crate::data::Sample],
    texts: &[String],
    parsed: &[Attributes],
    columns: &[String],
) -> Result<()> {
    let csv_err = |e: csv::Error| Error::Csv {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut w = csv::Writer::from_path(path).map_err(csv_err)?;
    let mut header = vec![
        "id".to_string(),
        "image".into(),
        "target".into(),
        "prediction".into(),
        "exact".into(),
    ];
    header.extend(columns.iter().map(|c| format!("pred_{c}")));
    w.write_record(&header).map_err(csv_err)?;
    for ((s, t), p) in samples.iter().zip(texts).zip(parsed) {
        let mut row = vec![
            s.id.clone(),
            s.image.display().to_string(),
            s.caption.clone(),
            t.clone(),
            (s.caption.trim() == t.as_str()).to_string(),
        ];
        row.extend(
            columns
                .iter()
                .map(|c| p.get(c).cloned().flatten().unwrap_or_default()),
        );
        w.write_record(&row).map_err(csv_err)?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

/// The report as a table.
pub fn format_table(r: &EvalReport) -> String {
    let mut s = format!(
        "{} samples, exact match {:.2}% ({})\n\n{:<14} {:>9} {:>9}\n",
        r.samples,
        100.0 * r.exact_match,
        if r.constrained {
            "decoding constrained to the caption schema"
        } else {
            "free decoding"
        },
        "attribute",
        "accuracy",
        "macro-F1"
    );
    for (k, v) in &r.attributes {
        s.push_str(&format!(
            "{:<14} {:>8.2}% {:>9.4}\n",
            k,
            100.0 * v.accuracy,
            v.macro_f1
        ));
    }
    s.push_str(&format!("\npredictions: {}\n", r.predictions.display()));
    s
}

/// The report as JSON: `{"exact_match": .., "attributes": {..}}` (plus `samples`
/// and `predictions`).
pub fn to_json(r: &EvalReport) -> serde_json::Value {
    serde_json::json!({
        "exact_match": r.exact_match,
        "constrained": r.constrained,
        "samples": r.samples,
        "attributes": r.attributes,
        "predictions": r.predictions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_averages_over_every_label() {
        let f1 = macro_f1(
            &["a".into(), "b".into()],
            &[Some("a".into()), Some("a".into())],
        );
        assert!((f1 - (2.0 / 3.0) / 2.0).abs() < 1e-9);
    }
}
