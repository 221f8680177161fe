//! Text generation over a decoder that takes one token per row: greedy search, sampling and
//! beam search, with the logits processors users know from `transformers`' `generate`.
//!
//! This is the only search of the workspace: the SDK runs it over ONNX Runtime's decoder and
//! the candle model (`CaptionModel::generate`, with the `candle` feature) over its own, so that
//! both give the same tokens for the same logits. It is written against [`StepModel`] and needs no
//! candle (the SDK builds this crate without it). The processors run in `transformers`'
//! order: repetition penalty, no-repeat n-gram, minimum length (which masks `</s>`), then,
//! when sampling, temperature, top-k and top-p.
//!
//! "The sequence" of a row, for the repetition penalty and n-gram ban, is the tokens generated
//! so far (the image prefix and the BOS are not text the model wrote). The log-probability
//! reported for a token is its log-softmax under the processed logits, as `transformers`'
//! `compute_transition_scores` reports it; under greedy search with no penalties that is the
//! model's own log-probability.
//!
//! Stop strings (`transformers`' `stop_strings`): a row also stops once the text of its
//! generated tokens contains one of [`GenerationOptions::stop_strings`]. The search sees text
//! through a [`Detokenize`] function the runner gives it (the search itself knows no
//! tokenizer); under beam search a beam that reaches a stop string is finished as one that
//! generates `</s>` is. The tokens keep the one that completed the stop string; the runner cuts
//! the description's text before it with [`cut_at_stop_string`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use wide::{f32x8, CmpEq};

use crate::constrain::{Constraint, ConstraintState};

/// Why a search could not run: options out of range, or a model that returned logits of the
/// wrong size. A [`StepModel`]'s own error type converts from it, so that the search returns
/// the model's errors and its own as one type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    /// An option is out of range, or the model's logits do not have the expected size.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<GenerateError> for crate::error::Error {
    fn from(e: GenerateError) -> Self {
        match e {
            GenerateError::InvalidArgument(m) => crate::error::Error::Input(m),
        }
    }
}

type Result<T, E = GenerateError> = std::result::Result<T, E>;

/// How to generate a description. [`Default`] is greedy search with the runner's default
/// `max_new_tokens`; change what you need with the `with_*` methods (or by field). New
/// options may be added, so it cannot be built field by field outside this crate.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationOptions {
    /// Most tokens to generate after the BOS, the final `</s>` included; `None` takes the
    /// runner's default: the SDK's is the bundle's (`generation.max_new_tokens` in
    /// `moda.json`), the candle model's as many as its decoder's positions allow.
    pub max_new_tokens: Option<usize>,
    /// `</s>` is forbidden until this many tokens have been generated.
    pub min_new_tokens: usize,
    /// Beams for beam search; 1 is greedy search (or sampling).
    pub num_beams: usize,
    /// Sample from the distribution instead of taking the most likely token.
    pub do_sample: bool,
    /// Sampling temperature (> 0); 1.0 leaves the logits as they are.
    pub temperature: f32,
    /// Sample among the `top_k` most likely tokens only; 0 turns it off. Default 50, as in
    /// `transformers`.
    pub top_k: usize,
    /// Sample among the smallest set of tokens whose probability adds up to `top_p`; 1.0 turns
    /// it off.
    pub top_p: f32,
    /// Seed of the sampler. Every image gets its own generator seeded with it, so an image's
    /// description does not depend on the other images of its batch.
    pub seed: u64,
    /// Penalty on tokens already generated (> 0; 1.0 is none; `transformers`' CTRL rule:
    /// positive logits are divided by it, negative ones multiplied).
    pub repetition_penalty: f32,
    /// Forbid repeating any n-gram of this size; 0 turns it off.
    pub no_repeat_ngram_size: usize,
    /// Beam search: a finished hypothesis scores `sum(logprobs) / len^length_penalty`.
    pub length_penalty: f32,
    /// Stop a description once its text contains one of these (`transformers`'
    /// `stop_strings`); the description's text ends before the first of them. `None` takes
    /// the runner's default (the SDK's is the bundle's `generation.stop_strings`, the candle
    /// model's none); `Some` of an empty list turns them off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_strings: Option<Vec<String>>,
    /// Whether the description must fit the model's caption schema (see
    /// [`crate::constrain`]). [`Constrain::Auto`] constrains when the runner has a schema.
    pub constrain: Constrain,
}

/// Whether decoding is constrained to the caption schema: the template's literal text and,
/// in each field, one of the values the schema knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Constrain {
    /// Constrained when the model has a schema whose every field lists values; free
    /// otherwise.
    #[default]
    Auto,
    /// Constrained; an error when the model has no schema that allows it.
    Schema,
    /// Free text: the decoder may write anything, e.g. a value the catalog never had.
    None,
}

impl Constrain {
    /// The name as the command line and the JSON write it (`auto`, `schema`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            Constrain::Auto => "auto",
            Constrain::Schema => "schema",
            Constrain::None => "none",
        }
    }
}

impl std::str::FromStr for Constrain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Constrain::Auto),
            "schema" => Ok(Constrain::Schema),
            "none" => Ok(Constrain::None),
            _ => Err(format!(
                "{s:?} is not a constraint; use auto, schema or none"
            )),
        }
    }
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            min_new_tokens: 0,
            num_beams: 1,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            seed: 0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            length_penalty: 1.0,
            stop_strings: None,
            constrain: Constrain::Auto,
        }
    }
}

impl GenerationOptions {
    /// [`GenerationOptions::max_new_tokens`].
    pub fn with_max_new_tokens(mut self, max_new_tokens: Option<usize>) -> Self {
        self.max_new_tokens = max_new_tokens;
        self
    }

    /// [`GenerationOptions::min_new_tokens`].
    pub fn with_min_new_tokens(mut self, min_new_tokens: usize) -> Self {
        self.min_new_tokens = min_new_tokens;
        self
    }

    /// [`GenerationOptions::num_beams`].
    pub fn with_num_beams(mut self, num_beams: usize) -> Self {
        self.num_beams = num_beams;
        self
    }

    /// [`GenerationOptions::do_sample`].
    pub fn with_do_sample(mut self, do_sample: bool) -> Self {
        self.do_sample = do_sample;
        self
    }

    /// [`GenerationOptions::temperature`].
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// [`GenerationOptions::top_k`].
    pub fn with_top_k(mut self, top_k: usize) -> Self {
        self.top_k = top_k;
        self
    }

    /// [`GenerationOptions::top_p`].
    pub fn with_top_p(mut self, top_p: f32) -> Self {
        self.top_p = top_p;
        self
    }

    /// [`GenerationOptions::seed`].
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// [`GenerationOptions::repetition_penalty`].
    pub fn with_repetition_penalty(mut self, repetition_penalty: f32) -> Self {
        self.repetition_penalty = repetition_penalty;
        self
    }

    /// [`GenerationOptions::no_repeat_ngram_size`].
    pub fn with_no_repeat_ngram_size(mut self, no_repeat_ngram_size: usize) -> Self {
        self.no_repeat_ngram_size = no_repeat_ngram_size;
        self
    }

    /// [`GenerationOptions::length_penalty`].
    pub fn with_length_penalty(mut self, length_penalty: f32) -> Self {
        self.length_penalty = length_penalty;
        self
    }

    /// [`GenerationOptions::stop_strings`].
    pub fn with_stop_strings(mut self, stop_strings: Option<Vec<String>>) -> Self {
        self.stop_strings = stop_strings;
        self
    }

    /// [`GenerationOptions::constrain`].
    pub fn with_constrain(mut self, constrain: Constrain) -> Self {
        self.constrain = constrain;
        self
    }

    /// The stop strings in effect (none when `stop_strings` is `None`: a runner resolves its
    /// default before it searches).
    pub fn stop_strings(&self) -> &[String] {
        self.stop_strings.as_deref().unwrap_or(&[])
    }

