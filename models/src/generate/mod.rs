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
//!
//! This file holds what a runner calls ([`generate`], [`StepModel`], what comes back) and the
//! stop strings; `options` the [`GenerationOptions`], `greedy` greedy search and sampling,
//! `beam` beam search, and `logits` the processors and the row arithmetic both searches use.

mod beam;
mod greedy;
mod logits;
mod options;

use serde::{Deserialize, Serialize};

use crate::constrain::Constraint;

use beam::beam_search;
use greedy::greedy_or_sample;

pub use options::{Constrain, GenerationOptions};

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

fn check_len(logits: &[f32], rows: usize, vocab: usize) -> Result<()> {
    if logits.len() != rows * vocab {
        return Err(GenerateError::InvalidArgument(format!(
            "decoder returned {} logits, expected {rows} rows of {vocab}",
            logits.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::logits::{log_softmax_at, warp};
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
