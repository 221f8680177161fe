//! [`Moda`]: an opened bundle, its ONNX Runtime sessions and what runs them.
//!
//! ## Threads
//! `Moda` is `Send + Sync`. ONNX Runtime's `Run` on one session is not safe to call from two
//! threads at once (the `ort` crate makes it `&mut`), so `Moda` keeps a **pool of session
//! sets**: a call takes an idle set, runs the whole description with it and gives it back.
//! [`OpenOptions::sessions`] sets the most sets the pool makes (default 1): with one, callers
//! take turns and results are the same as calling one after another; each further set costs
//! another copy of the weights in memory (about the bundle's size: 1 GB for fp32 ViT-B/32 +
//! OPT-125m, 0.3 GB for int4), made the first time that many callers overlap. The first set is
//! built by [`Moda::open`], so a broken graph fails there.
//!
//! ## The KV cache
//! The decoder graph appends each step's keys and values to the past it is given
//! (`Concat` on the sequence axis) and returns the whole cache as `present.*`. The SDK moves
//! those output values, which ONNX Runtime allocated, straight back in as the next step's
//! `past_key_values.*`: no copy is made on the Rust side, nor any per-step allocation of the
//! cache beyond the graph's own concatenation (O(cache) bytes per step, against the weights'
//! hundreds of MB, so the per-token time stays flat). The token embeddings likewise go from
//! the `embed_tokens` graph's output into the decoder without a copy. Beam search reorders the
//! cache rows between steps, which copies it, as every beam search does.
//!
//! ## Listed logits
//! Under constrained decoding a step's logits matter only at the tokens the schema allows
//! after each position fed (the search renormalises over those). Before each run the search
//! tells the decoder which tokens those are ([`StepModel::only_logits_of`]); a decoder graph
//! that takes [`HEAD_IDS`] then computes just those columns of the LM head, and the SDK
//! spreads them into vocabulary-wide rows with minus infinity elsewhere. With OPT-125m's
//! 50,272-row head that is a third of an int4 step's weight reads saved.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use moda_models::constrain::{self, Constraint, ConstraintError};
use moda_models::preprocess::{decode_image, load_image, ImageLimits, ImageProcessor};
use moda_models::tokenizer::ModaTokenizer;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use serde::{Deserialize, Serialize};

use crate::attributes::{read_attributes, Attribute};
use crate::error::{Error, Result};
use crate::generate::{
    generate, strip_stop_string, Constrain, Finish, GenerationOptions, Search, StepModel,
};
use crate::manifest::{
    bundle_file, GraphInfo, Manifest, Role, HEAD_IDS, MANIFEST_FILE, MAX_POSITIONS_METADATA,
    VOCAB_SIZE_METADATA,
};
use crate::runtime::{session_from_bytes, session_from_file, SessionOptions};

/// How [`Moda::open`] sets things up: start from [`OpenOptions::default`] and change what you
/// need with the `with_*` methods (or by field); new settings may be added.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Threads ONNX Runtime uses inside one graph run. `None` picks the number of cores the
    /// process may use, at most 8 (a 125M-parameter decoder gains nothing from more threads
    /// per token), divided among [`OpenOptions::sessions`]. A larger number is capped at the
    /// cores the process may use ([`available_cores`]; more threads than cores only wait on
    /// each other); [`Moda::intra_threads`] tells the number used.
    pub intra_threads: Option<usize>,
    /// Most session sets in the pool (see the module documentation); at least 1.
    pub sessions: usize,
    /// Check every file's SHA-256 against the manifest (reads the whole bundle once; a few
    /// seconds for an fp32 bundle). Sizes are always checked.
    pub verify_checksums: bool,
    /// Limits on decoded images (dimensions and allocation).
    pub image_limits: ImageLimits,
    /// Run ONNX Runtime's graph optimisations (on by default).
    pub optimize: bool,
    /// Record ONNX Runtime's per-operator profile of every graph run into JSON files in this
    /// directory (which must exist), one per session, named after the graph's role; they are
    /// written by [`Moda::end_profiling`]. Off by default: profiling slows every run.
    pub profile_dir: Option<PathBuf>,
    /// Under constrained decoding, ask the decoder for the logits of the tokens the schema
    /// allows only, where the bundle's decoder takes the list ([`HEAD_IDS`]): the LM head then
    /// reads a few dozen of its rows instead of all of them. On by default; off computes every
    /// token's logits at every step, as with bundles exported before the input existed.
    pub listed_logits: bool,
    /// Build only what embeddings need: the encoder's and the projector's sessions, not the
    /// decoder's or the token embedding's, no tokenizer and no caption constraint. Opening
    /// takes about half the time and memory; describing (and [`Moda::tokenizer`]) is then an
    /// error. Off by default.
    pub embeddings_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            intra_threads: None,
            sessions: 1,
            verify_checksums: false,
            image_limits: ImageLimits::default(),
            optimize: true,
            profile_dir: None,
            listed_logits: true,
            embeddings_only: false,
        }
    }
}

impl OpenOptions {
    /// [`OpenOptions::intra_threads`].
    pub fn with_intra_threads(mut self, threads: Option<usize>) -> Self {
        self.intra_threads = threads;
        self
    }

    /// [`OpenOptions::sessions`].
    pub fn with_sessions(mut self, sessions: usize) -> Self {
        self.sessions = sessions;
        self
    }

    /// [`OpenOptions::verify_checksums`].
    pub fn with_verify_checksums(mut self, verify: bool) -> Self {
        self.verify_checksums = verify;
        self
    }

    /// [`OpenOptions::image_limits`].
    pub fn with_image_limits(mut self, limits: ImageLimits) -> Self {
        self.image_limits = limits;
        self
    }

    /// [`OpenOptions::optimize`].
    pub fn with_optimize(mut self, optimize: bool) -> Self {
        self.optimize = optimize;
        self
    }

    /// [`OpenOptions::profile_dir`].
    pub fn with_profile_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.profile_dir = dir;
        self
    }

    /// [`OpenOptions::listed_logits`].
    pub fn with_listed_logits(mut self, listed: bool) -> Self {
        self.listed_logits = listed;
        self
    }

    /// [`OpenOptions::embeddings_only`].
    pub fn with_embeddings_only(mut self, only: bool) -> Self {
        self.embeddings_only = only;
        self
    }
}

/// How an embedding comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// As the model's projection gives it.
    #[default]
    Raw,
    /// Scaled to unit (L2) length, so that cosine similarity is a dot product.
    Unit,
}

impl Norm {
    /// [`Norm::Unit`] when `normalize` is set (a command-line flag, a C `int`).
    pub fn unit_if(normalize: bool) -> Self {
        if normalize {
            Norm::Unit
        } else {
            Norm::Raw
        }
    }

    /// Scales `v` in place as this asks (nothing for [`Norm::Raw`]; a vector of zeros stays
    /// zeros under [`Norm::Unit`]).
    pub fn apply(self, v: &mut [f32]) {
        if self == Norm::Unit {
            let length = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= length);
        }
    }
}

/// An image to describe or embed.
#[derive(Debug, Clone, Copy)]
pub enum ImageInput<'a> {
    /// An image file (JPEG, PNG, WebP, GIF, BMP, TIFF; recognised by its bytes).
    Path(&'a Path),
    /// An encoded image in memory; `name` is used in error messages.
    Bytes {
        /// The encoded file.
        bytes: &'a [u8],
        /// What to call it in messages.
        name: &'a str,
    },
    /// Decoded pixels: `height` rows of `width` RGB triplets, 8 bits each, no padding.
    Rgb8 {
        /// `width * height * 3` bytes.
        data: &'a [u8],
        /// Pixels per row.
        width: u32,
        /// Rows.
        height: u32,
    },
}

impl ImageInput<'_> {
    /// How messages name this image.
    pub fn name(&self) -> String {
        match self {
            ImageInput::Path(p) => p.display().to_string(),
            ImageInput::Bytes { name, .. } => name.to_string(),
            ImageInput::Rgb8 { width, height, .. } => format!("RGB buffer {width}x{height}"),
        }
    }
}

