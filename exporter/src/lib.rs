//! `exporter onnx`: writes a MODA bundle (ONNX graphs, tokenizer, manifest) from a trained
//! model and checks it in ONNX Runtime against the candle model it came from.
//!
//! The bundle is a directory:
//!
//! | file | what |
//! |---|---|
//! | `encoder.onnx` | `pixel_values [batch, 3, S, S]` -> `image_embeds [batch, projection_dim]` |
//! | `projector.onnx` | `image_embeds` -> `prefix_embeds [batch, 1, embed_dim]` |
//! | `embed_tokens.onnx` | `input_ids [batch, sequence]` (int64) -> `inputs_embeds` |
//! | `decoder.onnx` | `inputs_embeds`, `attention_mask`, `past_key_values.{i}.key/value` -> `logits`, `present.{i}.key/value` |
//! | `tokenizer.json` | the decoder's tokenizer |
//! | `moda.json` | the manifest ([`moda_sdk::manifest::Manifest`]) |
//!
//! The token embedding table travels as its own small `Gather` graph so that the runtime
//! needs nothing but ONNX Runtime; for a tied model it is stored twice (there and, transposed,
//! as the decoder's LM head). Every graph is self-contained (initializers inside the model, no
//! external data). The bundle is written to a temporary directory beside `--out`
//! (`.<name>.partial-<pid>`), verified, and renamed into place: a failure leaves no bundle. A
//! process killed while writing cannot clean up: the next export to the same `--out` removes the
//! `.<name>.partial-<pid>` (and `.<name>.old-<pid>`) of processes that are gone, and says so.
//! An existing `--out` is replaced only with `--force`, and only if it is a bundle (it has
//! `moda.json`) or an empty directory; an `--out` that is, contains or lies inside the
//! checkpoint, the encoder or the decoder is refused (paths compared with links resolved).
//!
//! The decoder's self-attention is ONNX Runtime's contrib op `com.microsoft.MultiHeadAttention`
//! (KV cache through its `past_key`/`past_value` and `present_key`/`present_value`), so every
//! decoder, fp32 included, needs ONNX Runtime (or another runtime with that contrib op); see
//! [`graphs`].
//!
//! `--quantize int8|int4` writes the linear layers of the encoder's transformer and of the
//! decoder (with its LM head) as ONNX Runtime's `com.microsoft.MatMulNBits` (symmetric, blocks
//! of 32, `accuracy_level` 4: int8 dot products on CPU); the patch convolution, the projector
//! and the embeddings stay fp32. A quantized bundle is verified by cosine similarities with the
//! fp32 model: of the image embeddings, and of the logits at every probe position (argmax
//! agreement is measured and reported).

pub mod graph;
pub mod graphs;
pub mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use moda_models::checkpoint;
use moda_models::hub::{resolve_model, FileReq};
use moda_models::preprocess::ImageProcessorConfig;
use moda_models::tokenizer::ModaTokenizer;
use moda_models::Moda;
use moda_sdk::manifest::{
    FileInfo, GenerationDefaults, GraphInfo, Manifest, ModelDims, Producer, SpecialTokenIds,
    TensorInfo, FORMAT, FORMAT_VERSION, MANIFEST_FILE,
};
use prost::Message;
use sha2::{Digest, Sha256};

pub use verify::Measurements;

/// The image encoder's file in a bundle.
pub const ENCODER_FILE: &str = "encoder.onnx";
/// The projector's file.
pub const PROJECTOR_FILE: &str = "projector.onnx";
/// The decoder's file.
pub const DECODER_FILE: &str = "decoder.onnx";
/// The token embedding graph's file.
pub const EMBED_TOKENS_FILE: &str = "embed_tokens.onnx";
/// The tokenizer's file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The default frozen encoder (FashionCLIP).
pub const DEFAULT_ENCODER: &str = "patrickjohncyh/fashion-clip";
/// The default decoder configuration and tokenizer (OPT-125m).
pub const DEFAULT_DECODER: &str = "facebook/opt-125m";

