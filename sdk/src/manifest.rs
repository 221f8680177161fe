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

/// The names of layer `i`'s cache tensors in the decoder graph: the inputs
/// `past_key_values.{i}.key` and `.value` and the outputs `present.{i}.key` and `.value`
/// (the names `optimum` and `transformers.js` use).
pub fn cache_names(i: usize) -> [String; 4] {
    [
        format!("past_key_values.{i}.key"),
        format!("past_key_values.{i}.value"),
        format!("present.{i}.key"),
        format!("present.{i}.value"),
    ]
}

/// The largest number of positions, layers, heads, ... a manifest may state: far above any
/// model this SDK runs, low enough that products of two of them cannot overflow.
const MAX_DIM: usize = 1 << 24;

impl Manifest {
    /// Checks what can be checked without the graphs: every dimension positive and within
    /// reason, the special tokens inside the vocabulary, the generation defaults within the
    /// positions, and every file name a plain relative name (see [`check_file_name`]). The
    /// graphs' own input and output shapes are compared when they are loaded.
    pub fn validate(&self) -> Result<(), String> {
        let d = &self.model;
        let dims = [
            ("image_size", d.image_size),
            ("num_channels", d.num_channels),
            ("projection_dim", d.projection_dim),
            ("embed_dim", d.embed_dim),
            ("hidden_size", d.hidden_size),
            ("num_layers", d.num_layers),
            ("num_heads", d.num_heads),
            ("head_dim", d.head_dim),
            ("vocab_size", d.vocab_size),
            ("max_positions", d.max_positions),
            ("prefix_len", d.prefix_len),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_DIM {
                return Err(format!(
                    "\"model\".\"{name}\" is {v}; it must be between 1 and {MAX_DIM}"
                ));
            }
        }
        if d.prefix_len != 1 {
            return Err(format!(
                "image prefix of {} positions; this SDK supports 1",
                d.prefix_len
            ));
        }
        let s = &self.special_tokens;
        for (name, id) in [("bos", s.bos), ("eos", s.eos), ("pad", s.pad)] {
            if id as usize >= d.vocab_size {
                return Err(format!(
                    "\"special_tokens\".\"{name}\" is {id}, outside the vocabulary of {}",
                    d.vocab_size
                ));
            }
        }
        let g = &self.generation;
        // The image prefix and the BOS take a position each; the last token generated is
        // never fed back.
        let room = d.max_positions.saturating_sub(d.prefix_len);
        if g.max_new_tokens == 0 || g.max_new_tokens > room {
            return Err(format!(
                "\"generation\".\"max_new_tokens\" is {}; the decoder's {} positions allow 1 to \
                 {room}",
                g.max_new_tokens, d.max_positions
            ));
        }
        if g.num_beams == 0 || g.num_beams > MAX_DIM {
            return Err(format!(
                "\"generation\".\"num_beams\" is {}; it must be at least 1",
                g.num_beams
            ));
        }
        check_file_name(&self.tokenizer).map_err(|e| format!("\"tokenizer\": {e}"))?;
        if !self.files.contains_key(&self.tokenizer) {
            return Err(format!(
                "\"files\" does not list the tokenizer {:?} (its size and checksum)",
                self.tokenizer
            ));
        }
        for (role, graph) in &self.graphs {
            check_file_name(&graph.file)
                .map_err(|e| format!("\"graphs\".\"{role}\".\"file\": {e}"))?;
            if !self.files.contains_key(&graph.file) {
                return Err(format!(
                    "\"files\" does not list the {role} graph {:?} (its size and checksum)",
                    graph.file
                ));
            }
        }
        for name in self.files.keys() {
            check_file_name(name).map_err(|e| format!("\"files\": {e}"))?;
        }
        self.check_cache_names()
    }

