//! The MODA checkpoint directory: what `trainer fit` writes and the exporter loads.
//!
//! Layout (nanoVLM's `save_pretrained`: `config.json` + `model.safetensors`):
//!
//! - `config.json`: [`CheckpointConfig`]: format name and version, the encoder (its config,
//!   where it comes from, whether it was trained), the decoder's `OptConfig`, the
//!   `ProjectorConfig` and the image preprocessor config;
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
//! [`save`] is atomic: everything is written and fsynced in a temporary directory next to the
//! target (`.<name>.tmp-<pid>`), which then replaces it by rename. A previous checkpoint is
//! moved aside to `.<name>.old` during the swap and removed after it; should the process die
//! between the two renames, [`load`] and [`resolve_dir`] find the complete `.<name>.old`.
//! Should it die while writing, the temporary directory of a process that is gone is removed by
//! the next [`save`] of that checkpoint, or by [`remove_stale_temporaries`]
//! ([`remove_stale`] does the same for other temporary names that carry a process id).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::clip_vision::{ClipVision, ClipVisionConfig};
use crate::error::{Error, Result};
use crate::hub::{resolve_model, FileReq};
use crate::moda::Moda;
use crate::opt::{Opt, OptConfig};
use crate::preprocess::ImageProcessorConfig;
use crate::projector::{Projector, ProjectorConfig};
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
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn sync_dir(path: &Path) -> Result<()> {
    // Directories can be opened and fsynced on Unix; elsewhere this is best effort.
    match std::fs::File::open(path) {
        Ok(f) => {
            let _ = f.sync_all();
            Ok(())
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
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
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Input(format!("{} has no directory name", dir.display())))?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    Ok(parent.join(format!(".{}.{suffix}", name.to_string_lossy())))
}

/// A temporary file or directory left by a process that is gone (killed while writing),
/// found by [`remove_stale`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleTemporary {
    /// The file or directory.
    pub path: PathBuf,
    /// The process id in its name.
    pub pid: u32,
    /// Why it is stale: the process is not running, or (where that cannot be told) the entry
    /// has not been modified for [`STALE_AGE`].
    pub why: String,
    /// `None` once removed, else why it could not be.
    pub error: Option<String>,
}

impl std::fmt::Display for StaleTemporary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            None => write!(
                f,
                "removed {}, left behind by process {} ({})",
                self.path.display(),
                self.pid,
                self.why
            ),
            Some(e) => write!(
                f,
                "cannot remove {}, left behind by process {} ({}): {e}",
                self.path.display(),
                self.pid,
                self.why
            ),
        }
    }
}

/// Where a system cannot tell whether a process runs, a temporary entry counts as stale once
/// it has not been modified for this long.
pub const STALE_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Whether process `pid` runs: `Some` on Linux with `/proc` mounted (`/proc/<pid>` exists; a
/// process of another PID namespace is not seen), `None` where this cannot be told.
pub fn process_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    if cfg!(target_os = "linux") && proc.join("self").exists() {
        Some(proc.join(pid.to_string()).exists())
    } else {
        None
    }
}

