//! Catalog jobs: which images to run (files, directories, a CSV column), how `n` processes
//! split them (`--shard i/n`), and the resumable JSON Lines output that makes a long job safe
//! to stop and run again.
//!
//! ## Records
//! A job writes one JSON object per image, one per line ([`Record`]): `{"image",
//! "description", "token_ids", "logprobs", "timings_ms"}` for `describe`, `{"image",
//! "embedding"}` for `embed`, `{"image", "error"}` for an image that failed. `"image"` is the
//! image as the job named it: the path given (or found under a directory given), or a CSV
//! cell as written (trimmed); it is the key by which a job that is run again skips the images
//! already recorded.
//!
//! ## Resuming
//! [`ResumableOutput::open`] reads an existing output file first. Every complete line (one
//! that ends in a newline) must be a record; a last line without its newline is what a crash
//! or a kill in the middle of a write leaves, and is cut off, so the file again ends with a
//! complete record before anything is appended. Each record is written with a single
//! `write` of the whole line, so a stopped job loses at most the line it was writing.
//!
//! The same output file must not be written by two processes at once; give each shard its own.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::generate::GenerationOptions;
use crate::model::{Description, ImageInput, Moda, Timings};

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
    Model(#[from] crate::Error),
    /// Handing a record on failed (writing it to the output or to stdout).
    #[error("writing a record: {0}")]
    Emit(std::io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CatalogError + '_ {
    move |error| CatalogError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// One image of a job: the key it is recorded under and the file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogItem {
    /// The `"image"` value of its record (see the module documentation).
    pub key: String,
    /// The file.
    pub path: PathBuf,
}

impl CatalogItem {
    fn from_path(path: PathBuf) -> Self {
        Self {
            key: path.display().to_string(),
            path,
        }
    }
}

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
        if input.is_dir() {
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
pub fn list_csv(csv: &Path, column: &str, root: Option<&Path>) -> Result<Listing, CatalogError> {
    let csv_err = |msg: String| CatalogError::Csv {
        path: csv.to_path_buf(),
        msg,
    };
    let file = File::open(csv).map_err(io_err(csv))?;
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
    let headers = reader
        .headers()
        .map_err(|e| csv_err(format!("cannot read the header row: {e}")))?
        .clone();
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
        None => csv.parent().map(Path::to_path_buf).unwrap_or_default(),
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
        items.push(CatalogItem {
            key: cell.to_string(),
            path: base.join(cell),
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
        .filter(|it| seen.insert(it.key.clone()))
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
        /// The text.
        description: String,
        /// Generated token ids (the final `</s>` included when one was generated).
        token_ids: Vec<u32>,
        /// Log-probability of each generated token.
        logprobs: Vec<f32>,
        /// Where the time went.
        timings_ms: TimingsMs,
    },
    /// An embedding.
    Embedding {
        /// The image's key.
        image: String,
        /// `projection_dim` numbers.
        embedding: Vec<f32>,
    },
    /// A failure of this image.
    Error {
        /// The image's key.
        image: String,
        /// Why it failed.
        error: String,
    },
}

impl Record {
    /// A description's record.
    pub fn description(image: &str, d: &Description) -> Self {
        Record::Description {
            image: image.to_string(),
            description: d.text.clone(),
            token_ids: d.token_ids.clone(),
            logprobs: d.logprobs.clone(),
            timings_ms: TimingsMs::from(&d.timings),
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

    /// Whether this records a failure.
    pub fn is_error(&self) -> bool {
        matches!(self, Record::Error { .. })
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

/// What a job does to each image.
#[derive(Debug, Clone)]
pub enum Task {
    /// Describe with these options.
    Describe(GenerationOptions),
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
            Task::Describe(_) => "describe",
            Task::Embed { .. } => "embed",
        }
    }

    /// The record field that a successful record of this task has.
    fn field(&self) -> &'static str {
        match self {
            Task::Describe(_) => "description",
            Task::Embed { .. } => "embedding",
        }
    }
}

/// What an existing output file already records.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// Each recorded image, and whether its record is an error.
    pub images: HashMap<String, bool>,
    /// Bytes of an incomplete last line that were cut off.
    pub truncated_bytes: u64,
}

/// A JSON Lines output file that a job appends to and can resume (see the module
/// documentation).
#[derive(Debug)]
pub struct ResumableOutput {
    file: File,
    path: PathBuf,
}

impl ResumableOutput {
    /// Opens (or creates) `path` for `task`'s records: reads the records already there, cuts
    /// off an incomplete last line, and positions at the end. A complete line that is not a
    /// record, or a record of the other task, is an error (the file is left as it is).
    pub fn open(path: &Path, task: &Task) -> Result<(Self, Recorded), CatalogError> {
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err(path))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut recorded = Recorded {
            truncated_bytes: (bytes.len() - complete) as u64,
            ..Default::default()
        };
        let bad = |line: usize, msg: String| CatalogError::Output {
            path: path.to_path_buf(),
            msg: format!(
                "line {line}: {msg}; this is not a `moda-sdk {}` output (choose another \
                 --output, or move this file away)",
                task.name()
            ),
        };
        for (i, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| bad(i + 1, format!("not a JSON record ({e})")))?;
            let image = v
                .get("image")
                .and_then(|x| x.as_str())
                .ok_or_else(|| bad(i + 1, "no \"image\" string".to_string()))?;
            let is_error = v.get("error").is_some();
            if !is_error && v.get(task.field()).is_none() {
                return Err(bad(i + 1, format!("a record without {:?}", task.field())));
            }
            recorded.images.insert(image.to_string(), is_error);
        }
        if recorded.truncated_bytes > 0 {
            file.set_len(complete as u64).map_err(io_err(path))?;
        }
        file.seek(SeekFrom::Start(complete as u64))
            .map_err(io_err(path))?;
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
            },
            recorded,
        ))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` as one line, in a single write, and flushes it.
    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let mut line = record.to_json();
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobSummary {
    /// Images run (records handed on), failures included.
    pub done: usize,
    /// Of those, the failures.
    pub failed: usize,
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
    for chunk in items.chunks(batch_size.max(1)) {
        if stop.load(Ordering::SeqCst) {
            summary.interrupted = true;
            break;
        }
        let inputs: Vec<ImageInput<'_>> = chunk
            .iter()
            .map(|it| ImageInput::Path(it.path.as_path()))
            .collect();
        let records: Vec<Record> = match task {
            Task::Describe(opts) => moda
                .describe_batch(&inputs, opts)?
                .into_iter()
                .zip(chunk)
                .map(|(r, it)| match r {
                    Ok(d) => Record::description(&it.key, &d),
                    Err(e) => error_record(it, &e),
                })
                .collect(),
            Task::Embed { normalize } => moda
                .embed_batch(&inputs, *normalize)?
                .into_iter()
                .zip(chunk)
                .map(|(r, it)| match r {
                    Ok(embedding) => Record::Embedding {
                        image: it.key.clone(),
                        embedding,
                    },
                    Err(e) => error_record(it, &e),
                })
                .collect(),
        };
        for r in &records {
            emit(r).map_err(CatalogError::Emit)?;
            summary.done += 1;
            summary.failed += usize::from(r.is_error());
        }
    }
    Ok(summary)
}

/// An image's failure; the record names the image, so an image error's message goes without
/// the name again.
fn error_record(item: &CatalogItem, e: &crate::Error) -> Record {
    let error = match e {
        crate::Error::Image { msg, .. } => msg.clone(),
        other => other.to_string(),
    };
    Record::Error {
        image: item.key.clone(),
        error,
    }
}