/// Where the time of a description went, in milliseconds. In a batch every image reports the
/// batch's times, except `tokens` and `decode_ms`, which are the image's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Decoding and preprocessing the image(s).
    pub preprocess_ms: f64,
    /// The image encoder.
    pub encoder_ms: f64,
    /// The projector.
    pub projector_ms: f64,
    /// The decoder over the image prefix and the BOS (with the BOS's embedding).
    pub prefill_ms: f64,
    /// The decoder steps after the prefill (each with its token embedding).
    pub decode_ms: f64,
    /// The whole call.
    pub total_ms: f64,
    /// Tokens generated.
    pub tokens: usize,
    /// Decoder runs for this description: the prefill and each step after it (a step that
    /// feeds several forced tokens at once counts once; under beam search, the batch's steps,
    /// which every image's beams take together).
    #[serde(default)]
    pub decoder_runs: usize,
    /// Decoder runs of the batch (the prefill included) that computed the logits of the tokens
    /// the caption schema allowed only, not the whole vocabulary's (constrained decoding, with
    /// a bundle whose decoder takes the list; see the module documentation).
    #[serde(default)]
    pub listed_runs: usize,
    /// Each decoder step after the prefill, in order (under beam search, the batch's).
    #[serde(skip)]
    pub step_ms: Vec<f64>,
}

/// A generated description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Description {
    /// The text, special tokens removed; cut before the first stop string (and the white space
    /// before it) when one was generated.
    pub text: String,
    /// The attributes read from the text with the bundle's caption schema: every field of
    /// the template, `None` where the text yields no known value (see [`crate::attributes`]).
    /// `None` when the bundle has no schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<BTreeMap<String, Option<Attribute>>>,
    /// Why generation ended: [`Finish::Length`] says the token limit cut the text, which then
    /// often lacks the schema's later fields.
    pub finish: Finish,
    /// The generated tokens, the final `</s>` included when one was generated.
    pub token_ids: Vec<u32>,
    /// Log-probability of each generated token (see [`crate::generate`]).
    pub logprobs: Vec<f32>,
    /// Where the time went.
    pub timings: Timings,
    /// The image embedding the encoder computed for this description (`projection_dim`
    /// floats, as the model gives it; [`Norm::apply`] scales it to unit length): what
    /// [`Moda::embed_batch`] returns for the same batch of images, without running the
    /// encoder again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embedding: Vec<f32>,
}

/// A token as it is generated, for streaming.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent<'a> {
    /// Which image of the batch (0 for [`Moda::describe`]).
    pub image: usize,
    /// The token's index in its description.
    pub index: usize,
    /// The token id.
    pub token_id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The text this token adds to the description (may be empty, e.g. for `</s>` or for the
    /// first bytes of a character split across tokens). The pieces add up to the final text,
    /// except that a character still incomplete when generation ends (a U+FFFD at the end of
    /// the final text) is never passed.
    pub text: &'a str,
}

/// The names of one graph's inputs and outputs, from the manifest.
#[derive(Debug, Clone)]
struct Io {
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Whether the graph lists [`HEAD_IDS`] among its optional inputs (decoders exported
    /// with it).
    head_ids: bool,
}

impl Io {
    fn of(g: &GraphInfo) -> Self {
        Self {
            inputs: g.inputs.iter().map(|t| t.name.clone()).collect(),
            outputs: g.outputs.iter().map(|t| t.name.clone()).collect(),
            head_ids: g.optional_inputs.iter().any(|t| t.name == HEAD_IDS),
        }
    }
}

/// The most images one call of [`Moda::describe_batch`] or [`Moda::embed_batch`] takes: a
/// batch holds every image's pixels (600 kB each at 224 px) and cache at once, so a larger
/// list is split by the caller (catalog jobs run it in batches).
pub const MAX_BATCH: usize = 1024;

/// Refuses a batch larger than [`MAX_BATCH`].
fn check_batch(n: usize) -> Result<()> {
    if n > MAX_BATCH {
        return Err(Error::InvalidArgument(format!(
            "{n} images in one batch; at most {MAX_BATCH} (split the list)"
        )));
    }
    Ok(())
}

/// Expected shapes of a graph's inputs or outputs: a number per fixed dimension, `None` for
/// a dynamic one.
type Shapes = Vec<Vec<Option<usize>>>;

/// One set of sessions: each graph once (the text side absent when the model was opened
/// with [`OpenOptions::embeddings_only`]).
struct Worker {
    encoder: Session,
    projector: Session,
    text: Option<TextSessions>,
}

/// The sessions that write text: the token embedding and the decoder.
struct TextSessions {
    embed: Session,
    decoder: Session,
}

impl Worker {
    /// The text side, or the error a model opened for embeddings gives when asked to write.
    fn text(&mut self) -> Result<&mut TextSessions> {
        self.text.as_mut().ok_or_else(embeddings_only_error)
    }
}

/// What describing with a model opened for embeddings only gives.
fn embeddings_only_error() -> Error {
    Error::InvalidArgument(
        "the model was opened for embeddings only (its encoder and projector alone); open it \
         without that option to describe images"
            .to_string(),
    )
}

struct PoolState {
    idle: Vec<Worker>,
    live: usize,
}

/// An opened bundle, ready to describe and embed images. See the module documentation for
/// threads and memory.
pub struct Moda {
    dir: PathBuf,
    manifest: Manifest,
    /// `None` for a model opened for embeddings only (which never reads text).
    tokenizer: Option<ModaTokenizer>,
    processor: ImageProcessor,
    options: OpenOptions,
    session_options: SessionOptions,
    encoder_io: Io,
    projector_io: Io,
    embed_io: Io,
    decoder_io: Io,
    pool: Mutex<PoolState>,
    returned: Condvar,
    /// The caption schema compiled for constrained decoding when the bundle was opened
    /// (`None` without a schema); a schema that cannot be compiled is reported when a
    /// description asks for the constraint.
    constraint: Option<std::result::Result<Constraint, ConstraintError>>,
    /// Session sets built so far (names each set's profile files apart).
    built: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Moda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moda")
            .field("dir", &self.dir)
            .field("quantization", &self.manifest.quantization)
            .finish_non_exhaustive()
    }
}

/// What building a session set reads of an opened bundle, borrowed: [`Moda::open`] builds
/// the first set from it before the `Moda` exists (while the tokenizer loads beside it), and
/// later sets come from the `Moda`'s own fields ([`Moda::graph_set`]).
struct GraphSet<'a> {
    dir: &'a Path,
    manifest: &'a Manifest,
    options: &'a OpenOptions,
    session_options: &'a SessionOptions,
    encoder_io: &'a Io,
    projector_io: &'a Io,
    embed_io: &'a Io,
    decoder_io: &'a Io,
    /// Session sets built so far (names each set's profile files apart).
    built: &'a std::sync::atomic::AtomicUsize,
}

