//! `trainer fit`: the training loop, read top to bottom as nanoGPT's and nanoVLM's `train.py`.
//! [`fit`] calls one named step after another: the starting state (new, or the checkpoint's),
//! the checks, the catalog and its split, the model (`build_trainee`), the data (the frozen
//! encoder's embeddings cached, or pixels), the optimizer; then `Run::train` runs the epochs:
//! micro-batches (`Run::micro_batch`), gradient-accumulated AdamW steps with clipping and the
//! learning-rate schedule (`Run::optimizer_step`), and at each epoch's end validation,
//! metrics, checkpoints and a plot (`Run::end_epoch`).
//!
//! Differences from the original notebook, on purpose:
//! - image embeddings come from the on-disk cache (the encoder is frozen), not recomputed;
//! - the caption ends with the real `</s>` token, not the literal characters `<\s>`;
//! - gradients are clipped (`--max-grad-norm`, 1.0; 0 turns it off);
//! - an epoch whose number of batches is not a multiple of `--grad-accum` ends with one step
//!   over the remaining gradients instead of carrying them into the next epoch.
//!
//! Resuming is exact: a checkpoint is written at an optimizer-step boundary with the step,
//! the epoch and the position in its (seeded) data order, the AdamW moments and the dropout
//! generator's state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use moda_models::checkpoint::{self, CheckpointConfig, CheckpointContents, EncoderInfo};
use moda_models::hub::{resolve_model, FileReq, DEFAULT_DECODER, DEFAULT_ENCODER};
use moda_models::preprocess::{ImageProcessor, ImageProcessorConfig};
use moda_models::tokenizer::ModaTokenizer;
use moda_models::{CaptionModel, ClipVision, ClipVisionConfig, Opt, OptConfig, Projector};
use moda_models::{ProjectorConfig, Weights};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::Augment;
use crate::data::{load_catalog, Catalog, CatalogSource, LoadOptions, RowKey, Split};
use crate::embed_cache::{EmbeddingCache, EncoderFingerprint};
use crate::error::{Error, Result};
use crate::optim::{cosine_lr, step_lr, AdamW, AdamWParams};
use crate::params::{NewInit, ParamStore};
use crate::preset::{self, Preset};
use moda_models::schema::CaptionSchema;

/// The training state file of a checkpoint.
pub const STATE_FILE: &str = "training_state.json";
/// The optimizer moments of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The metrics file in the output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The loss plot in the output directory.
pub const PLOT_FILE: &str = "loss.png";

fn one() -> usize {
    1
}

/// How the learning rate changes over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// PyTorch's `StepLR`, stepped per epoch (the original recipe).
    #[default]
    Step,
    /// Linear warm-up, then cosine decay to 0 at the last epoch, set at every optimizer step.
    Cosine,
}

/// Every setting of a run; recorded in each checkpoint's training state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitConfig {
    /// Epochs over the training split.
    pub epochs: usize,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Base learning rate.
    pub lr: f64,
    /// The learning-rate schedule: StepLR (`lr_step_epochs`, `lr_gamma`) or cosine with
    /// linear warm-up (`warmup_epochs`).
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Epochs of linear warm-up (cosine schedule only; fractional allowed).
    #[serde(default)]
    pub warmup_epochs: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// StepLR's period, in epochs.
    pub lr_step_epochs: usize,
    /// StepLR's factor.
    pub lr_gamma: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Fraction of the catalog held out for validation.
    pub val_fraction: f64,
    /// Seed of the split, the data order, new weights and dropout.
    pub seed: u64,
    /// Stop after this many optimizer steps (in total, counting resumed ones).
    pub max_steps: Option<u64>,
    /// Train the image encoder too (it is frozen by default).
    pub train_encoder: bool,
    /// The encoder: a local directory or a hub id (unused by the tiny preset).
    pub encoder: String,
    /// The decoder: a local directory or a hub id (unused by the tiny preset).
    pub decoder: String,
    /// The preset the settings come from (`--preset`), if any.
    pub preset: Option<Preset>,
    /// Override of the decoder's dropout (`None`: the decoder config's).
    pub dropout: Option<f64>,
    /// Split each micro-batch into this many shards, computed on as many threads (CPU only;
    /// small models leave cores idle inside candle's ops). 1: no split.
    #[serde(default = "one")]
    pub data_parallel: usize,
    /// At most this many training samples in all (epochs x training samples): with a larger
    /// catalog, fewer epochs, so that a preset's run takes the same time whatever the catalog
    /// (`epochs = min(epochs, ceil(budget / training samples))`). `None`: `epochs` as given.
    #[serde(default)]
    pub sample_budget: Option<u64>,
    /// Augment the training images when the encoder trains: random left-right flips and
    /// shifts of up to 1/16 of the image side (see [`crate::augment`]).
    #[serde(default)]
    pub augment: bool,
    /// With `augment`: rotate a share of the images ([`crate::augment::AFFINE_SHARE`]) by up
    /// to this many degrees either way (0: none).
    #[serde(default)]
    pub augment_rotate: f64,
    /// With `augment`: scale that share of the images by a factor within `1 +- this`
    /// (0: none).
    #[serde(default)]
    pub augment_scale: f64,
    /// Repeat factor sampling: catalog columns whose combination of values groups the
    /// training samples (see [`repeat_weights`]); empty: every sample once per epoch.
    #[serde(default)]
    pub repeat_columns: Vec<String>,
    /// Repeat factor sampling's threshold `t`: a group that makes up a fraction `f < t` of
    /// the training samples is drawn `sqrt(t / f)` times as often as one at `t` or above.
    #[serde(default)]
    pub repeat_threshold: f64,
}

impl Default for FitConfig {
    /// The original recipe.
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_size: 32,
            grad_accum: 8,
            lr: 1e-3,
            lr_schedule: LrSchedule::Step,
            warmup_epochs: 0.0,
            weight_decay: 0.01,
            lr_step_epochs: 2,
            lr_gamma: 0.8,
            max_grad_norm: 1.0,
            val_fraction: 0.2,
            seed: 42,
            max_steps: None,
            train_encoder: false,
            encoder: DEFAULT_ENCODER.into(),
            decoder: DEFAULT_DECODER.into(),
            preset: None,
            dropout: None,
            augment: false,
            augment_rotate: 0.0,
            augment_scale: 0.0,
            repeat_columns: Vec::new(),
            repeat_threshold: 0.0,
            data_parallel: 1,
            sample_budget: None,
        }
    }
}

/// The tiny preset's training budget: 270 epochs of the 1,200 training samples of a
/// 1,500-product catalog; a 3,000-product catalog gets 135.
pub const TINY_SAMPLE_BUDGET: u64 = 324_000;

impl FitConfig {
    /// The tiny preset's settings: the encoder trains (patch 16, CLIP's initialisation, see
    /// `preset::tiny_encoder_init`) with augmented images (flips, shifts up to 4 px, and half
    /// of them rotated by up to 10 degrees and scaled by 0.8-1.2), one
    /// learning rate of 1e-3 for all on a cosine schedule after 5 warm-up epochs, AdamW
    /// weight decay 0.1, a budget of [`TINY_SAMPLE_BUDGET`] samples (270 epochs of 1,200, 135
    /// of 2,400), decoder dropout 0.1, micro-batches split over 2 threads. How each setting
    /// was chosen (the experiments on synthetic catalogs and their results) is in
    /// docs/PERFORMANCE.md.
    pub fn tiny() -> Self {
        Self {
            epochs: 270,
            batch_size: 32,
            grad_accum: 1,
            lr: 1e-3,
            lr_step_epochs: 30,
            lr_gamma: 0.5,
            train_encoder: true,
            preset: Some(Preset::Tiny),
            dropout: Some(0.1),
            augment: true,
            augment_rotate: 10.0,
            augment_scale: 0.2,
            weight_decay: 0.1,
            lr_schedule: LrSchedule::Cosine,
            warmup_epochs: 5.0,
            data_parallel: 2,
            sample_budget: Some(TINY_SAMPLE_BUDGET),
            ..Self::default()
        }
    }

    /// Checks every setting: counts positive, every float finite and in its range; the error
    /// names the flag.
    pub fn check(&self) -> Result<()> {
        fn bad(msg: String) -> Result<()> {
            Err(Error::InvalidArgument(msg))
        }
        for (flag, value) in [
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--lr-step-epochs", self.lr_step_epochs),
            ("--data-parallel", self.data_parallel),
        ] {
            if value == 0 {
                return bad(format!("{flag} must be at least 1, got 0"));
            }
        }
        if self.max_steps == Some(0) {
            return bad("--max-steps must be at least 1, got 0".to_string());
        }
        let check = |flag: &str, v: f64, ok: bool, range: &str| -> Result<()> {
            if v.is_finite() && ok {
                Ok(())
            } else {
                bad(format!("{flag} must be {range}, got {v}"))
            }
        };
        check("--lr", self.lr, self.lr > 0.0, "a number > 0")?;
        check(
            "--weight-decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "a number >= 0",
        )?;
        check(
            "--lr-gamma",
            self.lr_gamma,
            self.lr_gamma > 0.0,
            "a number > 0",
        )?;
        check(
            "--warmup-epochs",
            self.warmup_epochs,
            self.warmup_epochs >= 0.0,
            "a number >= 0",
        )?;
        check(
            "--max-grad-norm",
            self.max_grad_norm,
            self.max_grad_norm >= 0.0,
            "a number >= 0 (0 turns clipping off)",
        )?;
        check(
            "--val-fraction",
            self.val_fraction,
            self.val_fraction > 0.0 && self.val_fraction < 1.0,
            "a number in (0, 1)",
        )?;
        check(
            "--augment-rotate",
            self.augment_rotate,
            (0.0..=45.0).contains(&self.augment_rotate),
            "a number of degrees in [0, 45]",
        )?;
        check(
            "--augment-scale",
            self.augment_scale,
            (0.0..0.5).contains(&self.augment_scale),
            "a number in [0, 0.5)",
        )?;
        if !self.augment && (self.augment_rotate > 0.0 || self.augment_scale > 0.0) {
            return bad(
                "--augment-rotate and --augment-scale act on augmented images: add --augment \
                 (on with --preset tiny unless --no-augment)"
                    .to_string(),
            );
        }
        check(
            "--repeat-threshold",
            self.repeat_threshold,
            (0.0..=1.0).contains(&self.repeat_threshold),
            "a fraction in [0, 1]",
        )?;
        if self.repeat_columns.is_empty() != (self.repeat_threshold == 0.0) {
            return bad(
                "--repeat-rare and --repeat-threshold go together: the columns that group the \
                 samples and the fraction below which a group is drawn more often"
                    .to_string(),
            );
        }
        if let Some(p) = self.dropout {
            check(
                "--dropout",
                p,
                (0.0..1.0).contains(&p),
                "a number in [0, 1)",
            )?;
        }
        Ok(())
    }
}

