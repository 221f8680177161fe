//! Attributes of a description: its text read back into the fields of the bundle's caption
//! schema (`moda.json`'s `schema`) with the workspace's one parser
//! ([`CaptionSchema::parse_spans`], the rule is documented in `moda_models::schema`), each
//! with a confidence from the log-probabilities the search already computed.
//!
//! **Confidence** of a value: the probability of the tokens that spell it, given the image and
//! everything generated before them: `exp` of the sum of the log-probabilities of the
//! generated tokens whose text overlaps the value's text (with OPT's byte-level BPE a word's
//! token carries its leading space, so `" Blue"` counts for `Blue`). These are the search's
//! own log-probabilities ([`crate::Description::logprobs`]): the model's under greedy search
//! without penalties, the processed distribution's under sampling or penalties. No extra
//! decoder run is made; a value the model was sure of has a confidence near 1, one spelled
//! over several doubtful tokens a low one. It is not normalised over the field's other
//! values.

use std::collections::BTreeMap;

use moda_models::schema::CaptionSchema;
use moda_models::tokenizer::ModaTokenizer;
use serde::{Deserialize, Serialize};

/// A field's value in a description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    /// The value, one of the schema's known values (or any text for a field the schema lists
    /// no values for).
    pub value: String,
    /// The probability of the value's tokens (see the module documentation); `None` when the
    /// value's tokens could not be told apart (a text without tokens, e.g. one given by hand).
    pub confidence: Option<f32>,
}

/// Every field of `schema`, with its value in `text` or `None`. `token_ids` and `logprobs`
/// are the generated tokens of which `text` is the decoded text (possibly cut short by a stop
/// string), for the confidences.
pub fn read_attributes(
    schema: &CaptionSchema,
    tokenizer: &ModaTokenizer,
    text: &str,
    token_ids: &[u32],
    logprobs: &[f32],
) -> BTreeMap<String, Option<Attribute>> {
    let ends = token_ends(tokenizer, token_ids);
    schema
        .parse_spans(text)
        .into_iter()
        .map(|(name, span)| {
            let attribute = span.map(|r| Attribute {
                value: text[r.clone()].to_string(),
                confidence: confidence(&ends, logprobs, r),
            });
            (name, attribute)
        })
        .collect()
}

/// The byte offset in the decoded text where each token's text ends: the length of the text
/// of the tokens up to it (special tokens add nothing). `None` when decoding fails.
fn token_ends(tokenizer: &ModaTokenizer, token_ids: &[u32]) -> Option<Vec<usize>> {
    let vocab = tokenizer.vocab_size();
    let mut known = Vec::with_capacity(token_ids.len());
    let mut ends = Vec::with_capacity(token_ids.len());
    for &id in token_ids {
        // Ids outside the tokenizer (a larger embedding table) add no text, as in decoding.
        if (id as usize) < vocab {
            known.push(id);
        }
        ends.push(tokenizer.decode(&known, true).ok()?.len());
    }
    Some(ends)
}

/// `exp` of the summed log-probabilities of the tokens whose text overlaps `span`.
fn confidence(
    ends: &Option<Vec<usize>>,
    logprobs: &[f32],
    span: std::ops::Range<usize>,
) -> Option<f32> {
    let ends = ends.as_ref()?;
    let mut sum = 0.0f64;
    let mut any = false;
    let mut start = 0;
    for (&end, &lp) in ends.iter().zip(logprobs) {
        if end > start && start < span.end && end > span.start {
            sum += f64::from(lp);
            any = true;
        }
        start = start.max(end);
    }
    any.then(|| sum.exp() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_sums_the_tokens_that_overlap_the_value() {
        // Three tokens: "Navy" [0, 4), " Blue" [4, 9), " Jeans" [9, 15).
        let ends = Some(vec![4, 9, 15]);
        let lp = [(0.9f32).ln(), (0.5f32).ln(), (0.8f32).ln()];
        let c = confidence(&ends, &lp, 0..9).expect("Navy Blue");
        assert!((c - 0.45).abs() < 1e-6, "{c}");
        let c = confidence(&ends, &lp, 10..15).expect("Jeans");
        assert!((c - 0.8).abs() < 1e-6, "{c}");
        // A token that adds no text (</s>, a partial character) counts for nothing.
        let ends = Some(vec![4, 4, 9]);
        let c = confidence(&ends, &lp, 5..9).expect("Blue");
        assert!((c - 0.8).abs() < 1e-6, "{c}");
        assert_eq!(confidence(&None, &lp, 0..4), None);
        assert_eq!(confidence(&Some(Vec::new()), &[], 0..4), None);
    }
}
