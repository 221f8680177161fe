//! `trainer`: fits MODA's projector and OPT decoder in candle.
//!
//! The data side lives here as library modules that the `trainer` binary calls:
//! [`synth`] writes a synthetic catalog in the Kaggle "fashion-images" layout, [`data`] loads a
//! catalog (that layout, or a CSV of image paths and captions) and splits it, [`embed_cache`]
//! stores the frozen encoder's image embeddings on disk, and [`error`] is the error type.

pub mod alloc;
pub mod augment;
pub mod data;
pub mod embed_cache;
pub mod error;
pub mod synth;

// The training side: fit loop, checkpoints, plots, evaluation.
pub mod eval;
pub mod fit;
pub mod loss;
pub mod optim;
pub mod params;
pub mod plot;
pub mod preset;
pub mod profile;
pub mod threads;

pub use error::{Error, Result};