/// One epoch's record (in the training state and the metrics file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean training loss of the epoch's micro-batches.
    pub train_loss: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// The learning rate of the epoch.
    pub lr: f64,
    /// Optimizer steps at the end of the epoch.
    pub step: u64,
    /// Wall time of the epoch (seconds).
    pub seconds: f64,
}

/// Where a run stands; written with every checkpoint (`training_state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The run's settings.
    pub config: FitConfig,
    /// The epoch in progress (0-based).
    pub epoch: usize,
    /// Micro-batches of that epoch already consumed.
    pub batch_pos: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// Sum and count of the epoch's micro-batch losses so far.
    pub epoch_loss_sum: f64,
    /// Micro-batches summed in `epoch_loss_sum`.
    pub epoch_loss_count: usize,
    /// The best validation loss so far.
    pub best_val_loss: Option<f64>,
    /// The dropout generator's state.
    pub dropout_state: Option<u64>,
    /// The ids of the validation samples, in row order, for people and older tools to read
    /// (an id repeats when several rows have it). Checkpoints of older trainers record only
    /// these; see [`recorded_split`].
    #[serde(default)]
    pub validation_ids: Vec<String>,
    /// The validation rows: exactly the run's split, what `--resume` and `trainer eval
    /// --split val` use ([`recorded_split`]).
    #[serde(default)]
    pub validation_rows: Vec<RowKey>,
    /// Finished epochs.
    pub history: Vec<EpochRecord>,
    /// Whether the run reached its last epoch.
    pub finished: bool,
}

impl TrainState {
    /// Reads `dir/training_state.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text =
            moda_models::files::read_text_bounded(&path, moda_models::files::TEXT_FILE_MAX_BYTES)
                .map_err(|e| Error::TrainingState {
                path: path.clone(),
                msg: if e.kind() == std::io::ErrorKind::NotFound {
                    "missing (is this a checkpoint written by `trainer fit`?)".to_string()
                } else {
                    e.to_string()
                },
            })?;
        serde_json::from_str(&text).map_err(|e| Error::TrainingState {
            path,
            msg: e.to_string(),
        })
    }
}

/// The train/validation split of the run whose state is `state`, rebuilt on `catalog`, and
/// warnings for the caller to show; `Err` says why the catalog does not have it.
///
/// A state that records rows ([`TrainState::validation_rows`]) gives exactly its split, or an
/// error when a row is not there. Older checkpoints record only the validation ids: their run
/// drew the split with [`Split::new`] from its seed, so when that draw on `catalog` gives the
/// recorded ids, it is the run's split; otherwise (the catalog changed) the split is rebuilt from
/// the ids, with a warning, and rows that share a recorded id all count as validation.
pub fn recorded_split(
    catalog: &Catalog,
    state: &TrainState,
) -> std::result::Result<(Split, Vec<String>), String> {
    let csv = catalog.csv.display();
    if !state.validation_rows.is_empty() {
        let (split, problems) = Split::from_rows(catalog, &state.validation_rows);
        return match problems.first() {
            Some(first) => Err(format!(
                "{} of the {} validation rows recorded in the checkpoint are not in the catalog \
                 {csv} (first: {first})",
                problems.len(),
                state.validation_rows.len()
            )),
            None => Ok((split, Vec::new())),
        };
    }
    if state.validation_ids.is_empty() {
        return Err("the checkpoint records no validation split".to_string());
    }
    if let Ok(split) = catalog.split(state.config.val_fraction, state.config.seed) {
        if split.validation_ids(catalog) == state.validation_ids {
            return Ok((split, Vec::new()));
        }
    }
    let (split, absent) = Split::from_ids(catalog, &state.validation_ids);
    if let Some(first) = absent.first() {
        return Err(format!(
            "{} validation sample id(s) recorded in the checkpoint are not in the catalog {csv} \
             (first: {first})",
            absent.len()
        ));
    }
    let mut warnings = vec![format!(
        "the checkpoint records its validation split by id only (an older trainer wrote it) \
         and the catalog {csv} is not the one its run split: the {} validation rows are those \
         with a recorded id",
        split.validation.len()
    )];
    let recorded: HashSet<&str> = state.validation_ids.iter().map(String::as_str).collect();
    let shared: Vec<String> = catalog
        .duplicate_ids()
        .into_iter()
        .filter(|(id, _)| recorded.contains(id.as_str()))
        .map(|(id, n)| format!("{id:?} ({n} rows)"))
        .collect();
    if !shared.is_empty() {
        warnings.push(format!(
            "{} recorded validation id(s) appear on more than one row, and all their rows count \
             as validation, rows the run trained on among them: {}",
            shared.len(),
            shared.join(", ")
        ));
    }
    Ok((split, warnings))
}

/// What stopped [`fit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitEnd {
    /// All epochs done.
    Finished,
    /// `max_steps` reached.
    MaxSteps,
    /// The stop flag was raised (Ctrl-C); a resumable checkpoint was written.
    Interrupted,
}

/// The result of [`fit`].
#[derive(Debug, Clone)]
pub struct FitReport {
    /// Why it stopped.
    pub end: FitEnd,
    /// The warnings the run printed (repeated ids, a split rebuilt from an older checkpoint's
    /// ids, metrics records dropped on resume, stale temporary checkpoints removed).
    pub warnings: Vec<String>,
    /// The final state.
    pub state: TrainState,
    /// The output directory.
    pub out: PathBuf,
}

/// Options of [`fit`] that are not settings of the run.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// The catalog.
    pub source: CatalogSource,
    /// The output directory (checkpoints `best/`, `last/`, metrics, plot).
    pub out: PathBuf,
    /// A checkpoint to continue from: its `training_state.json` gives every setting of the run
    /// (the `FitConfig` passed to [`fit`] is then used only for `max_steps`), and the run
    /// continues exactly as it would have without the interruption.
    pub resume: Option<PathBuf>,
    /// When resuming: a new total number of epochs (`--epochs` given explicitly), which also
    /// stretches or shrinks a cosine schedule. `None` keeps the run's recorded length.
    pub resume_epochs: Option<usize>,
    /// The device.
    pub device: Device,
    /// Where image embeddings are cached.
    pub cache_dir: PathBuf,
    /// Show progress bars and messages.
    pub progress: bool,
    /// Raised (e.g. by a Ctrl-C handler) to stop at the next micro-batch with a resumable
    /// checkpoint.
    pub stop: Arc<AtomicBool>,
}

/// The model being trained and what is needed to save it.
struct Trainee {
    model: CaptionModel,
    decoder_store: ParamStore,
    encoder_store: Option<ParamStore>,
    tokenizer: ModaTokenizer,
    ckpt: CheckpointConfig,
    /// The encoder directory when it is a fixed external model.
    encoder_dir: Option<PathBuf>,
}

/// Builds the model: from the checkpoint being resumed, tiny and random (`--preset tiny`), or
/// from pretrained backbones.
fn build_trainee(
    cfg: &FitConfig,
    resume: Option<&Path>,
    captions: &[String],
    scratch: &Path,
    device: &Device,
) -> Result<Trainee> {
    match (resume, cfg.preset) {
        (Some(dir), _) => resumed_trainee(cfg, dir, device),
        (None, Some(Preset::Tiny)) => tiny_trainee(cfg, captions, scratch, device),
        (None, None) => pretrained_trainee(cfg, device),
    }
}

/// An encoder whose weights train: loaded from `dir` into a parameter store.
fn trainable_encoder(
    config: &ClipVisionConfig,
    dir: &Path,
    seed: u64,
    device: &Device,
) -> Result<(ClipVision, ParamStore)> {
    let weights = Weights::from_dir(dir)?;
    let store = ParamStore::new(Some(weights.clone()), vec![], seed);
    let encoder =
        ClipVision::new(config, store.var_builder(device)).map_err(|e| weights.explain(e))?;
    Ok((encoder, store))
}

/// The model of a checkpoint, to continue its run: the encoder trains when the checkpoint
/// embeds it or the run trains it; otherwise it is the fixed model the checkpoint names.
fn resumed_trainee(cfg: &FitConfig, dir: &Path, device: &Device) -> Result<Trainee> {
    let ckpt = CheckpointConfig::from_dir(dir)?;
    let weights = Weights::from_file(&dir.join(checkpoint::MODEL_FILE))?;
    let decoder_store = ParamStore::new(Some(weights.clone()), vec![], cfg.seed);
    let vb = decoder_store.var_builder(device);
    let decoder = Opt::new(&ckpt.decoder, vb.pp("opt")).map_err(|e| weights.explain(e))?;
    let projector = Projector::new(&ckpt.projector, vb).map_err(|e| weights.explain(e))?;
    let enc_dir = checkpoint::encoder_dir(dir, &ckpt)?;
    let (encoder, encoder_store, encoder_dir) = if ckpt.encoder.embedded || cfg.train_encoder {
        let (encoder, store) = trainable_encoder(&ckpt.encoder.config, &enc_dir, cfg.seed, device)?;
        (encoder, Some(store), None)
    } else {
        let encoder = ClipVision::from_dir(&enc_dir, DType::F32, device)?;
        (encoder, None, Some(enc_dir))
    };
    let tokenizer = ModaTokenizer::from_tokenizer_json(&dir.join(checkpoint::TOKENIZER_FILE))?;
    Ok(Trainee {
        model: CaptionModel::new(encoder, projector, decoder)?,
        decoder_store,
        encoder_store,
        tokenizer,
        ckpt,
        encoder_dir,
    })
}

/// The tiny preset's model: small random backbones (see [`preset`]) and a byte-level BPE
/// trained on the training captions; the encoder is embedded in every checkpoint.
fn tiny_trainee(
    cfg: &FitConfig,
    captions: &[String],
    scratch: &Path,
    device: &Device,
) -> Result<Trainee> {
    let tokenizer = preset::train_tokenizer(captions, 1024, scratch)?;
    let vocab = tokenizer.vocab_size().div_ceil(8) * 8;
    let mut dcfg = preset::tiny_decoder_config(vocab);
    if let Some(p) = cfg.dropout {
        dcfg.dropout = p;
    }
    let ecfg = preset::tiny_encoder_config();
    let pcfg = ProjectorConfig::new(ecfg.projection_dim, dcfg.embed_dim());
    let encoder_store = ParamStore::new(None, preset::tiny_encoder_init(&ecfg), cfg.seed ^ 0x0e0c);
    let encoder = ClipVision::new(&ecfg, encoder_store.var_builder(device))?;
    let decoder_store = ParamStore::new(
        None,
        vec![
            ("projection.".into(), NewInit::TorchLinear),
            ("opt.".into(), NewInit::Normal(preset::TINY_INIT_STD)),
        ],
        cfg.seed ^ 0xdec0,
    );
    let vb = decoder_store.var_builder(device);
    let decoder = Opt::new(&dcfg, vb.pp("opt"))?;
    let projector = Projector::new(&pcfg, vb)?;
    let ckpt = CheckpointConfig::new(
        EncoderInfo {
            config: ecfg,
            source: checkpoint::ENCODER_DIR.into(),
            embedded: true,
            trained: cfg.train_encoder,
        },
        dcfg,
        pcfg,
        preset::tiny_preprocessor_config(),
    );
    Ok(Trainee {
        model: CaptionModel::new(encoder, projector, decoder)?,
        decoder_store,
        encoder_store: Some(encoder_store),
        tokenizer,
        ckpt,
        encoder_dir: None,
    })
}

