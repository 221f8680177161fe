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
//! over several doubtful tokens a low one.
//!
//! Under constrained decoding (`constrain`, the default when the bundle has a schema; see
//! `moda_models::constrain`) the search's log-probabilities are those of the constrained
//! distribution: the model's probabilities renormalised over the tokens the schema allows at
//! each step, and the tokens the schema forces (the rest of a value once only one fits) are
//! not the model's choice. A value's confidence is then the probability of the choices that
//! led to it: `exp` of the summed log-probabilities of the value's tokens that the search
//! chose, forced tokens left out. It is the value's probability among the values the schema
//! allows there, given the image and the text before it, and **alternatives** are on the
//! same scale: at each chosen token of the value, every other allowed token that leads to
//! exactly one other value of the field counts for that value with the probability of that
//! branch (the value's chosen tokens before it times the other token's). Such a value's own
//! later choices are not scored (that would take extra decoder runs); where it has none (its
//! rest is forced, the usual case) the figure is its probability. Under greedy search no
//! alternative is more likely than the value at the same branch.
//! Without a constraint a value's confidence is not normalised over the field's other values
//! and no alternatives are given.

use std::collections::BTreeMap;

use moda_models::constrain::{values_fitting, Constraint};
use moda_models::generate::Generated;
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
    /// The next most likely values of the field with their probabilities, most likely first
    /// (see the module documentation for when they are known); empty when none are.
    #[serde(default)]
    pub alternatives: Vec<(String, f32)>,
}

/// The most alternatives listed per attribute.
pub const MAX_ALTERNATIVES: usize = 3;

/// Every field of `schema`, with its value in `text` or `None`. `generated` is the search's
/// output of which `text` is the decoded text (possibly cut short by a stop string), for the
/// confidences; `constraint` the one it ran under, for the alternatives.
pub fn read_attributes(
    schema: &CaptionSchema,
    tokenizer: &ModaTokenizer,
    text: &str,
    generated: &Generated,
    constraint: Option<&Constraint>,
) -> BTreeMap<String, Option<Attribute>> {
    let ends = token_ends(tokenizer, &generated.token_ids);
    schema
        .parse_spans(text)
        .into_iter()
        .map(|(name, span)| {
            let attribute = span.map(|r| {
                let value = text[r.clone()].to_string();
                let alternatives = match (constraint, &ends) {
                    (Some(c), Some(ends)) => {
                        alternatives(schema, c, &name, &value, text, ends, generated, r.clone())
                    }
                    _ => Vec::new(),
                };
                Attribute {
                    value,
                    confidence: confidence(&ends, &generated.logprobs, &generated.forced, r),
                    alternatives,
                }
            });
            (name, attribute)
        })
        .collect()
}

/// The other values of field `name` that the constrained search weighed where it chose the
/// tokens of `value` (at `span` of `text`); see the module documentation.
#[allow(clippy::too_many_arguments)]
fn alternatives(
    schema: &CaptionSchema,
    constraint: &Constraint,
    name: &str,
    value: &str,
    text: &str,
    ends: &[usize],
    generated: &Generated,
    span: std::ops::Range<usize>,
) -> Vec<(String, f32)> {
    let mut found: BTreeMap<&str, f64> = BTreeMap::new();
    let mut before = 0.0f64; // log-probability of the value's tokens so far
    let mut start = 0;
    for (i, &end) in ends.iter().enumerate() {
        let token_start = start;
        start = start.max(end);
        if end <= token_start || token_start >= span.end || end <= span.start {
            continue;
        }
        let Some(prefix) = text.as_bytes().get(..token_start) else {
            break;
        };
        for &(other, lp) in generated.alternatives.get(i).map_or(&[][..], |a| &a[..]) {
            let Some(bytes) = constraint.token_bytes(other) else {
                continue;
            };
            let mut branch = prefix.to_vec();
            branch.extend_from_slice(bytes);
            let Some(in_field) = branch.get(span.start..) else {
                continue;
            };
            let in_field = String::from_utf8_lossy(in_field);
            if let [v] = values_fitting(schema, name, &in_field)[..] {
                if v != value {
                    *found.entry(v).or_default() += (before + f64::from(lp)).exp();
                }
            }
        }
        if !generated.forced.get(i).copied().unwrap_or(false) {
            before += f64::from(generated.logprobs.get(i).copied().unwrap_or(0.0));
        }
    }
    let mut out: Vec<(String, f32)> = found
        .into_iter()
        .map(|(v, p)| (v.to_string(), p as f32))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out.truncate(MAX_ALTERNATIVES);
    out
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

/// `exp` of the summed log-probabilities of the tokens whose text overlaps `span`, leaving
/// out those `forced` marks (a forced token still counts as the value's token: a value
/// spelled by forced tokens only has a confidence of 1).
fn confidence(
    ends: &Option<Vec<usize>>,
    logprobs: &[f32],
    forced: &[bool],
    span: std::ops::Range<usize>,
) -> Option<f32> {
    let ends = ends.as_ref()?;
    let mut sum = 0.0f64;
    let mut any = false;
    let mut start = 0;
    for (i, (&end, &lp)) in ends.iter().zip(logprobs).enumerate() {
        if end > start && start < span.end && end > span.start {
            if !forced.get(i).copied().unwrap_or(false) {
                sum += f64::from(lp);
            }
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
        let c = confidence(&ends, &lp, &[], 0..9).expect("Navy Blue");
        assert!((c - 0.45).abs() < 1e-6, "{c}");
        let c = confidence(&ends, &lp, &[], 10..15).expect("Jeans");
        assert!((c - 0.8).abs() < 1e-6, "{c}");
        // A token that adds no text (</s>, a partial character) counts for nothing.
        let ends = Some(vec![4, 4, 9]);
        let c = confidence(&ends, &lp, &[], 5..9).expect("Blue");
        assert!((c - 0.8).abs() < 1e-6, "{c}");
        assert_eq!(confidence(&None, &lp, &[], 0..4), None);
        // Forced tokens are not choices: "Navy" chosen, " Blue" forced.
        let ends = Some(vec![4, 9, 15]);
        let c = confidence(&ends, &lp, &[false, true, false], 0..9).expect("Navy Blue");
        assert!((c - 0.9).abs() < 1e-6, "{c}");
        assert_eq!(confidence(&Some(Vec::new()), &[], &[], 0..4), None);
    }
}
