//! The MODA checkpoint directory: what `trainer fit` writes and the exporter loads.
//!
//! Layout (nanoVLM's `save_pretrained`: `config.json` + `model.safetensors`):
//!
//! - `config.json`: [`CheckpointConfig`]: format name and version, the encoder (its config,
//!   where it comes from, whether it was trained), the decoder's `OptConfig`, the
//!   `ProjectorConfig`, the image preprocessor config and, when the trainer recorded one, the
//!   caption schema (`moda_models::schema`: template and training values);
//! - `model.safetensors`: the projector and OPT under the original recipe's names
//!   (`opt.model.decoder.*`, `opt.lm_head.weight` only when untied, `projection.{0,2}.*`), so
//!   `FashionOPT.load_state_dict(safetensors.torch.load_file(..), strict=False)` takes it
//!   (the recipe's `embed_tokens.weight` alias is the tied OPT embedding and is not stored);
//! - `tokenizer.json` ([`ModaTokenizer::save`]);
//! - `encoder/`: a Hugging Face `CLIPVisionModelWithProjection` directory (`config.json`,
//!   `model.safetensors`, `preprocessor_config.json`) when the encoder is not a fixed external
//!   model (it was trained, or it is random as in the trainer's tiny preset);
//! - any extra files the caller adds (the trainer's `training_state.json`, optimizer moments).
//!
//! [`save`] is atomic: everything is written in a temporary directory next to the target
//! (`.<name>.tmp-<pid>`), which then replaces it with [`files::replace_dir`] (fsynced, the
//! previous checkpoint moved aside to `.<name>.old` during the swap and removed after it);
//! should the process die between the two renames, [`load`] and [`resolve_dir`] find the
//! complete `.<name>.old`. Should it die while writing, the temporary directory of a process
//! that is gone is removed by the next [`save`] of that checkpoint, or by
//! [`remove_stale_temporaries`] ([`files::remove_stale`] does the same for other temporary
//! names that carry a process id).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::clip_vision::{ClipVision, ClipVisionConfig};
use crate::error::{Error, Result};
use crate::files;
use crate::hub::{resolve_model, FileReq};
use crate::moda::CaptionModel;
use crate::opt::{Opt, OptConfig};
use crate::preprocess::ImageProcessorConfig;
use crate::projector::{Projector, ProjectorConfig};
use crate::schema::CaptionSchema;
use crate::tokenizer::ModaTokenizer;
use crate::weights::Weights;

/// The `format` value of a MODA checkpoint's `config.json`.
pub const FORMAT: &str = "moda-checkpoint";
/// The version of the layout this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The weights file of a checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// The configuration file of a checkpoint.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer file of a checkpoint.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The subdirectory holding an embedded encoder.
pub const ENCODER_DIR: &str = "encoder";

/// Where a checkpoint's image encoder comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderInfo {
    /// The encoder's vision configuration.
    pub config: ClipVisionConfig,
    /// `"encoder"` (embedded in the checkpoint) or the local directory / hub id it was loaded
    /// from (a fixed external model).
    pub source: String,
    /// Whether the encoder is stored in the checkpoint's `encoder/` directory.
    pub embedded: bool,
    /// Whether the encoder's weights were trained (they are then embedded).
    pub trained: bool,
}

/// A checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// Always [`FORMAT`].
    pub format: String,
    /// The layout version, [`FORMAT_VERSION`] when written by this code.
    pub format_version: u32,
    /// The image encoder.
    pub encoder: EncoderInfo,
    /// The OPT decoder (`OPTConfig` key names).
    pub decoder: OptConfig,
    /// The projector's sizes.
    pub projector: ProjectorConfig,
    /// The image preprocessing (`preprocessor_config.json` key names).
    pub preprocessor: ImageProcessorConfig,
    /// The caption schema of the training data: the caption template and each field's values
    /// with their counts in the training split. Absent in checkpoints written before it was
    /// recorded, and for catalogs of free captions (a CSV with a caption column); an optional
    /// addition, so the format version stays 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<CaptionSchema>,
}