impl GraphSet<'_> {
    /// A session for the graph `graph`. With `verify_checksums` the graph's file and its
    /// external data file (if it has one) are read once, their SHA-256 compared with the
    /// manifest's, and ONNX Runtime given those very bytes: what runs is what was checked (a
    /// file swapped after the check is not read again), and a graph that names external data
    /// other than its own listed file, which no checksum covers, is refused. Otherwise ONNX
    /// Runtime reads the files itself: it maps the external data into memory instead of
    /// copying the weights, and needs no second copy of the graph while the session is built.
    fn load_graph(&self, graph: &GraphInfo, options: &SessionOptions) -> Result<Session> {
        let path = self.dir.join(&graph.file);
        if !self.options.verify_checksums {
            return Ok(session_from_file(&path, options)?);
        }
        let bytes = self.read_checked(&graph.file)?;
        let data = match &graph.data {
            Some(name) => Some((name.as_str(), Arc::<[u8]>::from(self.read_checked(name)?))),
            None => None,
        };
        session_from_bytes(&path, &bytes, data, options).map_err(|e| {
            let msg = e.to_string();
            if msg.to_lowercase().contains("external data") {
                Error::bundle(
                    &path,
                    format!(
                        "{msg} (with checksums verified a graph's weights must be in the graph \
                         or in the external data file the manifest lists for it, which its \
                         checksum covers)"
                    ),
                )
            } else {
                e.into()
            }
        })
    }

    /// The bundle file `file`, read whole and checked against the manifest's SHA-256.
    fn read_checked(&self, file: &str) -> Result<Vec<u8>> {
        let path = self.dir.join(file);
        let info = self.manifest.files.get(file).ok_or_else(|| {
            Error::bundle(
                &path,
                "is not listed in the manifest's files, so it has no checksum",
            )
        })?;
        let bytes = moda_models::files::read_bounded(&path, info.bytes)
            .map_err(|e| Error::bundle(&path, e.to_string()))?;
        let got = moda_models::files::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if got != info.sha256 {
            return Err(Error::bundle(
                &path,
                format!("SHA-256 {got} differs from the manifest's {}", info.sha256),
            ));
        }
        Ok(bytes)
    }

    fn build_worker(&self) -> Result<Worker> {
        let set = self
            .built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let open = |role: Role| -> Result<Session> {
            let g = self
                .manifest
                .graph(role)
                .map_err(|e| Error::bundle(self.dir, e))?;
            // Only the decoder, run once per token, keeps its threads spinning between runs.
            let options = SessionOptions {
                no_spinning: role != Role::Decoder,
                profile_prefix: self
                    .options
                    .profile_dir
                    .as_ref()
                    .map(|d| d.join(format!("{}-{set}", role.name()))),
                ..self.session_options.clone()
            };
            self.load_graph(g, &options)
        };
        // Building a session (ONNX Runtime's optimizer, packing the weights) runs mostly on one
        // core: the decoder and the projector each on a thread of their own while this one
        // builds the encoder and the token embedding. The two large graphs start at once, and
        // the small projector goes to whichever core is free first instead of waiting behind
        // the encoder (in int4 bundles the encoder and the decoder take about as long).
        let joined = |r: std::thread::Result<Result<Session>>, role: Role| {
            r.unwrap_or_else(|_| {
                Err(Error::Internal(format!(
                    "building the {role} session panicked"
                )))
            })
        };
        let text = !self.options.embeddings_only;
        let (decoder, projector, others) = std::thread::scope(|scope| {
            let decoder = text.then(|| scope.spawn(|| open(Role::Decoder)));
            let projector = scope.spawn(|| open(Role::Projector));
            let others = open(Role::Encoder).and_then(|e| {
                let embed = text.then(|| open(Role::EmbedTokens)).transpose()?;
                Ok((e, embed))
            });
            (
                decoder.map(|d| joined(d.join(), Role::Decoder)).transpose(),
                joined(projector.join(), Role::Projector),
                others,
            )
        });
        // One graph's error is reported when several fail: the decoder's first, then the
        // encoder's, the token embedding's and the projector's.
        let decoder = decoder?;
        let (encoder, embed) = others?;
        let projector = projector?;
        let worker = Worker {
            encoder,
            projector,
            text: embed
                .zip(decoder)
                .map(|(embed, decoder)| TextSessions { embed, decoder }),
        };
        self.check_graph_shapes(&worker)?;
        if let Some(text) = &worker.text {
            self.check_decoder_metadata(&text.decoder)?;
        }
        Ok(worker)
    }

    /// Compares every graph's inputs and outputs, as ONNX Runtime reads them from the graph
    /// files, with the shapes the manifest's dimensions imply; a bundle whose `moda.json`
    /// disagrees with its graphs is refused here instead of failing (or, worse, running on
    /// wrong numbers) later. Dimensions a graph leaves dynamic are checked on every run.
    fn check_graph_shapes(&self, w: &Worker) -> Result<()> {
        let d = self.manifest.model;
        let (c, s, p, e) = (
            Some(d.num_channels),
            Some(d.image_size),
            Some(d.projection_dim),
            Some(d.embed_dim),
        );
        let cache = vec![None, Some(d.num_heads), None, Some(d.head_dim)];
        let mut decoder_in = vec![vec![None, None, e], vec![None, None]];
        let mut decoder_out = vec![vec![None, None, Some(d.vocab_size)]];
        for _ in 0..2 * d.num_layers {
            decoder_in.push(cache.clone());
            decoder_out.push(cache.clone());
        }
        let mut checks: Vec<(Role, &Session, &Io, Shapes, Shapes)> = vec![
            (
                Role::Encoder,
                &w.encoder,
                self.encoder_io,
                vec![vec![None, c, s, s]],
                vec![vec![None, p]],
            ),
            (
                Role::Projector,
                &w.projector,
                self.projector_io,
                vec![vec![None, p]],
                vec![vec![None, Some(d.prefix_len), e]],
            ),
        ];
        if let Some(t) = &w.text {
            checks.push((
                Role::EmbedTokens,
                &t.embed,
                self.embed_io,
                vec![vec![None, None]],
                vec![vec![None, None, e]],
            ));
            checks.push((
                Role::Decoder,
                &t.decoder,
                self.decoder_io,
                decoder_in,
                decoder_out,
            ));
        }
        for (role, session, io, ins, outs) in checks {
            let graph = self
                .manifest
                .graph(role)
                .map_err(|e| Error::bundle(self.dir, e))?;
            let file = self.dir.join(&graph.file);
            let sides = [
                ("input", session.inputs(), &io.inputs, ins),
                ("output", session.outputs(), &io.outputs, outs),
            ];
            for (side, outlets, names, expected) in sides {
                if outlets.len() != names.len() {
                    return Err(Error::bundle(
                        &file,
                        format!(
                            "the {role} graph has {} {side}s, the manifest lists {} (is \
                             \"model\".\"num_layers\" right?)",
                            outlets.len(),
                            names.len()
                        ),
                    ));
                }
                for (name, want) in names.iter().zip(expected) {
                    let outlet = outlets.iter().find(|o| o.name() == name).ok_or_else(|| {
                        Error::bundle(
                            &file,
                            format!(
                                "the manifest names a {role} {side} {name:?} that the graph \
                                 does not have"
                            ),
                        )
                    })?;
                    let got: Vec<i64> = outlet
                        .dtype()
                        .tensor_shape()
                        .map(|s| s.iter().copied().collect())
                        .unwrap_or_default();
                    let fits = got.len() == want.len()
                        && got
                            .iter()
                            .zip(&want)
                            .all(|(&g, w)| g < 0 || w.is_none_or(|w| g as u64 == w as u64));
                    if !fits {
                        let show = |v: Vec<String>| format!("[{}]", v.join(", "));
                        return Err(Error::bundle(
                            &file,
                            format!(
                                "the graph's {role} {side} {name:?} has shape {}, but the \
                                 manifest's \"model\" dimensions make it {}",
                                show(
                                    got.iter()
                                        .map(|&g| if g < 0 { "?".into() } else { g.to_string() })
                                        .collect()
                                ),
                                show(
                                    want.iter()
                                        .map(|w| w.map_or("?".into(), |w| w.to_string()))
                                        .collect()
                                )
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Compares the manifest with what the decoder graph says of itself: `max_positions`
    /// with the positions its table holds ([`MAX_POSITIONS_METADATA`]; more would fail
    /// mid-job, in the middle of a long description, as an out-of-range lookup inside the
    /// graph), `vocab_size` with the tokens its LM head scores ([`VOCAB_SIZE_METADATA`]), and
    /// an optional [`HEAD_IDS`] input that the manifest lists with the graph's inputs that
    /// have defaults. A graph without an entry (older bundles) is not checked on it.
    fn check_decoder_metadata(&self, decoder: &Session) -> Result<()> {
        let file = self
            .manifest
            .graph(Role::Decoder)
            .map(|g| self.dir.join(&g.file))
            .map_err(|e| Error::bundle(self.dir, e))?;
        if self.decoder_io.head_ids
            && !decoder
                .overridable_initializers()
                .iter()
                .any(|o| o.name() == HEAD_IDS)
        {
            return Err(Error::bundle(
                &file,
                format!(
                    "the manifest lists an optional decoder input {HEAD_IDS:?} that the graph \
                     does not have"
                ),
            ));
        }
        let meta = decoder
            .metadata()
            .map_err(|e| Error::bundle(&file, format!("cannot read its metadata: {e}")))?;
        let number = |key: &str| -> Result<Option<usize>> {
            let Some(value) = meta.custom(key) else {
                return Ok(None);
            };
            value.trim().parse().map(Some).map_err(|_| {
                Error::bundle(
                    &file,
                    format!("its {key} metadata is {value:?}, not a number"),
                )
            })
        };
        let d = self.manifest.model;
        if let Some(table) = number(MAX_POSITIONS_METADATA)? {
            if d.max_positions > table {
                return Err(Error::bundle(
                    &file,
                    format!(
                        "the manifest's \"model\".\"max_positions\" is {}, but the decoder's \
                         position table holds {table} positions",
                        d.max_positions
                    ),
                ));
            }
        }
        if let Some(vocab) = number(VOCAB_SIZE_METADATA)? {
            if d.vocab_size != vocab {
                return Err(Error::bundle(
                    &file,
                    format!(
                        "the decoder's LM head scores {vocab} tokens, but the manifest's \
                         \"model\" dimensions make it {} (\"vocab_size\")",
                        d.vocab_size
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Reads and checks `moda.json` in `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(Error::bundle(
            dir,
            "no such directory (make one with `exporter onnx --checkpoint CKPT --out DIR`)",
        ));
    }
    let path = dir.join(MANIFEST_FILE);
    let text = moda_models::files::read_text_bounded(&path, MANIFEST_MAX_BYTES).map_err(|e| {
        Error::bundle(
            &path,
            format!("cannot read the manifest ({e}); is this a bundle written by `exporter onnx`?"),
        )
    })?;
    crate::manifest::parse(text.as_bytes()).map_err(|e| Error::bundle(&path, e))
}

/// The names of `role`'s inputs and outputs; [`Manifest::validate`] has checked that they
/// are the ones [`Role::input_names`] and [`Role::output_names`] give.
fn graph_io(path: &Path, m: &Manifest, role: Role) -> Result<Io> {
    let g = m.graph(role).map_err(|e| Error::bundle(path, e))?;
    Ok(Io::of(g))
}

/// The largest `moda.json` read (a real one is a few kB).
const MANIFEST_MAX_BYTES: u64 = 16 << 20;

/// The cores this process may use (its CPU affinity and cgroup quota included).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The default intra-op thread count: the cores this process may use, at most 8, shared by
/// `sessions` session sets.
fn default_threads(sessions: usize) -> usize {
    (available_cores().min(8) / sessions.max(1)).max(1)
}

impl Moda {
    /// Opens the bundle in `dir`: reads and checks the manifest and the files, loads ONNX
    /// Runtime (see [`crate::runtime`]), the tokenizer and the preprocessing, and builds the
    /// first session set.
    pub fn open(dir: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = read_manifest(&dir)?;
        let mpath = dir.join(MANIFEST_FILE);
        let encoder_io = graph_io(&mpath, &manifest, Role::Encoder)?;
        let projector_io = graph_io(&mpath, &manifest, Role::Projector)?;
        let embed_io = graph_io(&mpath, &manifest, Role::EmbedTokens)?;
        let decoder_io = graph_io(&mpath, &manifest, Role::Decoder)?;
        // Every file the manifest lists: inside the bundle, a regular file of its size (and
        // checksum, when asked). The graphs and the tokenizer are among them.
        for (name, info) in &manifest.files {
            let p = bundle_file(&dir, name).map_err(|e| Error::bundle(&dir, e))?;
            let role = manifest
                .role_of_file(name)
                .map(|role| format!("the {role} graph"))
                .unwrap_or_else(|| "a file the manifest lists".to_string());
            let meta =
                std::fs::metadata(&p).map_err(|e| Error::bundle(&p, format!("{role}: {e}")))?;
            if meta.len() != info.bytes {
                return Err(Error::bundle(
                    &p,
                    format!(
                        "is {} bytes, the manifest says {} (truncated or replaced?)",
                        meta.len(),
                        info.bytes
                    ),
                ));
            }
            // Graphs are checked as they are loaded, from the bytes they are loaded from (see
            // `Moda::load_graph`); every other file here.
            if options.verify_checksums && manifest.role_of_file(name).is_none() {
                let got = moda_models::files::sha256_file(&p, info.bytes)
                    .map(|d| d.hex())
                    .map_err(|e| Error::bundle(&p, e.to_string()))?;
                if got != info.sha256 {
                    return Err(Error::bundle(
                        &p,
                        format!("SHA-256 {got} differs from the manifest's {}", info.sha256),
                    ));
                }
            }
        }
        let tok_path = dir.join(&manifest.tokenizer);
        // Checked by `Manifest::validate` (its size included), so this does not fail.
        let processor = ImageProcessor::new(manifest.preprocessing.clone())
            .map_err(|e| Error::bundle(&mpath, e.to_string()))?;
        let sessions = options.sessions.max(1);
        let session_options = SessionOptions {
            intra_threads: Some(
                options
                    .intra_threads
                    .unwrap_or_else(|| default_threads(sessions))
                    .clamp(1, available_cores()),
            ),
            disable_optimizations: !options.optimize,
            optimized_model_path: None,
            no_spinning: false,
            profile_prefix: None,
        };
        let options = OpenOptions {
            sessions,
            ..options.clone()
        };
        let built = std::sync::atomic::AtomicUsize::new(0);
        // The first session set is built while the tokenizer loads and, for a bundle with a
        // caption schema (decoded under its constraint by default), the constraint compiles:
        // both read the tokenizer's whole vocabulary (OPT's has 50k tokens), which would
        // otherwise come before the sessions or with the first description.
        let (first, loaded) = std::thread::scope(|scope| {
            let loading = scope.spawn(|| {
                // Embeddings need no text: the tokenizer (tokenizer.json's size was checked
                // above, and its checksum when asked) is not parsed.
                if options.embeddings_only {
                    return Ok((None, None));
                }
                let tokenizer = ModaTokenizer::from_tokenizer_json(&tok_path)
                    .map_err(|e| Error::bundle(&tok_path, e.to_string()))?;
                let eos = manifest.special_tokens.eos;
                let constraint = manifest
                    .schema
                    .as_ref()
                    .map(|schema| Constraint::new(schema, &tokenizer, eos));
                Ok::<_, Error>((Some(tokenizer), constraint))
            });
            let first = GraphSet {
                dir: &dir,
                manifest: &manifest,
                options: &options,
                session_options: &session_options,
                encoder_io: &encoder_io,
                projector_io: &projector_io,
                embed_io: &embed_io,
                decoder_io: &decoder_io,
                built: &built,
            }
            .build_worker();
            let loaded = loading.join().unwrap_or_else(|_| {
                Err(Error::Internal(
                    "loading the tokenizer panicked".to_string(),
                ))
            });
            (first, loaded)
        });
        // A tokenizer that cannot be loaded is reported first, as when it was loaded first.
        let (tokenizer, constraint) = loaded?;
        let first = first?;
        let moda = Self {
            dir,
            manifest,
            tokenizer,
            processor,
            options,
            session_options,
            encoder_io,
            projector_io,
            embed_io,
            decoder_io,
            pool: Mutex::new(PoolState {
                idle: Vec::new(),
                live: 1,
            }),
            returned: Condvar::new(),
            constraint,
            built,
        };
        moda.lock_pool().idle.push(first);
        Ok(moda)
    }

    /// The bundle's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bundle's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The tokenizer; an error for a model opened for embeddings only, which does not load
    /// it.
    pub fn tokenizer(&self) -> Result<&ModaTokenizer> {
        self.tokenizer.as_ref().ok_or_else(embeddings_only_error)
    }

    /// The limits decoded images are held to.
    pub fn image_limits(&self) -> &ImageLimits {
        &self.options.image_limits
    }

    /// The intra-op thread count each session uses.
    pub fn intra_threads(&self) -> usize {
        self.session_options.intra_threads.unwrap_or(1)
    }

    /// Ends the profiles that [`OpenOptions::profile_dir`] started, in every idle session set,
    /// and returns each graph's role and the file ONNX Runtime wrote. Empty without
    /// `profile_dir`; a set in use by another thread is left recording.
    pub fn end_profiling(&self) -> Result<Vec<(Role, PathBuf)>> {
        if self.options.profile_dir.is_none() {
            return Ok(Vec::new());
        }
        let mut files = Vec::new();
        let mut st = self.lock_pool();
        for w in st.idle.iter_mut() {
            let mut sessions = vec![
                (Role::Encoder, &mut w.encoder),
                (Role::Projector, &mut w.projector),
            ];
            if let Some(t) = &mut w.text {
                sessions.push((Role::EmbedTokens, &mut t.embed));
                sessions.push((Role::Decoder, &mut t.decoder));
            }
            for (role, session) in sessions {
                let file = session.end_profiling().map_err(|e| {
                    Error::Internal(format!("ending the {role} graph's profile: {e}"))
                })?;
                files.push((role, PathBuf::from(file)));
            }
        }
        Ok(files)
    }

    /// Builds a session set (see [`GraphSet::build_worker`]).
    fn build_worker(&self) -> Result<Worker> {
        self.graph_set().build_worker()
    }

    /// The parts of this bundle that building a session set reads.
    fn graph_set(&self) -> GraphSet<'_> {
        GraphSet {
            dir: &self.dir,
            manifest: &self.manifest,
            options: &self.options,
            session_options: &self.session_options,
            encoder_io: &self.encoder_io,
            projector_io: &self.projector_io,
            embed_io: &self.embed_io,
            decoder_io: &self.decoder_io,
            built: &self.built,
        }
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves the state consistent (a push or a pop).
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes an idle session set, making one if fewer than `sessions` exist, else waits.
    fn checkout(&self) -> Result<WorkerGuard<'_>> {
        let mut st = self.lock_pool();
        loop {
            if let Some(w) = st.idle.pop() {
                return Ok(WorkerGuard {
                    moda: self,
                    worker: Some(w),
                });
            }
            if st.live < self.options.sessions {
                st.live += 1;
                drop(st);
                return match self.build_worker() {
                    Ok(w) => Ok(WorkerGuard {
                        moda: self,
                        worker: Some(w),
                    }),
                    Err(e) => {
                        self.lock_pool().live -= 1;
                        self.returned.notify_one();
                        Err(e)
                    }
                };
            }
            st = self.returned.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Decodes and preprocesses one image into `pixel_values` (`3 * size * size` floats).
    pub fn pixel_values(&self, image: &ImageInput<'_>) -> Result<Vec<f32>> {
        let limits = &self.options.image_limits;
        let name = image.name();
        let to_err = |e: moda_models::Error| Error::Image {
            source_name: name.clone(),
            msg: strip_name(&e.to_string(), &name),
        };
        let img = match image {
            ImageInput::Path(p) => load_image(p, limits).map_err(to_err)?,
            ImageInput::Bytes { bytes, name } => {
                decode_image(bytes, name, limits).map_err(to_err)?
            }
            ImageInput::Rgb8 {
                data,
                width,
                height,
            } => {
                // The caller's pixels are read in place, never copied; they still count
                // against the image limits as a decoded image would.
                check_rgb8(data, *width, *height, limits).map_err(|msg| Error::Image {
                    source_name: name.clone(),
                    msg,
                })?;
                return self
                    .processor
                    .preprocess_rgb8(data, *width, *height)
                    .map_err(to_err);
            }
        };
        self.processor.preprocess(&img).map_err(to_err)
    }

    /// The image embedding (`projection_dim` floats, 512 for FashionCLIP), as the model gives
    /// it or scaled to unit length ([`Norm`]).
    pub fn embed(&self, image: &ImageInput<'_>, norm: Norm) -> Result<Vec<f32>> {
        let mut all = self.embed_batch(std::slice::from_ref(image), norm)?;
        all.pop()
            .unwrap_or_else(|| Err(Error::Internal("no embedding returned".into())))
    }

    /// Embeddings of many images, run through the encoder as one batch; an image that cannot
    /// be read gets its own error and the others go on.
    pub fn embed_batch(
        &self,
        images: &[ImageInput<'_>],
        norm: Norm,
    ) -> Result<Vec<Result<Vec<f32>>>> {
        check_batch(images.len())?;
        let (pixels, slots) = self.preprocess_all(images);
        if pixels.is_empty() {
            return Ok(slots.into_iter().map(|s| Err(s.unwrap_err_or())).collect());
        }
        let mut guard = self.checkout()?;
        let w = guard.worker_mut()?;
        let n = pixels.len();
        let embeds = self.run_encoder(w, pixels)?;
        let p = self.manifest.model.projection_dim;
        let mut ok = (0..n).map(|i| {
            let mut v = embeds[i * p..(i + 1) * p].to_vec();
            norm.apply(&mut v);
            v
        });
        Ok(slots
            .into_iter()
            .map(|s| match s {
                Slot::Ok => ok
                    .next()
                    .ok_or_else(|| Error::Internal("encoder returned too few embeddings".into())),
                Slot::Err(e) => Err(e),
            })
            .collect())
    }

    /// Describes one image.
    pub fn describe(
        &self,
        image: &ImageInput<'_>,
        options: &GenerationOptions,
    ) -> Result<Description> {
        self.describe_with(image, options, &mut |_| true)
    }

    /// Describes one image, calling `on_token` as each token is chosen (return `false` to stop
    /// early). With beam search the tokens are only known at the end, and `on_token` sees them
    /// then. The pieces passed include a stop string's text as it is generated; the returned
    /// description's text is cut before it.
    pub fn describe_with(
        &self,
        image: &ImageInput<'_>,
        options: &GenerationOptions,
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<Description> {
        let mut all = self.describe_batch_with(std::slice::from_ref(image), options, on_token)?;
        all.pop()
            .unwrap_or_else(|| Err(Error::Internal("no description returned".into())))
    }

    /// Describes many images as one batch through the encoder and the decoder. The results
    /// are in order; an image that cannot be read gets its own error and the others go on.
    /// Each image's description is the same as [`Moda::describe`] would give it (up to
    /// floating-point differences between batch sizes in ONNX Runtime's kernels, which do not
    /// change greedy tokens in practice).
    pub fn describe_batch(
        &self,
        images: &[ImageInput<'_>],
        options: &GenerationOptions,
    ) -> Result<Vec<Result<Description>>> {
        self.describe_batch_with(images, options, &mut |_| true)
    }

    /// [`Moda::describe_batch`] with a per-token callback (see [`Moda::describe_with`]);
    /// [`TokenEvent::image`] is the image's index in `images`.
    pub fn describe_batch_with(
        &self,
        images: &[ImageInput<'_>],
        options: &GenerationOptions,
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<Vec<Result<Description>>> {
        let t0 = Instant::now();
        // A model opened for embeddings only has no tokenizer: describing is refused here.
        let tokenizer = self.tokenizer()?;
        check_batch(images.len())?;
        let max_new = options
            .max_new_tokens
            .unwrap_or(self.manifest.generation.max_new_tokens);
        options.validate(max_new)?;
        // Stop strings: the caller's, else the bundle's.
        let resolved;
        let options = if options.stop_strings.is_none()
            && !self.manifest.generation.stop_strings.is_empty()
        {
            resolved = options
                .clone()
                .with_stop_strings(Some(self.manifest.generation.stop_strings.clone()));
            &resolved
        } else {
            options
        };
        let constraint = self.constraint_for(options.constrain)?;
        let d = self.manifest.model;
        if max_new > d.max_positions.saturating_sub(d.prefix_len) {
            return Err(Error::InvalidArgument(format!(
                "max_new_tokens {max_new} is more than this model's {} positions allow \
                 (at most {})",
                d.max_positions,
                d.max_positions.saturating_sub(d.prefix_len)
            )));
        }
        let (pixels, slots) = self.preprocess_all(images);
        let preprocess_ms = ms_since(t0);
        let n = pixels.len() / self.pixels_per_image();
        if n == 0 {
            return Ok(slots.into_iter().map(|s| Err(s.unwrap_err_or())).collect());
        }
        // Which input image each batch row is.
        let rows_to_image: Vec<usize> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Ok))
            .map(|(i, _)| i)
            .collect();
        let mut guard = self.checkout()?;
        let w = guard.worker_mut()?;
        let t = Instant::now();
        let image_embeds = self.run_encoder(w, pixels)?;
        let encoder_ms = ms_since(t);
        let t = Instant::now();
        // Each description hands back its image's embedding; the projector takes a copy.
        let prefix = self.run_projector(w, image_embeds.clone(), n)?;
        let projector_ms = ms_since(t);

        let beams = options.num_beams.max(1);
        let rows = n * beams;
        let e = self.manifest.model.embed_dim;
        // Prefill: [prefix, BOS] for every row (beams repeat their image).
        let t = Instant::now();
        let bos = self.embed_tokens(w, &vec![self.manifest.special_tokens.bos; rows])?;
        let bos_data = extract_f32(&bos, Role::EmbedTokens, &[rows, 1, e])?;
        let mut embeds = Vec::with_capacity(rows * 2 * e);
        for r in 0..rows {
            let img = r / beams;
            embeds.extend_from_slice(&prefix[img * e..(img + 1) * e]);
            embeds.extend_from_slice(&bos_data[r * e..(r + 1) * e]);
        }
        let mut state = DecodeState {
            moda: self,
            worker: w,
            past: Vec::new(),
            total: 0,
            rows,
            mask: Vec::new(),
            listed: None,
            listed_runs: 0,
        };
        // The first token is chosen among those the schema allows at its start (every beam
        // starts there too).
        if let Some(c) = constraint {
            if state.selects_logits() {
                let mut ids = c.allowed(&c.start());
                ids.sort_unstable();
                ids.dedup();
                state.only_logits_of(ids);
            }
        }
        let first = state.prefill(embeds)?;
        let prefill_ms = ms_since(t);

        let eos = self.manifest.special_tokens.eos;
        let vocab = self.manifest.model.vocab_size;
        let mut streams: Vec<TextStream> = (0..n).map(|_| TextStream::default()).collect();
        let mut sink = |row: usize, token: u32, logprob: f32| -> bool {
            let s = &mut streams[row];
            let piece = s.push(tokenizer, token);
            on_token(&TokenEvent {
                image: rows_to_image[row],
                index: s.ids.len() - 1,
                token_id: token,
                logprob,
                text: &piece,
            })
        };
        let detokenize = |ids: &[u32]| decode_text(tokenizer, ids).unwrap_or_default();
        let search = Search::new(vocab, eos, max_new)
            .with_text(&detokenize)
            .with_sink(&mut sink)
            .with_constraint(constraint);
        let generated = generate(&mut state, first, n, options, search)?;
        let listed_runs = state.listed_runs;
        drop(state);
        drop(guard);
        let total_ms = ms_since(t0);
        let mut gen = generated.into_iter();
        let p = self.manifest.model.projection_dim;
        let mut image_row = 0;
        let mut out = Vec::with_capacity(images.len());
        for s in slots {
            match s {
                Slot::Err(e) => out.push(Err(e)),
                Slot::Ok => {
                    let g = gen.next().ok_or_else(|| {
                        Error::Internal("generation returned too few rows".into())
                    })?;
                    let raw = decode_text(tokenizer, &g.token_ids)?;
                    let finish =
                        Finish::of(&g.token_ids, eos, &raw, options.stop_strings(), max_new);
                    let text = strip_stop_string(&raw, options.stop_strings());
                    let attributes =
                        self.manifest.schema.as_ref().map(|schema| {
                            read_attributes(schema, tokenizer, &text, &g, constraint)
                        });
                    let decode_ms = g.step_ms.iter().sum();
                    out.push(Ok(Description {
                        text,
                        attributes,
                        finish,
                        timings: Timings {
                            preprocess_ms,
                            encoder_ms,
                            projector_ms,
                            prefill_ms,
                            decode_ms,
                            total_ms,
                            tokens: g.token_ids.len(),
                            decoder_runs: 1 + g.step_ms.len(),
                            listed_runs,
                            step_ms: g.step_ms,
                        },
                        token_ids: g.token_ids,
                        logprobs: g.logprobs,
                        embedding: image_embeds
                            .get(image_row * p..(image_row + 1) * p)
                            .map(<[f32]>::to_vec)
                            .ok_or_else(|| {
                                Error::Internal("encoder returned too few embeddings".into())
                            })?,
                    }));
                    image_row += 1;
                }
            }
        }
        Ok(out)
    }

    /// The fields of the bundle's caption schema in template order: the keys of every
    /// description's `attributes` (empty without a schema).
    pub fn attribute_names(&self) -> Vec<String> {
        self.manifest
            .schema
            .as_ref()
            .map(|s| s.fields.iter().map(|f| f.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Checks that generation under `mode` can run on this bundle (`Constrain::Schema` needs
    /// a schema whose every field lists values), as a description would find out; a job can
    /// call it before it writes anything.
    pub fn check_constrain(&self, mode: Constrain) -> Result<()> {
        self.constraint_for(mode).map(|_| ())
    }

    /// The constraint `mode` asks for (the bundle's schema, compiled when it was opened).
    fn constraint_for(&self, mode: Constrain) -> Result<Option<&Constraint>> {
        if mode == Constrain::None {
            return Ok(None);
        }
        constrain::resolve(mode, self.constraint.as_ref())
            .map_err(|e| Error::InvalidArgument(format!("constrain=schema: {e}")))
    }

    fn pixels_per_image(&self) -> usize {
        let d = self.manifest.model;
        d.num_channels * d.image_size * d.image_size
    }

    /// Preprocesses every image; the good ones' pixels are concatenated.
    fn preprocess_all(&self, images: &[ImageInput<'_>]) -> (Vec<f32>, Vec<Slot>) {
        let mut pixels = Vec::with_capacity(images.len() * self.pixels_per_image());
        let mut slots = Vec::with_capacity(images.len());
        for img in images {
            match self.pixel_values(img) {
                Ok(p) => {
                    pixels.extend(p);
                    slots.push(Slot::Ok);
                }
                Err(e) => slots.push(Slot::Err(e)),
            }
        }
        (pixels, slots)
    }

    /// `pixel_values` -> image embeddings `[n * projection_dim]`.
    fn run_encoder(&self, w: &mut Worker, pixels: Vec<f32>) -> Result<Vec<f32>> {
        let d = self.manifest.model;
        let n = pixels.len() / self.pixels_per_image().max(1);
        let shape = [n, d.num_channels, d.image_size, d.image_size];
        let input =
            Tensor::from_array((shape, pixels)).map_err(|e| Error::run(Role::Encoder.name(), e))?;
        let out = run(
            &mut w.encoder,
            Role::Encoder,
            vec![(self.encoder_io.inputs[0].clone(), input.into())],
            &self.encoder_io.outputs[0],
        )?;
        let embeds = extract_f32(&out, Role::Encoder, &[n, d.projection_dim])?;
        check_finite(Role::Encoder, "image embeddings", &embeds)?;
        Ok(embeds)
    }

    /// Image embeddings -> prefix embeddings `[n * prefix_len * embed_dim]` (`prefix_len` is
    /// 1).
    fn run_projector(&self, w: &mut Worker, embeds: Vec<f32>, n: usize) -> Result<Vec<f32>> {
        let d = self.manifest.model;
        let input = Tensor::from_array(([n, d.projection_dim], embeds))
            .map_err(|e| Error::run(Role::Projector.name(), e))?;
        let out = run(
            &mut w.projector,
            Role::Projector,
            vec![(self.projector_io.inputs[0].clone(), input.into())],
            &self.projector_io.outputs[0],
        )?;
        extract_f32(&out, Role::Projector, &[n, d.prefix_len, d.embed_dim])
    }

    /// Token ids (one per row) -> embeddings `[rows, 1, embed_dim]`, left in ONNX Runtime's
    /// memory.
    fn embed_tokens(&self, w: &mut Worker, ids: &[u32]) -> Result<DynValue> {
        self.embed_tokens_rows(w, ids, 1)
    }

    /// The embeddings of `ids` taken as rows of `seq` tokens: `[ids.len() / seq, seq, e]`.
    fn embed_tokens_rows(&self, w: &mut Worker, ids: &[u32], seq: usize) -> Result<DynValue> {
        let rows = ids.len() / seq.max(1);
        let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let input = Tensor::from_array(([rows, seq], data))
            .map_err(|e| Error::run(Role::EmbedTokens.name(), e))?;
        let out = run(
            &mut w.text()?.embed,
            Role::EmbedTokens,
            vec![(self.embed_io.inputs[0].clone(), input.into())],
            &self.embed_io.outputs[0],
        )?;
        check_value_shape(
            &out,
            Role::EmbedTokens,
            &[rows, seq, self.manifest.model.embed_dim],
        )?;
        Ok(out)
    }
}

/// A preprocessed image or why not.
enum Slot {
    Ok,
    Err(Error),
}

impl Slot {
    fn unwrap_err_or(self) -> Error {
        match self {
            Slot::Err(e) => e,
            Slot::Ok => Error::Internal("image was not processed".into()),
        }
    }
}

/// Gives its session set back to the pool when dropped.
struct WorkerGuard<'m> {
    moda: &'m Moda,
    worker: Option<Worker>,
}

impl WorkerGuard<'_> {
    fn worker_mut(&mut self) -> Result<&mut Worker> {
        self.worker
            .as_mut()
            .ok_or_else(|| Error::Internal("session set already returned".into()))
    }
}

impl Drop for WorkerGuard<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            self.moda.lock_pool().idle.push(w);
            self.moda.returned.notify_one();
        }
    }
}

/// Runs `session` and returns the output `out`.
fn run(
    session: &mut Session,
    graph: Role,
    inputs: Vec<(String, SessionInputValue<'static>)>,
    out: &str,
) -> Result<DynValue> {
    let inputs: Vec<(Cow<'static, str>, SessionInputValue<'static>)> = inputs
        .into_iter()
        .map(|(n, v)| (Cow::Owned(n), v))
        .collect();
    let mut outputs = session
        .run(inputs)
        .map_err(|e| Error::run(graph.name(), e))?;
    outputs
        .remove(out)
        .ok_or_else(|| Error::run(graph.name(), format!("no output named {out}")))
}

/// The data of the `f32` output `v` of `graph`, which must have shape `want`.
fn extract_f32(v: &DynValue, graph: Role, want: &[usize]) -> Result<Vec<f32>> {
    let (shape, data) = v
        .try_extract_tensor::<f32>()
        .map_err(|e| Error::run(graph.name(), e))?;
    check_shape(graph, shape, want)?;
    Ok(data.to_vec())
}

/// A graph output that holds NaN or infinity means broken weights (or preprocessing that
/// overflowed): an error, never a description made of it.
fn check_finite(graph: Role, what: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::run(
            graph.name(),
            format!(
                "its {what} hold {} (at index {i}): the bundle's weights or preprocessing are \
                 broken",
                values[i]
            ),
        )),
    }
}

/// [`check_shape`] of a value left in ONNX Runtime's memory.
fn check_value_shape(v: &DynValue, graph: Role, want: &[usize]) -> Result<()> {
    match v.dtype().tensor_shape() {
        Some(shape) => check_shape(graph, shape, want),
        None => Err(Error::run(graph.name(), "an output that is not a tensor")),
    }
}

/// An output's shape must be what the manifest's dimensions say; a graph that disagrees
/// with its manifest is an error, not a silently truncated or misread tensor.
fn check_shape(graph: Role, shape: &ort::value::Shape, want: &[usize]) -> Result<()> {
    let same = shape.len() == want.len()
        && shape
            .iter()
            .zip(want)
            .all(|(&g, &w)| g >= 0 && g as u64 == w as u64);
    if same {
        Ok(())
    } else {
        Err(Error::run(
            graph.name(),
            format!("output of shape {shape:?}; the manifest's dimensions make it {want:?}"),
        ))
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The models crate prefixes image errors with the source name; the SDK's error adds it
/// again, so drop the first copy.
fn strip_name(msg: &str, name: &str) -> String {
    msg.strip_prefix(name)
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(msg)
        .to_string()
}

/// Checks decoded RGB8 pixels against the image limits: dimensions, and their bytes
/// against the allocation limit.
fn check_rgb8(
    data: &[u8],
    width: u32,
    height: u32,
    limits: &ImageLimits,
) -> std::result::Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("empty image ({width}x{height})"));
    }
    if width > limits.max_width || height > limits.max_height {
        return Err(format!(
            "{width}x{height} is larger than the limit {}x{}",
            limits.max_width, limits.max_height
        ));
    }
    let need = u64::from(width) * u64::from(height) * 3;
    if data.len() as u64 != need {
        return Err(format!(
            "buffer holds {} bytes; {width}x{height} RGB8 needs {need}",
            data.len()
        ));
    }
    if need > limits.max_alloc {
        return Err(format!(
            "{width}x{height} RGB8 is {need} bytes, more than the limit of {} bytes",
            limits.max_alloc
        ));
    }
    Ok(())
}

/// The decoder's running state for one batch.
struct DecodeState<'a> {
    moda: &'a Moda,
    worker: &'a mut Worker,
    /// `present.*` of the last run, in the decoder's input order.
    past: Vec<DynValue>,
    /// Positions so far (image prefix, BOS, generated tokens and the padding of ragged
    /// steps).
    total: usize,
    rows: usize,
    /// The attention mask of those positions, `[rows, total]`: 0 for padding.
    mask: Vec<i64>,
    /// The tokens whose logits the next run must return (sorted, unique; every token's when
    /// `None`); taken by that run.
    listed: Option<Vec<u32>>,
    /// Runs that returned listed tokens' logits only.
    listed_runs: usize,
}

impl DecodeState<'_> {
    /// Runs the decoder on `embeds` (`[rows, seq, embed_dim]`, as a value) and returns the last
    /// position's logits `[rows * vocab]`, or every position's `[rows * seq * vocab]`. With
    /// `lens`, row `r`'s positions from `lens[r]` on are padding (masked from then on).
    fn run(
        &mut self,
        embeds: SessionInputValue<'static>,
        seq: usize,
        every_position: bool,
        lens: Option<&[usize]>,
    ) -> Result<Vec<f32>> {
        let m = self.moda;
        let d = m.manifest.model;
        let io = &m.decoder_io;
        let total = self.total + seq;
        let mut mask_data = Vec::with_capacity(self.rows * total);
        for r in 0..self.rows {
            mask_data.extend_from_slice(&self.mask[r * self.total..(r + 1) * self.total]);
            let len = lens.and_then(|l| l.get(r).copied()).unwrap_or(seq);
            mask_data.extend((0..seq).map(|j| i64::from(j < len)));
        }
        let mask = Tensor::from_array(([self.rows, total], mask_data.clone()))
            .map_err(|e| Error::run(Role::Decoder.name(), e))?;
        let mut inputs: Vec<(Cow<'static, str>, SessionInputValue<'static>)> =
            Vec::with_capacity(io.inputs.len());
        inputs.push((Cow::Owned(io.inputs[0].clone()), embeds));
        inputs.push((Cow::Owned(io.inputs[1].clone()), mask.into()));
        if self.past.is_empty() {
            for name in &io.inputs[2..] {
                let empty = Tensor::from_array((
                    [self.rows, d.num_heads, 0, d.head_dim],
                    Vec::<f32>::new(),
                ))
                .map_err(|e| Error::run(Role::Decoder.name(), e))?;
                inputs.push((Cow::Owned(name.clone()), empty.into()));
            }
        } else {
            for (name, v) in io.inputs[2..].iter().zip(self.past.drain(..)) {
                inputs.push((Cow::Owned(name.clone()), v.into()));
            }
        }
        // The listed tokens, when the graph takes them and the list is short enough to gain:
        // past an eighth of the vocabulary, gathering the rows costs about what the whole
        // product does.
        let listed = self
            .listed
            .take()
            .filter(|ids| io.head_ids && m.options.listed_logits && ids.len() * 8 <= d.vocab_size);
        if let Some(ids) = &listed {
            self.listed_runs += 1;
            let ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
            let t = Tensor::from_array(([ids.len()], ids))
                .map_err(|e| Error::run(Role::Decoder.name(), e))?;
            inputs.push((Cow::Borrowed(HEAD_IDS), t.into()));
        }
        let mut outputs = self
            .worker
            .text()?
            .decoder
            .run(inputs)
            .map_err(|e| Error::run(Role::Decoder.name(), e))?;
        let mut past = Vec::with_capacity(io.outputs.len() - 1);
        let cache_shape = [self.rows, d.num_heads, total, d.head_dim];
        for name in &io.outputs[1..] {
            let v = outputs.remove(name.as_str()).ok_or_else(|| {
                Error::run(Role::Decoder.name(), format!("no output named {name}"))
            })?;
            check_value_shape(&v, Role::Decoder, &cache_shape)?;
            past.push(v);
        }
        let logits = outputs
            .remove(io.outputs[0].as_str())
            .ok_or_else(|| Error::run(Role::Decoder.name(), "no logits output"))?;
        drop(outputs);
        self.past = past;
        self.total = total;
        self.mask = mask_data;
        let (shape, data) = logits
            .try_extract_tensor::<f32>()
            .map_err(|e| Error::run(Role::Decoder.name(), e))?;
        let v = d.vocab_size;
        // The columns: every token's, or the listed tokens'.
        let width = listed.as_ref().map_or(v, Vec::len);
        if shape.len() != 3 || shape[0] as usize != self.rows || shape[2] as usize != width {
            return Err(Error::run(
                Role::Decoder.name(),
                format!(
                    "logits have shape {shape:?}, expected [{}, seq, {width}]",
                    self.rows
                ),
            ));
        }
        if shape[1] < 1
            || data.len() as u64 != (self.rows as u64) * (shape[1] as u64) * width as u64
        {
            return Err(Error::run(
                Role::Decoder.name(),
                format!("logits have shape {shape:?}, with no position to read"),
            ));
        }
        let s = shape[1] as usize;
        if every_position && s != seq {
            return Err(Error::run(
                Role::Decoder.name(),
                format!("logits have shape {shape:?}, expected {seq} positions"),
            ));
        }
        // The positions returned: every one, or each row's last.
        let positions: Vec<usize> = if every_position {
            (0..self.rows * s).collect()
        } else {
            (0..self.rows).map(|r| r * s + s - 1).collect()
        };
        let Some(ids) = listed else {
            let mut out = Vec::with_capacity(positions.len() * v);
            for p in positions {
                out.extend_from_slice(&data[p * v..(p + 1) * v]);
            }
            check_finite(Role::Decoder, "logits", &out)?;
            return Ok(out);
        };
        // Vocabulary-wide rows: the listed tokens' logits, minus infinity elsewhere.
        let mut out = vec![f32::NEG_INFINITY; positions.len() * v];
        for (row, p) in out.chunks_exact_mut(v).zip(positions) {
            let got = &data[p * width..(p + 1) * width];
            check_finite(Role::Decoder, "logits", got)?;
            for (&t, &l) in ids.iter().zip(got) {
                if let Some(x) = row.get_mut(t as usize) {
                    *x = l;
                }
            }
        }
        Ok(out)
    }

    fn prefill(&mut self, embeds: Vec<f32>) -> Result<Vec<f32>> {
        let e = self.moda.manifest.model.embed_dim;
        let t = Tensor::from_array(([self.rows, 2, e], embeds))
            .map_err(|err| Error::run(Role::Decoder.name(), err))?;
        self.run(t.into(), 2, false, None)
    }
}

impl StepModel for DecodeState<'_> {
    type Error = Error;

    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let embeds = self.moda.embed_tokens(self.worker, tokens)?;
        self.run(embeds.into(), 1, false, None)
    }

    fn step_many(&mut self, tokens: &[u32], n: usize) -> Result<Vec<f32>> {
        if n == 0 || tokens.len() != self.rows * n {
            return Err(Error::Internal(format!(
                "{} tokens for {} decoder rows of {n}",
                tokens.len(),
                self.rows
            )));
        }
        let embeds = self.moda.embed_tokens_rows(self.worker, tokens, n)?;
        self.run(embeds.into(), n, true, None)
    }

    fn ragged(&self) -> bool {
        true
    }

    fn selects_logits(&self) -> bool {
        self.moda.decoder_io.head_ids && self.moda.options.listed_logits
    }

    fn only_logits_of(&mut self, mut ids: Vec<u32>) {
        // Ids past the decoder's vocabulary have no logits (a tokenizer may be larger).
        ids.retain(|&t| (t as usize) < self.moda.manifest.model.vocab_size);
        self.listed = Some(ids);
    }

    fn step_ragged(&mut self, tokens: &[u32], n: usize, lens: &[usize]) -> Result<Vec<f32>> {
        if n == 0
            || tokens.len() != self.rows * n
            || lens.len() != self.rows
            || lens.iter().any(|&l| l == 0 || l > n)
        {
            return Err(Error::Internal(format!(
                "{} tokens for {} decoder rows of {n} (lengths {lens:?})",
                tokens.len(),
                self.rows
            )));
        }
        let embeds = self.moda.embed_tokens_rows(self.worker, tokens, n)?;
        self.run(embeds.into(), n, true, Some(lens))
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if rows.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(());
        }
        let mut out = Vec::with_capacity(self.past.len());
        for v in &self.past {
            let (shape, data) = v
                .try_extract_tensor::<f32>()
                .map_err(|e| Error::run(Role::Decoder.name(), e))?;
            let dims: Vec<usize> = shape.iter().map(|&x| x as usize).collect();
            let per_row: usize = dims[1..].iter().product();
            let mut g = Vec::with_capacity(rows.len() * per_row);
            for &r in rows {
                g.extend_from_slice(&data[r * per_row..(r + 1) * per_row]);
            }
            let mut new_dims = dims.clone();
            new_dims[0] = rows.len();
            let t = Tensor::from_array((new_dims, g))
                .map_err(|e| Error::run(Role::Decoder.name(), e))?;
            out.push(t.into_dyn());
        }
        self.past = out;
        let total = self.total;
        self.mask = rows
            .iter()
            .flat_map(|&r| self.mask[r * total..(r + 1) * total].iter().copied())
            .collect();
        Ok(())
    }
}

/// The text of generated ids, special tokens left out. Ids the tokenizer does not know are
/// skipped, as `transformers`' `decode` does: a model's embedding table is often larger than
/// its tokenizer's vocabulary (OPT-125m: 50272 rows, 50265 tokens), and those rows can be
/// generated.
fn decode_text(tok: &ModaTokenizer, ids: &[u32]) -> Result<String> {
    let known: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| tok.inner().id_to_token(id).is_some())
        .collect();
    tok.decode(&known, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Turns a growing list of token ids into text pieces whose concatenation is the decoded
/// text: a piece is emitted once the text decoded so far no longer ends in an incomplete
/// character.
#[derive(Default)]
struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    fn push(&mut self, tok: &ModaTokenizer, id: u32) -> String {
        self.ids.push(id);
        let Ok(text) = decode_text(tok, &self.ids) else {
            return String::new();
        };
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return String::new();
        }
        let piece = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        piece
    }
}