/// The recipe's model: the pretrained encoder and decoder (a local directory or a hub id
/// each) and a new projector between them.
fn pretrained_trainee(cfg: &FitConfig, device: &Device) -> Result<Trainee> {
    let enc_dir = resolve_model(
        &cfg.encoder,
        &[
            FileReq::config(),
            FileReq::weights(),
            FileReq::preprocessor_config().optional(),
        ],
    )?;
    let ecfg = ClipVisionConfig::from_file(&enc_dir.join("config.json"))?;
    let preprocessor = ImageProcessorConfig::from_dir_or_default(&enc_dir)?;
    let (encoder, encoder_store) = if cfg.train_encoder {
        let (encoder, store) = trainable_encoder(&ecfg, &enc_dir, cfg.seed, device)?;
        (encoder, Some(store))
    } else {
        (ClipVision::from_dir(&enc_dir, DType::F32, device)?, None)
    };
    let mut reqs = vec![FileReq::config(), FileReq::weights()];
    reqs.extend(FileReq::tokenizer_all());
    let dec_dir = resolve_model(&cfg.decoder, &reqs)?;
    let mut dcfg = OptConfig::from_file(&dec_dir.join("config.json"))?;
    if let Some(p) = cfg.dropout {
        dcfg.dropout = p;
    }
    let tokenizer = ModaTokenizer::from_dir(&dec_dir)?;
    let dw = Weights::from_dir(&dec_dir)?;
    let decoder_store = ParamStore::new(
        Some(dw.clone()),
        vec![("projection.".into(), NewInit::TorchLinear)],
        cfg.seed,
    );
    let vb = decoder_store.var_builder(device);
    let decoder = Opt::new(&dcfg, vb.pp("opt")).map_err(|e| dw.explain(e))?;
    let pcfg = ProjectorConfig::new(ecfg.projection_dim, dcfg.embed_dim());
    let projector = Projector::new(&pcfg, vb)?;
    let ckpt = CheckpointConfig::new(
        EncoderInfo {
            config: ecfg,
            source: recorded_encoder_source(cfg)?,
            embedded: cfg.train_encoder,
            trained: cfg.train_encoder,
        },
        dcfg,
        pcfg,
        preprocessor,
    );
    Ok(Trainee {
        model: CaptionModel::new(encoder, projector, decoder)?,
        decoder_store,
        encoder_store,
        tokenizer,
        ckpt,
        encoder_dir: (!cfg.train_encoder).then_some(enc_dir),
    })
}

/// Where a checkpoint finds its pretrained encoder: its own `encoder/` when the encoder
/// trains (embedded), else the hub id, or the local directory made absolute so that the
/// checkpoint loads from anywhere.
fn recorded_encoder_source(cfg: &FitConfig) -> Result<String> {
    if cfg.train_encoder {
        Ok(checkpoint::ENCODER_DIR.into())
    } else if Path::new(&cfg.encoder).is_dir() {
        Ok(std::fs::canonicalize(&cfg.encoder)
            .map_err(|e| Error::io(&cfg.encoder, e))?
            .display()
            .to_string())
    } else {
        Ok(cfg.encoder.clone())
    }
}

/// The trainable parameters: projector and decoder, plus the encoder with `--train-encoder`.
fn trainable_vars(t: &Trainee, cfg: &FitConfig) -> Vec<(String, candle_core::Var)> {
    let mut vars = t.decoder_store.vars();
    if cfg.train_encoder {
        if let Some(s) = &t.encoder_store {
            vars.extend(
                s.vars()
                    .into_iter()
                    .map(|(k, v)| (format!("encoder.{k}"), v)),
            );
        }
    }
    vars
}

/// Writes a checkpoint of `t` (and, with a state, everything needed to resume).
fn save_checkpoint(dir: &Path, t: &Trainee, state: &TrainState, optimizer: &AdamW) -> Result<()> {
    let model = t.decoder_store.tensors();
    let encoder = t.encoder_store.as_ref().map(ParamStore::tensors);
    let state_json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::InvalidArgument(format!("cannot serialize the state: {e}")))?;
    let contents = CheckpointContents {
        config: &t.ckpt,
        model: &model,
        encoder: if t.ckpt.encoder.embedded {
            encoder.as_ref()
        } else {
            None
        },
        tokenizer: &t.tokenizer,
        extra_files: vec![(STATE_FILE.to_string(), state_json)],
        extra_tensors: vec![(OPTIMIZER_FILE.to_string(), optimizer.state_tensors())],
    };
    checkpoint::save(dir, &contents)?;
    Ok(())
}

/// Token ids of a caption: BOS, the text, `</s>`.
fn caption_ids(tok: &ModaTokenizer, caption: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(caption)?;
    ids.push(tok.eos_id());
    Ok(ids)
}

/// A micro-batch's `input_ids` and text mask, right-padded.
fn pad_batch(ids: &[&Vec<u32>], pad: u32, device: &Device) -> Result<(Tensor, Tensor)> {
    let t = ids.iter().map(|v| v.len()).max().unwrap_or(1);
    let mut flat = Vec::with_capacity(ids.len() * t);
    let mut mask = Vec::with_capacity(ids.len() * t);
    for v in ids {
        for j in 0..t {
            flat.push(v.get(j).copied().unwrap_or(pad));
            mask.push(if j < v.len() { 1f32 } else { 0f32 });
        }
    }
    Ok((
        Tensor::from_vec(flat, (ids.len(), t), device)?,
        Tensor::from_vec(mask, (ids.len(), t), device)?,
    ))
}

/// The prepared data: token ids per sample and the image side.
pub(crate) struct Prepared {
    pub(crate) ids: Vec<Vec<u32>>,
    /// `[n, projection_dim]` embeddings of every sample (frozen encoder).
    pub(crate) embeds: Option<Tensor>,
    /// `[n, 3, h, w]` pixel values of every sample, when the encoder trains (preprocessed
    /// once, kept in memory).
    pub(crate) pixels: Option<Tensor>,
}

/// The image inputs of samples `idx`, in order: rows of the cached embeddings, or their pixel
/// values for the trained encoder, image `i` transformed by `draws[i]` when given (pixels
/// only: cached embeddings are not augmented).
fn select_images(
    data: &Prepared,
    idx: &[usize],
    device: &Device,
    draws: Option<&[crate::augment::Draw]>,
) -> Result<Tensor> {
    let rows: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let rows = Tensor::new(rows.as_slice(), device)?;
    match (&data.embeds, &data.pixels) {
        (Some(e), _) => Ok(e.index_select(&rows, 0)?),
        (None, Some(px)) => {
            let px = px.index_select(&rows, 0)?;
            let Some(draws) = draws else {
                return Ok(px);
            };
            let (n, c, h, w) = px.dims4()?;
            let mut values: Vec<f32> = px.flatten_all()?.to_vec1()?;
            crate::augment::apply(&mut values, c, h, w, draws);
            Ok(Tensor::from_vec(values, (n, c, h, w), device)?)
        }
        (None, None) => Err(Error::InvalidArgument("no image inputs prepared".into())),
    }
}

/// The summed loss of samples `idx` whose image inputs are `images` (see [`select_images`]),
/// and the number of predicted tokens.
fn loss_sum(
    model: &CaptionModel,
    data: &Prepared,
    images: &Tensor,
    idx: &[usize],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, usize)> {
    let image_embeds = if data.embeds.is_some() {
        images.clone()
    } else {
        model.encode_images(images)?
    };
    let ids: Vec<&Vec<u32>> = idx.iter().map(|&i| &data.ids[i]).collect();
    let (input_ids, text_mask) = pad_batch(&ids, pad, device)?;
    let prefix = model.project(&image_embeds)?;
    let batch = model.build_batch(&prefix, &input_ids, &text_mask)?;
    crate::loss::causal_lm_loss_sum(&model.logits(&batch)?, &batch.labels)
}

/// The mean loss of one micro-batch of sample indices, image `i` transformed by `draws[i]`
/// when given.
fn batch_loss(
    model: &CaptionModel,
    data: &Prepared,
    idx: &[usize],
    pad: u32,
    device: &Device,
    draws: Option<&[crate::augment::Draw]>,
) -> Result<Tensor> {
    let images = select_images(data, idx, device, draws)?;
    let (sum, count) = loss_sum(model, data, &images, idx, pad, device)?;
    Ok((sum / count.max(1) as f64)?)
}

/// `n` samples in `k` contiguous, near-equal, non-empty ranges (fewer when `n < k`).
fn shard_ranges(n: usize, k: usize) -> Vec<std::ops::Range<usize>> {
    let k = k.clamp(1, n.max(1));
    (0..k)
        .map(|i| (i * n / k)..((i + 1) * n / k))
        .filter(|r| !r.is_empty())
        .collect()
}

/// The dropout generator state of shard `k` of a micro-batch whose model state is `state`
/// (SplitMix64's finaliser over the state plus `k + 1` golden-ratio increments).
fn shard_seed(state: u64, k: usize) -> u64 {
    let mut z = state.wrapping_add((k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One shard's summed loss, predicted tokens and gradients of the summed loss.
type ShardResult = Result<(f64, usize, candle_core::backprop::GradStore)>;

/// The thread pool the shards of a micro-batch run on ([`sharded_step`]): one thread per
/// shard, made on first use (a process trains with one shard count).
fn shard_pool(shards: usize) -> Result<&'static rayon::ThreadPool> {
    if let Some(pool) = SHARD_POOL.get() {
        return Ok(pool);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(shards.max(1))
        .thread_name(|i| format!("shard-{i}"))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start the training threads: {e}")))?;
    Ok(SHARD_POOL.get_or_init(|| pool))
}

/// Runs `tasks` as tasks of `pool` (as many at once as it has threads) and returns their
/// results in order; a task that panics gives an error naming `what`.
fn on_pool<T, F>(pool: &rayon::ThreadPool, tasks: Vec<F>, what: &str) -> Vec<Result<T>>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let mut slots: Vec<Option<Result<T>>> = tasks.iter().map(|_| None).collect();
    pool.scope(|sc| {
        for (task, slot) in tasks.into_iter().zip(slots.iter_mut()) {
            sc.spawn(move |_| {
                *slot = Some(
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)).unwrap_or_else(
                        |_| Err(Error::InvalidArgument(format!("{what} panicked"))),
                    ),
                );
            });
        }
    });
    slots
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::InvalidArgument(format!("{what} did not run")))))
        .collect()
}

