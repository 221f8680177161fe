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
//! The graphs' roles, file names and input and output names are the bundle format's
//! ([`moda_sdk::manifest::Role`]), shared with the SDK that reads the bundle.
//!
//! Each graph's initializers of 64 KiB or more are in an external data file beside it
//! (`decoder.onnx.data`, ...; the manifest lists it as the graph's `data`), each tensor at a
//! page-aligned offset, so that ONNX Runtime maps them into memory instead of copying them
//! out of the graph: opening a bundle takes about half the memory and time. The token embedding
//! table travels as its own small `Gather` graph so that the runtime needs nothing but ONNX
//! Runtime; for a tied model it is stored twice (there and, transposed, as the decoder's LM
//! head), but mapped from the file only the rows of the tokens looked up are ever read into
//! memory. The bundle is written to a temporary directory beside `--out`
//! (`.<name>.partial-<pid>`), verified, and put in place by
//! [`moda_models::files::replace_dir`] (files fsynced, an existing bundle moved aside to
//! `.<name>.old` and removed once the new one is in place): a failure leaves no bundle. A
//! process killed while writing cannot clean up: the next export to the same `--out` removes the
//! `.<name>.partial-<pid>` of processes that are gone (and the `.<name>.old-<pid>` that earlier
//! exporters moved a bundle aside to), and says so.
//! An existing `--out` is replaced only with `--force`, and only if it is a bundle (it has
//! `moda.json`) or an empty directory; an `--out` that is, contains or lies inside the
//! checkpoint, the encoder or the decoder is refused (paths compared with links resolved).
//!
//! The decoder's self-attention is ONNX Runtime's contrib op `com.microsoft.MultiHeadAttention`
//! (KV cache through its `past_key`/`past_value` and `present_key`/`present_value`), so every
//! decoder, fp32 included, needs ONNX Runtime (or another runtime with that contrib op); see
//! [`graphs`].
//!
//! `--quantize int8|int4` writes the linear layers of the decoder (with its LM head) as ONNX
//! Runtime's `com.microsoft.MatMulNBits` (symmetric; blocks of 128 weights for int8 and 32 for
//! int4 unless `--block-size` says otherwise; `accuracy_level` 4: int8 dot products on CPU),
//! and those of the encoder's transformer, in both kinds, as
//! `com.microsoft.DynamicQuantizeMatMul` (int8 weights with a scale per output column,
//! activations quantized on each run: int8 dot products for the encoder's compute-bound
//! products, where `MatMulNBits` was no faster than fp32); the patch convolution, the layer
//! norms, the projector and the embeddings stay fp32. A quantized bundle is verified by cosine similarities with the
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
use moda_models::schema::{CaptionSchema, CaptionTemplate, DEFAULT_TEMPLATE};
use moda_models::tokenizer::ModaTokenizer;
use moda_models::CaptionModel;
use moda_sdk::manifest::{
    external_data_file, FileInfo, GenerationDefaults, GraphInfo, Manifest, ModelDims, Producer,
    Role, SpecialTokenIds, TensorInfo, FORMAT, FORMAT_VERSION, MANIFEST_FILE,
};
use prost::Message;
use sha2::{Digest, Sha256};

pub use verify::Measurements;

/// The image encoder's file in a bundle ([`Role::default_file`]).
pub const ENCODER_FILE: &str = Role::Encoder.default_file();
/// The projector's file.
pub const PROJECTOR_FILE: &str = Role::Projector.default_file();
/// The decoder's file.
pub const DECODER_FILE: &str = Role::Decoder.default_file();
/// The token embedding graph's file.
pub const EMBED_TOKENS_FILE: &str = Role::EmbedTokens.default_file();
pub use moda_sdk::manifest::TOKENIZER_FILE;

/// The default of `--max-new-tokens`: the most tokens a description gets unless its caller
/// asks otherwise (the manifest's `generation.max_new_tokens`).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 32;

/// The default frozen encoder (FashionCLIP) and decoder (OPT-125m), as `trainer fit` uses them.
pub use moda_models::hub::{DEFAULT_DECODER, DEFAULT_ENCODER};

/// The decoder graph's metadata key for the positions its table holds.
pub use moda_sdk::manifest::MAX_POSITIONS_METADATA;

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
/// (with its LM head): the manifest's own type ([`moda_sdk::manifest::Quantization`]); the
/// `MatMulNBits` parameters of each are [`graphs::WeightQuant::of`].
pub use moda_sdk::manifest::Quantization as Quantize;