/// Errors of exporting.
///
/// A variant shows its cause in its message or returns it from `source()`, not both (a chain
/// printer such as anyhow's `{:#}` would print it twice); [`report`] prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading the model or its files failed.
    #[error(transparent)]
    Model(#[from] moda_models::Error),
    /// A tensor operation failed (candle's message shown, so not a `source()`).
    #[error("tensor operation: {0}")]
    Candle(candle_core::Error),
    /// ONNX Runtime could not be loaded.
    #[error(transparent)]
    Runtime(#[from] moda_sdk::runtime::RuntimeError),
    /// ONNX Runtime failed on a written graph.
    #[error("verification: ONNX Runtime failed on the {graph} graph: {msg}")]
    Ort {
        /// The graph.
        graph: String,
        /// ONNX Runtime's message.
        msg: String,
    },
    /// A graph's output differs from the candle model.
    #[error(
        "verification failed: the {graph} graph's output `{output}` differs from the candle \
         model by {diff:.3e} (tolerance {tol:.0e}) on {step}{}; no bundle was written",
        if detail.is_empty() { String::new() } else { format!(": {detail}") }
    )]
    Verify {
        /// The graph.
        graph: String,
        /// The output.
        output: String,
        /// Which probe or step.
        step: String,
        /// The largest absolute difference.
        diff: f32,
        /// The tolerance.
        tol: f32,
        /// More about the failure (a shape mismatch, a NaN).
        detail: String,
    },
    /// `--out` exists and `--force` was not given.
    #[error("{} already exists; pass --force to replace it", .0.display())]
    OutExists(PathBuf),
    /// `--out` exists and is not a bundle: `--force` replaces only a bundle.
    #[error(
        "{} exists and is not a MODA bundle (it has no {MANIFEST_FILE}); --force replaces only \
         a bundle: remove it yourself or choose another --out",
        .0.display()
    )]
    OutNotBundle(PathBuf),
    /// `--out` is, contains or lies inside an input of the export.
    #[error(
        "--out {} {relation} the {what} {} that the export reads; choose an --out apart from \
         it (the bundle replaces --out as a whole: writing it there could destroy its input)",
        out.display(),
        input.display()
    )]
    OutOverlapsInput {
        /// The bundle directory asked for.
        out: PathBuf,
        /// "is", "is inside" or "contains".
        relation: &'static str,
        /// What the input is: checkpoint, encoder, decoder.
        what: &'static str,
        /// The input.
        input: PathBuf,
    },
    /// A file or directory could not be read, written, created, renamed or removed.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The operating system's error (in the message, so not a `source()`).
        cause: std::io::Error,
    },
    /// A weight to be written holds a NaN or an infinity.
    #[error(
        "the weight `{tensor}` (shape {shape:?}) holds {value} at {index:?} ({count} non-finite \
         value(s) in all); a bundle's weights must be finite, no bundle was written"
    )]
    NonFinite {
        /// The tensor, as named in the graph (`.T`: stored transposed).
        tensor: String,
        /// Its shape.
        shape: Vec<i64>,
        /// The index of the first non-finite value.
        index: Vec<usize>,
        /// That value.
        value: f32,
        /// How many of its values are not finite.
        count: usize,
    },
    /// The options are not usable.
    #[error("{0}")]
    Usage(String),
    /// A bug: the model lacks a tensor that its configuration implies.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// The exporter's result type.
pub type Result<T> = std::result::Result<T, Error>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    }
}

pub use moda_models::error::report;

/// Weight quantization of the linear layers of the encoder's transformer and of the decoder
/// (with its LM head); the patch convolution, the projector and the embeddings stay fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// fp32 weights.
    #[default]
    None,
    /// int8 weights, blocks of 32 (`MatMulNBits` with `bits = 8`).
    Int8,
    /// int4 weights, blocks of 32 (`MatMulNBits` with `bits = 4`).
    Int4,
}

impl Quantize {
    /// The name in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Quantize::None => "none",
            Quantize::Int8 => "int8",
            Quantize::Int4 => "int4",
        }
    }

    /// The `MatMulNBits` parameters, if any.
    pub fn weight_quant(self) -> Option<graphs::WeightQuant> {
        match self {
            Quantize::None => None,
            Quantize::Int8 => Some(graphs::WeightQuant::INT8),
            Quantize::Int4 => Some(graphs::WeightQuant::INT4),
        }
    }
}

/// How [`write_bundle`] writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct BundleOptions {
    /// Replace an existing bundle.
    pub force: bool,
    /// Check the graphs in ONNX Runtime before renaming the bundle into place.
    pub verify: bool,
    /// Weight quantization of the decoder.
    pub quantize: Quantize,
}