impl CheckpointConfig {
    /// A config of the current format version.
    pub fn new(
        encoder: EncoderInfo,
        decoder: OptConfig,
        projector: ProjectorConfig,
        preprocessor: ImageProcessorConfig,
    ) -> Self {
        Self {
            format: FORMAT.to_string(),
            format_version: FORMAT_VERSION,
            encoder,
            decoder,
            projector,
            preprocessor,
            schema: None,
        }
    }

    /// Reads and checks `dir/config.json` (a regular file of at most
    /// [`crate::files::TEXT_FILE_MAX_BYTES`]: a FIFO or a device is refused, never waited on
    /// or read without end).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = crate::files::read_text_bounded(&path, crate::files::TEXT_FILE_MAX_BYTES)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::MissingFile {
                        path: path.clone(),
                        what: "MODA checkpoint configuration".into(),
                    }
                } else {
                    Error::io(&path, e)
                }
            })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        if cfg.format != FORMAT || cfg.format_version > FORMAT_VERSION {
            return Err(Error::Unsupported {
                path,
                key: "format".into(),
                value: format!("{} v{}", cfg.format, cfg.format_version),
                supported: format!("{FORMAT} up to v{FORMAT_VERSION}"),
            });
        }
        cfg.decoder.validate(&path)?;
        cfg.encoder.config.validate(&path)?;
        if let Some(schema) = &cfg.schema {
            schema.validate().map_err(|msg| {
                Error::Input(format!("{}: bad \"schema\": {msg}", path.display()))
            })?;
        }
        Ok(cfg)
    }
}

/// Everything [`save`] writes.
#[derive(Debug)]
pub struct CheckpointContents<'a> {
    /// `config.json`.
    pub config: &'a CheckpointConfig,
    /// Projector and OPT tensors under the recipe's names (see the module docs).
    pub model: &'a BTreeMap<String, Tensor>,
    /// The encoder's tensors under Hugging Face names (`vision_model.*`,
    /// `visual_projection.weight`), when `config.encoder.embedded`.
    pub encoder: Option<&'a BTreeMap<String, Tensor>>,
    /// The tokenizer.
    pub tokenizer: &'a ModaTokenizer,
    /// Extra files (plain names) and their bytes, e.g. the trainer's state.
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// Extra safetensors files (plain names) and their tensors, e.g. optimizer moments.
    pub extra_tensors: Vec<(String, BTreeMap<String, Tensor>)>,
}

/// The recipe names of a `.pth`/safetensors state dict of the original FashionOPT module that
/// a checkpoint stores: everything but the `embed_tokens.weight` alias and, when tied, the
/// `opt.lm_head.weight` copy.
pub fn recipe_state_dict(weights: &Weights, tied: bool) -> Result<BTreeMap<String, Tensor>> {
    use candle_nn::var_builder::SimpleBackend;
    let mut out = BTreeMap::new();
    for name in weights.names() {
        if name == "embed_tokens.weight" || (tied && name == "opt.lm_head.weight") {
            continue;
        }
        let t = weights
            .get_unchecked(&name, DType::F32, &Device::Cpu)
            .map_err(|e| weights.explain(e))?;
        out.insert(name, t);
    }
    Ok(out)
}

fn plain_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
        return Err(Error::Input(format!(
            "checkpoint file name `{name}` is not a plain file name"
        )));
    }
    Ok(())
}

fn sync_file(path: &Path) -> Result<()> {
    files::sync_file(path).map_err(|e| Error::io(path, e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Writes tensors as safetensors with `{"format": "pt"}` metadata (as transformers does), then
/// fsyncs the file.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(contiguous, Some(meta), path).map_err(|e| {
        Error::BadWeights {
            path: path.to_path_buf(),
            msg: format!("cannot write: {e}"),
        }
    })?;
    sync_file(path)
}

fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    files::sibling(dir, suffix).map_err(|e| Error::Input(e.to_string()))
}

/// Removes the temporary directories that [`save`] of the checkpoint `dir` left when its
/// process died while writing (`.<name>.tmp-<pid>` of a process that is gone, and the
/// `.<name>.tmp` of older versions); see [`files::remove_stale`].
pub fn remove_stale_temporaries(dir: &Path) -> Vec<files::StaleTemporary> {
    let (Ok(tmp), Some(parent)) = (sibling(dir, "tmp-"), dir.parent()) else {
        return Vec::new();
    };
    let Some(prefix) = tmp.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let mut found = files::remove_stale(parent, prefix);
    if let Ok(legacy) = sibling(dir, "tmp") {
        if legacy.is_dir() {
            let removed = std::fs::remove_dir_all(&legacy);
            found.push(files::StaleTemporary {
                path: legacy,
                pid: 0,
                why: "an older version's temporary checkpoint".to_string(),
                error: removed.err().map(|e| e.to_string()),
            });
        }
    }
    found
}

