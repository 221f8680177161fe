//! Catalog jobs: which images to run (files, directories, a CSV column), how `n` processes
//! split them (`--shard i/n`), and the resumable JSON Lines output that makes a long job safe
//! to stop and run again.
//!
//! ## Records
//! A job writes one JSON object per image, one per line ([`Record`]): `{"image",
//! "description", "finish", "token_ids", "logprobs", "timings_ms"}` for `describe`, `{"image",
//! "embedding"}` for `embed`, `{"image", "error"}` for an image that failed. `"image"` is the
//! image as the job named it: the path given (or found under a directory given), or a CSV
//! cell as written (trimmed); it is the key by which a job that is run again skips the images
//! already recorded. A file name that is not valid UTF-8 cannot be a JSON string as it is:
//! its `"image"` shows it with U+FFFD in place of the bad bytes, and `"image_hex"` holds its
//! exact bytes in hexadecimal, so that two such names stay two images and a resumed job maps
//! each record back to its file.
//!
//! ## Resuming
//! [`ResumableOutput::open`] locks the output file (a second process that opens it is
//! refused and told which process holds it) and reads it first. Its first line is a job
//! header ([`JobHeader`]: the task, the shard, the options and the model) and a job run again
//! with anything different is refused rather than mixed in. Every complete line (one that
//! ends in a newline) must be a record; a last line without its newline is what a crash or a
//! kill in the middle of a write leaves, and is cut off, so the file again ends with a
//! complete record before anything is appended. Each record is appended with a single
//! `write` of the whole line, so a stopped job loses at most the line it was writing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use moda_sdk::GenerationOptions;
use moda_sdk::{Attribute, Description, Finish, ImageInput, Moda, Norm, Timings};

/// File extensions (compared case-insensitively) that directory listings take as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Why a catalog operation failed (as opposed to one image failing, which is a [`Record`]).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Reading or writing a file or directory failed.
    #[error("{}: {error}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// The CSV could not be read, or has no such column.
    #[error("{}: {msg}", .path.display())]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// An existing output file holds something other than this job's records.
    #[error("{}: {msg}", .path.display())]
    Output {
        /// The output file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A `--shard` value that is not `i/n` with `i < n`.
    #[error("invalid shard {0:?}: expected i/n with 0 <= i < n (e.g. 0/4 for the first of 4)")]
    Shard(String),
    /// The model failed as a whole (not because of one image): ONNX Runtime refused a run,
    /// or the generation options are out of range.
    #[error(transparent)]
    Model(#[from] moda_sdk::Error),
    /// Handing a record on failed (writing it to the output or to stdout).
    #[error("writing a record: {0}")]
    Emit(std::io::Error),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CatalogError + '_ {
    move |error| CatalogError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// One image of a job: the key it is recorded under and the file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogItem {
    /// The `"image"` value of its record (see the module documentation). A file name that is
    /// not UTF-8 shows here with U+FFFD in place of its bad bytes, and its exact bytes are in
    /// [`CatalogItem::key_bytes`].
    pub key: String,
    /// The exact bytes of a key that is not UTF-8 (the record's `"image_hex"`); `None` when
    /// `key` is exact.
    pub key_bytes: Option<Vec<u8>>,
    /// The file; `-` is standard input.
    pub path: PathBuf,
}

impl CatalogItem {
    fn from_path(path: PathBuf) -> Self {
        let key_bytes = path
            .to_str()
            .is_none()
            .then(|| path.as_os_str().as_encoded_bytes().to_vec());
        Self {
            key: path.display().to_string(),
            key_bytes,
            path,
        }
    }

    /// What identifies the image in an output file: the exact bytes of its key. Two file
    /// names that differ only in bytes that are not UTF-8 are two images.
    pub fn identity(&self) -> Vec<u8> {
        self.key_bytes
            .clone()
            .unwrap_or_else(|| self.key.as_bytes().to_vec())
    }

    /// Whether this item is standard input (`-`).
    pub fn is_stdin(&self) -> bool {
        self.path.as_os_str() == STDIN
    }
}

/// The name that stands for standard input among the images and for `--csv`.
pub const STDIN: &str = "-";

/// The images a job runs, and the CSV rows that named none.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// The images, in order, each once.
    pub items: Vec<CatalogItem>,
    /// Rows or paths that were left out, one message each (e.g. an empty CSV cell).
    pub skipped: Vec<String>,
}

