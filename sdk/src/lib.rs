//! MODA SDK: describes and embeds product images with an exported bundle and ONNX Runtime on
//! CPU. It needs only the bundle (written by `exporter onnx`) and the ONNX Runtime shared
//! library: no candle, no Python.
//!
//! ```no_run
//! use moda_sdk::{GenerationOptions, ImageInput, Moda, OpenOptions};
//! let moda = Moda::open("demo/bundle", &OpenOptions::default())?;
//! let d = moda.describe(&ImageInput::Path("shirt.jpg".as_ref()), &GenerationOptions::default())?;
//! println!("{}", d.text);
//! # Ok::<(), moda_sdk::Error>(())
//! ```
//!
//! [`model`] holds [`Moda`] (threads, memory and the KV cache are described there),
//! [`generate`] the search and its options, [`attributes`] how a description is read into the
//! fields of the bundle's caption schema, [`manifest`] the bundle's `moda.json` and
//! [`runtime`] how ONNX Runtime is found. The `moda-sdk` command line (catalog jobs, the
//! benchmark) is a separate crate, `moda-cli`, so that a program embedding this library (and
//! `libmoda`, the C API over it) builds none of its dependencies.

pub mod attributes;
pub mod error;
/// The search and its options; it lives in `moda_models::generate`, shared with the candle
/// model, and is re-exported here.
pub mod generate {
    pub use moda_models::generate::*;
}
pub mod manifest;
pub mod model;
pub mod runtime;

pub use attributes::Attribute;
pub use error::{Error, Result};
pub use generate::{Constrain, Finish, GenerationOptions};
pub use moda_models::preprocess::ImageLimits;
pub use model::{
    read_manifest, Description, ImageInput, Moda, Norm, OpenOptions, Timings, TokenEvent,
};