/// What `exporter onnx` was asked to do.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// A trainer checkpoint directory ([`moda_models::checkpoint`]) or the original
    /// recipe's `.pth` state_dict.
    pub checkpoint: PathBuf,
    /// The bundle directory to write.
    pub out: PathBuf,
    /// The frozen encoder for a `.pth`: a local directory or a hub id.
    pub encoder: String,
    /// The decoder's configuration and tokenizer for a `.pth`: a local directory or a hub id.
    pub decoder: String,
    /// Weight quantization.
    pub quantize: Quantize,
    /// Replace an existing `out`.
    pub force: bool,
    /// Run the verification (on by default).
    pub verify: bool,
}

impl ExportOptions {
    fn bundle_options(&self) -> BundleOptions {
        BundleOptions {
            force: self.force,
            verify: self.verify,
            quantize: self.quantize,
        }
    }
}

/// The non-weight parts of a bundle: tokenizer, preprocessing, provenance.
#[derive(Debug)]
pub struct BundleSources {
    /// The decoder's tokenizer.
    pub tokenizer: ModaTokenizer,
    /// The encoder's image preprocessing.
    pub preprocessing: ImageProcessorConfig,
    /// Where the encoder came from (for the manifest).
    pub encoder: String,
    /// Where the decoder came from.
    pub decoder: String,
}

impl BundleSources {
    /// Reads the tokenizer from `decoder_dir` and `preprocessor_config.json` (or CLIP's
    /// defaults) from `encoder_dir`.
    pub fn from_dirs(encoder_dir: &Path, decoder_dir: &Path) -> Result<Self> {
        Ok(Self {
            tokenizer: ModaTokenizer::from_dir(decoder_dir)?,
            preprocessing: ImageProcessorConfig::from_dir_or_default(encoder_dir)?,
            encoder: encoder_dir.display().to_string(),
            decoder: decoder_dir.display().to_string(),
        })
    }
}

/// What an export did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The bundle directory.
    pub out: PathBuf,
    /// Each file and its size in bytes.
    pub files: Vec<(String, u64)>,
    /// The verification's largest differences (`None` with `--no-verify`).
    pub verification: Option<Measurements>,
    /// Seconds spent writing the graphs.
    pub write_seconds: f64,
    /// Seconds spent verifying.
    pub verify_seconds: f64,
}

/// `exporter onnx`: loads the model and writes the bundle.
pub fn export_onnx(opts: &ExportOptions) -> Result<ExportReport> {
    if opts.out.as_os_str().is_empty() {
        return Err(Error::Usage("--out is empty".to_string()));
    }
    check_apart(&opts.out, &opts.checkpoint, "checkpoint")?;
    // Early, before loading anything; whether `--force` may replace it is checked once the
    // inputs are known to lie apart (`write_bundle`).
    if !opts.force && opts.out.symlink_metadata().is_ok() {
        return Err(Error::OutExists(opts.out.clone()));
    }
    if opts.checkpoint.is_file() {
        return export_recipe(opts);
    }
    let dir = checkpoint::resolve_dir(&opts.checkpoint);
    check_apart(&opts.out, &dir, "checkpoint")?;
    match checkpoint::file_kind(&dir) {
        Some("a directory") => {}
        kind => {
            let what = match kind {
                None => "does not exist".to_string(),
                Some(kind) => format!("is {kind}, not a checkpoint directory or file"),
            };
            return Err(Error::Usage(format!(
                "checkpoint {} {what} (pass a trainer checkpoint directory or the original \
                 recipe's .pth)",
                opts.checkpoint.display()
            )));
        }
    }
    // A trainer checkpoint carries its encoder (or where it comes from), the decoder's
    // configuration and the tokenizer: --encoder and --decoder are not used.
    let loaded = checkpoint::load(&dir, &Device::Cpu)?;
    if !loaded.config.encoder.embedded {
        let encoder = checkpoint::encoder_dir(&loaded.dir, &loaded.config)?;
        check_apart(&opts.out, &encoder, "encoder")?;
    }
    let sources = BundleSources {
        tokenizer: loaded.tokenizer,
        preprocessing: loaded.config.preprocessor.clone(),
        encoder: if loaded.config.encoder.embedded {
            "checkpoint".to_string()
        } else {
            loaded.config.encoder.source.clone()
        },
        decoder: "checkpoint".to_string(),
    };
    write_bundle(&loaded.model, &sources, &opts.out, &opts.bundle_options())
}

