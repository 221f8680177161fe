//! MODA model core: the FashionCLIP vision tower, the projector and the OPT decoder in candle,
//! loaded from real Hugging Face checkpoints and matching `transformers`.
//!
//! The model: a frozen CLIP vision tower whose projected image embedding, through the projector
//! (`Linear 512 -> 3072`, GELU, `Linear 3072 -> 768`), is a one-token prefix of OPT's input
//! embeddings; OPT then writes the description. Each model lives in its own file:
//! [`clip_vision`], [`projector`], [`opt`], [`moda`]. [`weights`] reads checkpoints,
//! [`preprocess`] turns images into `pixel_values`, [`tokenizer`] is OPT's byte-level BPE and
//! [`hub`] finds model directories locally or on the Hugging Face hub. [`checkpoint`] is MODA's
//! own checkpoint directory, written by the trainer and read by the exporter. [`schema`] is the
//! caption template and the values each field took in training, with the one parser that reads
//! a description back into attributes (the trainer's evaluation and the SDK use it).

#[cfg(feature = "candle")]
pub mod checkpoint;
#[cfg(feature = "candle")]
pub mod clip_vision;
pub mod constrain;
pub mod error;
pub mod files;
#[cfg(feature = "candle")]
pub mod fused;
pub mod generate;
#[cfg(feature = "hub")]
pub mod hub;
pub mod kaggle;
#[cfg(feature = "candle")]
pub mod moda;
#[cfg(feature = "candle")]
mod nn;
#[cfg(feature = "candle")]
pub mod opt;
pub mod preprocess;
#[cfg(feature = "candle")]
pub mod projector;
#[cfg(feature = "candle")]
mod pth_check;
pub mod schema;
pub mod tokenizer;
#[cfg(feature = "candle")]
pub mod weights;

#[cfg(feature = "candle")]
pub use clip_vision::{ClipVision, ClipVisionConfig};
pub use error::{Error, Result};
#[cfg(feature = "candle")]
pub use moda::{CaptionBatch, CaptionDecoder, CaptionModel};
#[cfg(feature = "candle")]
pub use nn::Activation;
#[cfg(feature = "candle")]
pub use opt::{Cache, DecoderInput, Opt, OptConfig};
#[cfg(feature = "candle")]
pub use projector::{Projector, ProjectorConfig};
#[cfg(feature = "candle")]
pub use weights::Weights;

#[cfg(test)]
mod testutil {
    //! Helpers for the unit tests.
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop (a `tempfile::TempDir`),
    /// with its path in `.0`.
    pub(crate) struct TempDir(
        pub(crate) PathBuf,
        // Held for its drop, which removes the directory.
        #[allow(dead_code)] tempfile::TempDir,
    );

    impl TempDir {
        pub(crate) fn new() -> Self {
            let dir = tempfile::Builder::new()
                .prefix("moda-models-test-")
                .tempdir()
                .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
            Self(dir.path().to_path_buf(), dir)
        }
    }
}