    /// Checks the ranges; `max_new_tokens` is the resolved maximum.
    pub fn validate(&self, max_new_tokens: usize) -> Result<()> {
        let bad = |m: String| Err(GenerateError::InvalidArgument(m));
        if max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if self.min_new_tokens > max_new_tokens {
            return bad(format!(
                "min_new_tokens ({}) is larger than max_new_tokens ({max_new_tokens})",
                self.min_new_tokens
            ));
        }
        if self.num_beams == 0 {
            return bad("num_beams must be at least 1".into());
        }
        if self.num_beams > 64 {
            return bad(format!("num_beams {} is more than 64", self.num_beams));
        }
        if self.num_beams > 1 && self.do_sample {
            return bad("beam sampling (num_beams > 1 with do_sample) is not supported".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature must be a positive number, not {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], not {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be a positive number, not {}",
                self.repetition_penalty
            ));
        }
        if !self.length_penalty.is_finite() {
            return bad("length_penalty must be finite".into());
        }
        let stops = self.stop_strings();
        if stops.iter().any(String::is_empty) {
            return bad("a stop string must not be empty".into());
        }
        if stops.len() > MAX_STOP_STRINGS {
            return bad(format!(
                "{} stop strings; at most {MAX_STOP_STRINGS}",
                stops.len()
            ));
        }
        Ok(())
    }
}

/// A decoder that has already seen each row's prompt (the image prefix and the BOS), and
/// keeps a KV cache per row. For beam search the rows are `images * num_beams`, each image's
/// beams next to each other; otherwise one row per image.
pub trait StepModel {
    /// The model's error; the search's own errors convert into it.
    type Error: From<GenerateError>;
    /// Feeds one token per row and returns the next logits, `[rows * vocab]`.
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Self::Error>;
    /// Feeds `n` tokens per row (`tokens` is `[rows * n]`, row by row) as one step and
    /// returns the logits after each of them, `[rows * n * vocab]` (row by row, then
    /// position). The default feeds them one [`StepModel::step`] at a time; a model that can
    /// run several positions at once should do so (constrained decoding feeds the text it
    /// forces this way).
    fn step_many(&mut self, tokens: &[u32], n: usize) -> Result<Vec<f32>, Self::Error> {
        if n == 0 || !tokens.len().is_multiple_of(n) {
            return Err(GenerateError::InvalidArgument(format!(
                "{} tokens are not rows of {n}",
                tokens.len()
            ))
            .into());
        }
        let rows = tokens.len() / n;
        if n == 1 {
            return self.step(tokens);
        }
        let mut out = Vec::new();
        let mut vocab = 0;
        for j in 0..n {
            let column: Vec<u32> = (0..rows).map(|r| tokens[r * n + j]).collect();
            let logits = self.step(&column)?;
            if j == 0 {
                vocab = logits.len() / rows.max(1);
                out = vec![0.0; rows * n * vocab];
            }
            check_len(&logits, rows, vocab)?;
            for r in 0..rows {
                let at = (r * n + j) * vocab;
                out[at..at + vocab].copy_from_slice(&logits[r * vocab..(r + 1) * vocab]);
            }
        }
        Ok(out)
    }
    /// Whether [`StepModel::step_ragged`] can feed rows of different lengths.
    fn ragged(&self) -> bool {
        false
    }
    /// Feeds row `r` the first `lens[r]` of its `n` tokens as one step (`tokens` is
    /// `[rows * n]`, each row padded at its end) and returns the logits after each position,
    /// `[rows * n * vocab]` (those after a row's padding mean nothing). The padding takes
    /// cache positions but is masked from then on: no position id, and no later token attends
    /// to it. Only for a model whose [`StepModel::ragged`] is true; the default feeds rows of
    /// equal lengths with [`StepModel::step_many`] and refuses others.
    fn step_ragged(
        &mut self,
        tokens: &[u32],
        n: usize,
        lens: &[usize],
    ) -> Result<Vec<f32>, Self::Error> {
        if lens.iter().all(|&l| l == n) {
            return self.step_many(tokens, n);
        }
        Err(GenerateError::InvalidArgument(
            "this decoder cannot feed rows of different lengths in one step".into(),
        )
        .into())
    }
    /// Whether the model can return some tokens' logits only ([`StepModel::only_logits_of`]):
    /// then a constrained search (greedy, sampling or beam) tells it, before each step, which
    /// tokens it will read.
    fn selects_logits(&self) -> bool {
        false
    }
    /// The next step's logits are read at these token ids only (sorted, without repeats):
    /// the model may return minus infinity for every other token. Called before a step when
    /// [`StepModel::selects_logits`] is true.
    fn only_logits_of(&mut self, _ids: Vec<u32>) {}
    /// Keeps cache rows `rows`, in that order (rows may repeat): beam search's reordering.
    /// `rows` has as many entries as there are rows.
    fn reorder(&mut self, rows: &[usize]) -> Result<(), Self::Error>;
}

/// What one image's search produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    /// Generated tokens, the final `</s>` included when one was generated.
    pub token_ids: Vec<u32>,
    /// Log-probability of each token.
    pub logprobs: Vec<f32>,
    /// Under a constraint, for each token the search chose (not forced), the other allowed
    /// tokens with their log-probabilities, most likely first (at most
    /// [`MAX_TOKEN_ALTERNATIVES`]); empty for forced tokens and without a constraint.
    pub alternatives: Vec<Vec<(u32, f32)>>,
    /// Under a constraint, for each token whether it was forced (the schema allowed only
    /// the text it spells, see [`Constraint::forced`]) rather than chosen; empty without a
    /// constraint.
    pub forced: Vec<bool>,
    /// Time of each decoder run after the prompt's that fed this row, in ms: one per step, one
    /// for a multi-token step. Beam search steps every image's beams together, so each image
    /// gets the batch's steps.
    pub step_ms: Vec<f64>,
}

/// The most alternatives recorded per token under a constraint.
pub const MAX_TOKEN_ALTERNATIVES: usize = 4;

/// Called with (image, token, logprob) as each token is chosen; `false` stops that image.
pub type TokenSink<'a> = &'a mut dyn FnMut(usize, u32, f32) -> bool;

/// The text of generated token ids (special tokens left out), for matching stop strings.
pub type Detokenize<'a> = &'a dyn Fn(&[u32]) -> String;

/// The most stop strings one call may give.
pub const MAX_STOP_STRINGS: usize = 64;

/// Where `text` is to be cut for its stop strings: the start of the earliest occurrence of any
/// of them, `None` when none occurs.
pub fn cut_at_stop_string(text: &str, stop_strings: &[String]) -> Option<usize> {
    stop_strings
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// `text` without its first stop string and what follows it, trailing white space removed
/// when something was cut; `text` itself when it holds none.
pub fn strip_stop_string(text: &str, stop_strings: &[String]) -> String {
    match cut_at_stop_string(text, stop_strings) {
        Some(at) => text[..at].trim_end().to_string(),
        None => text.to_string(),
    }
}

/// Why a description ended: a pipeline reads `Length` as "this text may be cut short" (its
/// caption schema's fields are then often missing) rather than as a complete description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// The model wrote `</s>`: the description is complete.
    EndOfText,
    /// The text reached one of the stop strings (and was cut before it).
    StopString,
    /// The token limit (`max_new_tokens`) was reached first: the text may be cut short.
    Length,
    /// The caller's token callback asked to stop.
    Stopped,
}

impl Finish {
    /// Why a row that generated `token_ids`, whose text is `text`, ended, under `stop_strings`
    /// and a limit of `max_new_tokens`. `</s>` is the search's only way to finish before the
    /// limit besides a stop string and the callback, so what is neither is `Stopped`. A text
    /// that reaches a stop string with its last allowed token finished on the stop string.
    pub fn of(
        token_ids: &[u32],
        eos: u32,
        text: &str,
        stop_strings: &[String],
        max_new_tokens: usize,
    ) -> Self {
        if token_ids.last() == Some(&eos) {
            Finish::EndOfText
        } else if cut_at_stop_string(text, stop_strings).is_some() {
            Finish::StopString
        } else if token_ids.len() >= max_new_tokens {
            Finish::Length
        } else {
            Finish::Stopped
        }
    }