/// Runs `f` in [`shard_pool`]'s pool when there is one, so that the parallel iterators in it
/// (the optimizer's) use every core: rayon's global pool then has one thread, the cores being
/// divided between the shards for candle's products.
fn on_all_cores<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match SHARD_POOL.get() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// [`shard_pool`]'s pool, once made.
static SHARD_POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();

/// Forward and backward of one micro-batch split into `shards` on as many threads (CPU), each
/// on a clone of the model (shared weights) with a dropout generator of its own; the model's
/// generator then moves on by one draw. Returns the micro-batch's mean loss; the gradients of
/// that mean, divided by `grad_accum`, are added to `optimizer`. The result depends on the
/// number of shards (dropout draws, summation order), not on the number of cores.
#[allow(clippy::too_many_arguments)]
fn sharded_step(
    model: &CaptionModel,
    data: &Prepared,
    draws: Option<&[crate::augment::Draw]>,
    idx: &[usize],
    shards: &[std::ops::Range<usize>],
    pad: u32,
    device: &Device,
    grad_accum: usize,
    optimizer: &mut AdamW,
) -> Result<f32> {
    let base = model.decoder().dropout_state();
    // The shards run as tasks of a rayon pool of one thread per shard. An op of a shard that
    // splits its rows on rayon (our kernels, some of candle's) then splits them on that pool,
    // from inside it: the shard's thread runs them itself, and a thread done with its shard
    // steals some. On plain threads of their own, the shards' splits all went to rayon's
    // global pool (one thread: the cores are divided between the shards) and each shard slept
    // while they queued there.
    let tasks: Vec<_> = shards
        .iter()
        .enumerate()
        .map(|(k, range)| {
            let fork = model.clone();
            if let Some(b) = base {
                fork.decoder().set_dropout_state(shard_seed(b, k));
            }
            let range = range.clone();
            move || -> ShardResult {
                let draws = draws.map(|d| &d[range.clone()]);
                let imgs = select_images(data, &idx[range.clone()], device, draws)?;
                let (sum, count) = loss_sum(&fork, data, &imgs, &idx[range], pad, device)?;
                let value = sum.to_scalar::<f32>()? as f64;
                let grads = sum.backward()?;
                Ok((value, count, grads))
            }
        })
        .collect();
    let pool = shard_pool(shards.len())?;
    let results = on_pool(pool, tasks, "a training shard");
    if let Some(b) = base {
        model
            .decoder()
            .set_dropout_state(shard_seed(b, shards.len()));
    }
    let parts = results.into_iter().collect::<Result<Vec<_>>>()?;
    let count = parts.iter().map(|p| p.1).sum::<usize>().max(1);
    let mean = parts.iter().map(|p| p.0).sum::<f64>() / count as f64;
    if mean.is_finite() {
        let scale = 1.0 / (count as f64 * grad_accum as f64);
        let stores: Vec<_> = parts.iter().map(|p| &p.2).collect();
        on_all_cores(|| optimizer.accumulate_scaled(&stores, scale))?;
    }
    Ok(mean as f32)
}

/// Mean loss over `idx` in eval mode (no dropout), in batches of `bs`.
fn evaluate_loss(
    model: &mut CaptionModel,
    data: &Prepared,
    idx: &[usize],
    bs: usize,
    pad: u32,
    device: &Device,
) -> Result<f64> {
    let was = model.decoder().dropout_state();
    model.decoder_mut().eval();
    let mut sum = 0f64;
    let mut n = 0usize;
    let chunks: Vec<&[usize]> = idx.chunks(bs.max(1)).collect();
    let one = |model: &CaptionModel, chunk: &[usize]| -> Result<f64> {
        Ok(batch_loss(model, data, chunk, pad, device, None)?
            .detach()
            .to_scalar::<f32>()? as f64)
    };
    // With sharded training the batches go to the shards' pool, as many at once as it has
    // threads; the losses are added in batch order all the same.
    let losses: Vec<Result<f64>> = match SHARD_POOL.get() {
        Some(pool) => {
            let tasks: Vec<_> = chunks
                .iter()
                .map(|chunk| {
                    let fork = model.clone();
                    move || one(&fork, chunk)
                })
                .collect();
            on_pool(pool, tasks, "a validation batch")
        }
        None => chunks.iter().map(|chunk| one(model, chunk)).collect(),
    };
    let result = (|| -> Result<()> {
        for (chunk, l) in chunks.iter().zip(losses) {
            sum += l? * chunk.len() as f64;
            n += chunk.len();
        }
        Ok(())
    })();
    if let Some(s) = was {
        model.decoder_mut().train(s);
    }
    result?;
    Ok(sum / n.max(1) as f64)
}

/// The order of the training samples in `epoch`: a ChaCha8 shuffle seeded by the run's seed
/// and the epoch, so that a resumed run sees the same order.
fn epoch_order(train: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut order = train.to_vec();
    order.shuffle(&mut epoch_rng(seed, epoch));
    order
}

/// The generator of an epoch's data order, from the run's seed and the epoch.
fn epoch_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9)
            .wrapping_add(epoch as u64 + 1),
    )
}

/// Repeat factor sampling (Gupta, Dollar and Girshick, "LVIS", 2019) over catalog columns:
/// the training samples are grouped by their values in `columns`, and a sample of a group
/// that makes up a fraction `f` of them gets the repeat factor `r = max(1, sqrt(threshold /
/// f))`. Returns each sample's factor as an integer weight (`r` in units of 2^-20), in the
/// order of `samples`, or an error naming a column that a sample lacks.
pub fn repeat_weights(
    samples: &[&BTreeMap<String, String>],
    columns: &[String],
    threshold: f64,
) -> std::result::Result<Vec<u64>, String> {
    let mut keys = Vec::with_capacity(samples.len());
    for attributes in samples {
        let mut key = Vec::with_capacity(columns.len());
        for c in columns {
            match attributes.get(c) {
                Some(v) => key.push(v.as_str()),
                None => {
                    let mut have: Vec<&str> = attributes.keys().map(String::as_str).collect();
                    have.sort_unstable();
                    return Err(format!(
                        "--repeat-rare: no column {c:?} in the catalog (its columns: {})",
                        have.join(", ")
                    ));
                }
            }
        }
        keys.push(key);
    }
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for k in &keys {
        *counts.entry(k.as_slice()).or_default() += 1;
    }
    let n = samples.len().max(1) as f64;
    Ok(keys
        .iter()
        .map(|k| {
            let f = counts[k.as_slice()] as f64 / n;
            let r = (threshold / f).sqrt().max(1.0);
            (r * f64::from(1u32 << 20)).round() as u64
        })
        .collect())
}

/// The samples of an epoch under repeat factor sampling: as many as `train` holds, sample
/// `train[i]` drawn about `weights[i] / mean(weights)` times (systematic sampling over a
/// shuffled order, so that each count is the floor or the ceiling of its expectation), then
/// shuffled; seeded like [`epoch_order`], so that a resumed run draws the same.
fn weighted_epoch_order(train: &[usize], weights: &[u64], seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = epoch_rng(seed, epoch);
    let mut pos: Vec<usize> = (0..train.len().min(weights.len())).collect();
    pos.shuffle(&mut rng);
    let total: u128 = pos.iter().map(|&p| u128::from(weights[p])).sum();
    let n = pos.len() as u128;
    if total == 0 {
        return epoch_order(train, seed, epoch);
    }
    // Sample j's count: the multiples of `total` that its share of [0, n * total) crosses,
    // offset by `u`; the counts add up to exactly n.
    let u = rand::Rng::random_range(&mut rng, 0..total);
    let mut order = Vec::with_capacity(train.len());
    let mut cum: u128 = 0;
    for &p in &pos {
        let before = (cum * n + u) / total;
        cum += u128::from(weights[p]);
        let after = (cum * n + u) / total;
        for _ in before..after {
            order.push(train[p]);
        }
    }
    order.shuffle(&mut rng);
    order
}

/// Refuses an output directory that is, contains or lies inside what the run reads (the
/// catalog, a local encoder or decoder, the checkpoint it resumes, unless that is the run's
/// own `best/` or `last/`), and an existing one that holds anything but a run's files: the run
/// replaces `best/` and `last/` and rewrites the metrics and the plot.
fn check_run_dir(cfg: &FitConfig, opts: &FitOptions, resume: Option<&Path>) -> Result<()> {
    let out = &opts.out;
    let apart = |what: &str, input: &Path| -> Result<()> {
        match moda_models::files::overlap(out, input) {
            None => Ok(()),
            Some(relation) => Err(Error::OutputOverlapsInput {
                flag: "--out",
                out: out.clone(),
                relation,
                what: what.to_string(),
                input: input.to_path_buf(),
            }),
        }
    };
    for (what, input) in opts.source.inputs() {
        apart(what, &input)?;
    }
    match resume {
        Some(dir) => {
            // `--resume OUT/last` (or `OUT/best`, or the `.last.old` a crash left) continues a
            // run in its own directory: the checkpoint is read whole before it is replaced.
            let own = ["best", "last", ".best.old", ".last.old"]
                .iter()
                .any(|n| moda_models::files::overlap(&out.join(n), dir) == Some("is"));
            if !own {
                apart("checkpoint being resumed", dir)?;
            }
            if let Ok(ck) = CheckpointConfig::from_dir(dir) {
                let source = Path::new(&ck.encoder.source);
                if !ck.encoder.embedded && source.exists() {
                    apart("encoder of the checkpoint being resumed", source)?;
                }
            }
        }
        None if cfg.preset.is_none() => {
            for (what, name) in [("encoder", &cfg.encoder), ("decoder", &cfg.decoder)] {
                let path = Path::new(name);
                if path.exists() {
                    apart(what, path)?;
                }
            }
        }
        None => {}
    }
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    let foreign: Vec<String> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            match name.as_ref() {
                // Temporaries (checkpoints being written, metrics being repaired).
                n if n.starts_with('.') => false,
                "best" | "last" => !e.path().join(checkpoint::CONFIG_FILE).is_file(),
                METRICS_FILE | PLOT_FILE => !e.path().is_file(),
                _ => true,
            }
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if let Some(first) = foreign.first() {
        return Err(Error::OutputNotReplaceable {
            path: out.clone(),
            msg: format!(
                "not a training run's directory: it holds {first:?}{} (a run's directory holds \
                 only the checkpoints best/ and last/, {METRICS_FILE} and {PLOT_FILE}); \
                 `trainer fit` would write among them and replace any best/ or last/: choose a \
                 new or empty --out",
                match foreign.len() {
                    1 => String::new(),
                    n => format!(" and {} other entries", n - 1),
                }
            ),
        });
    }
    Ok(())
}

