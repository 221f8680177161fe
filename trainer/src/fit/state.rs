//! Where a run stands ([`TrainState`], written into every checkpoint as
//! `training_state.json`) and what resuming reads back: the state, the optimizer's moments and
//! the recorded train/validation split.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use moda_models::checkpoint;
use moda_models::Weights;
use serde::{Deserialize, Serialize};

use crate::data::{Catalog, RowKey, Split};
use crate::error::{Error, Result};

use super::config::FitConfig;
use super::{FitOptions, Log};

/// The training state file of a checkpoint.
pub const STATE_FILE: &str = "training_state.json";
/// The optimizer moments of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
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

impl TrainState {
    /// The state of a new run: nothing done yet.
    pub(super) fn start(config: FitConfig) -> Self {
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
pub(super) fn resumed_state(
    dir: &Path,
    cfg: &FitConfig,
    opts: &FitOptions,
    log: &Log,
) -> Result<TrainState> {
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

/// The optimizer moments of a checkpoint: its safetensors file, read only if it is a regular
/// file (a FIFO is refused, not waited on; a device is refused, not read without end) and
/// mapped rather than read whole.
pub(super) fn read_moments(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
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