/// Whether `path` has one of the [`IMAGE_EXTENSIONS`].
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The images named by `inputs`: a directory stands for the image files under it, at any
/// depth (by extension, sorted by path; symbolic links to files are followed, to directories
/// not), anything else for itself (any extension; a path that does not exist becomes that
/// image's error when it is read). Images named twice are kept once, at their first place.
pub fn list_paths(inputs: &[PathBuf]) -> Result<Listing, CatalogError> {
    let mut items = Vec::new();
    for input in inputs {
        if input.as_os_str() != STDIN && input.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found)?;
            found.sort();
            items.extend(found.into_iter().map(CatalogItem::from_path));
        } else {
            items.push(CatalogItem::from_path(input.clone()));
        }
    }
    Ok(Listing {
        items: dedup(items),
        skipped: Vec::new(),
    })
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), CatalogError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(io_err(&path))?;
        if ft.is_dir() {
            walk(&path, out)?;
        } else if (ft.is_file() || (ft.is_symlink() && path.is_file()))
            && has_image_extension(&path)
        {
            out.push(path);
        }
    }
    Ok(())
}

/// The images of a CSV catalog: the cells of `column` (trimmed), in row order, as paths
/// relative to `root` (by default the CSV's directory; absolute cells stay as they are).
/// The record key is the cell as written. Rows with an empty cell are listed in
/// [`Listing::skipped`].
///
/// A CSV of the Kaggle fashion-images layout (`moda_models::kaggle`: its header has every
/// column of that catalog's `fashion.csv`) read by its `Image` column finds each image where
/// that layout puts it, `<Category>/<Gender>/Images/images_with_product_ids/<Image>` below
/// `root`, and keys the record by that relative path (image names alone repeat across
/// folders).
pub fn list_csv(csv: &Path, column: &str, root: Option<&Path>) -> Result<Listing, CatalogError> {
    let csv_err = |msg: String| CatalogError::Csv {
        path: csv.to_path_buf(),
        msg,
    };
    let input: Box<dyn Read> = if csv.as_os_str() == STDIN {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(moda_models::files::open_regular(csv).map_err(io_err(csv))?)
    };
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(input);
    let headers = reader
        .headers()
        .map_err(|e| csv_err(format!("cannot read the header row: {e}")))?
        .clone();
    if headers.is_empty() {
        return Err(csv_err(
            "empty: no header row naming the columns".to_string(),
        ));
    }
    let index = headers
        .iter()
        .position(|h| h.trim() == column)
        .ok_or_else(|| {
            csv_err(format!(
                "no column {column:?}; the columns are {}",
                headers
                    .iter()
                    .map(|h| format!("{h:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let base = match root {
        Some(r) => r.to_path_buf(),
        None if csv.as_os_str() == STDIN => PathBuf::new(),
        None => csv.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let column_of = |name: &str| headers.iter().position(|h| h.trim() == name);
    let kaggle = match (column_of("Category"), column_of("Gender")) {
        (Some(c), Some(g))
            if column == moda_models::kaggle::IMAGE_COLUMN
                && moda_models::kaggle::is_layout_header(headers.iter()) =>
        {
            Some((c, g))
        }
        _ => None,
    };
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_err(e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let cell = record.get(index).map(str::trim).unwrap_or("");
        if cell.is_empty() {
            skipped.push(format!(
                "{} line {line}: no image in column {column:?}",
                csv.display()
            ));
            continue;
        }
        let kaggle_path = kaggle.map(|(c, g)| {
            let field = |i: usize| record.get(i).map(str::trim).unwrap_or("");
            moda_models::kaggle::image_path(Path::new(""), field(c), field(g), cell)
        });
        let cell = match &kaggle_path {
            Some(rel) => rel.to_string_lossy().into_owned(),
            None => cell.to_string(),
        };
        let cell = cell.as_str();
        items.push(CatalogItem {
            key: cell.to_string(),
            key_bytes: None,
            // Never `-` alone (standard input): a CSV read from standard input names files
            // relative to the current directory.
            path: if base.as_os_str().is_empty() {
                Path::new(".").join(cell)
            } else {
                base.join(cell)
            },
        });
    }
    Ok(Listing {
        items: dedup(items),
        skipped,
    })
}

fn dedup(items: Vec<CatalogItem>) -> Vec<CatalogItem> {
    let mut seen = HashSet::new();
    items
        .into_iter()
        .filter(|it| seen.insert(it.identity()))
        .collect()
}

/// Shard `index` of `count`: the items whose position `p` in the list has `p % count ==
/// index`, so `count` processes given the same list split it without overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, from 0.
    pub index: usize,
    /// How many shards.
    pub count: usize,
}

impl Shard {
    /// The whole list.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// This shard's items, in order.
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(p, _)| p % self.count == self.index)
            .map(|(_, it)| it)
            .collect()
    }
}

impl FromStr for Shard {
    type Err = CatalogError;

    /// Parses `i/n`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CatalogError::Shard(s.to_string());
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// [`Timings`] as a record's `"timings_ms"`: milliseconds, and the number of tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimingsMs {
    /// Decoding and preprocessing the image (the batch's).
    pub preprocess: f64,
    /// The image encoder (the batch's).
    pub encoder: f64,
    /// The projector (the batch's).
    pub projector: f64,
    /// The decoder over the image prefix and the BOS (the batch's).
    pub prefill: f64,
    /// The decoder steps after the prefill that fed this image.
    pub decode: f64,
    /// The whole call (the batch's).
    pub total: f64,
    /// Tokens generated for this image.
    pub tokens: usize,
    /// Decoder runs for this image: the prefill and each step (one step may feed several
    /// tokens the caption schema forces; under beam search, the batch's steps).
    #[serde(default)]
    pub decoder_runs: usize,
    /// Decoder runs of the batch that computed only the logits of the tokens the caption
    /// schema allowed (constrained decoding).
    #[serde(default)]
    pub listed_runs: usize,
}

impl From<&Timings> for TimingsMs {
    fn from(t: &Timings) -> Self {
        Self {
            preprocess: t.preprocess_ms,
            encoder: t.encoder_ms,
            projector: t.projector_ms,
            prefill: t.prefill_ms,
            decode: t.decode_ms,
            total: t.total_ms,
            tokens: t.tokens,
            decoder_runs: t.decoder_runs,
            listed_runs: t.listed_runs,
        }
    }
}

/// One line of a job's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    /// A description.
    Description {
        /// The image's key.
        image: String,
        /// The exact bytes of a key that is not UTF-8, in hexadecimal (see
        /// [`CatalogItem::key_bytes`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_hex: Option<String>,
        /// The text.
        description: String,
        /// The attributes read from the text with the bundle's caption schema: every field,
        /// `{"value", "confidence"}` or `null` where the text yields no known value (see
        /// `moda_sdk::attributes`). Left out for a bundle without a schema.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attributes: Option<BTreeMap<String, Option<Attribute>>>,
        /// Why generation ended: `end_of_text`, `stop_string`, `length` (the token limit cut
        /// the text) or `stopped` (see `moda_sdk::Finish`). Absent from records written
        /// before it was recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finish: Option<Finish>,
        /// Generated token ids (the final `</s>` included when one was generated).
        token_ids: Vec<u32>,
        /// Log-probability of each generated token (`-inf`, which JSON cannot hold, is
        /// written as `null` and read back as NaN).
        #[serde(deserialize_with = "floats_or_null")]
        logprobs: Vec<f32>,
        /// Where the time went.
        timings_ms: TimingsMs,
        /// The image's embedding, the one the encoder computed for this description (`describe
        /// --embed`); absent otherwise.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            deserialize_with = "some_floats_or_null"
        )]
        embedding: Option<Vec<f32>>,
    },
    /// An embedding.
    Embedding {
        /// The image's key.
        image: String,
        /// As in [`Record::Description`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_hex: Option<String>,
        /// `projection_dim` numbers.
        #[serde(deserialize_with = "floats_or_null")]
        embedding: Vec<f32>,
    },
    /// A failure of this image.
    Error {
        /// The image's key.
        image: String,
        /// As in [`Record::Description`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_hex: Option<String>,
        /// Why it failed.
        error: String,
    },
}