fn ensure_writable(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| Error::OutputNotWritable {
        path: out.to_path_buf(),
        source,
    })?;
    let probe = out.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|source| Error::OutputNotWritable {
        path: out.to_path_buf(),
        source,
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Appends one record to the metrics file as one line written by one `write_all` of the
/// whole line, newline included, on an unbuffered file opened for appending: a crash leaves
/// either the whole line or a torn last line, which [`repair_metrics`] drops, never two
/// records glued together.
fn append_metric(out: &Path, value: &serde_json::Value) -> Result<()> {
    let path = out.join(METRICS_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    write_record(&mut f, value).map_err(|e| Error::io(&path, e))
}

/// Writes `value` and a newline with a single `write_all`.
fn write_record(w: &mut impl Write, value: &serde_json::Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())
}

/// What [`repair_metrics`] dropped from a metrics file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsRepair {
    /// The step the file was cut back to.
    pub step: u64,
    /// Records kept.
    pub kept: usize,
    /// Complete records after the state (step or epoch beyond it).
    pub after: usize,
    /// A last line without its newline (a write cut short).
    pub torn: bool,
    /// Complete lines that are not a record (not JSON, or no `step`).
    pub unreadable: usize,
}

impl MetricsRepair {
    /// A line for the log, when anything was dropped.
    pub fn message(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.after > 0 {
            parts.push(format!(
                "{} record(s) after step {}, where this run starts",
                self.after, self.step
            ));
        }
        if self.unreadable > 0 {
            parts.push(format!("{} unreadable line(s)", self.unreadable));
        }
        if self.torn {
            parts.push("a torn last line".to_string());
        }
        (!parts.is_empty()).then(|| format!("{METRICS_FILE}: dropped {}", parts.join(", ")))
    }
}