/// The original recipe's `.pth` with the encoder and the decoder's config/tokenizer from
/// `--encoder` and `--decoder`.
fn export_recipe(opts: &ExportOptions) -> Result<ExportReport> {
    let mut enc_files = vec![FileReq::config(), FileReq::weights()];
    enc_files.push(FileReq::preprocessor_config());
    let encoder_dir = resolve_model(&opts.encoder, &enc_files)?;
    let mut dec_files = vec![FileReq::config()];
    dec_files.extend(FileReq::tokenizer_all());
    let decoder_dir = resolve_model(&opts.decoder, &dec_files)?;
    check_apart(&opts.out, &encoder_dir, "encoder")?;
    check_apart(&opts.out, &decoder_dir, "decoder")?;
    let model =
        Moda::from_recipe_checkpoint(&opts.checkpoint, &encoder_dir, &decoder_dir, &Device::Cpu)?;
    let mut sources = BundleSources::from_dirs(&encoder_dir, &decoder_dir)?;
    sources.encoder = opts.encoder.clone();
    sources.decoder = opts.decoder.clone();
    write_bundle(&model, &sources, &opts.out, &opts.bundle_options())
}

/// Refuses an existing `out` unless `force`, and with `force` unless it is a bundle (it has
/// a manifest) or an empty directory: nothing else is replaced.
fn check_out(out: &Path, force: bool) -> Result<()> {
    if out.as_os_str().is_empty() {
        return Err(Error::Usage("--out is empty".to_string()));
    }
    if out.symlink_metadata().is_err() {
        return Ok(());
    }
    if !force {
        return Err(Error::OutExists(out.to_path_buf()));
    }
    let bundle = out.join(MANIFEST_FILE).is_file();
    let empty = std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_none());
    if bundle || empty {
        Ok(())
    } else {
        Err(Error::OutNotBundle(out.to_path_buf()))
    }
}

/// Refuses an `out` that is the input `input` (`what`: checkpoint, encoder, decoder), lies
/// inside it or contains it, symbolic links resolved: the bundle replaces `out` as a whole.
fn check_apart(out: &Path, input: &Path, what: &'static str) -> Result<()> {
    match checkpoint::overlap(out, input) {
        None => Ok(()),
        Some(relation) => Err(Error::OutOverlapsInput {
            out: out.to_path_buf(),
            relation,
            what,
            input: input.to_path_buf(),
        }),
    }
}

/// Removes a directory when dropped, unless disarmed.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn tensor_info(sig: &graphs::Signature) -> Vec<TensorInfo> {
    sig.iter()
        .map(|(name, elem, dims)| TensorInfo {
            name: name.clone(),
            dtype: elem.name().to_string(),
            shape: dims
                .iter()
                .map(|d| match d {
                    graph::Dim::Fixed(n) => serde_json::Value::from(*n),
                    graph::Dim::Named(s) => serde_json::Value::from(s.clone()),
                })
                .collect(),
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Removes what exports to `parent/name` killed midway left behind: `.<name>.partial-<pid>`
/// (a bundle being written) of processes that are gone, and their `.<name>.old-<pid>` (the
/// bundle that was being replaced) when `out` exists; one killed between its two renames
/// leaves no `out`, and its `.old` is then kept as the only copy of that bundle. Each is
/// reported on stderr.
fn remove_stale_partials(parent: &Path, name: &str, out: &Path) {
    for stale in checkpoint::remove_stale(parent, &format!(".{name}.partial-")) {
        eprintln!("exporter: {stale}");
    }
    let old = format!(".{name}.old-");
    if out.symlink_metadata().is_ok() {
        for stale in checkpoint::remove_stale(parent, &old) {
            eprintln!("exporter: {stale}");
        }
    } else if let Ok(entries) = std::fs::read_dir(parent) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&old) {
                eprintln!(
                    "exporter: {} holds a bundle that an interrupted export moved aside; \
                     rename it to {} to restore it",
                    entry.path().display(),
                    out.display()
                );
            }
        }
    }
}

