//! The SDK's error type: every failure names what it was working on.

use std::path::PathBuf;

use crate::runtime::RuntimeError;

/// Why a call failed. New kinds may be added (it is `non_exhaustive`): match the ones you
/// handle and keep a catch-all arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bundle directory, its manifest or one of its files is missing or wrong.
    #[error("bundle {}: {msg}", .path.display())]
    Bundle {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// ONNX Runtime could not be loaded, or refused a graph or a run.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// ONNX Runtime failed while running a graph.
    #[error("ONNX Runtime failed running the {graph} graph: {msg}")]
    Run {
        /// `encoder`, `projector`, `embed_tokens` or `decoder`.
        graph: String,
        /// ONNX Runtime's message.
        msg: String,
    },
    /// An image could not be read, decoded or preprocessed.
    #[error("{source_name}: {msg}")]
    Image {
        /// The path, or the name the caller gave to bytes in memory.
        source_name: String,
        /// What went wrong (not an image, truncated, too large, ...).
        msg: String,
    },
    /// An argument is out of range (generation options, buffer sizes, an empty batch, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The tokenizer failed to decode generated ids.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Something MODA itself got wrong (a broken internal invariant), not the caller's input:
    /// please report it.
    #[error("internal error (a bug in MODA, please report it): {0}")]
    Internal(String),
}

/// The SDK's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// The search's errors (options out of range, logits of the wrong size) are invalid
/// arguments, with the same messages.
impl From<moda_models::generate::GenerateError> for Error {
    fn from(e: moda_models::generate::GenerateError) -> Self {
        match e {
            moda_models::generate::GenerateError::InvalidArgument(m) => Error::InvalidArgument(m),
        }
    }
}

impl Error {
    pub(crate) fn bundle(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Bundle {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn run(graph: &str, e: impl std::fmt::Display) -> Self {
        Error::Run {
            graph: graph.to_string(),
            msg: e.to_string(),
        }
    }
}