/// The directory to read a checkpoint from: `dir`, or its `.<name>.old` copy when a crash
/// interrupted [`save`] between moving the old checkpoint aside and renaming the new one.
pub fn resolve_dir(dir: &Path) -> PathBuf {
    let found = files::resolve_replaced(dir);
    if found != dir && !found.join(CONFIG_FILE).is_file() {
        return dir.to_path_buf();
    }
    found
}

/// Writes a checkpoint to `dir` atomically (see the module docs). The parent directory is
/// created if needed; an existing checkpoint at `dir` is replaced only once the new one is
/// complete on disk.
pub fn save(dir: &Path, contents: &CheckpointContents<'_>) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    for stale in remove_stale_temporaries(dir) {
        eprintln!("warning: {stale}");
    }
    let tmp = sibling(dir, &format!("tmp-{}", std::process::id()))?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = write_contents(&tmp, contents)
        .and_then(|()| files::replace_dir(&tmp, dir).map_err(|e| Error::io(dir, e)));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

fn write_contents(tmp: &Path, c: &CheckpointContents<'_>) -> Result<()> {
    let cfg_path = tmp.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(c.config).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    write_file(&cfg_path, &json)?;
    write_safetensors(&tmp.join(MODEL_FILE), c.model)?;
    let tok = tmp.join(TOKENIZER_FILE);
    c.tokenizer.save(&tok)?;
    match (c.config.encoder.embedded, c.encoder) {
        (true, Some(enc)) => {
            let d = tmp.join(ENCODER_DIR);
            std::fs::create_dir(&d).map_err(|e| Error::io(&d, e))?;
            let mut cfg =
                serde_json::to_value(&c.config.encoder.config).map_err(|source| Error::Json {
                    path: d.join(CONFIG_FILE),
                    source,
                })?;
            if let Some(obj) = cfg.as_object_mut() {
                obj.insert("model_type".into(), "clip_vision_model".into());
                obj.insert(
                    "architectures".into(),
                    serde_json::json!(["CLIPVisionModelWithProjection"]),
                );
            }
            let text = serde_json::to_vec_pretty(&cfg).map_err(|source| Error::Json {
                path: d.join(CONFIG_FILE),
                source,
            })?;
            write_file(&d.join(CONFIG_FILE), &text)?;
            write_safetensors(&d.join(MODEL_FILE), enc)?;
            let pp = serde_json::to_vec_pretty(&c.config.preprocessor).map_err(|source| {
                Error::Json {
                    path: d.join("preprocessor_config.json"),
                    source,
                }
            })?;
            write_file(&d.join("preprocessor_config.json"), &pp)?;
        }
        (true, None) => {
            return Err(Error::Input(
                "the checkpoint config says the encoder is embedded, but no encoder tensors \
                 were given"
                    .into(),
            ))
        }
        _ => {}
    }
    for (name, bytes) in &c.extra_files {
        plain_name(name)?;
        write_file(&tmp.join(name), bytes)?;
    }
    for (name, tensors) in &c.extra_tensors {
        plain_name(name)?;
        write_safetensors(&tmp.join(name), tensors)?;
    }
    Ok(())
}

/// The directory of the encoder a checkpoint uses: its `encoder/` subdirectory, or the
/// external source resolved as a local directory or hub id.
pub fn encoder_dir(dir: &Path, cfg: &CheckpointConfig) -> Result<PathBuf> {
    if cfg.encoder.embedded {
        let d = dir.join(ENCODER_DIR);
        if !d.join(CONFIG_FILE).is_file() {
            return Err(Error::MissingFile {
                path: d,
                what: "the checkpoint's embedded encoder".into(),
            });
        }
        Ok(d)
    } else {
        resolve_model(
            &cfg.encoder.source,
            &[FileReq::config(), FileReq::weights()],
        )
    }
}