/// Cuts a metrics file back to a run state of `step` optimizer steps and `epochs` finished
/// epochs: keeps the step records up to `step` and the epoch records up to `epochs`, and drops
/// the rest, a torn last line and lines that are not records. A run resumed from a checkpoint
/// then writes each step's record once; a new run (`0, 0`) starts an empty file. The file is
/// rewritten (a temporary file renamed over it) only when something is dropped.
pub fn repair_metrics(path: &Path, step: u64, epochs: usize) -> Result<MetricsRepair> {
    // A regular file only (a FIFO or a device in the output directory is refused), of at
    // most 1 GiB (millions of steps).
    let bytes = match moda_models::files::read_bounded(path, 1 << 30) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(MetricsRepair::default()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut repair = MetricsRepair {
        step,
        ..MetricsRepair::default()
    };
    let mut kept = Vec::with_capacity(bytes.len());
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            repair.torn = true;
            break;
        };
        let (line, tail) = rest.split_at(end + 1);
        rest = tail;
        let record: Option<serde_json::Value> = serde_json::from_slice(line).ok();
        let at = record.as_ref().and_then(|v| {
            let step = v.get("step")?.as_u64()?;
            let epoch = v.get("epoch").and_then(serde_json::Value::as_u64);
            Some((
                v.get("kind").and_then(serde_json::Value::as_str) == Some("epoch"),
                step,
                epoch,
            ))
        });
        match at {
            None => repair.unreadable += 1,
            Some((is_epoch, s, e)) => {
                let keep = if is_epoch {
                    e.is_some_and(|e| e <= epochs as u64) && s <= step
                } else {
                    s <= step
                };
                if keep {
                    kept.extend_from_slice(line);
                    repair.kept += 1;
                } else {
                    repair.after += 1;
                }
            }
        }
    }
    if repair.message().is_some() {
        let tmp = path.with_file_name(format!(".{METRICS_FILE}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, &kept).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })?;
    }
    Ok(repair)
}

/// What training needs of the catalog: every caption's token ids, and either the cached
/// embeddings of the frozen encoder or, when the encoder trains, the pixel values.
fn prepare_data(
    catalog: &Catalog,
    t: &Trainee,
    cfg: &FitConfig,
    opts: &FitOptions,
) -> Result<Prepared> {
    let ids = catalog
        .samples
        .iter()
        .map(|s| caption_ids(&t.tokenizer, &s.caption))
        .collect::<Result<Vec<_>>>()?;
    let max_len = ids.iter().map(Vec::len).max().unwrap_or(0) + 1;
    if max_len > t.ckpt.decoder.max_position_embeddings {
        return Err(Error::InvalidArgument(format!(
            "the longest caption takes {max_len} positions, the decoder has {}",
            t.ckpt.decoder.max_position_embeddings
        )));
    }
    let processor = ImageProcessor::new(t.ckpt.preprocessor.clone())?;
    if cfg.train_encoder {
        // The encoder changes every step: no embedding cache, but the pixels are computed
        // once, not every epoch.
        let pixels = preprocess_all(catalog, &processor, &opts.device)?;
        return Ok(Prepared {
            ids,
            embeds: None,
            pixels: Some(pixels),
        });
    }
    let embeds = cached_embeddings(catalog, t, &processor, opts)?;
    Ok(Prepared {
        ids,
        embeds: Some(embeds),
        pixels: None,
    })
}

/// The `[n, 3, h, w]` pixel values of every sample, preprocessed on one thread per core.
fn preprocess_all(
    catalog: &Catalog,
    processor: &ImageProcessor,
    device: &Device,
) -> Result<Tensor> {
    let limits = moda_models::preprocess::ImageLimits::default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = catalog.samples.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<Result<Vec<f32>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = catalog
            .samples
            .chunks(chunk)
            .map(|c| {
                let limits = &limits;
                sc.spawn(move || -> Result<Vec<f32>> {
                    let mut out = Vec::new();
                    for s in c {
                        out.extend(processor.preprocess_path(&s.image, limits)?);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::InvalidArgument(
                        "image preprocessing panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let mut px = Vec::new();
    for p in parts {
        px.extend(p?);
    }
    let (h, w) = processor.config().output_size();
    Ok(Tensor::from_vec(px, (catalog.len(), 3, h, w), device)?)
}

/// The frozen encoder's `[n, projection_dim]` embeddings of every sample, read from the
/// embedding cache or computed into it. The cache is keyed by the encoder: the fingerprint of
/// an external model's directory, or of an embedded encoder's configuration and weights.
fn cached_embeddings(
    catalog: &Catalog,
    t: &Trainee,
    processor: &ImageProcessor,
    opts: &FitOptions,
) -> Result<Tensor> {
    let fingerprint = match &t.encoder_dir {
        Some(dir) => EncoderFingerprint::from_dir(dir)?,
        None => embedded_encoder_fingerprint(t)?,
    };
    let cache = EmbeddingCache::open(opts.cache_dir.clone(), fingerprint)?;
    let pb = if opts.progress {
        let pb = ProgressBar::new(catalog.len() as u64);
        pb.set_style(
            ProgressStyle::with_template("embedding images {bar:30} {pos}/{len} {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let embeds = cache.get_or_compute(
        &catalog.samples,
        t.model.encoder(),
        processor,
        &opts.device,
        64,
        &pb,
    )?;
    pb.finish_and_clear();
    Ok(embeds.to_dtype(DType::F32)?)
}

/// The fingerprint of an embedded encoder (random or resumed): its configuration and its
/// weights' values.
fn embedded_encoder_fingerprint(t: &Trainee) -> Result<EncoderFingerprint> {
    let enc = t
        .encoder_store
        .as_ref()
        .map(ParamStore::tensors)
        .unwrap_or_default();
    let mut parts: Vec<Vec<u8>> = vec![serde_json::to_vec(&t.ckpt.encoder.config)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?];
    for (k, v) in &enc {
        parts.push(k.as_bytes().to_vec());
        let vals: Vec<f32> = v.flatten_all()?.to_vec1()?;
        parts.push(vals.iter().flat_map(|x| x.to_le_bytes()).collect());
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(EncoderFingerprint::from_parts(&refs))
}

/// Trains MODA; see the module docs. `cfg` is ignored when resuming (the checkpoint's settings
/// apply), except `epochs` and `max_steps`.
pub fn fit(cfg: &FitConfig, opts: &FitOptions) -> Result<FitReport> {
    let created = !opts.out.exists();
    let result = fit_in(cfg, opts);
    if result.is_err() && created {
        // A run that failed before writing anything (a model that does not resolve, a bad
        // catalog) leaves no empty output directory behind. `remove_dir` keeps a directory
        // that holds anything (checkpoints of a run stopped by a NaN loss, say).
        let _ = std::fs::remove_dir(&opts.out);
    }
    result
}

/// The run, step by step: its starting state, the checks, the data and its split, the model,
/// the cached embeddings (or pixels), the optimizer, then the epochs.
fn fit_in(cfg: &FitConfig, opts: &FitOptions) -> Result<FitReport> {
    let mut log = Log {
        progress: opts.progress,
        warnings: Vec::new(),
    };
    let resume_dir = opts.resume.as_deref().map(checkpoint::resolve_dir);
    let mut state = match &resume_dir {
        Some(dir) => resumed_state(dir, cfg, opts, &log)?,
        None => TrainState::start(cfg.clone()),
    };
    let mut cfg = state.config.clone();
    check_run(&cfg, &state, opts, resume_dir.as_deref())?;
    let (catalog, split) =
        load_and_split(&mut cfg, &mut state, opts, resume_dir.is_some(), &mut log)?;
    let repeat = sampling_weights(&cfg, &catalog, &split, &mut log)?;
    let train_captions: Vec<String> = split
        .train
        .iter()
        .map(|&i| catalog.samples[i].caption.clone())
        .collect();
    let mut trainee = build_trainee(
        &cfg,
        resume_dir.as_deref(),
        &train_captions,
        &opts.out,
        &opts.device,
    )?;
    trainee.ckpt.schema = caption_schema(&opts.source, &catalog, &split);
    let data = prepare_data(&catalog, &trainee, &cfg, opts)?;
    let optimizer = new_optimizer(&trainee, &cfg, &state, resume_dir.as_deref(), &opts.device)?;
    trainee
        .model
        .decoder_mut()
        .train(state.dropout_state.unwrap_or(cfg.seed ^ 0xd0d0));
    log.say(format!(
        "training {} parameters on {} samples ({} held out), {} epochs",
        optimizer
            .vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>(),
        split.train.len(),
        split.validation.len(),
        cfg.epochs
    ));
    clean_output(opts, &state, &mut log)?;

    let mut run = Run::new(cfg, opts, trainee, data, split, optimizer, state, log);
    run.last_good = resume_dir;
    run.repeat = repeat;
    let end = run.train()?;
    Ok(FitReport {
        end,
        warnings: run.log.warnings,
        state: run.state,
        out: opts.out.clone(),
    })
}

/// Repeat factor sampling's weights over the training split (see [`repeat_weights`]), when
/// configured, with a line in the log on what they do.
fn sampling_weights(
    cfg: &FitConfig,
    catalog: &Catalog,
    split: &Split,
    log: &mut Log,
) -> Result<Option<Vec<u64>>> {
    if cfg.repeat_columns.is_empty() {
        return Ok(None);
    }
    let attributes: Vec<&BTreeMap<String, String>> = split
        .train
        .iter()
        .map(|&i| &catalog.samples[i].attributes)
        .collect();
    let weights = repeat_weights(&attributes, &cfg.repeat_columns, cfg.repeat_threshold)
        .map_err(|m| Error::InvalidArgument(format!("{}: {m}", catalog.csv.display())))?;
    let unit = f64::from(1u32 << 20);
    let mean = weights.iter().sum::<u64>() as f64 / weights.len().max(1) as f64;
    let max = weights.iter().copied().max().unwrap_or(0) as f64;
    let repeated = weights.iter().filter(|&&w| w as f64 > unit).count();
    log.say(format!(
        "repeat factor sampling over {}: {repeated} of {} training samples are in groups under \
         {} of them; per epoch the rarest are drawn {:.2} times on average, the commonest {:.2}",
        cfg.repeat_columns.join(", "),
        weights.len(),
        cfg.repeat_threshold,
        max / mean.max(1.0),
        unit / mean.max(1.0)
    ));
    Ok(Some(weights))
}

/// The caption schema a checkpoint records: the Kaggle layout's caption template with each
/// field's values counted over the training split (what the model was taught to write);
/// `None` for a CSV of free captions, which has no template.
pub fn caption_schema(
    source: &CatalogSource,
    catalog: &Catalog,
    split: &Split,
) -> Option<CaptionSchema> {
    match source {
        CatalogSource::Kaggle { template, .. } => Some(CaptionSchema::from_rows(
            template.clone(),
            split.train.iter().map(|&i| &catalog.samples[i]),
            |s, field| s.attributes.get(field).cloned(),
        )),
        CatalogSource::Csv { .. } => None,
    }
}

/// Where a run's messages go: progress lines to stderr when asked for; warnings always, and
/// kept for the report.
struct Log {
    progress: bool,
    warnings: Vec<String>,
}

impl Log {
    fn say(&self, msg: String) {
        if self.progress {
            eprintln!("{msg}");
        }
    }

    fn warn(&mut self, msg: String) {
        eprintln!("warning: {msg}");
        self.warnings.push(msg);
    }
}

impl TrainState {
    /// The state of a new run: nothing done yet.
    fn start(config: FitConfig) -> Self {
        TrainState {
            config,
            epoch: 0,
            batch_pos: 0,
            step: 0,
            epoch_loss_sum: 0.0,
            epoch_loss_count: 0,
            best_val_loss: None,
            dropout_state: None,
            validation_ids: Vec::new(),
            validation_rows: Vec::new(),
            history: Vec::new(),
            finished: false,
        }
    }
}

/// The state of the checkpoint `dir`, to continue its run to its recorded end: to another
/// length only when `--epochs` asks for one; `--max-steps` as given now.
fn resumed_state(dir: &Path, cfg: &FitConfig, opts: &FitOptions, log: &Log) -> Result<TrainState> {
    let mut s = TrainState::from_dir(dir).map_err(|e| Error::Resume(e.to_string()))?;
    if let Some(epochs) = opts.resume_epochs {
        if epochs < s.epoch {
            return Err(Error::Resume(format!(
                "--epochs {epochs}: the run has already finished {} epochs",
                s.epoch
            )));
        }
        if epochs != s.config.epochs {
            log.say(format!(
                "--epochs {epochs}: the run's {} epochs become {epochs}",
                s.config.epochs
            ));
        }
        s.config.epochs = epochs;
        s.config.sample_budget = None;
    }
    s.config.max_steps = cfg.max_steps;
    s.finished = s.epoch >= s.config.epochs;
    Ok(s)
}

/// Everything checked before the catalog is read: the settings, the backbones a new run
/// names, the output directory (apart from the inputs, a run's or empty, writable) and a
/// `--max-steps` still ahead of a resumed run.
fn check_run(
    cfg: &FitConfig,
    state: &TrainState,
    opts: &FitOptions,
    resume: Option<&Path>,
) -> Result<()> {
    cfg.check()?;
    if resume.is_none() {
        check_backbones_used(cfg)?;
    }
    check_run_dir(cfg, opts, resume)?;
    if let (Some(_), Some(max)) = (resume, cfg.max_steps) {
        if max <= state.step {
            return Err(Error::Resume(format!(
                "--max-steps {max}: the run has already taken {} optimizer steps",
                state.step
            )));
        }
    }
    ensure_writable(&opts.out)
}

/// Refuses an encoder or decoder that a preset does not use: the tiny preset builds its own
/// random backbones, so an `encoder` or `decoder` other than the defaults (a local directory,
/// a hub id, or a path that does not exist) would be silently ignored.
fn check_backbones_used(cfg: &FitConfig) -> Result<()> {
    let Some(preset) = cfg.preset else {
        return Ok(());
    };
    let name = preset.name();
    for (flag, given, default, what) in [
        ("--encoder", &cfg.encoder, DEFAULT_ENCODER, "encoder"),
        ("--decoder", &cfg.decoder, DEFAULT_DECODER, "decoder"),
    ] {
        if given != default {
            return Err(Error::InvalidArgument(format!(
                "{flag} {given:?}: --preset {name} builds its own small random {what} and does \
                 not read {flag}; drop {flag}, or drop --preset {name} to train from {given:?}"
            )));
        }
    }
    Ok(())
}

/// Loads the catalog and splits it: the split recorded in the checkpoint when resuming, else
/// a new one drawn from the seed (a preset's sample budget then sets the epochs). The split
/// is recorded in `state`.
fn load_and_split(
    cfg: &mut FitConfig,
    state: &mut TrainState,
    opts: &FitOptions,
    resuming: bool,
    log: &mut Log,
) -> Result<(Catalog, Split)> {
    let catalog = load_catalog(&opts.source, &LoadOptions::default())?;
    if catalog.report.skipped() > 0 {
        log.say(catalog.report.summary());
    }
    if let Some(w) = catalog.duplicate_warning() {
        log.warn(w);
    }
    let split = if resuming {
        let (split, notes) = recorded_split(&catalog, state).map_err(Error::Resume)?;
        notes.into_iter().for_each(|n| log.warn(n));
        split
    } else {
        let split = catalog.split(cfg.val_fraction, cfg.seed)?;
        if let Some(epochs) = budget_epochs(cfg, split.train.len(), log) {
            cfg.epochs = epochs;
            state.config.epochs = epochs;
        }
        split
    };
    // Recorded by row (an older checkpoint's ids become rows from here on).
    state.validation_rows = split.validation_rows(&catalog);
    state.validation_ids = split.validation_ids(&catalog);
    if split.train.is_empty() || split.validation.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} sample(s): too few to train and validate",
            catalog.len()
        )));
    }
    Ok((catalog, split))
}

/// The epochs of a sample budget ([`FitConfig::sample_budget`]) over `train` training
/// samples, when they are fewer than the configured epochs.
fn budget_epochs(cfg: &FitConfig, train: usize, log: &Log) -> Option<usize> {
    let budget = cfg.sample_budget?;
    let epochs = budget.div_ceil(train.max(1) as u64).max(1) as usize;
    if epochs >= cfg.epochs {
        return None;
    }
    log.say(format!(
        "{train} training samples: {epochs} epochs (a budget of {budget} samples)"
    ));
    Some(epochs)
}

/// AdamW over the trainable parameters, with the checkpoint's moments when resuming.
fn new_optimizer(
    t: &Trainee,
    cfg: &FitConfig,
    state: &TrainState,
    resume: Option<&Path>,
    device: &Device,
) -> Result<AdamW> {
    let mut optimizer = AdamW::new(
        trainable_vars(t, cfg),
        AdamWParams {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..AdamWParams::default()
        },
    )?;
    if let Some(dir) = resume {
        let moments = read_moments(&dir.join(OPTIMIZER_FILE), device)?;
        optimizer.load_state(&moments, state.step)?;
    }
    Ok(optimizer)
}

/// Removes what a run killed while writing left in the output directory (temporary
/// checkpoints and metrics files), and cuts the metrics file back to where the state stands:
/// records after it (written after the checkpoint, or by an earlier run in this directory)
/// and a torn last line go.
fn clean_output(opts: &FitOptions, state: &TrainState, log: &mut Log) -> Result<()> {
    let metrics_tmp = format!(".{METRICS_FILE}.tmp-");
    for stale in ["best", "last"]
        .into_iter()
        .flat_map(|d| checkpoint::remove_stale_temporaries(&opts.out.join(d)))
        .chain(moda_models::files::remove_stale(&opts.out, &metrics_tmp))
    {
        log.warn(stale.to_string());
    }
    let repair = repair_metrics(&opts.out.join(METRICS_FILE), state.step, state.epoch)?;
    if let Some(msg) = repair.message() {
        log.warn(msg);
    }
    Ok(())
}

/// The learning rate at `progress` (in epochs) of `epoch`: StepLR's rate of the epoch, or the
/// cosine schedule's at that point.
fn lr_at(cfg: &FitConfig, epoch: usize, progress: f64) -> f64 {
    match cfg.lr_schedule {
        LrSchedule::Step => step_lr(cfg.lr, epoch, cfg.lr_step_epochs, cfg.lr_gamma),
        LrSchedule::Cosine => cosine_lr(cfg.lr, progress, cfg.warmup_epochs, cfg.epochs as f64),
    }
}

/// The micro-batches accumulated since the last optimizer step.
struct StepWindow {
    since: Instant,
    samples: usize,
    loss_sum: f64,
    micro_batches: usize,
}

impl StepWindow {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            samples: 0,
            loss_sum: 0.0,
            micro_batches: 0,
        }
    }

    fn add(&mut self, samples: usize, loss: f32) {
        self.samples += samples;
        self.loss_sum += loss as f64;
        self.micro_batches += 1;
    }
}

/// A run under way: the settings, the model, the data, the optimizer and where the run
/// stands.
struct Run<'a> {
    cfg: FitConfig,
    opts: &'a FitOptions,
    t: Trainee,
    data: Prepared,
    split: Split,
    optimizer: AdamW,
    /// The padding token.
    pad: u32,
    /// Micro-batches per epoch.
    batches: usize,
    /// Augmentation of the training images (only of pixels: cached embeddings cannot be
    /// augmented).
    augment: Option<Augment>,
    /// Shards per micro-batch (1 off the CPU).
    shards: usize,
    best_dir: PathBuf,
    last_dir: PathBuf,
    /// The last checkpoint written, named by a non-finite loss error.
    last_good: Option<PathBuf>,
    state: TrainState,
    /// The state at the last optimizer-step boundary (what an interruption saves).
    boundary: TrainState,
    log: Log,
    /// Where the current epoch's time goes (the epoch's metrics record).
    profile: crate::profile::EpochProfile,
    /// Repeat factor sampling's weights, one per training sample (`None`: each once).
    repeat: Option<Vec<u64>>,
}

impl<'a> Run<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: FitConfig,
        opts: &'a FitOptions,
        t: Trainee,
        data: Prepared,
        split: Split,
        optimizer: AdamW,
        state: TrainState,
        log: Log,
    ) -> Self {
        // Shifts of up to 1/16 of the image side; rotation and scale as configured.
        let augment = match (&data.pixels, cfg.augment) {
            (Some(px), true) => Some(Augment {
                flip: true,
                max_shift: px.dims().last().copied().unwrap_or(0) / 16,
                max_rotate_deg: cfg.augment_rotate as f32,
                max_scale: cfg.augment_scale as f32,
                affine_p: crate::augment::AFFINE_SHARE,
            }),
            _ => None,
        };
        let mut boundary = state.clone();
        boundary.dropout_state = t.model.decoder().dropout_state();
        Run {
            pad: t.tokenizer.pad_id(),
            batches: split.train.len().div_ceil(cfg.batch_size),
            augment,
            shards: if opts.device.is_cpu() {
                cfg.data_parallel
            } else {
                1
            },
            best_dir: opts.out.join("best"),
            last_dir: opts.out.join("last"),
            last_good: None,
            cfg,
            opts,
            t,
            data,
            split,
            optimizer,
            state,
            boundary,
            log,
            profile: crate::profile::EpochProfile::start(),
            repeat: None,
        }
    }

    /// Trains epoch after epoch to the last, or until `max_steps` or the stop flag.
    fn train(&mut self) -> Result<FitEnd> {
        while self.state.epoch < self.cfg.epochs {
            self.profile = crate::profile::EpochProfile::start();
            if let Some(end) = self.train_epoch()? {
                return Ok(end);
            }
            self.end_epoch()?;
        }
        Ok(FitEnd::Finished)
    }

    /// Trains the rest of the current epoch, micro-batch after micro-batch, with an optimizer
    /// step every `grad_accum` of them and at the end of the epoch. `Some` when the run stops
    /// inside the epoch (`max_steps`, the stop flag), after writing `last/`.
    fn train_epoch(&mut self) -> Result<Option<FitEnd>> {
        let epoch = self.state.epoch;
        // The epoch's rate as recorded (the cosine schedule's at the middle of the epoch).
        self.optimizer.params.lr = lr_at(&self.cfg, epoch, epoch as f64 + 0.5);
        let order = match &self.repeat {
            Some(w) => weighted_epoch_order(&self.split.train, w, self.cfg.seed, epoch),
            None => epoch_order(&self.split.train, self.cfg.seed, epoch),
        };
        let pb = self.epoch_bar();
        let bs = self.cfg.batch_size;
        let mut window = StepWindow::new();
        self.optimizer.zero_grad();
        while self.state.batch_pos < self.batches {
            if self.opts.stop.load(Ordering::SeqCst) {
                pb.abandon_with_message("interrupted");
                self.stop_at_boundary()?;
                self.log.say(format!(
                    "interrupted: resumable checkpoint written to {}",
                    self.last_dir.display()
                ));
                return Ok(Some(FitEnd::Interrupted));
            }
            let b = self.state.batch_pos;
            let idx = &order[b * bs..((b + 1) * bs).min(order.len())];
            let t = Instant::now();
            let loss = self.micro_batch(epoch, b, idx)?;
            self.profile.micro_batches += t.elapsed();
            if !loss.is_finite() {
                pb.abandon_with_message("non-finite loss");
                return Err(self.non_finite_loss(loss));
            }
            self.state.batch_pos += 1;
            self.state.epoch_loss_sum += loss as f64;
            self.state.epoch_loss_count += 1;
            window.add(idx.len(), loss);
            if window.micro_batches == self.cfg.grad_accum || self.state.batch_pos == self.batches {
                let t = Instant::now();
                let summary = self.optimizer_step(&window)?;
                self.profile.optimizer += t.elapsed();
                pb.set_message(summary);
                window = StepWindow::new();
                self.boundary = self.state.clone();
                self.boundary.dropout_state = self.t.model.decoder().dropout_state();
                if self.cfg.max_steps.is_some_and(|m| self.state.step >= m) {
                    pb.finish_and_clear();
                    self.stop_at_boundary()?;
                    self.log.say(format!(
                        "reached --max-steps {}: checkpoint written to {}",
                        self.state.step,
                        self.last_dir.display()
                    ));
                    return Ok(Some(FitEnd::MaxSteps));
                }
            }
            pb.set_position(self.state.batch_pos as u64);
        }
        pb.finish_and_clear();
        Ok(None)
    }

    /// The progress bar of the current epoch (hidden without `progress`).
    fn epoch_bar(&self) -> ProgressBar {
        if !self.opts.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(self.batches as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_prefix(format!("{}/{}", self.state.epoch + 1, self.cfg.epochs));
        pb.set_position(self.state.batch_pos as u64);
        pb
    }

    /// Forward and backward of micro-batch `b` (samples `idx`) of `epoch`: its gradients,
    /// divided by `grad_accum`, are added to the optimizer's. Returns its mean loss (no
    /// gradients are added when it is not finite).
    fn micro_batch(&mut self, epoch: usize, b: usize, idx: &[usize]) -> Result<f32> {
        let device = &self.opts.device;
        // The micro-batch's augmentation, drawn here in one sequence whatever the shards: each
        // shard then selects and transforms its own images on its thread.
        let draws = self.augment.map(|aug| {
            let mut rng = crate::augment::batch_rng(self.cfg.seed, epoch, b);
            crate::augment::draw(idx.len(), aug, &mut rng)
        });
        let shards = shard_ranges(idx.len(), self.shards);
        if shards.len() > 1 {
            return sharded_step(
                &self.t.model,
                &self.data,
                draws.as_deref(),
                idx,
                &shards,
                self.pad,
                device,
                self.cfg.grad_accum,
                &mut self.optimizer,
            );
        }
        let loss = batch_loss(
            &self.t.model,
            &self.data,
            idx,
            self.pad,
            device,
            draws.as_deref(),
        )?;
        let value = loss.to_scalar::<f32>()?;
        if value.is_finite() {
            let grads = (loss / self.cfg.grad_accum as f64)?.backward()?;
            let optimizer = &mut self.optimizer;
            on_all_cores(|| optimizer.accumulate(&grads))?;
        }
        Ok(value)
    }

    /// One optimizer step over the gradients of `window`'s micro-batches: clipping, the
    /// learning rate at the middle of the step, AdamW, and the step's metrics record. Returns
    /// the progress bar's message.
    fn optimizer_step(&mut self, window: &StepWindow) -> Result<String> {
        let cfg = &self.cfg;
        let epoch = self.state.epoch;
        let optimizer = &mut self.optimizer;
        let grad_norm = if cfg.max_grad_norm > 0.0 {
            on_all_cores(|| optimizer.clip_grad_norm(cfg.max_grad_norm))?
        } else {
            f64::NAN
        };
        // The middle of this optimizer step, in epochs.
        let progress = epoch as f64
            + (self.state.batch_pos as f64 - window.micro_batches as f64 / 2.0)
                / self.batches as f64;
        let lr = lr_at(cfg, epoch, progress);
        optimizer.params.lr = lr;
        on_all_cores(|| optimizer.step())?;
        self.state.step += 1;
        let secs = window.since.elapsed().as_secs_f64().max(1e-9);
        let loss = window.loss_sum / window.micro_batches as f64;
        let sps = window.samples as f64 / secs;
        append_metric(
            &self.opts.out,
            &serde_json::json!({
                "kind": "step", "epoch": epoch + 1, "step": self.state.step,
                "loss": loss, "lr": lr,
                "grad_norm": if grad_norm.is_finite() { Some(grad_norm) } else { None },
                "samples_per_s": sps,
            }),
        )?;
        Ok(format!("loss {loss:.4} lr {lr:.2e} {sps:.0} samples/s"))
    }

    /// Writes `last/` with the state of the last optimizer-step boundary and takes the run
    /// back to it: the micro-batches after it are not in the checkpoint, and a resumed run
    /// does them again.
    fn stop_at_boundary(&mut self) -> Result<()> {
        save_checkpoint(&self.last_dir, &self.t, &self.boundary, &self.optimizer)?;
        self.state = self.boundary.clone();
        Ok(())
    }

    /// The error of a loss that became NaN or infinite in the current epoch.
    fn non_finite_loss(&self, value: f32) -> Error {
        Error::NonFiniteLoss {
            value,
            epoch: self.state.epoch + 1,
            step: self.state.step,
            last_good: self.last_good.clone(),
        }
    }

    /// The end of an epoch: validation loss, the epoch's record (metrics file, history),
    /// checkpoints `best/` (when the validation loss improved) and `last/`, the loss plot.
    fn end_epoch(&mut self) -> Result<()> {
        let epoch = self.state.epoch;
        let validation_started = Instant::now();
        let val_loss = evaluate_loss(
            &mut self.t.model,
            &self.data,
            &self.split.validation,
            self.cfg.batch_size,
            self.pad,
            &self.opts.device,
        )?;
        if !val_loss.is_finite() {
            return Err(self.non_finite_loss(val_loss as f32));
        }
        let validation = validation_started.elapsed();
        let lr = lr_at(&self.cfg, epoch, epoch as f64 + 0.5);
        let record = EpochRecord {
            epoch: epoch + 1,
            train_loss: self.state.epoch_loss_sum / self.state.epoch_loss_count.max(1) as f64,
            val_loss,
            lr,
            step: self.state.step,
            seconds: self.profile.elapsed().as_secs_f64(),
        };
        // Where the epoch's time went; the checkpoints and the plot below come after this
        // record, so its `other_s` is the main thread's own work between the parts measured.
        let profile = self.profile.to_json(validation, self.profile.elapsed());
        append_metric(
            &self.opts.out,
            &serde_json::json!({
                "kind": "epoch", "epoch": record.epoch, "step": record.step,
                "train_loss": record.train_loss, "val_loss": record.val_loss,
                "lr": lr, "seconds": record.seconds, "profile": profile,
            }),
        )?;
        self.log.say(format!(
            "epoch {}/{}: train loss {:.4}, val loss {:.4}, {:.1}s",
            record.epoch, self.cfg.epochs, record.train_loss, record.val_loss, record.seconds
        ));
        let state = &mut self.state;
        state.history.push(record);
        state.epoch += 1;
        state.batch_pos = 0;
        state.epoch_loss_sum = 0.0;
        state.epoch_loss_count = 0;
        state.finished = state.epoch >= self.cfg.epochs;
        state.dropout_state = self.t.model.decoder().dropout_state();
        let improved = state.best_val_loss.is_none_or(|b| val_loss < b);
        if improved {
            state.best_val_loss = Some(val_loss);
        }
        self.boundary = self.state.clone();
        if improved {
            save_checkpoint(&self.best_dir, &self.t, &self.state, &self.optimizer)?;
        }
        save_checkpoint(&self.last_dir, &self.t, &self.state, &self.optimizer)?;
        self.last_good = Some(self.last_dir.clone());
        let plot = self.opts.out.join(PLOT_FILE);
        if let Err(e) = crate::plot::plot_losses(&plot, &self.state.history) {
            self.log.say(format!("warning: loss plot not written: {e}"));
        }
        Ok(())
    }
}

/// The optimizer moments of a checkpoint: its safetensors file, read only if it is a regular
/// file (a FIFO is refused, not waited on; a device is refused, not read without end) and
/// mapped rather than read whole.
fn read_moments(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    use candle_nn::var_builder::SimpleBackend;
    let resume = |e: moda_models::Error| Error::Resume(e.to_string());
    let weights = Weights::from_file(path).map_err(resume)?;
    weights
        .names()
        .into_iter()
        .map(|name| {
            let t = weights
                .get_unchecked(&name, DType::F32, device)
                .map_err(|e| resume(weights.explain(e)))?;
            Ok((name, t))
        })
        .collect()
}

/// Reads a checkpoint's training state and settings, for tools that inspect a run.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    TrainState::from_dir(&checkpoint::resolve_dir(dir))
}