impl Record {
    /// A description's record, with its image's embedding scaled as `embedding` asks (none:
    /// no embedding).
    pub fn description(item: &CatalogItem, d: &Description, embedding: Option<Norm>) -> Self {
        Record::Description {
            image: item.key.clone(),
            image_hex: item_hex(item),
            description: d.text.clone(),
            attributes: d.attributes.clone(),
            finish: Some(d.finish),
            token_ids: d.token_ids.clone(),
            logprobs: d.logprobs.clone(),
            timings_ms: TimingsMs::from(&d.timings),
            embedding: embedding.map(|norm| {
                let mut v = d.embedding.clone();
                norm.apply(&mut v);
                v
            }),
        }
    }

    /// An embedding's record.
    pub fn embedding(item: &CatalogItem, embedding: Vec<f32>) -> Self {
        Record::Embedding {
            image: item.key.clone(),
            image_hex: item_hex(item),
            embedding,
        }
    }

    /// An image's failure; the record names the image, so an image error's message goes
    /// without the name again, unless the file read was not the name itself (a CSV cell
    /// resolved against a folder): then the message names the path tried.
    pub fn error(item: &CatalogItem, e: &moda_sdk::Error) -> Self {
        let error = match e {
            moda_sdk::Error::Image { msg, source_name } if *source_name != item.key => {
                format!("{source_name}: {msg}")
            }
            moda_sdk::Error::Image { msg, .. } => msg.clone(),
            other => other.to_string(),
        };
        Record::Error {
            image: item.key.clone(),
            image_hex: item_hex(item),
            error,
        }
    }