/// Builds the projector and the decoder from a checkpoint's weights under the recipe's names,
/// checking that every stored tensor is used.
pub fn load_heads(
    cfg: &CheckpointConfig,
    weights: &Weights,
    dtype: DType,
    device: &Device,
) -> Result<(Projector, Opt)> {
    let vb = weights.var_builder(dtype, device);
    let decoder = Opt::new(&cfg.decoder, vb.pp("opt")).map_err(|e| weights.explain(e))?;
    let projector = Projector::new(&cfg.projector, vb.clone()).map_err(|e| weights.explain(e))?;
    let unexpected: Vec<String> = weights
        .unused()
        .into_iter()
        .filter(|n| {
            n != "embed_tokens.weight"
                && !(cfg.decoder.tie_word_embeddings && n == "opt.lm_head.weight")
        })
        .collect();
    if !unexpected.is_empty() {
        return Err(Error::UnexpectedKeys {
            path: weights.source().to_path_buf(),
            keys: unexpected,
        });
    }
    Ok((projector, decoder))
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// The model, in inference mode.
    pub model: CaptionModel,
    /// The tokenizer.
    pub tokenizer: ModaTokenizer,
    /// `config.json`.
    pub config: CheckpointConfig,
    /// The directory it was read from (see [`resolve_dir`]).
    pub dir: PathBuf,
}

/// Loads a checkpoint directory (f32).
pub fn load(dir: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    let dir = resolve_dir(dir);
    match files::file_kind(&dir) {
        Some("a directory") => {}
        None => {
            return Err(Error::MissingFile {
                path: dir,
                what: "MODA checkpoint directory".into(),
            })
        }
        Some(kind) => {
            return Err(Error::Input(format!(
                "{} is {kind}, not a MODA checkpoint directory",
                dir.display()
            )))
        }
    }
    let config = CheckpointConfig::from_dir(&dir)?;
    let enc_dir = encoder_dir(&dir, &config)?;
    let encoder = ClipVision::from_dir(&enc_dir, DType::F32, device)?;
    if encoder.config() != &config.encoder.config {
        return Err(Error::Input(format!(
            "the encoder in {} does not have the configuration recorded in {}",
            enc_dir.display(),
            dir.join(CONFIG_FILE).display()
        )));
    }
    let weights = Weights::from_file(&dir.join(MODEL_FILE))?;
    let (projector, decoder) = load_heads(&config, &weights, DType::F32, device)?;
    let tokenizer = ModaTokenizer::from_tokenizer_json(&dir.join(TOKENIZER_FILE))?;
    let model = CaptionModel::new(encoder, projector, decoder)?;
    Ok(LoadedCheckpoint {
        model,
        tokenizer,
        config,
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread and waits at most 20 s for it (a blocking open or an endless
    /// read would hang the test instead of failing it).
    fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(v) => v,
            Err(_) => panic!("did not return within 20 s"),
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_config_that_is_a_fifo_or_a_device_is_refused_at_once() {
        let d = crate::testutil::TempDir::new();
        let fifo_dir = d.0.join("fifo");
        std::fs::create_dir(&fifo_dir).expect("mkdir");
        let p = fifo_dir.join(CONFIG_FILE);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let zero_dir = d.0.join("zero");
        std::fs::create_dir(&zero_dir).expect("mkdir");
        std::os::unix::fs::symlink("/dev/zero", zero_dir.join(CONFIG_FILE)).expect("symlink");
        for (dir, kind) in [(fifo_dir, "FIFO"), (zero_dir, "character device")] {
            let e = within_seconds({
                let dir = dir.clone();
                move || CheckpointConfig::from_dir(&dir).map(|_| ())
            })
            .expect_err("not a regular file");
            let msg = e.to_string();
            assert!(msg.contains(CONFIG_FILE) && msg.contains(kind), "{msg}");
            // The whole checkpoint (what the exporter and `trainer eval` load) too.
            let e = within_seconds(move || load(&dir, &Device::Cpu).map(|_| ()))
                .expect_err("not a regular file");
            assert!(e.to_string().contains(kind), "{e}");
        }
        // A missing config still says it is missing.
        let e = CheckpointConfig::from_dir(&d.0).expect_err("missing");
        assert!(matches!(e, Error::MissingFile { .. }), "{e}");
    }
}
