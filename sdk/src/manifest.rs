//! The bundle manifest, `moda.json`: what `exporter onnx` writes and what the SDK reads.
//!
//! A bundle is a directory holding the ONNX graphs, `tokenizer.json` and this manifest. The
//! manifest names every graph's file, inputs and outputs, the model's dimensions, the image
//! preprocessing, the special tokens, generation defaults and the SHA-256 of every file.
//! [`FORMAT_VERSION`] changes when a reader written for the old format would misread the new
//! one; readers refuse versions newer than theirs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The manifest's file name inside a bundle.
pub const MANIFEST_FILE: &str = "moda.json";
/// The `format` value of every MODA manifest.
pub const FORMAT: &str = "moda-bundle";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// `moda.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Who wrote the bundle.
    pub exporter: Producer,
    /// The model's dimensions.
    pub model: ModelDims,
    /// The graphs by role: `encoder`, `projector`, `decoder`, `embed_tokens`.
    pub graphs: BTreeMap<String, GraphInfo>,
    /// The tokenizer file (`tokenizer.json`).
    pub tokenizer: String,
    /// The image preprocessing, as `preprocessor_config.json` keys (`CLIPImageProcessor`).
    pub preprocessing: serde_json::Value,
    /// Special token ids.
    pub special_tokens: SpecialTokenIds,
    /// Generation defaults.
    pub generation: GenerationDefaults,
    /// Weight quantization of the linear layers of the encoder's transformer and of the
    /// decoder (with its LM head): `none`, `int8` or `int4` (ONNX Runtime's
    /// `com.microsoft.MatMulNBits`, blocks of 32); the projector and embeddings stay fp32.
    pub quantization: String,
    /// Every other file of the bundle, with its size and SHA-256.
    pub files: BTreeMap<String, FileInfo>,
    /// The source models' own configurations (`config.json` contents), for reference.
    pub source_configs: serde_json::Value,
}

/// Who wrote a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producer {
    /// `moda-exporter`.
    pub name: String,
    /// Its version.
    pub version: String,
}

/// The dimensions a runtime needs, so that it never hard-codes the geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDims {
    /// Image side the encoder takes (`pixel_values [batch, channels, image_size, image_size]`).
    pub image_size: usize,
    /// Image channels (3).
    pub num_channels: usize,
    /// Size of an image embedding.
    pub projection_dim: usize,
    /// Size of the decoder's input embeddings (`word_embed_proj_dim`).
    pub embed_dim: usize,
    /// The decoder's width.
    pub hidden_size: usize,
    /// Decoder layers (pairs of cache tensors).
    pub num_layers: usize,
    /// Attention heads per decoder layer.
    pub num_heads: usize,
    /// Size of one head (the cache's last dimension).
    pub head_dim: usize,
    /// Rows of the logits.
    pub vocab_size: usize,
    /// Longest sequence (image prefix included) the decoder's positions cover.
    pub max_positions: usize,
    /// Positions the image takes at the start of the sequence (1).
    pub prefix_len: usize,
}

/// One graph of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphInfo {
    /// File name inside the bundle.
    pub file: String,
    /// Inputs in order.
    pub inputs: Vec<TensorInfo>,
    /// Outputs in order.
    pub outputs: Vec<TensorInfo>,
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// Its name in the graph.
    pub name: String,
    /// `float32` or `int64`.
    pub dtype: String,
    /// Dimensions: numbers, or names of dynamic dimensions (`batch`, `sequence`, ...).
    pub shape: Vec<serde_json::Value>,
}

/// Special token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokenIds {
    /// The token fed after the image prefix (OPT: `</s>`, 2).
    pub bos: u32,
    /// Generation stops after it (`</s>`, 2).
    pub eos: u32,
    /// Padding (`<pad>`, 1).
    pub pad: u32,
}

/// Generation defaults (greedy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationDefaults {
    /// Most tokens generated after the BOS.
    pub max_new_tokens: usize,
    /// Beams (1 = greedy).
    pub num_beams: usize,
    /// Sampling off.
    pub do_sample: bool,
}

/// A file's size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}