    /// The image's key.
    pub fn image(&self) -> &str {
        match self {
            Record::Description { image, .. }
            | Record::Embedding { image, .. }
            | Record::Error { image, .. } => image,
        }
    }

    /// What identifies the image (see [`CatalogItem::identity`]).
    pub fn identity(&self) -> Vec<u8> {
        let hex = match self {
            Record::Description { image_hex, .. }
            | Record::Embedding { image_hex, .. }
            | Record::Error { image_hex, .. } => image_hex.as_deref(),
        };
        hex.and_then(from_hex)
            .unwrap_or_else(|| self.image().as_bytes().to_vec())
    }

    /// Whether this records a failure.
    pub fn is_error(&self) -> bool {
        matches!(self, Record::Error { .. })
    }

    /// Whether this records a description that the token limit cut short.
    pub fn is_cut(&self) -> bool {
        matches!(
            self,
            Record::Description {
                finish: Some(Finish::Length),
                ..
            }
        )
    }

    /// The record as one line of JSON (no newline).
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail (no maps with non-string keys); NaN
        // log-probabilities, which JSON cannot hold, become null.
        serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::json!({"image": self.image(), "error": format!("cannot serialise: {e}")})
                .to_string()
        })
    }
}

/// serde_json writes a non-finite float as `null`; a record read back takes it as NaN, so
/// that every record a job wrote can be read again.
fn floats_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    let v: Vec<Option<f32>> = Deserialize::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect())
}

/// [`floats_or_null`] for a field that may be absent.
fn some_floats_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<f32>>, D::Error> {
    floats_or_null(d).map(Some)
}

fn item_hex(item: &CatalogItem) -> Option<String> {
    item.key_bytes
        .as_ref()
        .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// What a job does to each image.
#[derive(Debug, Clone)]
pub enum Task {
    /// Describe with these options.
    Describe {
        /// The generation options.
        options: GenerationOptions,
        /// Also record each image's embedding, scaled so (`describe --embed`).
        embedding: Option<Norm>,
    },
    /// Embed, L2-normalised if `normalize`.
    Embed {
        /// L2-normalise the embeddings.
        normalize: bool,
    },
}

impl Task {
    /// `describe` or `embed`.
    pub fn name(&self) -> &'static str {
        match self {
            Task::Describe { .. } => "describe",
            Task::Embed { .. } => "embed",
        }
    }
}

/// What an existing output file already records.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// Each recorded image (by [`CatalogItem::identity`]), and whether its record is an
    /// error.
    pub images: HashMap<Vec<u8>, bool>,
    /// Bytes of an incomplete last line that were cut off.
    pub truncated_bytes: u64,
}

