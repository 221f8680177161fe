//! The model being trained ([`Trainee`]): built new from pretrained backbones, tiny and random
//! for a preset, or from the checkpoint being resumed; its trainable parameters, its optimizer,
//! and how a checkpoint of it is written.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use moda_models::checkpoint::{self, CheckpointConfig, CheckpointContents, EncoderInfo};
use moda_models::hub::{resolve_model, FileReq};
use moda_models::preprocess::ImageProcessorConfig;
use moda_models::tokenizer::ModaTokenizer;
use moda_models::{CaptionModel, ClipVision, ClipVisionConfig, Opt, OptConfig, Projector};
use moda_models::{ProjectorConfig, Weights};

use crate::embed_cache::EncoderFingerprint;
use crate::error::{Error, Result};
use crate::optim::{AdamW, AdamWParams};
use crate::params::{NewInit, ParamStore};
use crate::preset::{self, Preset};

use super::config::FitConfig;
use super::state::{read_moments, TrainState, OPTIMIZER_FILE, STATE_FILE};

/// The model being trained and what is needed to save it.
pub(super) struct Trainee {
    pub(super) model: CaptionModel,
    pub(super) decoder_store: ParamStore,
    pub(super) encoder_store: Option<ParamStore>,
    pub(super) tokenizer: ModaTokenizer,
    pub(super) ckpt: CheckpointConfig,
    /// The encoder directory when it is a fixed external model.
    pub(super) encoder_dir: Option<PathBuf>,
}

/// Builds the model: from the checkpoint being resumed, tiny and random (`--preset tiny`), or
/// from pretrained backbones.
pub(super) fn build_trainee(
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
pub(super) fn trainable_encoder(
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
pub(super) fn resumed_trainee(cfg: &FitConfig, dir: &Path, device: &Device) -> Result<Trainee> {
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
pub(super) fn tiny_trainee(
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
pub(super) fn pretrained_trainee(cfg: &FitConfig, device: &Device) -> Result<Trainee> {
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
pub(super) fn recorded_encoder_source(cfg: &FitConfig) -> Result<String> {
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
pub(super) fn trainable_vars(t: &Trainee, cfg: &FitConfig) -> Vec<(String, candle_core::Var)> {
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
pub(super) fn save_checkpoint(
    dir: &Path,
    t: &Trainee,
    state: &TrainState,
    optimizer: &AdamW,
) -> Result<()> {
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

/// The fingerprint of an embedded encoder (random or resumed): its configuration and its
/// weights' values.
pub(super) fn embedded_encoder_fingerprint(t: &Trainee) -> Result<EncoderFingerprint> {
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

/// AdamW over the trainable parameters, with the checkpoint's moments when resuming.
pub(super) fn new_optimizer(
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