/// The device named on the command line: `cpu`, or `cuda` / `cuda:N` when built with the
/// `cuda` feature.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal: usize = n
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()
                .map_err(|_| Error::Device(format!("{n:?}: expected cuda or cuda:N")))?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                return Err(Error::Device(format!(
                    "{n:?}: this trainer was built without CUDA; rebuild with \
                     `cargo build --release -p trainer --features cuda`"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| Error::Device(format!("{n:?}: {e}")))
        }
        other => Err(Error::Device(format!(
            "{other:?}: unknown (expected cpu or cuda)"
        ))),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Counts the `write` calls it gets.
    struct CountingWriter {
        bytes: Vec<u8>,
        writes: usize,
    }

    impl Write for CountingWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_preset_is_recorded_by_its_name() {
        // Training states written when the preset was free text read back, and new ones are
        // written the same way.
        let tiny = serde_json::to_value(FitConfig::tiny()).unwrap();
        assert_eq!(tiny["preset"], "tiny");
        let recipe = serde_json::to_value(FitConfig::default()).unwrap();
        assert_eq!(recipe["preset"], serde_json::Value::Null);
        let back: FitConfig = serde_json::from_value(tiny).unwrap();
        assert_eq!(back, FitConfig::tiny());
    }

    #[test]
    fn augmentation_settings_are_checked_and_default_to_off() {
        assert!(FitConfig::tiny().check().is_ok());
        for (rotate, scale, flag) in [
            (60.0, 0.0, "--augment-rotate"),
            (-1.0, 0.0, "--augment-rotate"),
            (f64::NAN, 0.0, "--augment-rotate"),
            (0.0, 0.5, "--augment-scale"),
            (0.0, -0.1, "--augment-scale"),
        ] {
            let cfg = FitConfig {
                augment_rotate: rotate,
                augment_scale: scale,
                ..FitConfig::tiny()
            };
            let err = cfg.check().unwrap_err().to_string();
            assert!(err.contains(flag), "{rotate} {scale}: {err}");
        }
        // Without augmentation they would do nothing: refused, not ignored.
        let off = FitConfig {
            augment: false,
            augment_rotate: 10.0,
            ..FitConfig::tiny()
        };
        let err = off.check().unwrap_err().to_string();
        assert!(err.contains("--augment"), "{err}");
        // A run recorded before these settings existed resumes without them.
        let mut old = serde_json::to_value(FitConfig::tiny()).unwrap();
        let map = old.as_object_mut().unwrap();
        map.remove("augment_rotate");
        map.remove("augment_scale");
        let back: FitConfig = serde_json::from_value(old).unwrap();
        assert_eq!((back.augment_rotate, back.augment_scale), (0.0, 0.0));
    }

    fn rows(values: &[(&str, &str)]) -> Vec<BTreeMap<String, String>> {
        values
            .iter()
            .map(|(t, u)| {
                BTreeMap::from([
                    ("ProductType".to_string(), t.to_string()),
                    ("Usage".to_string(), u.to_string()),
                ])
            })
            .collect()
    }

    #[test]
    fn repeat_factors_follow_the_rarity_of_each_group() {
        // 100 samples: 80 in one group, 16 in a second, 4 in a third. With t = 0.16 the
        // factors are 1 (f = 0.8 >= t), 1 (f = t) and sqrt(0.16 / 0.04) = 2.
        let mut v = vec![("Jeans", "Casual"); 80];
        v.extend(vec![("Heels", "Ethnic"); 16]);
        v.extend(vec![("Heels", "Formal"); 4]);
        let rows = rows(&v);
        let refs: Vec<&BTreeMap<String, String>> = rows.iter().collect();
        let cols = ["ProductType".to_string(), "Usage".to_string()];
        let w = repeat_weights(&refs, &cols, 0.16).unwrap();
        let unit = 1u64 << 20;
        assert_eq!(&w[..80], &vec![unit; 80][..]);
        assert_eq!(&w[80..96], &vec![unit; 16][..]);
        assert_eq!(&w[96..], &vec![2 * unit; 4][..]);
        // One column alone: the two Heels groups are one (f = 0.2 >= t).
        let w = repeat_weights(&refs, &cols[..1], 0.16).unwrap();
        assert!(w.iter().all(|&x| x == unit));
        // A column the catalog lacks is named.
        let err = repeat_weights(&refs, &["Season".to_string()], 0.16).unwrap_err();
        assert!(
            err.contains("\"Season\"") && err.contains("ProductType, Usage"),
            "{err}"
        );
    }

    #[test]
    fn a_weighted_epoch_draws_each_sample_by_its_weight() {
        // Samples 10..20 (ids), the last two weighted 3x: per epoch 12 draws are spread as
        // 8 x (10/14) + 2 x (30/14); each count is the floor or ceiling of its expectation,
        // the epoch holds exactly as many samples as the split, and the same epoch and seed
        // draw the same order.
        let train: Vec<usize> = (10..20).collect();
        let mut w = vec![1u64 << 20; 10];
        w[8] = 3 << 20;
        w[9] = 3 << 20;
        let mut seen_rare = 0usize;
        for epoch in 0..50 {
            let order = weighted_epoch_order(&train, &w, 7, epoch);
            assert_eq!(order.len(), train.len());
            assert_eq!(order, weighted_epoch_order(&train, &w, 7, epoch));
            let count = |id: usize| order.iter().filter(|&&x| x == id).count();
            for id in 10..18 {
                assert!(count(id) <= 1, "epoch {epoch}: {order:?}");
            }
            for id in 18..20 {
                assert!((2..=3).contains(&count(id)), "epoch {epoch}: {order:?}");
            }
            seen_rare += count(18) + count(19);
        }
        // 50 epochs x 2 x 30/14 = 214.3 expected draws of the two heavy samples.
        assert!((210..=219).contains(&seen_rare), "{seen_rare}");
        // Equal weights: every sample exactly once.
        let mut order = weighted_epoch_order(&train, &[5; 10], 3, 1);
        order.sort_unstable();
        assert_eq!(order, train);
    }

    #[test]
    fn repeat_settings_go_together() {
        let with = |columns: &[&str], t: f64| FitConfig {
            repeat_columns: columns.iter().map(|c| c.to_string()).collect(),
            repeat_threshold: t,
            ..FitConfig::tiny()
        };
        assert!(with(&["ProductType"], 0.05).check().is_ok());
        for (cfg, flag) in [
            (with(&["ProductType"], 0.0), "--repeat-rare"),
            (with(&[], 0.05), "--repeat-rare"),
            (with(&["ProductType"], 1.5), "--repeat-threshold"),
            (with(&["ProductType"], f64::NAN), "--repeat-threshold"),
        ] {
            let err = cfg.check().unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
        }
        // A training state written before these settings reads back without them.
        let mut map = serde_json::to_value(FitConfig::tiny()).unwrap();
        let obj = map.as_object_mut().unwrap();
        obj.remove("repeat_columns");
        obj.remove("repeat_threshold");
        let back: FitConfig = serde_json::from_value(map).unwrap();
        assert_eq!(back, FitConfig::tiny());
    }

    #[test]
    fn a_preset_refuses_backbones_it_does_not_read() {
        assert!(check_backbones_used(&FitConfig::tiny()).is_ok());
        assert!(check_backbones_used(&FitConfig {
            encoder: "some/encoder".into(),
            ..FitConfig::default()
        })
        .is_ok());
        for (encoder, decoder, named) in [
            (
                "does/not/exist",
                DEFAULT_DECODER,
                "--encoder \"does/not/exist\"",
            ),
            (DEFAULT_ENCODER, "./opt", "--decoder \"./opt\""),
        ] {
            let cfg = FitConfig {
                encoder: encoder.into(),
                decoder: decoder.into(),
                ..FitConfig::tiny()
            };
            let err = check_backbones_used(&cfg).unwrap_err().to_string();
            assert!(
                err.contains(named) && err.contains("--preset tiny"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_metrics_record_is_one_write() {
        let mut w = CountingWriter {
            bytes: Vec::new(),
            writes: 0,
        };
        let value = serde_json::json!({"kind": "step", "epoch": 1, "step": 7, "loss": 0.5});
        write_record(&mut w, &value).unwrap();
        assert_eq!(w.writes, 1, "the line and its newline in one write");
        assert_eq!(String::from_utf8(w.bytes).unwrap(), format!("{value}\n"));
    }

    #[test]
    fn metrics_are_cut_back_to_the_state() {
        let dir = std::env::temp_dir().join(format!("moda-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(METRICS_FILE);
        let step = |s: u64, e: u64| format!("{{\"kind\":\"step\",\"epoch\":{e},\"step\":{s}}}\n");
        let epoch = |e: u64, s: u64| format!("{{\"kind\":\"epoch\",\"epoch\":{e},\"step\":{s}}}\n");
        let kept = [step(1, 1), step(2, 1), epoch(1, 2), step(3, 2)].concat();
        let text = [
            kept.clone(),
            step(4, 2),
            epoch(2, 4),
            "not json\n".to_string(),
            step(5, 3),
            "{\"kind\":\"step\",\"ep".to_string(),
        ]
        .concat();
        std::fs::write(&path, &text).unwrap();
        // A state at step 3, one epoch finished.
        let r = repair_metrics(&path, 3, 1).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), kept);
        assert_eq!((r.kept, r.after, r.unreadable, r.torn), (4, 3, 1, true));
        let msg = r.message().unwrap();
        assert!(
            msg.contains("3 record(s) after step 3") && msg.contains("torn"),
            "{msg}"
        );
        // Nothing to drop: the file is left alone.
        let r = repair_metrics(&path, 3, 1).unwrap();
        assert_eq!((r.kept, r.message()), (4, None));
        // An epoch record is kept only when its epoch is finished in the state, even at the
        // state's step (the run stopped at the epoch's last step, before validation).
        let r = repair_metrics(&path, 2, 0).unwrap();
        assert_eq!(r.after, 2);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            [step(1, 1), step(2, 1)].concat()
        );
        // A new run starts an empty file; no file is nothing to do.
        repair_metrics(&path, 0, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            repair_metrics(&path, 0, 0).unwrap(),
            MetricsRepair::default()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