    /// The name used in JSON, the CSV column and the C and Python APIs: `end_of_text`,
    /// `stop_string`, `length` or `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::EndOfText => "end_of_text",
            Finish::StopString => "stop_string",
            Finish::Length => "length",
            Finish::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Finish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a search needs besides its options and the model: the vocabulary and end token, the
/// resolved token limit, and what the runner provides (text for stop strings, a token sink,
/// a schema constraint).
pub struct Search<'a> {
    /// Logits per row (the model's vocabulary, possibly larger than the tokenizer's).
    pub vocab: usize,
    /// The end-of-sequence token.
    pub eos: u32,
    /// The resolved limit (`GenerationOptions::max_new_tokens` is the runner's to resolve).
    pub max_new_tokens: usize,
    /// Decodes tokens for the stop strings (required when there are any).
    pub text: Option<Detokenize<'a>>,
    /// Sees each token as it is chosen (beam search: at the end).
    pub sink: Option<TokenSink<'a>>,
    /// Constrains decoding to a caption schema (the runner resolves
    /// [`GenerationOptions::constrain`] into it).
    pub constraint: Option<&'a Constraint>,
}

impl<'a> Search<'a> {
    /// A search over `vocab` logits per row, ending at `eos`, of at most `max_new_tokens`.
    pub fn new(vocab: usize, eos: u32, max_new_tokens: usize) -> Self {
        Self {
            vocab,
            eos,
            max_new_tokens,
            text: None,
            sink: None,
            constraint: None,
        }
    }

    /// [`Search::text`].
    pub fn with_text(mut self, text: Detokenize<'a>) -> Self {
        self.text = Some(text);
        self
    }

