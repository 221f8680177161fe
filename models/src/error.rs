//! The error type of the model core: every failure names the file, tensor or setting at fault.

use std::path::PathBuf;

/// Errors from loading, preprocessing and running MODA's models.
///
/// New variants may be added; match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file that must exist is missing.
    #[error("{}: missing ({what})", path.display())]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What it is needed for.
        what: String,
    },
    /// A JSON file (config.json, preprocessor_config.json, ...) is not valid for its purpose.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A configuration value that the model core does not support.
    #[error("{}: unsupported {key} = {value:?} (supported: {supported})", path.display())]
    Unsupported {
        /// The file the value came from.
        path: PathBuf,
        /// The key.
        key: String,
        /// The value found.
        value: String,
        /// The values that are supported.
        supported: String,
    },
    /// A weight file is malformed, truncated or not what it claims to be.
    #[error("{}: invalid weight file: {msg}", path.display())]
    BadWeights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor has a shape other than the configuration implies.
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?}", path.display())]
    TensorShape {
        /// The file the tensor came from.
        path: PathBuf,
        /// The tensor's name in the checkpoint.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A tensor the model needs is missing from the checkpoint.
    #[error("{}: tensor `{name}` not found in the checkpoint", path.display())]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A checkpoint has tensors that the model does not expect.
    #[error("{}: unexpected tensors: {}", path.display(), keys.join(", "))]
    UnexpectedKeys {
        /// The checkpoint.
        path: PathBuf,
        /// The unexpected names (sorted).
        keys: Vec<String>,
    },
    /// An image could not be decoded or is refused (too large, unknown format, ...).
    #[error("{source_name}: {msg}")]
    Image {
        /// The file name, or a description of the in-memory source.
        source_name: String,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer could not be built or failed on its input.
    #[error("tokenizer {}: {msg}", path.display())]
    Tokenizer {
        /// The tokenizer file or directory.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A model could not be found locally nor fetched from the Hugging Face hub.
    #[error("{0}")]
    Hub(String),
    /// Invalid arguments to a model function (shapes of inputs, empty batch, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// An error inside candle.
    #[cfg(feature = "candle")]
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of the model core.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// An error and its chain of sources on one line, `message: cause: cause ...` as anyhow's
/// `{:#}` prints it, except that a source whose message the line already holds is left out:
/// an error that shows its cause and also returns it from `source()` (as [`Error::Io`] and
/// [`Error::Json`] do) would print it twice. The `trainer` and `exporter` binaries print
/// their errors with it.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let msg = cause.to_string();
        if !msg.is_empty() && !line.contains(&msg) {
            line.push_str(": ");
            line.push_str(&msg);
        }
        next = cause.source();
    }
    line
}
