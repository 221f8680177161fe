//! [`GenerationOptions`]: what a search is asked for (greedy, sampling or beams, the logits
//! processors, stop strings, constrained decoding), their defaults and their checks.

use serde::{Deserialize, Serialize};

use super::Result;
use super::{GenerateError, MAX_STOP_STRINGS};

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
