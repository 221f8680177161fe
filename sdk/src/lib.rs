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
//! [`generate`] the search and its options, [`manifest`] the bundle's `moda.json` and
//! [`runtime`] how ONNX Runtime is found; [`catalog`] and [`bench`] are what the `moda-sdk`
//! command line runs: catalog jobs (inputs, shards, resumable output) and the benchmark.

pub mod bench;
pub mod catalog;
pub mod error;
pub mod generate;
pub mod manifest;
pub mod model;
pub mod runtime;

pub use error::{Error, Result};
pub use generate::GenerationOptions;
pub use moda_models::preprocess::ImageLimits;
pub use model::{read_manifest, Description, ImageInput, Moda, OpenOptions, Timings, TokenEvent};