/// Removes the entries of `parent` named `<prefix><pid>` or `<prefix><pid>-<anything>` whose
/// process is gone: not running ([`process_alive`]), or, where that cannot be told, not
/// modified for [`STALE_AGE`]. Entries of this process and of running processes are kept.
/// Returns what was found stale, removed or not, for the caller to report.
pub fn remove_stale(parent: &Path, prefix: &str) -> Vec<StaleTemporary> {
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let digits = rest.split('-').next().unwrap_or("");
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let path = entry.path();
        let why = match process_alive(pid) {
            Some(true) => continue,
            Some(false) => "no longer running".to_string(),
            None => {
                let age = std::fs::symlink_metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                match age {
                    Some(age) if age >= STALE_AGE => {
                        format!("not modified for {} hours", age.as_secs() / 3600)
                    }
                    _ => continue,
                }
            }
        };
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        found.push(StaleTemporary {
            path,
            pid,
            why,
            error: removed.err().map(|e| e.to_string()),
        });
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Removes the temporary directories that [`save`] of the checkpoint `dir` left when its
/// process died while writing (`.<name>.tmp-<pid>` of a process that is gone, and the
/// `.<name>.tmp` of older versions); see [`remove_stale`].
pub fn remove_stale_temporaries(dir: &Path) -> Vec<StaleTemporary> {
    let (Ok(tmp), Some(parent)) = (sibling(dir, "tmp-"), dir.parent()) else {
        return Vec::new();
    };
    let Some(prefix) = tmp.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let mut found = remove_stale(parent, prefix);
    if let Ok(legacy) = sibling(dir, "tmp") {
        if legacy.is_dir() {
            let removed = std::fs::remove_dir_all(&legacy);
            found.push(StaleTemporary {
                path: legacy,
                pid: 0,
                why: "an older version's temporary checkpoint".to_string(),
                error: removed.err().map(|e| e.to_string()),
            });
        }
    }
    found
}

/// `path` made absolute, with symbolic links, `.` and `..` resolved, whether it exists or not:
/// its deepest existing ancestor canonicalized and the rest (which does not exist, so holds no
/// links) appended component by component. Where an output would go, to compare with inputs.
pub fn canonical_path(path: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let mut rest = Vec::new();
    let mut cur = path;
    loop {
        let probe = if cur.as_os_str().is_empty() {
            Path::new(".")
        } else {
            cur
        };
        match std::fs::canonicalize(probe) {
            Ok(mut out) => {
                for c in rest.iter().rev() {
                    match c {
                        Component::Normal(name) => out.push(name),
                        Component::ParentDir => {
                            out.pop();
                        }
                        _ => {}
                    }
                }
                return Ok(out);
            }
            Err(e) => {
                let (Some(last), Some(parent)) = (cur.components().next_back(), cur.parent())
                else {
                    return Err(e);
                };
                rest.push(last);
                cur = parent;
            }
        }
    }
}

/// How the output path `out` and the input path `input` overlap, after [`canonical_path`]:
/// `Some("is")` (the same), `Some("is inside")` or `Some("contains")`; `None` when they are
/// apart (or one cannot be resolved). Writing or replacing `out` must not touch an input.
pub fn overlap(out: &Path, input: &Path) -> Option<&'static str> {
    let (o, i) = (canonical_path(out).ok()?, canonical_path(input).ok()?);
    if o == i {
        Some("is")
    } else if o.starts_with(&i) {
        Some("is inside")
    } else if i.starts_with(&o) {
        Some("contains")
    } else {
        None
    }
}

/// The directory to read a checkpoint from: `dir`, or its `.<name>.old` copy when a crash
/// interrupted [`save`] between moving the old checkpoint aside and renaming the new one.
pub fn resolve_dir(dir: &Path) -> PathBuf {
    if !dir.exists() {
        if let Ok(old) = sibling(dir, "old") {
            if old.join(CONFIG_FILE).is_file() {
                return old;
            }
        }
    }
    dir.to_path_buf()
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
    let old = sibling(dir, "old")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = write_contents(&tmp, contents);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&tmp)?;
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    sync_dir(parent)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
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
    sync_file(&tok)?;
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
            sync_dir(&d)?;
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
    pub model: Moda,
    /// The tokenizer.
    pub tokenizer: ModaTokenizer,
    /// `config.json`.
    pub config: CheckpointConfig,
    /// The directory it was read from (see [`resolve_dir`]).
    pub dir: PathBuf,
}

/// What kind of file system entry `path` is, for messages: `None` when it does not exist,
/// else "a directory", "a regular file", "a character device", ... (links followed).
pub fn file_kind(path: &Path) -> Option<&'static str> {
    let ft = std::fs::metadata(path).ok()?.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() {
            return Some("a character device");
        }
        if ft.is_block_device() {
            return Some("a block device");
        }
        if ft.is_fifo() {
            return Some("a FIFO (named pipe)");
        }
        if ft.is_socket() {
            return Some("a socket");
        }
    }
    Some(if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file nor a directory"
    })
}

/// Loads a checkpoint directory (f32).
pub fn load(dir: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    let dir = resolve_dir(dir);
    match file_kind(&dir) {
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
    let model = Moda::new(encoder, projector, decoder)?;
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

    #[test]
    fn paths_are_compared_resolved() {
        let d = crate::testutil::TempDir::new();
        let run = d.0.join("run");
        std::fs::create_dir_all(run.join("best/encoder")).expect("mkdir");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&run, d.0.join("link")).expect("symlink");
        let real = canonical_path(&run).expect("canonical");
        // Not existing yet, with `.` and `..` on the way.
        assert_eq!(
            canonical_path(&d.0.join("run/new/../best/./x/y")).expect("canonical"),
            real.join("best/x/y")
        );
        assert_eq!(overlap(&run, &run.join("best")), Some("contains"));
        assert_eq!(
            overlap(&run.join("best/encoder"), &run.join("best")),
            Some("is inside")
        );
        assert_eq!(
            overlap(&run.join("best/../best"), &run.join("best")),
            Some("is")
        );
        assert_eq!(overlap(&d.0.join("bundle"), &run.join("best")), None);
        assert_eq!(
            overlap(&d.0.join("run2"), &run),
            None,
            "a shared prefix is not inside"
        );
        #[cfg(unix)]
        assert_eq!(
            overlap(&d.0.join("link"), &run.join("best")),
            Some("contains")
        );
    }
}
