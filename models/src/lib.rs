//! MODA model core: the FashionCLIP vision tower, the projector and the OPT decoder in candle,
//! loaded from real Hugging Face checkpoints and matching `transformers`.
//!
//! The architecture is described in `shared/MISSION.md`; each model lives in its own file:
//! [`clip_vision`], [`projector`], [`opt`], [`moda`]. [`weights`] reads checkpoints,
//! [`preprocess`] turns images into `pixel_values`, [`tokenizer`] is OPT's byte-level BPE and
//! [`hub`] finds model directories locally or on the Hugging Face hub. [`checkpoint`] is MODA's
//! own checkpoint directory, written by the trainer and read by the exporter.

#[cfg(feature = "candle")]
pub mod checkpoint;
#[cfg(feature = "candle")]
pub mod clip_vision;
pub mod error;
pub mod files;
#[cfg(feature = "candle")]
mod fused;
#[cfg(feature = "hub")]
pub mod hub;
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
pub mod tokenizer;
#[cfg(feature = "candle")]
pub mod weights;

#[cfg(feature = "candle")]
pub use clip_vision::{ClipVision, ClipVisionConfig};
pub use error::{Error, Result};
#[cfg(feature = "candle")]
pub use moda::{Moda, ModaBatch};
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "moda-models-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&p);
            if let Err(e) = std::fs::create_dir_all(&p) {
                panic!("cannot create {}: {e}", p.display());
            }
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