/// Writes the bundle of `model` to `out` (see the crate documentation): a temporary directory
/// beside `out`, verified unless `verify` is false, then renamed into place.
pub fn write_bundle(
    model: &Moda,
    sources: &BundleSources,
    out: &Path,
    options: &BundleOptions,
) -> Result<ExportReport> {
    check_out(out, options.force)?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::Usage(format!("--out {} has no file name", out.display())))?
        .to_string_lossy()
        .to_string();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    remove_stale_partials(&parent, &name, out);
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let mut cleanup = Cleanup(Some(tmp.clone()));

    let start = Instant::now();
    let mut files = BTreeMap::new();
    let mut graph_infos = BTreeMap::new();
    let quant = options.quantize.weight_quant();
    let writers = [
        ("encoder", ENCODER_FILE),
        ("projector", PROJECTOR_FILE),
        ("embed_tokens", EMBED_TOKENS_FILE),
        ("decoder", DECODER_FILE),
    ];
    for (role, file) in writers {
        let g = match role {
            "encoder" => graphs::encoder(model, quant)?,
            "projector" => graphs::projector(model)?,
            "embed_tokens" => graphs::embed_tokens(model)?,
            _ => graphs::decoder(model, quant)?,
        };
        let bytes = g.model.encode_to_vec();
        drop(g.model);
        let path = tmp.join(file);
        std::fs::write(&path, &bytes).map_err(io(&path))?;
        files.insert(
            file.to_string(),
            FileInfo {
                bytes: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
            },
        );
        graph_infos.insert(
            role.to_string(),
            GraphInfo {
                file: file.to_string(),
                inputs: tensor_info(&g.inputs),
                outputs: tensor_info(&g.outputs),
            },
        );
    }
    let tok_path = tmp.join(TOKENIZER_FILE);
    sources.tokenizer.save(&tok_path)?;
    let tok_bytes =
        moda_models::files::read_bounded(&tok_path, moda_models::files::TEXT_FILE_MAX_BYTES)
            .map_err(io(&tok_path))?;
    files.insert(
        TOKENIZER_FILE.to_string(),
        FileInfo {
            bytes: tok_bytes.len() as u64,
            sha256: sha256_hex(&tok_bytes),
        },
    );

    let ecfg = model.encoder_config();
    let dcfg = model.decoder().config();
    let manifest = Manifest {
        format: FORMAT.to_string(),
        format_version: FORMAT_VERSION,
        exporter: Producer {
            name: "moda-exporter".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
        model: ModelDims {
            image_size: ecfg.image_size,
            num_channels: ecfg.num_channels,
            projection_dim: ecfg.projection_dim,
            embed_dim: dcfg.embed_dim(),
            hidden_size: dcfg.hidden_size,
            num_layers: dcfg.num_hidden_layers,
            num_heads: dcfg.num_attention_heads,
            head_dim: dcfg.head_dim(),
            vocab_size: dcfg.vocab_size,
            max_positions: dcfg.max_position_embeddings,
            prefix_len: 1,
        },
        graphs: graph_infos,
        tokenizer: TOKENIZER_FILE.to_string(),
        preprocessing: serde_json::to_value(&sources.preprocessing)
            .map_err(|e| Error::Internal(format!("preprocessing config: {e}")))?,
        special_tokens: SpecialTokenIds {
            bos: sources.tokenizer.bos_id(),
            eos: sources.tokenizer.eos_id(),
            pad: sources.tokenizer.pad_id(),
        },
        generation: GenerationDefaults {
            max_new_tokens: 32,
            num_beams: 1,
            do_sample: false,
        },
        quantization: options.quantize.name().to_string(),
        files: files.clone(),
        source_configs: serde_json::json!({
            "encoder": { "source": sources.encoder, "config": ecfg },
            "projector": model.projector().config(),
            "decoder": { "source": sources.decoder, "config": dcfg },
        }),
    };
    let manifest_path = tmp.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::Internal(format!("manifest: {e}")))?;
    std::fs::write(&manifest_path, text).map_err(io(&manifest_path))?;
    let write_seconds = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let verification = if options.verify {
        Some(verify::verify_bundle(model, &tmp, options.quantize)?)
    } else {
        None
    };
    let verify_seconds = start.elapsed().as_secs_f64();

    // Into place: move an existing `out` aside (only with --force), rename, drop the old one.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let had_old = out.symlink_metadata().is_ok();
    if had_old {
        std::fs::rename(out, &old).map_err(io(out))?;
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        if had_old {
            let _ = std::fs::rename(&old, out);
        }
        return Err(io(out)(e));
    }
    cleanup.0 = None;
    if had_old {
        let _ = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
    }
    let mut list: Vec<(String, u64)> = files.iter().map(|(k, v)| (k.clone(), v.bytes)).collect();
    list.push((
        MANIFEST_FILE.to_string(),
        std::fs::metadata(out.join(MANIFEST_FILE))
            .map(|m| m.len())
            .unwrap_or(0),
    ));
    Ok(ExportReport {
        out: out.to_path_buf(),
        files: list,
        verification,
        write_seconds,
        verify_seconds,
    })
}