/// The first line of a job's output file: what the job was, so that running it again with
/// other options, another shard or another model is refused instead of mixed in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobHeader {
    /// `describe` or `embed`.
    pub task: String,
    /// The shard, `i/n`.
    pub shard: String,
    /// The task's options: the generation options (with the bundle's defaults resolved)
    /// or `{"normalize": ..}`.
    pub options: serde_json::Value,
    /// The model: the SHA-256 of the bundle's files as its manifest lists them.
    pub model: String,
}

impl JobHeader {
    /// The header of `task` on `shard` with the bundle `moda`.
    pub fn new(moda: &Moda, task: &Task, shard: Shard) -> Self {
        let options = match task {
            Task::Describe { options, embedding } => {
                let mut o = options.clone();
                o.max_new_tokens = Some(
                    o.max_new_tokens
                        .unwrap_or(moda.manifest().generation.max_new_tokens),
                );
                let mut v = serde_json::to_value(o).unwrap_or_default();
                // Only with --embed, so that the headers of jobs without it stay as they were.
                if let (Some(norm), Some(map)) = (embedding, v.as_object_mut()) {
                    map.insert("embedding".into(), serde_json::json!(norm));
                }
                v
            }
            Task::Embed { normalize } => serde_json::json!({ "normalize": normalize }),
        };
        let files: Vec<String> = moda
            .manifest()
            .files
            .iter()
            .map(|(name, f)| format!("{name} {} {}", f.bytes, f.sha256))
            .collect();
        let model = {
            use sha2::{Digest, Sha256};
            Sha256::digest(files.join("\n").as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        Self {
            task: task.name().to_string(),
            shard: shard.to_string(),
            options,
            model,
        }
    }

    fn to_line(&self) -> String {
        let mut line = serde_json::json!({ HEADER_KEY: self }).to_string();
        line.push('\n');
        line
    }

    /// What differs between an output's header and this job's, in words.
    fn differences(&self, old: &JobHeader) -> Vec<String> {
        let mut d = Vec::new();
        if self.task != old.task {
            d.push(format!("it is a `{}` output", old.task));
        }
        if self.shard != old.shard {
            d.push(format!(
                "it holds shard {}, this job is shard {}",
                old.shard, self.shard
            ));
        }
        if self.model != old.model {
            d.push("it was written with another model bundle".to_string());
        }
        if self.options != old.options {
            let (a, b) = (&old.options, &self.options);
            let keys: Vec<String> = match (a.as_object(), b.as_object()) {
                (Some(a), Some(b)) => a
                    .keys()
                    .chain(b.keys())
                    .filter(|k| a.get(*k) != b.get(*k))
                    .map(|k| format!("{k} {} here, {} there", show(b.get(k)), show(a.get(k))))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                _ => vec![format!("{b} here, {a} there")],
            };
            d.push(format!("other options ({})", keys.join("; ")));
        }
        d
    }
}

/// The options of a job header written by an earlier `moda-sdk`, with the options added since
/// then at the value that version used: `constrain` (added with constrained decoding) is
/// `"auto"`, the default, so that the same command that wrote an output resumes it, and the
/// shards of one job written before and after the upgrade merge. Options of a newer version
/// (keys this one does not know) are left as they are, and so are headers of other tasks.
pub fn upgrade_options(task: &str, options: &mut serde_json::Value) {
    if task != "describe" {
        return;
    }
    if let Some(o) = options.as_object_mut() {
        o.entry("constrain")
            .or_insert_with(|| serde_json::json!(moda_sdk::Constrain::Auto.name()));
    }
}

fn show(v: Option<&serde_json::Value>) -> String {
    v.map_or("unset".to_string(), |v| v.to_string())
}

/// The key of the header line's object.
pub const HEADER_KEY: &str = "moda_job";

/// The longest line an output file may hold (a record is a few kB; an embedding of a few
/// thousand numbers tens of kB).
const MAX_LINE_BYTES: u64 = 64 << 20;

/// A JSON Lines output file that a job appends to and can resume (see the module
/// documentation).
#[derive(Debug)]
pub struct ResumableOutput {
    file: File,
    path: PathBuf,
}

impl ResumableOutput {
    /// Opens (or creates) `path` for the job `header`: takes an exclusive lock on it (a second
    /// process writing the same file is refused, naming the process that holds it), reads
    /// the records already there, cuts off an incomplete last line and appends from then
    /// on. A new file starts with the header line; an existing one must have been written by
    /// the same job (task, shard, options and model), or by a version that wrote no header.
    /// A complete line that is not a record, or a record of the other task, is an error (the
    /// file is left as it is). Only a regular file is accepted.
    pub fn open(path: &Path, header: &JobHeader) -> Result<(Self, Recorded), CatalogError> {
        let out_err = |msg: String| CatalogError::Output {
            path: path.to_path_buf(),
            msg,
        };
        let file = open_output(path)?;

        let bad = |line: usize, msg: String| {
            out_err(format!(
                "line {line}: {msg}; this is not a `moda-sdk {}` output (choose another \
                 --output, or move this file away)",
                header.task
            ))
        };
        let field = match header.task.as_str() {
            "embed" => "embedding",
            _ => "description",
        };
        let mut recorded = Recorded::default();
        let mut reader = std::io::BufReader::new(&file);
        let mut line = Vec::new();
        let mut complete: u64 = 0;
        let mut number = 0usize;
        let mut saw_header = false;
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE_BYTES + 1)
                .read_until(b'\n', &mut line)
                .map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                if n as u64 > MAX_LINE_BYTES {
                    return Err(bad(
                        number + 1,
                        format!("a line longer than {MAX_LINE_BYTES} bytes"),
                    ));
                }
                // An incomplete last line: what a crash in the middle of a write leaves.
                recorded.truncated_bytes = n as u64;
                break;
            }
            number += 1;
            complete += n as u64;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&line)
                .map_err(|e| bad(number, format!("not a JSON record ({e})")))?;
            if let Some(h) = v.get(HEADER_KEY) {
                if saw_header || !recorded.images.is_empty() {
                    return Err(bad(
                        number,
                        "a job header that is not the first line".to_string(),
                    ));
                }
                let mut old: JobHeader = serde_json::from_value(h.clone())
                    .map_err(|e| bad(number, format!("a malformed job header ({e})")))?;
                upgrade_options(&old.task, &mut old.options);
                // Both sides as this version reads them (a caller's header may predate an
                // option too).
                let mut want = header.clone();
                upgrade_options(&want.task, &mut want.options);
                let diff = want.differences(&old);
                if !diff.is_empty() {
                    return Err(out_err(format!(
                        "was written by another job: {}. Resume it with the same options, \
                         or choose another --output",
                        diff.join("; ")
                    )));
                }
                saw_header = true;
                continue;
            }
            let record: Record = serde_json::from_value(v.clone())
                .map_err(|e| bad(number, format!("not a record of this task ({e})")))?;
            if !record.is_error() && v.get(field).is_none() {
                return Err(bad(number, format!("a record without {field:?}")));
            }
            recorded.images.insert(record.identity(), record.is_error());
        }
        drop(reader);
        if recorded.truncated_bytes > 0 {
            file.set_len(complete).map_err(io_err(path))?;
        }
        let mut out = Self {
            file,
            path: path.to_path_buf(),
        };
        if !saw_header {
            if !recorded.images.is_empty() {
                return Err(out_err(
                    "holds records but no job header (its first line, {\"moda_job\": ...}): \
                     it was not written by `moda-sdk --output` (perhaps by `--json > FILE`), so \
                     which task, shard and options made it is unknown; choose another --output"
                        .to_string(),
                ));
            }
            // Empty, or blank lines only: start it afresh with the header.
            out.file.set_len(0).map_err(io_err(path))?;
            out.write_line(header.to_line().as_bytes())
                .map_err(io_err(path))?;
        }
        Ok((out, recorded))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` as one line, in a single write, and flushes it.
    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let mut line = record.to_json();
        line.push('\n');
        self.write_line(line.as_bytes())
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.file.write_all(line)?;
        self.file.flush()
    }
}

/// Opens (or creates) an `--output` file to read and append to: a regular file only (a FIFO
/// is refused without blocking), locked exclusively for as long as it is open (see
/// [`ResumableOutput::open`]).
pub(crate) fn open_output(path: &Path) -> Result<File, CatalogError> {
    let mut options = File::options();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // A FIFO would block the open until a reader came; refuse it instead (below).
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(CatalogError::Output {
            path: path.to_path_buf(),
            msg: "not a regular file; --output takes a file that records are appended to (leave \
                  it out to write the records to standard output)"
                .to_string(),
        });
    }
    lock_exclusive(&file, path)?;
    Ok(file)
}

/// Takes an exclusive lock on the whole of `file` for as long as it is open, or says which
/// process holds it.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), CatalogError> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => {
            let who = lock_holder(file)
                .map(|(pid, cmd)| format!(" (process {pid}: {cmd})"))
                .unwrap_or_default();
            Err(CatalogError::Output {
                path: path.to_path_buf(),
                msg: format!(
                    "another process is writing it{who}; two jobs must not share an output \
                     (give each --shard its own --output)"
                ),
            })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(CatalogError::Io {
            path: path.to_path_buf(),
            error: e,
        }),
    }
}

/// The process that holds a lock on `file` and its command line, from Linux's `/proc/locks`
/// (elsewhere, or if it cannot be read, `None`).
fn lock_holder(file: &File) -> Option<(u32, String)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let ino = file.metadata().ok()?.ino();
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        // "1: FLOCK  ADVISORY  WRITE 12345 00:2e:1234 0 EOF"
        let pid = locks.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (pid, dev_ino) = (f.get(4)?, f.get(5)?);
            let this = dev_ino.rsplit(':').next()?.parse::<u64>().ok()? == ino;
            this.then(|| pid.parse::<u32>().ok()).flatten()
        })?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .split('\0')
                    .filter(|a| !a.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        Some((pid, cmd))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        None
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobSummary {
    /// Images run (records handed on), failures included.
    pub done: usize,
    /// Of those, the failures.
    pub failed: usize,
    /// Of those, the descriptions the token limit cut short (`"finish": "length"`).
    pub cut: usize,
    /// The job stopped early because `stop` was set.
    pub interrupted: bool,
}

/// Runs `task` over `items`, `batch_size` images at a time, handing each image's record to
/// `emit` in order. One image that fails gets an error record and the job goes on; a failure
/// of the model as a whole, or of `emit`, ends it. `stop` is checked between batches (set it
/// from a Ctrl-C handler to stop cleanly).
pub fn run_job(
    moda: &Moda,
    items: &[CatalogItem],
    task: &Task,
    batch_size: usize,
    stop: &AtomicBool,
    emit: &mut dyn FnMut(&Record) -> std::io::Result<()>,
) -> Result<JobSummary, CatalogError> {
    let mut summary = JobSummary::default();
    // `-` is one image read from standard input, at most as many bytes as an image file may
    // hold.
    let stdin = if items.iter().any(CatalogItem::is_stdin) {
        moda_models::files::read_reader_bounded(
            std::io::stdin().lock(),
            moda.image_limits().max_alloc,
        )
        .map_err(io_err(Path::new(STDIN)))?
    } else {
        Vec::new()
    };
    for chunk in items.chunks(batch_size.max(1)) {
        if stop.load(Ordering::SeqCst) {
            summary.interrupted = true;
            break;
        }
        let inputs: Vec<ImageInput<'_>> = chunk
            .iter()
            .map(|it| {
                if it.is_stdin() {
                    ImageInput::Bytes {
                        bytes: &stdin,
                        name: "standard input",
                    }
                } else {
                    ImageInput::Path(it.path.as_path())
                }
            })
            .collect();
        let records: Vec<Record> = match task {
            Task::Describe { options, embedding } => moda
                .describe_batch(&inputs, options)?
                .into_iter()
                .zip(chunk)
                .map(|(r, it)| match r {
                    Ok(d) => Record::description(it, &d, *embedding),
                    Err(e) => Record::error(it, &e),
                })
                .collect(),
            Task::Embed { normalize } => moda
                .embed_batch(&inputs, moda_sdk::Norm::unit_if(*normalize))?
                .into_iter()
                .zip(chunk)
                .map(|(r, it)| match r {
                    Ok(embedding) => Record::embedding(it, embedding),
                    Err(e) => Record::error(it, &e),
                })
                .collect(),
        };
        for r in &records {
            emit(r).map_err(CatalogError::Emit)?;
            summary.done += 1;
            summary.failed += usize::from(r.is_error());
            summary.cut += usize::from(r.is_cut());
        }
    }
    Ok(summary)
}
