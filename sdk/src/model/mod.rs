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
//! ## Where things are
//! This file holds [`Moda`] and its pool; `options` holds [`OpenOptions`], `sessions` opens a
//! bundle's graphs as ONNX Runtime sessions, `decode` runs the decoder with its KV cache one
//! step at a time for the search, and `outputs` runs a graph and checks what it returns.

mod decode;
mod options;
mod outputs;
mod sessions;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use moda_models::constrain::{self, Constraint, ConstraintError};
use moda_models::preprocess::{decode_image, load_image, ImageLimits, ImageProcessor};
use moda_models::tokenizer::ModaTokenizer;
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use serde::{Deserialize, Serialize};

use crate::attributes::{read_attributes, Attribute};
use crate::error::{Error, Result};
use crate::generate::{
    generate, strip_stop_string, Constrain, Finish, GenerationOptions, Search, StepModel,
};
use crate::manifest::{bundle_file, Manifest, Role, MANIFEST_FILE};
use crate::runtime::SessionOptions;

use decode::{decode_text, DecodeState, TextStream};
use outputs::{check_finite, check_value_shape, extract_f32, run};
use sessions::{default_threads, graph_io, GraphSet, Io};

pub use options::OpenOptions;
pub use sessions::{available_cores, read_manifest};

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
