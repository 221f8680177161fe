//! The error type of the `trainer` library: every failure names the file, column or setting at
//! fault. The binary (`main.rs`) prints these with [`report`]; the library never panics on user
//! data.
//!
//! A variant either shows its cause in its message or returns it from `source()`, never both:
//! a chain printer (anyhow's `{:#}`) prints the message and then each source, so a cause in
//! both places was printed twice ("File exists (os error 17): File exists (os error 17)").
//! Errors of other crates that do both are printed once by [`report`].

use std::path::PathBuf;

/// Errors from the trainer's library code.
///
/// New variants may be added; match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error (in the message, so not a `source()`).
        cause: std::io::Error,
    },
    /// An error from the model core (loading weights, decoding or preprocessing an image, ...).
    #[error(transparent)]
    Model(#[from] moda_models::Error),
    /// An error inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A CSV file is malformed (bad quoting, a row with the wrong number of fields, not UTF-8).
    #[error("{}: {msg}", path.display())]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// What is wrong, with the line when known.
        msg: String,
    },
    /// A CSV file lacks columns that are required.
    #[error(
        "{}: missing column(s) {}; expected columns: {}; found: {}",
        path.display(),
        missing.join(", "),
        expected.join(", "),
        found.join(", ")
    )]
    MissingColumns {
        /// The CSV file.
        path: PathBuf,
        /// The required columns that are absent.
        missing: Vec<String>,
        /// Every column this load requires.
        expected: Vec<String>,
        /// The columns in the file's header.
        found: Vec<String>,
    },
    /// A caption template is malformed (an unclosed `{`, an empty `{}`, a stray `}`).
    #[error("caption template {template:?}: {msg}")]
    Template {
        /// The template.
        template: String,
        /// What is wrong.
        msg: String,
    },
    /// A caption template names a column that the catalog does not have.
    #[error(
        "caption template {template:?} uses column {{{column}}}, which {} does not have; \
         available columns: {}",
        path.display(),
        available.join(", ")
    )]
    TemplateColumn {
        /// The template.
        template: String,
        /// The unknown column.
        column: String,
        /// The CSV file.
        path: PathBuf,
        /// The columns the file has.
        available: Vec<String>,
    },
    /// A catalog with no usable sample.
    #[error(
        "{}: empty catalog: {rows} row(s), none usable ({skipped} skipped: {missing} image(s) \
         missing, {unreadable} unreadable, {incomplete} row(s) with empty values)",
        path.display()
    )]
    EmptyCatalog {
        /// The catalog's CSV file.
        path: PathBuf,
        /// Data rows in the file.
        rows: usize,
        /// Rows skipped, all reasons together.
        skipped: usize,
        /// Rows whose image file does not exist.
        missing: usize,
        /// Rows whose image cannot be decoded.
        unreadable: usize,
        /// Rows with an empty value in a column the caption needs.
        incomplete: usize,
    },
    /// An output directory exists and is not empty (pass `--force` to replace it).
    #[error("{}: already exists and is not empty (use --force to replace it)", path.display())]
    OutputExists {
        /// The directory.
        path: PathBuf,
    },
    /// An output path is, contains or lies inside something the command reads.
    #[error(
        "{flag} {} {relation} the {what} {}; choose {flag} apart from it (an output that is, \
         contains or lies inside an input could overwrite it)",
        out.display(),
        input.display()
    )]
    OutputOverlapsInput {
        /// The option that names the output (`--out`, `--predictions`).
        flag: &'static str,
        /// The output path.
        out: PathBuf,
        /// "is", "is inside" or "contains".
        relation: &'static str,
        /// What the input is ("catalog", "encoder", "checkpoint", ...).
        what: String,
        /// The input.
        input: PathBuf,
    },
    /// An existing output directory is not what the command writes, so it is not replaced
    /// (nor written into).
    #[error("{}: {msg}", path.display())]
    OutputNotReplaceable {
        /// The directory.
        path: PathBuf,
        /// What it is and what would be replaced.
        msg: String,
    },
    /// An image could not be drawn or encoded.
    #[error("{}: {msg}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// An invalid argument (a count of zero, a split fraction outside (0, 1), ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A training run cannot be resumed from the given checkpoint.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// A checkpoint's training state (`training_state.json`) cannot be read.
    #[error("{}: {msg}", path.display())]
    TrainingState {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// `trainer eval --split val` of a checkpoint that records no train/validation split.
    #[error(
        "{}: no recorded train/validation split (the checkpoint has no {}: it was not \
         written by `trainer fit`, or not copied with it); evaluate every image of a catalog \
         with --split all, e.g. --data with a catalog of held-out products only",
        checkpoint.display(),
        crate::fit::STATE_FILE
    )]
    NoRecordedSplit {
        /// The checkpoint directory.
        checkpoint: PathBuf,
    },
    /// The split recorded in a checkpoint does not fit the catalog given.
    #[error("{0}")]
    SplitMismatch(String),
    /// The loss became NaN or infinite; the run stopped without writing a checkpoint.
    #[error(
        "the training loss became {value} at epoch {epoch}, step {step}; stopped without \
         saving; {}",
        match last_good {
            Some(p) => format!("the last good checkpoint is {}", p.display()),
            None => "no checkpoint was written before this".to_string(),
        }
    )]
    NonFiniteLoss {
        /// The loss value (NaN or inf).
        value: f32,
        /// The epoch (1-based).
        epoch: usize,
        /// Optimizer steps taken before it.
        step: u64,
        /// The last checkpoint written, kept as it was.
        last_good: Option<PathBuf>,
    },
    /// The output directory cannot be created or written.
    #[error("output directory {}: cannot be created or written", path.display())]
    OutputNotWritable {
        /// The directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A device that this build cannot use (`--device cuda` without the `cuda` feature).
    #[error("device {0}")]
    Device(String),
    /// The embedding cache could not be used.
    #[error("embedding cache {}: {msg}", path.display())]
    Cache {
        /// The cache directory or entry.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
}

/// The result type of the trainer's library code.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}

pub use moda_models::error::report;

impl From<moda_models::schema::TemplateError> for Error {
    fn from(e: moda_models::schema::TemplateError) -> Self {
        Error::Template {
            template: e.template,
            msg: e.msg,
        }
    }
}