    /// The decoder's cache tensors are paired by name: `present.{i}.key` of one step goes in
    /// as `past_key_values.{i}.key` of the next. The SDK feeds them by position, so the
    /// manifest must list them in that order under those names; two layers' names swapped
    /// would otherwise run every step on the wrong layer's cache, with no error.
    fn check_cache_names(&self) -> Result<(), String> {
        let Some(g) = self.graphs.get("decoder") else {
            return Ok(());
        };
        let layers = self.model.num_layers;
        let names = |v: &[TensorInfo]| v.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        let (ins, outs) = (names(&g.inputs), names(&g.outputs));
        for i in 0..layers {
            let [pk, pv, k, v] = cache_names(i);
            let want_in = [(2 + 2 * i, pk), (3 + 2 * i, pv)];
            let want_out = [(1 + 2 * i, k), (2 + 2 * i, v)];
            for (side, list, wants) in [("inputs", &ins, want_in), ("outputs", &outs, want_out)] {
                for (at, want) in wants {
                    if list.get(at) != Some(&want) {
                        return Err(format!(
                            "the decoder's {side} must list {want:?} at position {at} (layer \
                             {i}'s cache, in layer order), not {:?}",
                            list.get(at).map_or("nothing", String::as_str)
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Parses and checks the contents of a `moda.json`: JSON, the [`FORMAT`], a
/// [`FORMAT_VERSION`] no newer than this crate's, every field, then [`Manifest::validate`].
/// The error says what is wrong, without the file's name (the caller adds it).
pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT) {
        return Err(format!(
            "not a MODA manifest (its \"format\" is not \"{FORMAT}\")"
        ));
    }
    match value.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v > FORMAT_VERSION as u64 => {
            return Err(format!(
                "bundle format version {v} is newer than this SDK reads (version \
                 {FORMAT_VERSION}); upgrade moda-sdk, or export the bundle with a matching \
                 exporter"
            ))
        }
        Some(_) => {}
        None => {
            return Err(format!(
                "\"format_version\" must be a whole number (this SDK reads up to \
                 {FORMAT_VERSION}), not {}",
                value
                    .get("format_version")
                    .map_or("missing".to_string(), |v| v.to_string())
            ))
        }
    }
    let m: Manifest =
        serde_json::from_value(value).map_err(|e| format!("malformed manifest: {e}"))?;
    m.validate()?;
    Ok(m)
}

/// Checks that `name` is a plain relative file name inside a bundle: not empty, not
/// absolute, no `..`, `.` or root components, no NUL, no backslash (a separator elsewhere).
/// A bundle is a directory that may come from anywhere; what it names must stay inside it.
pub fn check_file_name(name: &str) -> Result<(), String> {
    use std::path::{Component, Path};
    let bad = |why: &str| -> Result<(), String> {
        Err(format!(
            "{name:?} {why}; a bundle names its files by plain relative names"
        ))
    };
    if name.is_empty() {
        return Err("an empty file name".to_string());
    }
    if name.contains('\0') || name.contains('\\') {
        return bad("holds a NUL or a backslash");
    }
    for c in Path::new(name).components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return bad("leads out of the bundle (..)"),
            Component::RootDir | Component::Prefix(_) => return bad("is an absolute path"),
            Component::CurDir => return bad("has a . component"),
        }
    }
    Ok(())
}

/// The path of the bundle file `name` (checked with [`check_file_name`]) inside `dir`. If
/// it exists, it must still be inside `dir` once symbolic links are resolved, and be a
/// regular file.
pub fn bundle_file(dir: &std::path::Path, name: &str) -> Result<std::path::PathBuf, String> {
    check_file_name(name)?;
    let path = dir.join(name);
    if std::fs::symlink_metadata(&path).is_err() {
        // Missing: the caller reports it with the file's role.
        return Ok(path);
    }
    // Symbolic links (the file itself or a directory on the way) must not lead out.
    let real = path
        .canonicalize()
        .map_err(|e| format!("{name:?} cannot be resolved ({e})"))?;
    let root = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve the bundle directory ({e})"))?;
    if !real.starts_with(&root) {
        return Err(format!(
            "{name:?} leads out of the bundle through a symbolic link (to {})",
            real.display()
        ));
    }
    let ft = std::fs::metadata(&path)
        .map_err(|e| format!("{name:?}: {e}"))?
        .file_type();
    if !ft.is_file() {
        return Err(format!("{name:?} is not a regular file"));
    }
    Ok(path)
}