    /// [`Search::sink`].
    pub fn with_sink(mut self, sink: TokenSink<'a>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// [`Search::constraint`].
    pub fn with_constraint(mut self, constraint: Option<&'a Constraint>) -> Self {
        self.constraint = constraint;
        self
    }

    /// Whether the text of `tokens` holds a stop string.
    fn reaches_stop(&self, opts: &GenerationOptions, tokens: &[u32]) -> bool {
        match self.text {
            Some(text) if !opts.stop_strings().is_empty() => {
                cut_at_stop_string(&text(tokens), opts.stop_strings()).is_some()
            }
            _ => false,
        }
    }
}

/// Runs the search. `first` holds the logits after the prompt, `[rows * vocab]`, where rows is
/// `images * num_beams` for beam search (each image's beams repeated) and `images` otherwise.
/// Returns one result per image.
pub fn generate<M: StepModel + ?Sized>(
    model: &mut M,
    first: Vec<f32>,
    images: usize,
    opts: &GenerationOptions,
    mut search: Search<'_>,
) -> Result<Vec<Generated>, M::Error> {
    opts.validate(search.max_new_tokens)?;
    if !opts.stop_strings().is_empty() && search.text.is_none() {
        return Err(GenerateError::InvalidArgument(
            "stop strings need the tokenizer's text of the tokens; this runner gives none".into(),
        )
        .into());
    }
    if opts.num_beams > 1 {
        let mut out = beam_search(model, first, images, opts, &search)?;
        if let Some(sink) = search.sink.as_mut() {
            for (i, g) in out.iter_mut().enumerate() {
                for (&t, &l) in g.token_ids.iter().zip(&g.logprobs) {
                    if !sink(i, t, l) {
                        break;
                    }
                }
            }
        }
        return Ok(out);
    }
    greedy_or_sample(model, first, images, opts, &mut search)
}

/// A row's logits under the constraint: `row` processed, then every token outside `allowed`
/// set to minus infinity. When processing has banned every allowed token (a penalty or the
/// minimum length against the only text the schema allows), the allowed tokens keep their
/// unprocessed logits `raw`, so that the search can still follow the schema.
fn mask_to(row: &mut [f32], allowed: &[u32], raw: &[(u32, f32)]) {
    let kept: Vec<(u32, f32)> = allowed
        .iter()
        .filter_map(|&t| row.get(t as usize).map(|&l| (t, l)))
        .collect();
    row.fill(f32::NEG_INFINITY);
    let any = kept.iter().any(|(_, l)| l.is_finite());
    for &(t, l) in if any { &kept } else { raw } {
        if let Some(x) = row.get_mut(t as usize) {
            *x = l;
        }
    }
}

/// The unprocessed logits of the allowed tokens (for [`mask_to`]'s fallback).
fn raw_of(row: &[f32], allowed: &[u32]) -> Vec<(u32, f32)> {
    allowed
        .iter()
        .filter_map(|&t| row.get(t as usize).map(|&l| (t, l)))
        .collect()
}

/// The best other tokens of a masked row after `chosen`, with their log-probabilities.
fn other_choices(row: &[f32], allowed: &[u32], chosen: u32) -> Vec<(u32, f32)> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return Vec::new();
    }
    let lse = max as f64 + sum_exp(row, max).ln();
    let mut out: Vec<(u32, f32)> = allowed
        .iter()
        .filter(|&&t| t != chosen)
        .filter_map(|&t| {
            let l = *row.get(t as usize)?;
            l.is_finite().then_some((t, (l as f64 - lse) as f32))
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out.truncate(MAX_TOKEN_ALTERNATIVES);
    out
}

/// One row of greedy search or sampling.
struct Row {
    out: Generated,
    done: bool,
    state: Option<ConstraintState>,
    /// Forced tokens not yet fed to the decoder.
    queue: std::collections::VecDeque<u32>,
    rng: ChaCha8Rng,
}

/// Greedy search or sampling, one row per image. Under a constraint the forced tokens after a
/// chosen one are fed to the decoder in the same step, and their log-probabilities are read
/// from that step's logits: every row's whole run when the model takes ragged steps
/// ([`StepModel::ragged`]), else as many tokens as every running row has.
fn greedy_or_sample<M: StepModel + ?Sized>(
    model: &mut M,
    mut logits: Vec<f32>,
    rows: usize,
    opts: &GenerationOptions,
    s: &mut Search<'_>,
) -> Result<Vec<Generated>, M::Error> {
    let (vocab, eos, max) = (s.vocab, s.eos, s.max_new_tokens);
    check_len(&logits, rows, vocab)?;
    let mut rs: Vec<Row> = (0..rows)
        .map(|_| Row {
            out: Generated::default(),
            done: false,
            state: s.constraint.map(Constraint::start),
            queue: Default::default(),
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
        })
        .collect();
    let mut scratch = Vec::with_capacity(vocab);
    let ragged = model.ragged();
    // Positions of logits per row in `logits`, and where each row's next-token logits are.
    let mut width = 1;
    let mut last = vec![0usize; rows];
    loop {
        let mut runs: Vec<Vec<u32>> = vec![Vec::new(); rows];
        for (r, row) in rs.iter_mut().enumerate() {
            if row.done {
                continue;
            }
            let at = (r * width + last[r]) * vocab;
            let lrow = &mut logits[at..at + vocab];
            let token = match row.queue.pop_front() {
                Some(t) => {
                    commit_forced(row, lrow, t, eos, opts, s, r)?;
                    t
                }
                None => choose(row, lrow, eos, opts, s, r, &mut scratch)?,
            };
            if row.done {
                continue;
            }
            if row.out.token_ids.len() >= max {
                row.done = true;
                continue;
            }
            if row.queue.is_empty() {
                if let (Some(c), Some(state)) = (s.constraint, &row.state) {
                    let room = max - row.out.token_ids.len();
                    row.queue.extend(c.forced(state).into_iter().take(room));
                }
            }
            runs[r].push(token);
            // Forced tokens go into this step, but never a forced `</s>` (it is taken from the
            // logits before it, and ends the row).
            runs[r].extend(row.queue.iter().copied().take_while(|&t| t != eos));
        }
        // A model that can feed rows of different lengths takes every row's whole run (the
        // shorter ones padded); otherwise a step feeds as many tokens as every row has.
        let active = rs.iter().zip(&runs).filter(|(row, _)| !row.done);
        let n = if ragged {
            active.map(|(_, run)| run.len()).max()
        } else {
            active.map(|(_, run)| run.len()).min()
        };
        let Some(n) = n.filter(|&n| n > 0) else {
            break;
        };
        let lens: Vec<usize> = rs
            .iter()
            .zip(&runs)
            .map(|(row, run)| if row.done { n } else { run.len().min(n) })
            .collect();
        let mut feed = Vec::with_capacity(rows * n);
        for ((row, run), &len) in rs.iter().zip(&runs).zip(&lens) {
            if !row.done {
                feed.extend_from_slice(&run[..len]);
            }
            let fed = if row.done { 0 } else { len };
            feed.extend(std::iter::repeat_n(eos, n - fed));
        }
        if let (Some(c), true) = (s.constraint, model.selects_logits()) {
            if let Some(ids) = tokens_read(c, &rs, &runs, &lens) {
                model.only_logits_of(ids);
            }
        }
        let t = std::time::Instant::now();
        logits = if n == 1 {
            model.step(&feed)?
        } else if lens.iter().all(|&l| l == n) {
            model.step_many(&feed, n)?
        } else {
            model.step_ragged(&feed, n, &lens)?
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        check_len(&logits, rows * n, vocab)?;
        width = n;
        for (r, row) in rs.iter_mut().enumerate() {
            last[r] = lens[r] - 1;
            if row.done {
                continue;
            }
            row.out.step_ms.push(ms);
            // The fed forced tokens: each one's log-probability is read from the logits of
            // the position before it.
            for j in 1..lens[r] {
                let t = row.queue.pop_front().unwrap_or(eos);
                let at = (r * n + j - 1) * vocab;
                commit_forced(row, &mut logits[at..at + vocab], t, eos, opts, s, r)?;
                if row.done {
                    break;
                }
            }
            if !row.done && row.out.token_ids.len() >= max {
                row.done = true;
            }
        }
        if rs.iter().all(|row| row.done) {
            break;
        }
    }
    Ok(rs.into_iter().map(|row| row.out).collect())
}

/// The tokens whose logits the constrained search reads after a step that feeds `runs[r][..
/// lens[r]]` to each running row: at each position fed, the tokens the schema allows after it
/// (a forced token's log-probability is read there, and the next choice at the last one).
/// Every other logit is masked before it is read. Sorted, without repeats; `None` when a
/// row's state cannot follow its run (never, for runs the search made).
fn tokens_read(c: &Constraint, rs: &[Row], runs: &[Vec<u32>], lens: &[usize]) -> Option<Vec<u32>> {
    let mut ids = Vec::new();
    for ((row, run), &len) in rs.iter().zip(runs).zip(lens) {
        if row.done {
            continue;
        }
        // The row's state already follows the run's first token (it was committed when
        // chosen); the forced tokens after it are committed after the step.
        let mut state = row.state.clone()?;
        for (j, &t) in run.iter().take(len).enumerate() {
            if j > 0 {
                state = c.advance(&state, t)?;
            }
            ids.extend(c.allowed(&state));
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

/// The tokens whose logits the constrained beam search reads after its next step: those each
/// beam's text allows next, over the images still searching (a finished image's rows are
/// carried, not read). Every other logit is masked before it is read. Sorted, without
/// repeats; `None` when a beam has no state to follow (never, for beams the search made).
fn beam_tokens_read(
    c: &Constraint,
    beams: &[Beam],
    hyps: &[Hypotheses],
    k: usize,
) -> Option<Vec<u32>> {
    let mut ids = Vec::new();
    for (i, h) in hyps.iter().enumerate() {
        if h.done {
            continue;
        }
        for beam in beams.get(i * k..(i + 1) * k)? {
            ids.extend(c.allowed(beam.state.as_ref()?));
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

/// Chooses a row's next token from its logits (processed, constrained, then greedy or
/// sampled) and commits it.
#[allow(clippy::too_many_arguments)]
fn choose<E: From<GenerateError>>(
    row: &mut Row,
    lrow: &mut [f32],
    eos: u32,
    opts: &GenerationOptions,
    s: &mut Search<'_>,
    r: usize,
    scratch: &mut Vec<(f32, usize)>,
) -> Result<u32, E> {
    let allowed = match (s.constraint, &row.state) {
        (Some(c), Some(state)) => Some(c.allowed(state)),
        _ => None,
    };
    let raw = allowed.as_ref().map(|a| raw_of(lrow, a));
    process(lrow, &row.out.token_ids, eos, opts);
    if let (Some(a), Some(raw)) = (&allowed, &raw) {
        mask_to(lrow, a, raw);
    }
    let token = if opts.do_sample {
        warp(lrow, opts, scratch);
        sample(lrow, &mut row.rng)
    } else {
        argmax(lrow)
    } as u32;
    let lp = log_softmax_at(lrow, token as usize);
    let others = match &allowed {
        Some(a) => other_choices(lrow, a, token),
        None => Vec::new(),
    };
    commit(row, token, lp, Some(others), eos, opts, s, r)?;
    Ok(token)
}

/// Commits a forced token: its log-probability under the processed, constrained logits.
#[allow(clippy::too_many_arguments)]
fn commit_forced<E: From<GenerateError>>(
    row: &mut Row,
    lrow: &mut [f32],
    token: u32,
    eos: u32,
    opts: &GenerationOptions,
    s: &mut Search<'_>,
    r: usize,
) -> Result<(), E> {
    let allowed = match (s.constraint, &row.state) {
        (Some(c), Some(state)) => c.allowed(state),
        _ => vec![token],
    };
    let raw = raw_of(lrow, &allowed);
    process(lrow, &row.out.token_ids, eos, opts);
    mask_to(lrow, &allowed, &raw);
    let lp = log_softmax_at(lrow, token as usize);
    commit(row, token, lp, None, eos, opts, s, r)
}

/// Appends a token to a row, advances its constraint state, tells the sink, and ends the row
/// at `</s>`, a stop string or the sink's word. `others` are a chosen token's alternatives,
/// `None` for a forced token.
#[allow(clippy::too_many_arguments)]
fn commit<E: From<GenerateError>>(
    row: &mut Row,
    token: u32,
    lp: f32,
    others: Option<Vec<(u32, f32)>>,
    eos: u32,
    opts: &GenerationOptions,
    s: &mut Search<'_>,
    r: usize,
) -> Result<(), E> {
    if let (Some(c), Some(state)) = (s.constraint, &row.state) {
        let next = c.advance(state, token).ok_or_else(|| {
            GenerateError::InvalidArgument(format!(
                "the constrained search produced token {token}, which the schema does not allow"
            ))
        })?;
        row.state = Some(next);
    }
    row.out.token_ids.push(token);
    row.out.logprobs.push(lp);
    if s.constraint.is_some() {
        row.out.forced.push(others.is_none());
        row.out.alternatives.push(others.unwrap_or_default());
    }
    let go_on = match s.sink.as_mut() {
        Some(sink) => sink(r, token, lp),
        None => true,
    };
    if token == eos || !go_on || s.reaches_stop(opts, &row.out.token_ids) {
        row.done = true;
        row.queue.clear();
    }
    Ok(())
}

fn check_len(logits: &[f32], rows: usize, vocab: usize) -> Result<()> {
    if logits.len() != rows * vocab {
        return Err(GenerateError::InvalidArgument(format!(
            "decoder returned {} logits, expected {rows} rows of {vocab}",
            logits.len()
        )));
    }
    Ok(())
}

/// Repetition penalty, no-repeat n-gram and minimum length, on one row.
fn process(row: &mut [f32], generated: &[u32], eos: u32, opts: &GenerationOptions) {
    let p = opts.repetition_penalty;
    if p != 1.0 {
        let mut seen = generated.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            if let Some(l) = row.get_mut(t as usize) {
                *l = if *l < 0.0 { *l * p } else { *l / p };
            }
        }
    }
    let n = opts.no_repeat_ngram_size;
    if n > 0 && generated.len() + 1 >= n {
        let prefix = &generated[generated.len() + 1 - n..];
        for start in 0..(generated.len() + 1).saturating_sub(n) {
            if &generated[start..start + n - 1] == prefix {
                if let Some(l) = row.get_mut(generated[start + n - 1] as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
    if generated.len() < opts.min_new_tokens {
        if let Some(l) = row.get_mut(eos as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Temperature, top-k and top-p, on one row (sampling only).
fn warp(row: &mut [f32], opts: &GenerationOptions, scratch: &mut Vec<(f32, usize)>) {
    if opts.temperature != 1.0 {
        for l in row.iter_mut() {
            *l /= opts.temperature;
        }
    }
    let k = opts.top_k;
    if k > 0 && k < row.len() {
        let mut sorted: Vec<f32> = row.to_vec();
        sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for l in row.iter_mut() {
            if *l < kth {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if opts.top_p < 1.0 {
        scratch.clear();
        scratch.extend(
            row.iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (l, i)),
        );
        scratch.sort_by(|a, b| b.0.total_cmp(&a.0));
        let max = scratch.first().map_or(0.0, |x| x.0);
        let total: f64 = scratch.iter().map(|x| ((x.0 - max) as f64).exp()).sum();
        let mut cum = 0.0f64;
        let mut keep = scratch.len();
        for (j, x) in scratch.iter().enumerate() {
            cum += ((x.0 - max) as f64).exp() / total;
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            if cum >= opts.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        for x in &scratch[keep..] {
            row[x.1] = f32::NEG_INFINITY;
        }
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in row.iter().enumerate() {
        if l > row[best] {
            best = i;
        }
    }
    best
}

fn sample(row: &[f32], rng: &mut ChaCha8Rng) -> usize {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(row);
    }
    // Exactly the sum of the probabilities walked below (libm's `exp`, in f64), so that the
    // walk ends inside the row.
    let total: f64 = row
        .iter()
        .filter(|&&l| l != f32::NEG_INFINITY)
        .map(|&l| ((l - max) as f64).exp())
        .sum();
    let mut u = rng.random::<f64>() * total;
    let mut last = 0;
    for (i, &l) in row.iter().enumerate() {
        if l == f32::NEG_INFINITY {
            continue;
        }
        let p = ((l - max) as f64).exp();
        if p > 0.0 {
            last = i;
            if u < p {
                return i;
            }
            u -= p;
        }
    }
    last
}

/// `log_softmax(row)[i]`.
fn log_softmax_at(row: &[f32], i: usize) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f32::NEG_INFINITY;
    }
    ((row[i] - max) as f64 - sum_exp(row, max).ln()) as f32
}

/// `sum(exp(row - max))` for `max` the row's largest value, as the log-softmax of a token's
/// log-probability needs it: one per generated token, over the whole vocabulary (OPT's 50,272
/// entries). The exponentials are taken eight at a time in f32 (`wide`'s `exp`, within 2e-7
/// of libm's, relative: a log-probability moves by about 1e-7) and summed in f64 per lane,
/// several times faster than one libm `exp` per entry. Minus infinity (a masked token) adds
/// 0, and eight masked tokens in a row are skipped without their `exp` (a constrained row is
/// masked but for a few dozen tokens). Values under about 1e-38 flush to 0, which a sum of at
/// least 1 (the largest entry's) cannot tell. A NaN logit makes the sum NaN.
fn sum_exp(row: &[f32], max: f32) -> f64 {
    const LANES: usize = 8;
    let m = f32x8::splat(max);
    let masked = f32x8::splat(f32::NEG_INFINITY);
    let chunks = row.chunks_exact(LANES);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum();
    let mut lanes = [0f64; LANES];
    let mut nan = false;
    for c in chunks {
        let x = f32x8::from(<[f32; LANES]>::try_from(c).unwrap_or_default());
        if x.cmp_eq(masked).all() {
            continue;
        }
        nan |= x.is_nan().any();
        for (sum, e) in lanes.iter_mut().zip((x - m).exp().to_array()) {
            *sum += f64::from(e);
        }
    }
    if nan {
        return f64::NAN;
    }
    lanes.iter().sum::<f64>() + tail
}

fn log_softmax(row: &[f32], out: &mut Vec<f32>) {
    out.clear();
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + sum_exp(row, max).ln();
    out.extend(row.iter().map(|&l| (l as f64 - lse) as f32));
}

#[derive(Clone)]
struct Beam {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    alternatives: Vec<Vec<(u32, f32)>>,
    forced: Vec<bool>,
    score: f32,
    state: Option<ConstraintState>,
}

struct Hypotheses {
    list: Vec<(f32, Beam)>,
    done: bool,
}

impl Hypotheses {
    fn worst(&self) -> f32 {
        self.list.iter().map(|h| h.0).fold(f32::INFINITY, f32::min)
    }

    fn add(&mut self, beam: Beam, length_penalty: f32, k: usize) {
        let score = beam.score / (beam.tokens.len().max(1) as f32).powf(length_penalty);
        if self.list.len() < k || score > self.worst() {
            self.list.push((score, beam));
            if self.list.len() > k {
                let (i, _) = self
                    .list
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
                    .unwrap_or((0, &self.list[0]));
                self.list.remove(i);
            }
        }
    }
}

/// Beam search as `transformers` does it (no early stopping: an image is finished when it
/// has `num_beams` hypotheses and no running beam can beat the worst of them). A beam whose
/// text reaches a stop string is a finished hypothesis, as one ending in `</s>`. Under a
/// constraint each beam expands only into the tokens its text allows (one token per step), and
/// a model that can ([`StepModel::selects_logits`]) returns only those tokens' logits.
fn beam_search<M: StepModel + ?Sized>(
    model: &mut M,
    mut logits: Vec<f32>,
    images: usize,
    opts: &GenerationOptions,
    s: &Search<'_>,
) -> Result<Vec<Generated>, M::Error> {
    let (vocab, eos, max_new_tokens) = (s.vocab, s.eos, s.max_new_tokens);
    let k = opts.num_beams;
    let rows = images * k;
    check_len(&logits, rows, vocab)?;
    // All beams of an image start equal: only the first may expand at the first step.
    let mut beams: Vec<Beam> = (0..rows)
        .map(|r| Beam {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            alternatives: Vec::new(),
            forced: Vec::new(),
            score: if r % k == 0 { 0.0 } else { -1e9 },
            state: s.constraint.map(Constraint::start),
        })
        .collect();
    let mut hyps: Vec<Hypotheses> = (0..images)
        .map(|_| Hypotheses {
            list: Vec::new(),
            done: false,
        })
        .collect();
    let mut lsm = Vec::with_capacity(vocab);
    let lp = opts.length_penalty;
    let mut step_ms = Vec::new();
    for step in 0..max_new_tokens {
        let mut next_beams = Vec::with_capacity(rows);
        let mut source = Vec::with_capacity(rows);
        for i in 0..images {
            if hyps[i].done {
                for b in 0..k {
                    next_beams.push(beams[i * k + b].clone());
                    source.push(i * k + b);
                }
                continue;
            }
            // Candidates (score, beam, token, logprob) over all k beams.
            let mut cands: Vec<(f32, usize, u32, f32)> = Vec::with_capacity(2 * k * k);
            let mut allowed_of: Vec<Option<Vec<u32>>> = Vec::with_capacity(k);
            for b in 0..k {
                let r = i * k + b;
                let row = &mut logits[r * vocab..(r + 1) * vocab];
                let allowed = match (s.constraint, &beams[r].state) {
                    (Some(c), Some(state)) => Some(c.allowed(state)),
                    _ => None,
                };
                let raw = allowed.as_ref().map(|a| raw_of(row, a));
                process(row, &beams[r].tokens, eos, opts);
                if let (Some(a), Some(raw)) = (&allowed, &raw) {
                    mask_to(row, a, raw);
                }
                log_softmax(row, &mut lsm);
                // The 2k best tokens of this beam suffice for the 2k best overall; masked
                // tokens (minus infinity: most of a constrained row) are never candidates.
                let mut idx: Vec<usize> = (0..vocab).filter(|&t| lsm[t].is_finite()).collect();
                let take = (2 * k).min(idx.len());
                if take > 0 {
                    idx.select_nth_unstable_by(take - 1, |&a, &c| lsm[c].total_cmp(&lsm[a]));
                }
                for &t in &idx[..take] {
                    cands.push((beams[r].score + lsm[t], r, t as u32, lsm[t]));
                }
                allowed_of.push(allowed);
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut chosen = 0;
            for (rank, &(score, r, t, l)) in cands.iter().enumerate() {
                if chosen == k {
                    break;
                }
                let mut beam = beams[r].clone();
                if let (Some(c), Some(state)) = (s.constraint, &beam.state) {
                    beam.state = c.advance(state, t);
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    let allowed = allowed_of[r - i * k].as_deref().unwrap_or(&[]);
                    beam.alternatives.push(other_choices(row, allowed, t));
                    beam.forced.push(false);
                }
                beam.tokens.push(t);
                beam.logprobs.push(l);
                beam.score = score;
                if t == eos || s.reaches_stop(opts, &beam.tokens) {
                    if rank < k {
                        hyps[i].add(beam, lp, k);
                    }
                    continue;
                }
                next_beams.push(beam);
                source.push(r);
                chosen += 1;
            }
            while chosen < k {
                // Every candidate ended: pad with dead beams.
                let mut beam = beams[i * k].clone();
                beam.score = f32::NEG_INFINITY;
                beam.tokens.push(eos);
                beam.logprobs.push(f32::NEG_INFINITY);
                next_beams.push(beam);
                source.push(i * k);
                chosen += 1;
            }
            let best_running = next_beams[i * k..]
                .iter()
                .map(|b| b.score)
                .fold(f32::NEG_INFINITY, f32::max);
            let cur_len = (step + 1) as f32;
            if hyps[i].list.len() >= k && hyps[i].worst() >= best_running / cur_len.powf(lp) {
                hyps[i].done = true;
            }
        }
        beams = next_beams;
        if hyps.iter().all(|h| h.done) || step + 1 == max_new_tokens {
            break;
        }
        model.reorder(&source)?;
        let tokens: Vec<u32> = beams
            .iter()
            .map(|b| *b.tokens.last().unwrap_or(&eos))
            .collect();
        if let (Some(c), true) = (s.constraint, model.selects_logits()) {
            if let Some(ids) = beam_tokens_read(c, &beams, &hyps, k) {
                model.only_logits_of(ids);
            }
        }
        let t = std::time::Instant::now();
        logits = model.step(&tokens)?;
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
        check_len(&logits, rows, vocab)?;
    }
    let mut out = Vec::with_capacity(images);
    for (i, h) in hyps.iter_mut().enumerate() {
        if !h.done {
            for b in 0..k {
                let beam = beams[i * k + b].clone();
                if beam.score.is_finite() {
                    h.add(beam, lp, k);
                }
            }
        }
        let best = h
            .list
            .iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|x| x.1.clone());
        let g = match best {
            Some(b) => Generated {
                token_ids: b.tokens,
                logprobs: b.logprobs,
                alternatives: b.alternatives,
                forced: b.forced,
                step_ms: step_ms.clone(),
            },
            None => Generated::default(),
        };
        out.push(g);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy model whose logits depend on the last token fed: a fixed bigram table.
    struct Bigram {
        table: Vec<Vec<f32>>,
    }

    impl StepModel for Bigram {
        type Error = GenerateError;
        fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
            Ok(tokens
                .iter()
                .flat_map(|&t| self.table[t as usize].clone())
                .collect())
        }
        fn reorder(&mut self, rows: &[usize]) -> Result<()> {
            // The table model keeps no cache; check the rows exist.
            assert!(rows.iter().all(|&r| r < rows.len()));
            Ok(())
        }
    }

    fn table() -> Vec<Vec<f32>> {
        // Token 0 = eos. From 1 the best is 2 then 3; from 2 best 1; from 3 best eos.
        vec![
            vec![0.0, 1.0, 0.5, 0.2],
            vec![0.1, -1.0, 2.0, 1.9],
            vec![0.3, 2.0, -1.0, 0.0],
            vec![3.0, 0.0, 0.0, -1.0],
        ]
    }

    #[test]
    fn greedy_follows_argmax_and_stops_at_eos() {
        let mut m = Bigram { table: table() };
        let first = table()[1].clone();
        let opts = GenerationOptions::default();
        let g = generate(&mut m, first, 1, &opts, Search::new(4, 0, 6)).expect("generate");
        // 1 -> 2 -> 1 -> 2 ... never eos: stops at max.
        assert_eq!(g[0].token_ids, vec![2, 1, 2, 1, 2, 1]);
        let lp = log_softmax_at(&table()[1], 2);
        assert!((g[0].logprobs[0] - lp).abs() < 1e-6);
    }

    #[test]
    fn no_repeat_ngram_and_repetition_penalty_change_the_path() {
        let mut m = Bigram { table: table() };
        let opts = GenerationOptions {
            no_repeat_ngram_size: 2,
            ..Default::default()
        };
        let g =
            generate(&mut m, table()[1].clone(), 1, &opts, Search::new(4, 0, 6)).expect("generate");
        // 2, 1, 2, then (2, 1) is banned: from 2 the next best is eos.
        assert_eq!(g[0].token_ids, vec![2, 1, 2, 0]);
        let opts = GenerationOptions {
            repetition_penalty: 10.0,
            ..Default::default()
        };
        let g =
            generate(&mut m, table()[1].clone(), 1, &opts, Search::new(4, 0, 6)).expect("generate");
        assert_eq!(g[0].token_ids, vec![2, 1, 3, 0]);
    }

    #[test]
    fn min_new_tokens_masks_eos() {
        let mut m = Bigram { table: table() };
        let opts = GenerationOptions {
            min_new_tokens: 3,
            ..Default::default()
        };
        let g =
            generate(&mut m, table()[3].clone(), 1, &opts, Search::new(4, 0, 5)).expect("generate");
        assert_ne!(g[0].token_ids[0], 0);
        assert!(g[0].token_ids[..3].iter().all(|&t| t != 0));
    }

    #[test]
    fn sampling_is_seeded_and_top_k_1_is_greedy() {
        let run = |seed, top_k| {
            let mut m = Bigram { table: table() };
            let opts = GenerationOptions {
                do_sample: true,
                seed,
                top_k,
                ..Default::default()
            };
            let first = [table()[1].clone(), table()[1].clone()].concat();
            generate(&mut m, first, 2, &opts, Search::new(4, 0, 8))
                .expect("generate")
                .into_iter()
                .map(|g| (g.token_ids, g.logprobs))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7, 0), run(7, 0));
        let a = run(7, 0);
        assert_eq!(a[0], a[1], "each image has its own generator, same seed");
        let g = run(3, 1);
        assert_eq!(g[0].0, vec![2, 1, 2, 1, 2, 1, 2, 1]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let mut row = vec![2.0f32, 1.0, 0.0, -1.0];
        let opts = GenerationOptions {
            top_k: 0,
            top_p: 0.7,
            ..Default::default()
        };
        warp(&mut row, &opts, &mut Vec::new());
        // softmax: 0.644, 0.237, 0.087, 0.032 -> keep the first two.
        assert!(row[0].is_finite() && row[1].is_finite());
        assert!(row[2] == f32::NEG_INFINITY && row[3] == f32::NEG_INFINITY);
    }

    #[test]
    fn beam_search_finds_the_better_sequence() {
        // Greedy from 1 goes 2 (2.0) then 1...; the beam sees 3 (1.9) then eos (3.0).
        let mut m = Bigram { table: table() };
        let opts = GenerationOptions {
            num_beams: 2,
            ..Default::default()
        };
        let first: Vec<f32> = [table()[1].clone(), table()[1].clone()].concat();
        let g = generate(&mut m, first, 1, &opts, Search::new(4, 0, 4)).expect("generate");
        assert_eq!(g[0].token_ids, vec![3, 0]);
        assert_eq!(g[0].logprobs.len(), 2);
    }

    /// Token `t` reads as the letter `"_abc"[t]`, the eos (0) as nothing.
    fn letters(tokens: &[u32]) -> String {
        tokens
            .iter()
            .filter(|&&t| t != 0)
            .map(|&t| char::from(b"_abc"[t as usize]))
            .collect()
    }

    #[test]
    fn stop_strings_stop_greedy_search_and_beam_search() {
        // Greedy from 1 writes "babab..." and never eos.
        let opts = GenerationOptions {
            stop_strings: Some(vec!["aba".into(), "zz".into()]),
            ..Default::default()
        };
        let mut m = Bigram { table: table() };
        let g = generate(
            &mut m,
            table()[1].clone(),
            1,
            &opts,
            Search::new(4, 0, 8).with_text(&letters),
        )
        .expect("generate");
        // b a b a: "aba" is complete with the fourth token ("baba").
        assert_eq!(g[0].token_ids, vec![2, 1, 2, 1]);
        assert_eq!(letters(&g[0].token_ids), "baba");
        assert_eq!(strip_stop_string("baba", opts.stop_strings()), "b");
        // The sink saw exactly the tokens kept.
        let mut seen = Vec::new();
        let mut sink = |_: usize, t: u32, _: f32| {
            seen.push(t);
            true
        };
        let mut m = Bigram { table: table() };
        generate(
            &mut m,
            table()[1].clone(),
            1,
            &opts,
            Search::new(4, 0, 8)
                .with_text(&letters)
                .with_sink(&mut sink),
        )
        .expect("generate");
        assert_eq!(seen, vec![2, 1, 2, 1]);
        // Without the text function, stop strings are an error rather than ignored.
        let mut m = Bigram { table: table() };
        let e = generate(&mut m, table()[1].clone(), 1, &opts, Search::new(4, 0, 8))
            .expect_err("no text");
        assert!(e.to_string().contains("stop strings"), "{e}");
        // Beam search from 2: "a" (token 1) is the best first token; with "a" a stop string
        // that beam is finished at once and no longer beam beats it, while without stop
        // strings the search goes on past it.
        let beam = |stop_strings: Option<Vec<String>>| {
            let opts = GenerationOptions {
                num_beams: 2,
                stop_strings,
                ..Default::default()
            };
            let mut m = Bigram { table: table() };
            let first: Vec<f32> = [table()[2].clone(), table()[2].clone()].concat();
            generate(
                &mut m,
                first,
                1,
                &opts,
                Search::new(4, 0, 6).with_text(&letters),
            )
            .expect("generate")
            .remove(0)
            .token_ids
        };
        assert_eq!(beam(Some(vec!["a".into()])), vec![1]);
        let free = beam(None);
        assert_eq!(free[0], 1);
        assert!(free.len() > 1, "{free:?}");
        // An empty stop string is refused.
        let bad = GenerationOptions {
            stop_strings: Some(vec![String::new()]),
            ..Default::default()
        };
        assert!(bad.validate(8).is_err());
    }

    #[test]
    fn stop_strings_cut_at_the_earliest_one() {
        let stops = vec!["<\\s>".to_string(), "for".to_string()];
        assert_eq!(
            cut_at_stop_string("Blue Jeans for Men <\\s> Red", &stops),
            Some("Blue Jeans ".len())
        );
        assert_eq!(
            strip_stop_string("Blue Jeans <\\s> Red Jeans <\\s>", &stops),
            "Blue Jeans"
        );
        assert_eq!(strip_stop_string("Blue Jeans", &stops), "Blue Jeans");
        assert_eq!(cut_at_stop_string("Blue", &[]), None);
    }

    #[test]
    fn finish_tells_end_of_text_stop_string_length_and_stopped_apart() {
        let eos = 2;
        let stops = vec!["<\\s>".to_string()];
        // `</s>` wins even at the limit: the description is complete.
        assert_eq!(
            Finish::of(&[5, 6, eos], eos, "Blue", &stops, 3),
            Finish::EndOfText
        );
        // A stop string reached with the last allowed token is not a cut text.
        assert_eq!(
            Finish::of(&[5, 6, 7], eos, "Blue <\\s>", &stops, 3),
            Finish::StopString
        );
        assert_eq!(
            Finish::of(&[5, 6, 7], eos, "Blue Jeans", &stops, 3),
            Finish::Length
        );
        assert_eq!(Finish::of(&[5], eos, "Blue", &stops, 3), Finish::Stopped);
        // The JSON names are the documented ones.
        for f in [
            Finish::EndOfText,
            Finish::StopString,
            Finish::Length,
            Finish::Stopped,
        ] {
            assert_eq!(
                serde_json::to_string(&f).ok(),
                Some(format!("\"{}\"", f.as_str()))
            );
        }
    }

    #[test]
    fn options_are_validated() {
        let bad = [
            GenerationOptions {
                temperature: 0.0,
                ..Default::default()
            },
            GenerationOptions {
                top_p: 0.0,
                ..Default::default()
            },
            GenerationOptions {
                num_beams: 0,
                ..Default::default()
            },
            GenerationOptions {
                num_beams: 2,
                do_sample: true,
                ..Default::default()
            },
            GenerationOptions {
                min_new_tokens: 9,
                ..Default::default()
            },
        ];
        for o in bad {
            assert!(o.validate(8).is_err(), "{o:?}");
        }
        assert!(GenerationOptions::default().validate(0).is_err());
    }

    /// A model that wants to write `target`: at position p its logits favour `target[p]`
    /// (5.0) over a fixed spread of the others (within 1.0), whatever it was fed. It counts
    /// its decoder runs.
    struct Teacher {
        /// What each row wants to write.
        targets: Vec<Vec<u32>>,
        vocab: usize,
        fed: Vec<usize>,
        runs: usize,
        /// Feeds rows of different lengths in one step.
        ragged: bool,
        /// Takes the list of tokens the search reads ([`StepModel::only_logits_of`]) and
        /// returns minus infinity for every other token.
        selects: bool,
        /// The list for the next step.
        listed: Option<Vec<u32>>,
        /// Each listed step's list length.
        list_lens: Vec<usize>,
    }

    impl Teacher {
        fn new(target: Vec<u32>, vocab: usize, rows: usize) -> Self {
            Self::rows(vec![target; rows], vocab)
        }

        fn rows(targets: Vec<Vec<u32>>, vocab: usize) -> Self {
            let rows = targets.len();
            Self {
                targets,
                vocab,
                fed: vec![0; rows],
                runs: 0,
                ragged: false,
                selects: false,
                listed: None,
                list_lens: Vec::new(),
            }
        }

        fn logits_at(&self, r: usize, p: usize) -> Vec<f32> {
            let mut row: Vec<f32> = (0..self.vocab)
                .map(|t| ((t * 7919 + p * 104_729) % 1000) as f32 / 1000.0)
                .collect();
            if let Some(&t) = self.targets[r].get(p) {
                row[t as usize] = 5.0;
            }
            row
        }

        fn first(&self) -> Vec<f32> {
            (0..self.fed.len())
                .flat_map(|r| self.logits_at(r, 0))
                .collect()
        }
    }

    impl StepModel for Teacher {
        type Error = GenerateError;
        fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
            self.step_many(tokens, 1)
        }
        fn step_many(&mut self, tokens: &[u32], n: usize) -> Result<Vec<f32>> {
            let lens = vec![n; tokens.len() / n];
            self.runs += 1;
            self.feed(n, &lens)
        }
        fn ragged(&self) -> bool {
            self.ragged
        }
        fn step_ragged(&mut self, _tokens: &[u32], n: usize, lens: &[usize]) -> Result<Vec<f32>> {
            assert!(self.ragged, "a ragged step to a model that cannot take one");
            self.runs += 1;
            self.feed(n, lens)
        }
        fn selects_logits(&self) -> bool {
            self.selects
        }
        fn only_logits_of(&mut self, ids: Vec<u32>) {
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
            self.listed = Some(ids);
        }
        fn reorder(&mut self, rows: &[usize]) -> Result<()> {
            self.fed = rows.iter().map(|&r| self.fed[r]).collect();
            self.targets = rows.iter().map(|&r| self.targets[r].clone()).collect();
            Ok(())
        }
    }

    impl Teacher {
        /// Row `r` takes `lens[r]` tokens of `n`; the padding after them gives junk logits.
        fn feed(&mut self, n: usize, lens: &[usize]) -> Result<Vec<f32>> {
            let listed = self.listed.take();
            if let Some(ids) = &listed {
                self.list_lens.push(ids.len());
            }
            let mut out = Vec::new();
            for (r, &len) in lens.iter().enumerate() {
                for j in 0..n {
                    if j < len {
                        self.fed[r] += 1;
                        let mut row = self.logits_at(r, self.fed[r]);
                        if let Some(ids) = &listed {
                            for (t, l) in row.iter_mut().enumerate() {
                                if ids.binary_search(&(t as u32)).is_err() {
                                    *l = f32::NEG_INFINITY;
                                }
                            }
                        }
                        out.extend(row);
                    } else {
                        out.extend(std::iter::repeat_n(f32::NAN, self.vocab));
                    }
                }
            }
            Ok(out)
        }
    }

    fn run_teacher(
        text: &str,
        opts: &GenerationOptions,
        constrained: bool,
    ) -> (Generated, usize, String) {
        use crate::constrain::{fixtures, Constraint};
        let tok = fixtures::tokenizer();
        let schema = fixtures::schema();
        let c = Constraint::new(&schema, &tok, tok.eos_id()).expect("constraint");
        let mut target = tok.encode_no_bos(text).expect("encode");
        target.push(tok.eos_id());
        let vocab = tok.vocab_size() + 3; // a model's table is often larger
        let rows = opts.num_beams;
        let mut m = Teacher::new(target, vocab, rows);
        let first = m.first();
        // Room for a caption spelled over short tokens (a toy model's noise can prefer them).
        let search =
            Search::new(vocab, tok.eos_id(), 128).with_constraint(constrained.then_some(&c));
        let g = generate(&mut m, first, 1, opts, search)
            .expect("generate")
            .remove(0);
        let text = tok.decode(&g.token_ids, true).expect("decode");
        (g, m.runs, text)
    }

    #[test]
    fn constrained_greedy_equals_free_greedy_when_that_fits_and_runs_less() {
        let caption = "Navy Blue Smart Casual Shoes for Boys - Apparel Shoes";
        let opts = GenerationOptions::default();
        let (free, free_runs, text) = run_teacher(caption, &opts, false);
        assert_eq!(text, caption);
        let (constrained, runs, text) = run_teacher(caption, &opts, true);
        assert_eq!(text, caption);
        assert_eq!(constrained.token_ids, free.token_ids);
        // Forced runs: " Blue" after "Navy", " Casual" after "Smart", " for", " -" and the
        // final </s> need no run of their own.
        assert!(runs + 4 <= free_runs, "{runs} runs against {free_runs}");
        assert_eq!(constrained.step_ms.len(), runs);
        // Logprobs under the constraint are renormalised over fewer tokens: never lower.
        for (c, f) in constrained.logprobs.iter().zip(&free.logprobs) {
            assert!(c >= &(f - 1e-5), "{c} < {f}");
        }
        // Every chosen token has its alternatives recorded, forced ones none.
        assert_eq!(constrained.alternatives.len(), constrained.token_ids.len());
        assert!(constrained.alternatives[0].len() > 1);
        assert!(free.alternatives.is_empty());
    }

    /// Each caption's tokens (no BOS) and the final `</s>`: what a [`Teacher`] row writes.
    fn targets_of(tok: &crate::tokenizer::ModaTokenizer, texts: &[&str]) -> Vec<Vec<u32>> {
        texts
            .iter()
            .map(|t| {
                let mut ids = tok.encode_no_bos(t).expect("encode");
                ids.push(tok.eos_id());
                ids
            })
            .collect()
    }

    #[test]
    fn a_batch_feeds_each_row_its_own_forced_run() {
        use crate::constrain::{fixtures, Constraint};
        let tok = fixtures::tokenizer();
        let c = Constraint::new(&fixtures::schema(), &tok, tok.eos_id()).expect("constraint");
        let texts = [
            "Navy Blue Smart Casual Shoes for Boys - Apparel Shoes",
            "Black Formal Jeans for Men - Footwear Topwear",
            "Off White Sports Sports Shoes for Girls - Apparel Bottomwear",
        ];
        let targets = targets_of(&tok, &texts);
        let vocab = tok.vocab_size();
        let opts = GenerationOptions::default();
        let run = |ragged: bool| {
            let mut m = Teacher::rows(targets.clone(), vocab);
            m.ragged = ragged;
            let first = m.first();
            let search = Search::new(vocab, tok.eos_id(), 32).with_constraint(Some(&c));
            let g = generate(&mut m, first, texts.len(), &opts, search).expect("generate");
            (g, m.runs)
        };
        let (even, even_runs) = run(false);
        let (ragged, ragged_runs) = run(true);
        for ((a, b), want) in even.iter().zip(&ragged).zip(&targets) {
            // Each row writes its caption either way, with the same log-probabilities.
            assert_eq!(&a.token_ids, want);
            assert_eq!(a.token_ids, b.token_ids);
            assert_eq!(a.logprobs, b.logprobs);
        }
        // Every row's forced text goes in with the token before it: fewer runs than a batch
        // that waits for every row to be in forced text at once, and fewer than tokens.
        assert!(ragged_runs < even_runs, "{ragged_runs} vs {even_runs}");
        let longest = targets.iter().map(Vec::len).max().unwrap_or(0);
        assert!(
            ragged_runs + 3 <= longest,
            "{ragged_runs} runs, {longest} tokens"
        );
    }

    #[test]
    fn the_constraint_keeps_every_search_inside_the_schema() {
        use crate::constrain::fixtures;
        let schema = fixtures::schema();
        // The teacher wants a colour and a usage the schema does not know.
        let wanted = "Purple Party Jeans for Men - Apparel Bottomwear";
        let (_, _, free) = run_teacher(wanted, &GenerationOptions::default(), false);
        assert_eq!(free, wanted);
        assert!(schema.parse(&free)["Colour"].is_none());
        for opts in [
            GenerationOptions::default(),
            GenerationOptions::default().with_num_beams(3),
            GenerationOptions::default()
                .with_do_sample(true)
                .with_seed(3),
            GenerationOptions::default()
                .with_do_sample(true)
                .with_seed(11)
                .with_top_k(0)
                .with_temperature(2.0),
            GenerationOptions::default().with_repetition_penalty(3.0),
            GenerationOptions::default().with_no_repeat_ngram_size(1),
        ] {
            let (g, _, text) = run_teacher(wanted, &opts, true);
            let parsed = schema.parse(&text);
            assert!(
                parsed.values().all(Option::is_some),
                "{opts:?}: {text:?} -> {parsed:?}"
            );
            assert_eq!(g.token_ids.last(), Some(&2), "{opts:?}: ends with </s>");
            if opts == GenerationOptions::default() {
                // Greedy: what the teacher could keep, it kept.
                assert!(text.ends_with(" for Men - Apparel Bottomwear"), "{text:?}");
            }
        }
    }
    #[test]
    fn listed_logits_change_nothing_the_constrained_search_reads() {
        use crate::constrain::{fixtures, Constraint};
        let tok = fixtures::tokenizer();
        let schema = fixtures::schema();
        let c = Constraint::new(&schema, &tok, tok.eos_id()).expect("constraint");
        // Captions the schema knows, and one it does not (the constraint then steers away
        // from what the model wants, and reads tokens it would not choose).
        let texts = [
            "Navy Blue Smart Casual Shoes for Boys - Apparel Shoes",
            "Purple Party Jeans for Men - Apparel Bottomwear",
            "Off White Sports Sports Shoes for Girls - Apparel Bottomwear",
        ];
        let targets = targets_of(&tok, &texts);
        let vocab = tok.vocab_size() + 3;
        for opts in [
            GenerationOptions::default(),
            GenerationOptions::default()
                .with_do_sample(true)
                .with_seed(5)
                .with_top_k(0),
            GenerationOptions::default().with_repetition_penalty(3.0),
            GenerationOptions::default().with_no_repeat_ngram_size(1),
            GenerationOptions::default().with_min_new_tokens(40),
            GenerationOptions::default().with_num_beams(3),
            GenerationOptions::default()
                .with_num_beams(2)
                .with_length_penalty(0.5)
                .with_repetition_penalty(2.0),
        ] {
            // Beam search keeps `num_beams` rows per image, each wanting its image's caption.
            let beams = opts.num_beams.max(1);
            let rows: Vec<Vec<u32>> = targets
                .iter()
                .flat_map(|t| std::iter::repeat_n(t.clone(), beams))
                .collect();
            for ragged in [false, true] {
                let run = |selects: bool| {
                    let mut m = Teacher::rows(rows.clone(), vocab);
                    m.ragged = ragged;
                    m.selects = selects;
                    let first = m.first();
                    let search = Search::new(vocab, tok.eos_id(), 64).with_constraint(Some(&c));
                    let g = generate(&mut m, first, texts.len(), &opts, search).expect("generate");
                    (g, m.runs, m.list_lens)
                };
                let (every, _, none) = run(false);
                let (listed, runs, lens) = run(true);
                assert!(none.is_empty());
                // Every step after the first (whose logits come with the prompt) was listed,
                // with far fewer tokens than the vocabulary.
                assert_eq!(lens.len(), runs, "{opts:?}");
                assert!(lens.iter().all(|&n| n > 0 && n * 4 < vocab), "{lens:?}");
                for (a, b) in every.iter().zip(&listed) {
                    assert_eq!(a.token_ids, b.token_ids, "{opts:?} ragged {ragged}");
                    assert_eq!(a.logprobs, b.logprobs, "{opts:?} ragged {ragged}");
                    assert_eq!(a.alternatives, b.alternatives, "{opts:?} ragged {ragged}");
                    assert_eq!(a.forced, b.forced, "{opts:?} ragged {ragged}");
                }
            }
        }
    }
}
