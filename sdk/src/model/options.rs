//! [`OpenOptions`]: how [`Moda::open`] sets a model up.

use std::path::PathBuf;

use moda_models::preprocess::ImageLimits;

/// How [`Moda::open`] sets things up: start from [`OpenOptions::default`] and change what you
/// need with the `with_*` methods (or by field); new settings may be added.
///
/// [`Moda::open`]: super::Moda::open
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Threads ONNX Runtime uses inside one graph run. `None` picks the number of cores the
    /// process may use, at most 8 (a 125M-parameter decoder gains nothing from more threads
    /// per token), divided among [`OpenOptions::sessions`]. A larger number is capped at the
    /// cores the process may use ([`available_cores`]; more threads than cores only wait on
    /// each other); [`Moda::intra_threads`] tells the number used.
    ///
    /// [`available_cores`]: super::available_cores
    /// [`Moda::intra_threads`]: super::Moda::intra_threads
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
    ///
    /// [`Moda::end_profiling`]: super::Moda::end_profiling
    pub profile_dir: Option<PathBuf>,
    /// Under constrained decoding, ask the decoder for the logits of the tokens the schema
    /// allows only, where the bundle's decoder takes the list ([`HEAD_IDS`]): the LM head then
    /// reads a few dozen of its rows instead of all of them. On by default; off computes every
    /// token's logits at every step, as with bundles exported before the input existed.
    ///
    /// [`HEAD_IDS`]: crate::manifest::HEAD_IDS
    pub listed_logits: bool,
    /// Build only what embeddings need: the encoder's and the projector's sessions, not the
    /// decoder's or the token embedding's, no tokenizer and no caption constraint. Opening
    /// takes about half the time and memory; describing (and [`Moda::tokenizer`]) is then an
    /// error. Off by default.
    ///
    /// [`Moda::tokenizer`]: super::Moda::tokenizer
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
