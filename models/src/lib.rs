//! MODA model core: the FashionCLIP vision tower, the projector and the OPT decoder in candle,
//! loaded from real Hugging Face checkpoints and matching `transformers`.
//!
//! The architecture is described in `shared/MISSION.md`; each model lives in its own file:
//! [`clip_vision`], [`projector`], [`opt`], [`moda`]. [`weights`] reads checkpoints,
//! [`preprocess`] turns images into `pixel_values`, [`tokenizer`] is OPT's byte-level BPE and
//! [`hub`] finds model directories locally or on the Hugging Face hub.

pub mod clip_vision;
pub mod error;
pub mod hub;
pub mod moda;
mod nn;
pub mod opt;
pub mod preprocess;
pub mod projector;
pub mod tokenizer;
pub mod weights;

pub use clip_vision::{ClipVision, ClipVisionConfig};
pub use error::{Error, Result};
pub use moda::{Moda, ModaBatch};
pub use nn::Activation;
pub use opt::{Cache, DecoderInput, Opt, OptConfig};
pub use projector::{Projector, ProjectorConfig};
pub use weights::Weights;
