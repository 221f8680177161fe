//! The bundle manifest, `moda.json`: what `exporter onnx` writes and what the SDK reads.
//!
//! A bundle is a directory holding the ONNX graphs, `tokenizer.json` and this manifest. The
//! manifest names every graph's file, inputs and outputs, the model's dimensions, the image
//! preprocessing, the special tokens, generation defaults and the SHA-256 of every file.
//! [`FORMAT_VERSION`] changes when a reader written for the old format would misread the new
//! one; readers refuse versions newer than theirs.
//!
//! This module is the format's one definition, used by the writer (`exporter`) and the readers
//! (this SDK, `libmoda`): the graphs' [`Role`]s with their file names and input and output
//! names, the [`Quantization`], the typed preprocessing, and [`Manifest::validate`], the one
//! place a manifest is checked. These types read and write the same JSON as the string-typed
//! fields of the first exporters, so the format is still version 1.
//!
//! Two optional fields came later, still in version 1: `schema` (the caption template and
//! each field's known values, [`CaptionSchema`]) and `generation.stop_strings`. Both are left
//! out when empty, so a bundle without them is written byte for byte as before; unknown
//! fields are ignored when a manifest is read (serde's default), so an older reader opens a
//! bundle with them and runs it as it ran every bundle: free text, no attributes, no stop
//! strings. That is no misreading of what it does read, hence no version change.
//!
//! A third came with graphs whose large weights sit in an external data file beside them
//! (`graphs.<role>.data`, listed in `files` like every file): ONNX Runtime maps such a file
//! into memory instead of copying the weights out of the graph, which roughly halves the peak
//! memory and the time to open a bundle. A reader that does not know the field still runs these
//! graphs (ONNX Runtime finds the data file from the graph itself) and, with checksums
//! verified, refuses them with ONNX Runtime's message about external data; bundles without it
//! open as before. Again no version change.
//!
//! A fourth, `graphs.decoder.optional_inputs`, lists [`HEAD_IDS`]: a decoder input with a
//! default (an empty list: every token's logits), so that a constrained step asks for the
//! logits of the tokens it may choose only. A reader that does not know the field never
//! feeds it and gets every token's logits, as from any decoder. No version change.

use std::collections::BTreeMap;

use moda_models::preprocess::{ImageProcessor, ImageProcessorConfig};
pub use moda_models::schema::CaptionSchema;
use serde::{Deserialize, Serialize};

/// The manifest's file name inside a bundle.
pub const MANIFEST_FILE: &str = "moda.json";
/// The `format` value of every MODA manifest.
pub const FORMAT: &str = "moda-bundle";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The tokenizer's file in a bundle written by `exporter onnx`.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The decoder graph's metadata entry (ONNX `metadata_props`) giving the positions its
/// position table holds, which its inputs and outputs cannot tell; a manifest whose
/// `max_positions` says more is refused when the bundle opens. Bundles written before it
/// existed lack it and are not checked.
pub const MAX_POSITIONS_METADATA: &str = "moda.max_positions";
/// The decoder graph's metadata entry giving the tokens its LM head scores: its `logits`
/// declare their last axis dynamic (the vocabulary, or the tokens [`HEAD_IDS`] lists), so the
/// graph's outputs cannot tell. A manifest whose `vocab_size` differs is refused when the
/// bundle opens; bundles written before the entry declare the vocabulary on `logits` instead.
pub const VOCAB_SIZE_METADATA: &str = "moda.vocab_size";

/// The encoder's input: `pixel_values [batch, channels, image_size, image_size]` (f32).
pub const PIXEL_VALUES: &str = "pixel_values";
/// The encoder's output and the projector's input: `image_embeds [batch, projection_dim]`.
pub const IMAGE_EMBEDS: &str = "image_embeds";
/// The projector's output: `prefix_embeds [batch, prefix_len, embed_dim]`.
pub const PREFIX_EMBEDS: &str = "prefix_embeds";
/// The token embedding graph's input: `input_ids [batch, sequence]` (int64).
pub const INPUT_IDS: &str = "input_ids";
/// The token embedding graph's output and the decoder's first input:
/// `inputs_embeds [batch, sequence, embed_dim]`.
pub const INPUTS_EMBEDS: &str = "inputs_embeds";
/// The decoder's second input: `attention_mask [batch, past + sequence]` (int64, 1 keep, 0
/// pad).
pub const ATTENTION_MASK: &str = "attention_mask";
/// The decoder's first output: `logits [batch, sequence, vocab_size]`, or `[batch,
/// sequence, ids]` when [`HEAD_IDS`] is fed.
pub const LOGITS: &str = "logits";
/// The decoder's optional input (listed in its graph's `optional_inputs`): `head_ids [ids]`
/// (int64), the token ids whose logits the step returns, in that order; empty, its default,
/// for every token. A constrained step needs the logits of the few tokens the schema allows,
/// and the LM head is the largest single product of a decode step.
pub const HEAD_IDS: &str = "head_ids";

