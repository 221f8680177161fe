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
//!
//! This file holds the loop itself; each thing it calls on lives in one submodule:
//! - `config`: the run's settings ([`FitConfig`], the tiny preset, their checks) and the
//!   learning rate they give at each point;
//! - `state`: where a run stands ([`TrainState`]) and what resuming reads back (the state, the
//!   optimizer's moments, the recorded split);
//! - `trainee`: the model being trained, built new or from a checkpoint, its optimizer, and
//!   writing a checkpoint of it;
//! - `batches`: the prepared data (token ids, cached embeddings or pixels), a micro-batch's
//!   loss, the validation loss;
//! - `shards`: a micro-batch split over threads (data parallelism on the CPU);
//! - `sampling`: an epoch's order of samples (seeded shuffles, repeat factor sampling);
//! - `output`: the output directory's checks and the metrics file.

mod batches;
mod config;
mod output;
mod sampling;
mod shards;
mod state;
mod trainee;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use moda_models::checkpoint;
use moda_models::hub::{DEFAULT_DECODER, DEFAULT_ENCODER};
use moda_models::schema::CaptionSchema;

use crate::augment::Augment;
use crate::data::{load_catalog, Catalog, CatalogSource, LoadOptions, Split};
use crate::error::{Error, Result};
use crate::optim::AdamW;

use batches::{batch_loss, evaluate_loss, prepare_data, Prepared};
use config::lr_at;
use output::{append_metric, check_run_dir, clean_output, ensure_writable};
use sampling::{epoch_order, sampling_weights, weighted_epoch_order};
use shards::{on_all_cores, shard_ranges, sharded_step};
use state::resumed_state;
use trainee::{build_trainee, new_optimizer, save_checkpoint, Trainee};

pub use config::{FitConfig, LrSchedule, TINY_SAMPLE_BUDGET};
pub use output::{repair_metrics, MetricsRepair, METRICS_FILE, PLOT_FILE};
pub use sampling::repeat_weights;
pub use state::{read_state, recorded_split, EpochRecord, TrainState, OPTIMIZER_FILE, STATE_FILE};

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
}