/// How [`write_bundle`] writes.
#[derive(Debug, Clone, Copy)]
pub struct BundleOptions {
    /// Replace an existing bundle.
    pub force: bool,
    /// Check the graphs in ONNX Runtime before renaming the bundle into place.
    pub verify: bool,
    /// Weight quantization of the encoder and the decoder.
    pub quantize: Quantize,
    /// Weights per `MatMulNBits` block of the quantized decoder (a power of two from 16 to
    /// 256); `None` takes the kind's default ([`graphs::WeightQuant`]).
    pub block_size: Option<usize>,
    /// The manifest's default `max_new_tokens`: at least 1, at most what the decoder's
    /// positions allow ([`ModelDims::max_new_tokens_allowed`]).
    pub max_new_tokens: usize,
}

impl Default for BundleOptions {
    fn default() -> Self {
        Self {
            force: false,
            verify: false,
            quantize: Quantize::None,
            block_size: None,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
        }
    }
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
    /// [`BundleOptions::block_size`].
    pub block_size: Option<usize>,
    /// Replace an existing `out`.
    pub force: bool,
    /// Run the verification (on by default).
    pub verify: bool,
    /// The manifest's default `max_new_tokens` ([`BundleOptions::max_new_tokens`]).
    pub max_new_tokens: usize,
    /// The caption template of the bundle's schema, for a checkpoint that records none (the
    /// recipe's `.pth`) or to override the one it records; with [`ExportOptions::catalog`]
    /// the fields' values are counted from it, without it the fields take any text.
    pub caption_template: Option<String>,
    /// A catalog whose rows give the schema's values: a CSV with a column per template field,
    /// or a Kaggle layout directory (its `fashion.csv`). Alone, it takes the recipe's template.
    pub catalog: Option<PathBuf>,
}

/// The stop string of the recipe's `.pth`, whose captions end with the literal characters
/// `<\s>` (a backslash, not the tokenizer's `</s>`), which such a model writes and goes on
/// after. A bundle exported from a `.pth` stops there by default.
pub const RECIPE_STOP_STRING: &str = "<\\s>";

/// The schema `--caption-template` and `--catalog` describe, if either is given: the
/// template (the recipe's by default) and each field's values counted over the catalog's
/// rows whose template fields are all filled (those that make a caption).
pub fn schema_from_flags(
    template: Option<&str>,
    catalog: Option<&Path>,
) -> Result<Option<CaptionSchema>> {
    if template.is_none() && catalog.is_none() {
        return Ok(None);
    }
    let template = CaptionTemplate::parse(template.unwrap_or(DEFAULT_TEMPLATE))
        .map_err(|e| Error::Usage(format!("--caption-template: {e}")))?;
    let Some(catalog) = catalog else {
        return Ok(Some(CaptionSchema::from_template(template)));
    };
    let csv_path = if catalog.is_dir() {
        catalog.join(moda_models::kaggle::CSV_FILE)
    } else {
        catalog.to_path_buf()
    };
    let bad = |msg: String| Error::Usage(format!("--catalog {}: {msg}", csv_path.display()));
    let file = moda_models::files::open_regular(&csv_path).map_err(|e| bad(e.to_string()))?;
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(file);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect();
    let columns: Vec<String> = template.columns().iter().map(|c| c.to_string()).collect();
    let mut index = Vec::new();
    for c in &columns {
        match headers.iter().position(|h| h == c) {
            Some(i) => index.push(i),
            None => {
                return Err(bad(format!(
                    "the caption template uses column {c:?}, which the CSV does not have \
                     (columns: {})",
                    headers.join(", ")
                )))
            }
        }
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        let row: Vec<String> = index
            .iter()
            .map(|&i| record.get(i).unwrap_or("").to_string())
            .collect();
        if row.iter().all(|v| !v.is_empty()) {
            rows.push(row);
        }
    }
    if rows.is_empty() {
        return Err(bad(
            "no row fills every field of the caption template".to_string()
        ));
    }
    let schema = CaptionSchema::from_rows(template, rows, |row, field| {
        columns
            .iter()
            .position(|c| c == field)
            .map(|i| row[i].clone())
    });
    schema.validate().map_err(bad)?;
    Ok(Some(schema))
}