/// The part a graph plays in a bundle: the key of [`Manifest::graphs`].
///
/// Each role has one default file name and one list of input and output names, which the
/// exporter writes and the SDK expects ([`Manifest::validate`] refuses a manifest whose
/// graphs name them otherwise). A manifest naming a role this crate does not know is refused
/// when parsed.
///
/// The variants are declared in alphabetical order so that the map of graphs serialises in
/// the same key order as the string-keyed map of earlier exporters did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// OPT with its KV cache: `inputs_embeds`, `attention_mask`, then `past_key_values.{i}.key`
    /// and `.value` per layer -> `logits`, then `present.{i}.key` and `.value` per layer.
    Decoder,
    /// The token embedding lookup: `input_ids` -> `inputs_embeds`.
    EmbedTokens,
    /// The CLIP vision tower and its projection: `pixel_values` -> `image_embeds`.
    Encoder,
    /// The MLP from the image embedding to the decoder's prefix: `image_embeds` ->
    /// `prefix_embeds`.
    Projector,
}

impl Role {
    /// Every role, in the order an image flows through them.
    pub const ALL: [Role; 4] = [
        Role::Encoder,
        Role::Projector,
        Role::EmbedTokens,
        Role::Decoder,
    ];

    /// The role's name in the manifest (`encoder`, `projector`, `embed_tokens`, `decoder`).
    pub const fn name(self) -> &'static str {
        match self {
            Role::Decoder => "decoder",
            Role::EmbedTokens => "embed_tokens",
            Role::Encoder => "encoder",
            Role::Projector => "projector",
        }
    }

    /// The file `exporter onnx` writes the role's graph to (a reader takes the file name from
    /// [`GraphInfo::file`]).
    pub const fn default_file(self) -> &'static str {
        match self {
            Role::Decoder => "decoder.onnx",
            Role::EmbedTokens => "embed_tokens.onnx",
            Role::Encoder => "encoder.onnx",
            Role::Projector => "projector.onnx",
        }
    }

    /// The graph's input names in order; the decoder's depend on its `num_layers`.
    pub fn input_names(self, num_layers: usize) -> Vec<String> {
        match self {
            Role::Encoder => vec![PIXEL_VALUES.to_string()],
            Role::Projector => vec![IMAGE_EMBEDS.to_string()],
            Role::EmbedTokens => vec![INPUT_IDS.to_string()],
            Role::Decoder => {
                let mut names = vec![INPUTS_EMBEDS.to_string(), ATTENTION_MASK.to_string()];
                for i in 0..num_layers {
                    let [pk, pv, _, _] = cache_names(i);
                    names.extend([pk, pv]);
                }
                names
            }
        }
    }

    /// The graph's output names in order; the decoder's depend on its `num_layers`.
    pub fn output_names(self, num_layers: usize) -> Vec<String> {
        match self {
            Role::Encoder => vec![IMAGE_EMBEDS.to_string()],
            Role::Projector => vec![PREFIX_EMBEDS.to_string()],
            Role::EmbedTokens => vec![INPUTS_EMBEDS.to_string()],
            Role::Decoder => {
                let mut names = vec![LOGITS.to_string()];
                for i in 0..num_layers {
                    let [_, _, k, v] = cache_names(i);
                    names.extend([k, v]);
                }
                names
            }
        }
    }

    /// What the name at position `at` of the role's inputs (or outputs) is, for error
    /// messages: the decoder's cache tensors are paired with the next step's inputs by
    /// position, so a name out of place is reported with its layer.
    fn describe_slot(self, outputs: bool, at: usize) -> String {
        let first_cache = if outputs { 1 } else { 2 };
        match self {
            Role::Decoder if at >= first_cache => {
                format!("layer {}'s cache, in layer order", (at - first_cache) / 2)
            }
            _ => format!(
                "the {self} graph's {}",
                if outputs { "output" } else { "input" }
            ),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Weight quantization of a bundle's linear layers: those of the decoder (with its LM head) as
/// ONNX Runtime's `com.microsoft.MatMulNBits` (int8 or int4, blocks of 32), and in both kinds
/// those of the encoder's transformer as `com.microsoft.DynamicQuantizeMatMul` (int8); the
/// patch convolution, the projector and the embeddings stay fp32. Written as `none`, `int8` or
/// `int4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// fp32 weights.
    #[default]
    None,
    /// int8 weights, blocks of 32.
    Int8,
    /// int4 weights, blocks of 32.
    Int4,
}

impl Quantization {
    /// The name in the manifest (`none`, `int8`, `int4`).
    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Int8 => "int8",
            Quantization::Int4 => "int4",
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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
    /// The graphs by role; [`Manifest::validate`] requires every [`Role`].
    pub graphs: BTreeMap<Role, GraphInfo>,
    /// The tokenizer file (`tokenizer.json`).
    pub tokenizer: String,
    /// The image preprocessing, as `preprocessor_config.json` keys (`CLIPImageProcessor`);
    /// missing keys take its defaults and unknown keys are ignored.
    pub preprocessing: ImageProcessorConfig,
    /// Special token ids.
    pub special_tokens: SpecialTokenIds,
    /// Generation defaults.
    pub generation: GenerationDefaults,
    /// Weight quantization of the linear layers.
    pub quantization: Quantization,
    /// Every other file of the bundle, with its size and SHA-256.
    pub files: BTreeMap<String, FileInfo>,
    /// The source models' own configurations (`config.json` contents), for reference.
    pub source_configs: serde_json::Value,
    /// The caption schema: the template descriptions follow and each field's values seen in
    /// training, with which the SDK reads a description back into attributes. Absent in
    /// bundles exported without one (their descriptions are text only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<CaptionSchema>,
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

impl ModelDims {
    /// The most tokens generation may add after the BOS: the image prefix and the BOS take a
    /// position each, and the last token generated is never fed back.
    pub fn max_new_tokens_allowed(&self) -> usize {
        self.max_positions.saturating_sub(self.prefix_len)
    }
}

/// One graph of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphInfo {
    /// File name inside the bundle.
    pub file: String,
    /// The graph's external data file (ONNX's `external_data`, named by the graph's large
    /// initializers), when it has one: a file of the bundle that `files` lists. `exporter
    /// onnx` names it after the graph ([`external_data_file`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Inputs in order.
    pub inputs: Vec<TensorInfo>,
    /// Outputs in order.
    pub outputs: Vec<TensorInfo>,
    /// Inputs that the graph gives a default to ("overridable initializers"): a run may leave
    /// them out. The decoder's is [`HEAD_IDS`]. Left out when empty; a reader that does not
    /// know the field never feeds them and runs the graph as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub optional_inputs: Vec<TensorInfo>,
}

/// The external data file `exporter onnx` writes beside the graph file `graph`
/// (`decoder.onnx` -> `decoder.onnx.data`).
pub fn external_data_file(graph: &str) -> String {
    format!("{graph}.data")
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
    /// Stop strings used when a caller gives none (`<\s>` for the original recipe's
    /// checkpoint, whose captions end with those characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop_strings: Vec<String>,
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
    /// positions, every [`Role`]'s graph present with the inputs and outputs that role has,
    /// the preprocessing usable and of the encoder's image size, and every file name a plain
    /// relative name (see [`check_file_name`]). The graphs' own input and output shapes are
    /// compared when they are loaded.
    pub fn validate(&self) -> Result<(), String> {
        self.check_dims()?;
        self.check_special_tokens()?;
        self.check_generation()?;
        self.check_schema()?;
        self.check_files()?;
        for role in Role::ALL {
            self.check_graph_names(role)?;
        }
        self.check_preprocessing()
    }

    /// The graph of `role`; every role is there once the manifest is validated.
    pub fn graph(&self, role: Role) -> Result<&GraphInfo, String> {
        self.graphs
            .get(&role)
            .ok_or_else(|| format!("the manifest lists no \"{role}\" graph"))
    }

    /// The role of the graph stored in the bundle file `file` (the graph itself or its
    /// external data), if one is.
    pub fn role_of_file(&self, file: &str) -> Option<Role> {
        self.graphs
            .iter()
            .find(|(_, g)| g.file == file || g.data.as_deref() == Some(file))
            .map(|(role, _)| *role)
    }

    fn check_dims(&self) -> Result<(), String> {
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
        Ok(())
    }

    fn check_special_tokens(&self) -> Result<(), String> {
        let s = &self.special_tokens;
        for (name, id) in [("bos", s.bos), ("eos", s.eos), ("pad", s.pad)] {
            if id as usize >= self.model.vocab_size {
                return Err(format!(
                    "\"special_tokens\".\"{name}\" is {id}, outside the vocabulary of {}",
                    self.model.vocab_size
                ));
            }
        }
        Ok(())
    }

    fn check_generation(&self) -> Result<(), String> {
        let g = &self.generation;
        let room = self.model.max_new_tokens_allowed();
        if g.max_new_tokens == 0 || g.max_new_tokens > room {
            return Err(format!(
                "\"generation\".\"max_new_tokens\" is {}; the decoder's {} positions allow 1 to \
                 {room}",
                g.max_new_tokens, self.model.max_positions
            ));
        }
        if g.num_beams == 0 || g.num_beams > MAX_DIM {
            return Err(format!(
                "\"generation\".\"num_beams\" is {}; it must be at least 1",
                g.num_beams
            ));
        }
        let stops = &g.stop_strings;
        if stops.len() > moda_models::generate::MAX_STOP_STRINGS
            || stops.iter().any(String::is_empty)
        {
            return Err(format!(
                "\"generation\".\"stop_strings\" must be at most {} non-empty strings",
                moda_models::generate::MAX_STOP_STRINGS
            ));
        }
        Ok(())
    }

    /// The schema's fields must be its template's, its values distinct and within bounds.
    fn check_schema(&self) -> Result<(), String> {
        match &self.schema {
            Some(schema) => schema
                .validate()
                .map_err(|e| format!("bad \"schema\": {e}")),
            None => Ok(()),
        }
    }

    /// Every file name plain and relative; the tokenizer and every graph among the files
    /// listed with their size and checksum.
    fn check_files(&self) -> Result<(), String> {
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
            if let Some(data) = &graph.data {
                check_file_name(data)
                    .map_err(|e| format!("\"graphs\".\"{role}\".\"data\": {e}"))?;
                if !self.files.contains_key(data) {
                    return Err(format!(
                        "\"files\" does not list the {role} graph's external data {data:?} \
                         (its size and checksum)"
                    ));
                }
                if *data == graph.file
                    || self.graphs.iter().any(|(r, g)| {
                        r != role && (g.file == *data || g.data.as_ref() == Some(data))
                    })
                {
                    return Err(format!(
                        "the {role} graph's external data {data:?} is another graph's file"
                    ));
                }
            }
        }
        for name in self.files.keys() {
            check_file_name(name).map_err(|e| format!("\"files\": {e}"))?;
        }
        Ok(())
    }

    /// The graph of `role` must be listed with the inputs and outputs [`Role::input_names`]
    /// and [`Role::output_names`] give, in that order. The SDK feeds the decoder's cache by
    /// position (`present.{i}.key` of one step goes in as `past_key_values.{i}.key` of the
    /// next), so two layers' names swapped would otherwise run every step on the wrong layer's
    /// cache, with no error. A manifest listing fewer layers than its graph has passes here and
    /// is refused when the graph is loaded.
    fn check_graph_names(&self, role: Role) -> Result<(), String> {
        let g = self.graph(role)?;
        let layers = self.model.num_layers;
        let sides = [
            ("inputs", false, &g.inputs, role.input_names(layers)),
            ("outputs", true, &g.outputs, role.output_names(layers)),
        ];
        if let Some(dup) = g
            .optional_inputs
            .iter()
            .find(|o| g.inputs.iter().any(|i| i.name == o.name))
        {
            return Err(format!(
                "the {role} graph lists {:?} among both its inputs and its optional inputs",
                dup.name
            ));
        }
        for (side, outputs, listed, wanted) in sides {
            if listed.len() != wanted.len() {
                return Err(format!(
                    "the {role} graph lists {} {side}; with \"model\".\"num_layers\" {layers} \
                     it has {}",
                    listed.len(),
                    wanted.len()
                ));
            }
            for (at, (got, want)) in listed.iter().zip(&wanted).enumerate() {
                if &got.name != want {
                    return Err(format!(
                        "the {role}'s {side} must list {want:?} at position {at} ({}), not {:?}",
                        role.describe_slot(outputs, at),
                        got.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The preprocessing must be one the SDK runs ([`ImageProcessor::new`]) and make images of
    /// the encoder's size.
    fn check_preprocessing(&self) -> Result<(), String> {
        let processor = ImageProcessor::new(self.preprocessing.clone())
            .map_err(|e| format!("bad \"preprocessing\": {e}"))?;
        let (h, w) = processor.config().output_size();
        if h != self.model.image_size || w != self.model.image_size {
            return Err(format!(
                "preprocessing makes {h}x{w} images but the encoder takes {0}x{0}",
                self.model.image_size
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest as `exporter onnx` writes one for a 2-layer model with 64x64 images.
    fn sample() -> Manifest {
        let layers = 2;
        let tensor = |name: String| TensorInfo {
            name,
            dtype: "float32".to_string(),
            shape: vec![serde_json::Value::from("batch")],
        };
        let file = |bytes| FileInfo {
            bytes,
            sha256: "0".repeat(64),
        };
        let mut files = BTreeMap::from([(TOKENIZER_FILE.to_string(), file(10))]);
        let mut graphs = BTreeMap::new();
        for role in Role::ALL {
            files.insert(role.default_file().to_string(), file(100));
            let info = GraphInfo {
                file: role.default_file().to_string(),
                data: None,
                inputs: role.input_names(layers).into_iter().map(tensor).collect(),
                outputs: role.output_names(layers).into_iter().map(tensor).collect(),
                optional_inputs: Vec::new(),
            };
            graphs.insert(role, info);
        }
        let preprocessing = ImageProcessorConfig {
            crop_size: serde_json::from_value(serde_json::json!(64)).expect("crop"),
            ..Default::default()
        };
        Manifest {
            format: FORMAT.to_string(),
            format_version: FORMAT_VERSION,
            exporter: Producer {
                name: "moda-exporter".to_string(),
                version: "0.1.0".to_string(),
            },
            model: ModelDims {
                image_size: 64,
                num_channels: 3,
                projection_dim: 24,
                embed_dim: 32,
                hidden_size: 32,
                num_layers: layers,
                num_heads: 4,
                head_dim: 8,
                vocab_size: 100,
                max_positions: 40,
                prefix_len: 1,
            },
            graphs,
            tokenizer: TOKENIZER_FILE.to_string(),
            preprocessing,
            special_tokens: SpecialTokenIds {
                bos: 2,
                eos: 2,
                pad: 1,
            },
            generation: GenerationDefaults {
                max_new_tokens: 32,
                num_beams: 1,
                do_sample: false,
                stop_strings: Vec::new(),
            },
            quantization: Quantization::Int8,
            files,
            source_configs: serde_json::json!({}),
            schema: None,
        }
    }

    fn json(m: &Manifest) -> serde_json::Value {
        serde_json::to_value(m).expect("serialises")
    }

    fn parse_value(v: &serde_json::Value) -> Result<Manifest, String> {
        parse(v.to_string().as_bytes())
    }

    #[test]
    fn role_names_are_the_manifest_keys_and_file_stems() {
        let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, ["encoder", "projector", "embed_tokens", "decoder"]);
        for role in Role::ALL {
            assert_eq!(serde_json::to_value(role).expect("role"), role.name());
            let back: Role = serde_json::from_value(role.name().into()).expect("role");
            assert_eq!(back, role);
            assert_eq!(role.to_string(), role.name());
            assert_eq!(role.default_file(), format!("{}.onnx", role.name()));
        }
        // The map of graphs keeps the key order of the string-keyed map it replaced.
        let mut sorted = Role::ALL;
        sorted.sort();
        let mut by_name = Role::ALL;
        by_name.sort_by_key(|r| r.name());
        assert_eq!(sorted, by_name);
    }

    #[test]
    fn role_input_and_output_names_chain_the_graphs() {
        let ins = |r: Role| r.input_names(0);
        let outs = |r: Role| r.output_names(0);
        assert_eq!(ins(Role::Encoder), [PIXEL_VALUES]);
        assert_eq!(outs(Role::Encoder), ins(Role::Projector));
        assert_eq!(outs(Role::Projector), [PREFIX_EMBEDS]);
        assert_eq!(ins(Role::EmbedTokens), [INPUT_IDS]);
        assert_eq!(outs(Role::EmbedTokens)[0], ins(Role::Decoder)[0]);
        assert_eq!(
            Role::Decoder.input_names(2),
            [
                "inputs_embeds",
                "attention_mask",
                "past_key_values.0.key",
                "past_key_values.0.value",
                "past_key_values.1.key",
                "past_key_values.1.value",
            ]
        );
        assert_eq!(
            Role::Decoder.output_names(2),
            [
                "logits",
                "present.0.key",
                "present.0.value",
                "present.1.key",
                "present.1.value",
            ]
        );
        // Only the decoder's lists depend on the layers.
        for role in [Role::Encoder, Role::Projector, Role::EmbedTokens] {
            assert_eq!(role.input_names(0), role.input_names(12));
            assert_eq!(role.output_names(0), role.output_names(12));
        }
    }

    #[test]
    fn a_manifest_written_with_the_role_names_reads_back_the_same() {
        let m = sample();
        m.validate().expect("valid");
        let v = json(&m);
        assert_eq!(v["quantization"], "int8");
        assert_eq!(v["preprocessing"]["crop_size"], serde_json::json!(64));
        let keys: Vec<&String> = v["graphs"].as_object().expect("graphs").keys().collect();
        assert_eq!(keys, ["decoder", "embed_tokens", "encoder", "projector"]);
        assert_eq!(parse_value(&v).expect("parses"), m);
    }

    #[test]
    fn a_graph_external_data_file_must_be_its_own_and_listed() {
        // Left out when absent (a bundle without it reads and writes as before) and kept when
        // present.
        let m = sample();
        assert!(json(&m)["graphs"]["decoder"].get("data").is_none());
        let mut v = json(&m);
        v["graphs"]["decoder"]["data"] = "decoder.onnx.data".into();
        v["files"]["decoder.onnx.data"] = serde_json::json!({"bytes": 5, "sha256": "0".repeat(64)});
        let with = parse_value(&v).expect("parses");
        assert_eq!(with.role_of_file("decoder.onnx.data"), Some(Role::Decoder));
        assert_eq!(
            json(&with)["graphs"]["decoder"]["data"],
            "decoder.onnx.data"
        );
        // Not listed, not a plain name, or another graph's file: refused, saying which.
        let refused = |edit: &dyn Fn(&mut serde_json::Value), want: &str| {
            let mut v = json(&m);
            edit(&mut v);
            let err = parse_value(&v).expect_err(want);
            assert!(err.contains(want), "{err}");
        };
        refused(
            &|v| v["graphs"]["decoder"]["data"] = "decoder.onnx.data".into(),
            "does not list the decoder graph's external data",
        );
        refused(
            &|v| v["graphs"]["decoder"]["data"] = "../w.data".into(),
            "\"graphs\".\"decoder\".\"data\"",
        );
        refused(
            &|v| v["graphs"]["decoder"]["data"] = "encoder.onnx".into(),
            "is another graph's file",
        );
    }

    #[test]
    fn quantization_reads_the_strings_of_earlier_bundles() {
        for (name, q) in [
            ("none", Quantization::None),
            ("int8", Quantization::Int8),
            ("int4", Quantization::Int4),
        ] {
            let mut v = json(&sample());
            v["quantization"] = name.into();
            assert_eq!(parse_value(&v).expect("parses").quantization, q);
            assert_eq!(q.name(), name);
        }
        let mut v = json(&sample());
        v["quantization"] = "int2".into();
        let err = parse_value(&v).expect_err("int2");
        assert!(err.contains("int2"), "{err}");
    }

    #[test]
    fn preprocessing_ignores_unknown_keys_and_takes_defaults() {
        let mut v = json(&sample());
        v["preprocessing"] = serde_json::json!({
            "crop_size": {"height": 64, "width": 64},
            "image_processor_type": "CLIPImageProcessor",
            "feature_extractor_type": "CLIPFeatureExtractor"
        });
        let m = parse_value(&v).expect("parses");
        assert_eq!(m.preprocessing.crop_size.height_width(), (64, 64));
        assert_eq!(
            m.preprocessing.resample,
            ImageProcessorConfig::default().resample
        );
    }

    #[test]
    fn preprocessing_the_sdk_cannot_run_is_refused() {
        let mut v = json(&sample());
        v["preprocessing"]["image_std"] = serde_json::json!([0.0, 0.0, 0.0]);
        let err = parse_value(&v).expect_err("zero std");
        assert!(err.contains("image_std"), "{err}");
        let mut v = json(&sample());
        v["preprocessing"]["crop_size"] = serde_json::json!(32);
        let err = parse_value(&v).expect_err("wrong size");
        assert!(err.contains("32x32") && err.contains("64x64"), "{err}");
    }

    #[test]
    fn graphs_must_be_those_of_the_roles() {
        let mut v = json(&sample());
        v["graphs"]["extra"] = v["graphs"]["encoder"].clone();
        let err = parse_value(&v).expect_err("unknown role");
        assert!(err.contains("extra"), "{err}");

        let mut v = json(&sample());
        v["graphs"]
            .as_object_mut()
            .expect("graphs")
            .remove("projector");
        let err = parse_value(&v).expect_err("no projector");
        assert!(err.contains("no \"projector\" graph"), "{err}");

        let mut v = json(&sample());
        v["graphs"]["encoder"]["inputs"][0]["name"] = "images".into();
        let err = parse_value(&v).expect_err("renamed input");
        assert!(err.contains("\"pixel_values\" at position 0"), "{err}");

        let mut v = json(&sample());
        let outs = v["graphs"]["decoder"]["outputs"]
            .as_array_mut()
            .expect("outputs");
        outs.swap(1, 3);
        let err = parse_value(&v).expect_err("swapped cache");
        assert!(err.contains("layer 0's cache"), "{err}");

        let mut v = json(&sample());
        v["graphs"]["decoder"]["inputs"]
            .as_array_mut()
            .expect("inputs")
            .pop();
        let err = parse_value(&v).expect_err("a cache input fewer");
        assert!(err.contains("lists 5 inputs"), "{err}");
    }

    #[test]
    fn max_new_tokens_must_fit_the_positions() {
        let m = sample();
        assert_eq!(m.model.max_new_tokens_allowed(), 39);
        for (n, ok) in [(0, false), (1, true), (39, true), (40, false)] {
            let mut v = json(&m);
            v["generation"]["max_new_tokens"] = n.into();
            assert_eq!(parse_value(&v).is_ok(), ok, "{n}");
        }
    }

    #[test]
    fn schema_and_stop_strings_are_optional_and_checked() {
        // Without them, nothing is written for them: older bundles read and write the same.
        let v = json(&sample());
        assert!(v.get("schema").is_none());
        assert!(v["generation"].get("stop_strings").is_none());
        assert_eq!(parse_value(&v).expect("parses"), sample());
        // With them, they read back.
        let mut m = sample();
        let mut schema = CaptionSchema::from_template(
            moda_models::schema::CaptionTemplate::parse("{Colour} {Usage}").expect("template"),
        );
        schema.add_value("Colour", "Navy Blue");
        schema.add_value("Usage", "Casual");
        m.schema = Some(schema);
        m.generation.stop_strings = vec!["<\\s>".to_string()];
        let v = json(&m);
        assert_eq!(v["schema"]["template"], "{Colour} {Usage}");
        assert_eq!(v["schema"]["fields"][0]["values"][0]["value"], "Navy Blue");
        assert_eq!(v["generation"]["stop_strings"][0], "<\\s>");
        assert_eq!(parse_value(&v).expect("parses"), m);
        // A schema whose fields are not its template's, or a bad template, is refused.
        let mut bad = v.clone();
        bad["schema"]["fields"][1]["name"] = "Gender".into();
        let err = parse_value(&bad).expect_err("fields");
        assert!(err.contains("schema") && err.contains("Gender"), "{err}");
        let mut bad = v.clone();
        bad["schema"]["template"] = "{Colour".into();
        assert!(parse_value(&bad)
            .expect_err("template")
            .contains("unclosed"));
        let mut bad = v;
        bad["generation"]["stop_strings"] = serde_json::json!([""]);
        assert!(parse_value(&bad)
            .expect_err("empty stop string")
            .contains("stop_strings"));
    }

    #[test]
    fn newer_format_versions_are_refused_with_the_version() {
        let mut v = json(&sample());
        v["format_version"] = (FORMAT_VERSION + 1).into();
        let err = parse_value(&v).expect_err("newer");
        assert!(
            err.contains(&format!("version {}", FORMAT_VERSION + 1)),
            "{err}"
        );
    }
}
