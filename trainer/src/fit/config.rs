//! A run's settings ([`FitConfig`]): the recipe's defaults, the tiny preset, their checks,
//! and the learning rate they give at each point of the run ([`lr_at`]).

use moda_models::hub::{DEFAULT_DECODER, DEFAULT_ENCODER};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::{cosine_lr, step_lr};
use crate::preset::Preset;

pub(super) fn one() -> usize {
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
    /// training samples (see [`repeat_weights`](super::repeat_weights)); empty: every sample
    /// once per epoch.
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

/// The learning rate at `progress` (in epochs) of `epoch`: StepLR's rate of the epoch, or the
/// cosine schedule's at that point.
pub(super) fn lr_at(cfg: &FitConfig, epoch: usize, progress: f64) -> f64 {
    match cfg.lr_schedule {
        LrSchedule::Step => step_lr(cfg.lr, epoch, cfg.lr_step_epochs, cfg.lr_gamma),
        LrSchedule::Cosine => cosine_lr(cfg.lr, progress, cfg.warmup_epochs, cfg.epochs as f64),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