impl ExportOptions {
    fn bundle_options(&self) -> BundleOptions {
        BundleOptions {
            force: self.force,
            verify: self.verify,
            quantize: self.quantize,
            block_size: self.block_size,
            max_new_tokens: self.max_new_tokens,
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
    /// The caption schema the manifest records (none: descriptions have no attributes).
    pub schema: Option<CaptionSchema>,
    /// The manifest's default stop strings.
    pub stop_strings: Vec<String>,
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
            schema: None,
            stop_strings: Vec::new(),
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
    let flagged_schema =
        schema_from_flags(opts.caption_template.as_deref(), opts.catalog.as_deref())?;
    if opts.checkpoint.is_file() {
        return export_recipe(opts, flagged_schema);
    }
    let dir = checkpoint::resolve_dir(&opts.checkpoint);
    check_apart(&opts.out, &dir, "checkpoint")?;
    match moda_models::files::file_kind(&dir) {
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
        // The flags override what the checkpoint recorded.
        schema: flagged_schema.or(loaded.config.schema),
        stop_strings: Vec::new(),
    };
    write_bundle(&loaded.model, &sources, &opts.out, &opts.bundle_options())
}

/// The original recipe's `.pth` with the encoder and the decoder's config/tokenizer from
/// `--encoder` and `--decoder`; its schema, if any, from `--caption-template` and
/// `--catalog`; [`RECIPE_STOP_STRING`] as the default stop string.
fn export_recipe(opts: &ExportOptions, schema: Option<CaptionSchema>) -> Result<ExportReport> {
    let mut enc_files = vec![FileReq::config(), FileReq::weights()];
    enc_files.push(FileReq::preprocessor_config());
    let encoder_dir = resolve_model(&opts.encoder, &enc_files)?;
    let mut dec_files = vec![FileReq::config()];
    dec_files.extend(FileReq::tokenizer_all());
    let decoder_dir = resolve_model(&opts.decoder, &dec_files)?;
    check_apart(&opts.out, &encoder_dir, "encoder")?;
    check_apart(&opts.out, &decoder_dir, "decoder")?;
    let model = CaptionModel::from_recipe_checkpoint(
        &opts.checkpoint,
        &encoder_dir,
        &decoder_dir,
        &Device::Cpu,
    )?;
    let mut sources = BundleSources::from_dirs(&encoder_dir, &decoder_dir)?;
    sources.encoder = opts.encoder.clone();
    sources.decoder = opts.decoder.clone();
    sources.schema = schema;
    sources.stop_strings = vec![RECIPE_STOP_STRING.to_string()];
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
    match moda_models::files::overlap(out, input) {
        None => Ok(()),
        Some(relation) => Err(Error::OutOverlapsInput {
            out: out.to_path_buf(),
            relation,
            what,
            input: input.to_path_buf(),
        }),
    }
}

/// The temporary directory a bundle is written to, `.<name>.partial-<pid>` beside `out`; it is
/// removed when dropped unless [`Staging::commit`] renamed it into place.
struct Staging {
    /// The temporary directory.
    tmp: PathBuf,
    /// The bundle directory it becomes.
    out: PathBuf,
    /// Renamed into place: nothing to remove.
    committed: bool,
}

impl Staging {
    /// Creates the temporary directory (and `out`'s parent), after removing what exports to
    /// the same `out` killed midway left behind.
    fn create(out: &Path) -> Result<Self> {
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
        Ok(Self {
            tmp,
            out: out.to_path_buf(),
            committed: false,
        })
    }

    /// Puts the complete bundle in the place of `out` ([`moda_models::files::replace_dir`]:
    /// an existing `out`, allowed by `--force`, is moved aside and removed once the new one
    /// is in place).
    fn commit(mut self) -> Result<()> {
        moda_models::files::replace_dir(&self.tmp, &self.out).map_err(io(&self.out))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn tensor_info(sig: &graphs::Signature) -> Vec<TensorInfo> {
    sig.iter()
        .map(|t| TensorInfo {
            name: t.name.clone(),
            dtype: t.elem.name().to_string(),
            shape: t
                .dims
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
    moda_models::files::hex(&Sha256::digest(bytes))
}

/// Removes what exports to `parent/name` killed midway left behind: `.<name>.partial-<pid>`
/// (a bundle being written) of processes that are gone, and, when `out` exists, the
/// `.<name>.old-<pid>` that earlier exporters moved an existing bundle aside to. Without `out`,
/// such a copy, or the `.<name>.old` of [`moda_models::files::replace_dir`], is kept as the
/// only copy of that bundle and reported. Each is reported on stderr.
fn remove_stale_partials(parent: &Path, name: &str, out: &Path) {
    for stale in moda_models::files::remove_stale(parent, &format!(".{name}.partial-")) {
        eprintln!("exporter: {stale}");
    }
    let old = format!(".{name}.old-");
    if out.symlink_metadata().is_ok() {
        for stale in moda_models::files::remove_stale(parent, &old) {
            eprintln!("exporter: {stale}");
        }
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let moved_aside = format!(".{name}.old");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if file_name.starts_with(&old) || file_name == moved_aside {
            eprintln!(
                "exporter: {} holds a bundle that an interrupted export moved aside; rename it \
                 to {} to restore it",
                entry.path().display(),
                out.display()
            );
        }
    }
}

/// What the graphs and the tokenizer written so far are, as the manifest lists them.
#[derive(Debug, Default)]
struct WrittenFiles {
    /// Each graph's file and signature, by role.
    graphs: BTreeMap<Role, GraphInfo>,
    /// Each file's size and checksum, by name.
    files: BTreeMap<String, FileInfo>,
}

impl WrittenFiles {
    /// Writes `bytes` to `dir/name` and records the file.
    fn write(&mut self, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(io(&path))?;
        self.record(name, bytes);
        Ok(())
    }

    /// Records the size and checksum of the file `name` holding `bytes`.
    fn record(&mut self, name: &str, bytes: &[u8]) {
        let info = FileInfo {
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        };
        self.files.insert(name.to_string(), info);
    }
}

/// Builds the graph of `role` from `model`.
fn build_graph(
    model: &CaptionModel,
    role: Role,
    quant: Option<graphs::WeightQuant>,
) -> Result<graphs::Graph> {
    match role {
        // Every quantized bundle's encoder takes int8 dynamic products (see `graphs::Quant`).
        Role::Encoder => graphs::encoder(model, quant.map(|_| graphs::Quant::DynamicInt8)),
        Role::Projector => graphs::projector(model),
        Role::EmbedTokens => graphs::embed_tokens(model),
        Role::Decoder => graphs::decoder(model, quant),
    }
}

/// Writes every role's graph to its default file in `dir`, one at a time (each graph holds a
/// copy of its weights until written).
fn write_graphs(
    model: &CaptionModel,
    quant: Option<graphs::WeightQuant>,
    dir: &Path,
) -> Result<WrittenFiles> {
    let mut written = WrittenFiles::default();
    for role in Role::ALL {
        let mut g = build_graph(model, role, quant)?;
        let file = role.default_file();
        // The large weights go to an external data file beside the graph, which ONNX Runtime
        // maps into memory instead of copying (see `graph::move_to_external_data`).
        let data_file = external_data_file(file);
        let data = graph::move_to_external_data(&mut g.model, &data_file);
        let bytes = g.model.encode_to_vec();
        drop(g.model);
        let data_file = if data.is_empty() {
            None
        } else {
            written.write(dir, &data_file, &data)?;
            Some(data_file)
        };
        drop(data);
        written.write(dir, file, &bytes)?;
        let info = GraphInfo {
            file: file.to_string(),
            data: data_file,
            inputs: tensor_info(&g.inputs),
            outputs: tensor_info(&g.outputs),
            optional_inputs: tensor_info(&g.optional_inputs),
        };
        written.graphs.insert(role, info);
    }
    Ok(written)
}

/// Saves the tokenizer to `dir` and records it.
fn write_tokenizer(
    tokenizer: &ModaTokenizer,
    dir: &Path,
    written: &mut WrittenFiles,
) -> Result<()> {
    let path = dir.join(TOKENIZER_FILE);
    tokenizer.save(&path)?;
    let bytes = moda_models::files::read_bounded(&path, moda_models::files::TEXT_FILE_MAX_BYTES)
        .map_err(io(&path))?;
    written.record(TOKENIZER_FILE, &bytes);
    Ok(())
}

/// The dimensions of `model` a runtime needs.
fn model_dims(model: &CaptionModel) -> ModelDims {
    let ecfg = model.encoder_config();
    let dcfg = model.decoder().config();
    ModelDims {
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
    }
}

/// Refuses a `--max-new-tokens` of 0 or more than the decoder's positions allow.
fn check_max_new_tokens(dims: &ModelDims, max_new_tokens: usize) -> Result<()> {
    let room = dims.max_new_tokens_allowed();
    if max_new_tokens == 0 || max_new_tokens > room {
        return Err(Error::Usage(format!(
            "--max-new-tokens {max_new_tokens}: the decoder's {} positions allow 1 to {room}",
            dims.max_positions
        )));
    }
    Ok(())
}

/// Refuses a `--block-size` that `MatMulNBits` does not take, or one given without
/// `--quantize`.
fn check_block_size(options: &BundleOptions) -> Result<()> {
    let Some(bs) = options.block_size else {
        return Ok(());
    };
    if options.quantize == Quantize::None {
        return Err(Error::Usage(format!(
            "--block-size {bs}: blocks are of quantized weights; give --quantize int8 or int4"
        )));
    }
    if !graphs::WeightQuant::valid_block_size(bs) {
        return Err(Error::Usage(format!(
            "--block-size {bs}: must be a power of two from 16 to 256"
        )));
    }
    Ok(())
}

/// The manifest of the bundle whose files are `written`, checked as the SDK checks it (a
/// manifest the SDK would refuse is a bug here, not a bundle).
fn build_manifest(
    model: &CaptionModel,
    sources: &BundleSources,
    options: &BundleOptions,
    written: WrittenFiles,
) -> Result<Manifest> {
    let ecfg = model.encoder_config();
    let dcfg = model.decoder().config();
    let manifest = Manifest {
        format: FORMAT.to_string(),
        format_version: FORMAT_VERSION,
        exporter: Producer {
            name: "moda-exporter".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
        model: model_dims(model),
        graphs: written.graphs,
        tokenizer: TOKENIZER_FILE.to_string(),
        preprocessing: sources.preprocessing.clone(),
        special_tokens: SpecialTokenIds {
            bos: sources.tokenizer.bos_id(),
            eos: sources.tokenizer.eos_id(),
            pad: sources.tokenizer.pad_id(),
        },
        generation: GenerationDefaults {
            max_new_tokens: options.max_new_tokens,
            num_beams: 1,
            do_sample: false,
            stop_strings: sources.stop_strings.clone(),
        },
        quantization: options.quantize,
        schema: sources.schema.clone(),
        files: written.files,
        source_configs: serde_json::json!({
            "encoder": { "source": sources.encoder, "config": ecfg },
            "projector": model.projector().config(),
            "decoder": { "source": sources.decoder, "config": dcfg },
        }),
    };
    manifest
        .validate()
        .map_err(|e| Error::Internal(format!("the manifest written would be refused: {e}")))?;
    Ok(manifest)
}

/// Writes the graphs, the tokenizer and the manifest to `dir`; returns the manifest.
fn write_contents(
    model: &CaptionModel,
    sources: &BundleSources,
    options: &BundleOptions,
    dir: &Path,
) -> Result<Manifest> {
    let quant = graphs::WeightQuant::of(options.quantize, options.block_size);
    let mut written = write_graphs(model, quant, dir)?;
    write_tokenizer(&sources.tokenizer, dir, &mut written)?;
    let manifest = build_manifest(model, sources, options, written)?;
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::Internal(format!("manifest: {e}")))?;
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(manifest)
}

/// Each file of the bundle in `out` and its size, the manifest last.
fn file_sizes(manifest: &Manifest, out: &Path) -> Vec<(String, u64)> {
    let mut list: Vec<(String, u64)> = manifest
        .files
        .iter()
        .map(|(k, v)| (k.clone(), v.bytes))
        .collect();
    let manifest_bytes = std::fs::metadata(out.join(MANIFEST_FILE)).map_or(0, |m| m.len());
    list.push((MANIFEST_FILE.to_string(), manifest_bytes));
    list
}

/// Writes the bundle of `model` to `out` (see the crate documentation): a temporary directory
/// beside `out`, verified unless `verify` is false, then renamed into place.
pub fn write_bundle(
    model: &CaptionModel,
    sources: &BundleSources,
    out: &Path,
    options: &BundleOptions,
) -> Result<ExportReport> {
    check_out(out, options.force)?;
    check_max_new_tokens(&model_dims(model), options.max_new_tokens)?;
    check_block_size(options)?;
    let staging = Staging::create(out)?;

    let start = Instant::now();
    let manifest = write_contents(model, sources, options, &staging.tmp)?;
    let write_seconds = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let verification = if options.verify {
        Some(verify::verify_bundle(
            model,
            &staging.tmp,
            options.quantize,
        )?)
    } else {
        None
    };
    let verify_seconds = start.elapsed().as_secs_f64();

    staging.commit()?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        files: file_sizes(&manifest, out),
        verification,
        write_seconds,
        verify_seconds,
    })
}
