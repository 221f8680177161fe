//! The logits processors in `transformers`' order (repetition penalty, no-repeat n-gram,
//! minimum length; when sampling, temperature, top-k and top-p), the masks of constrained
//! decoding, and the row arithmetic they share: argmax, sampling, log-softmax.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use wide::{f32x8, CmpEq};

use super::options::GenerationOptions;
use super::MAX_TOKEN_ALTERNATIVES;

/// A row's logits under the constraint: `row` processed, then every token outside `allowed`
/// set to minus infinity. When processing has banned every allowed token (a penalty or the
/// minimum length against the only text the schema allows), the allowed tokens keep their
/// unprocessed logits `raw`, so that the search can still follow the schema.
pub(super) fn mask_to(row: &mut [f32], allowed: &[u32], raw: &[(u32, f32)]) {
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
pub(super) fn raw_of(row: &[f32], allowed: &[u32]) -> Vec<(u32, f32)> {
    allowed
        .iter()
        .filter_map(|&t| row.get(t as usize).map(|&l| (t, l)))
        .collect()
}

/// The best other tokens of a masked row after `chosen`, with their log-probabilities.
pub(super) fn other_choices(row: &[f32], allowed: &[u32], chosen: u32) -> Vec<(u32, f32)> {
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

/// Repetition penalty, no-repeat n-gram and minimum length, on one row.
pub(super) fn process(row: &mut [f32], generated: &[u32], eos: u32, opts: &GenerationOptions) {
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
pub(super) fn warp(row: &mut [f32], opts: &GenerationOptions, scratch: &mut Vec<(f32, usize)>) {
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

pub(super) fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in row.iter().enumerate() {
        if l > row[best] {
            best = i;
        }
    }
    best
}

pub(super) fn sample(row: &[f32], rng: &mut ChaCha8Rng) -> usize {
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
pub(super) fn log_softmax_at(row: &[f32], i: usize) -> f32 {
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
pub(super) fn sum_exp(row: &[f32], max: f32) -> f64 {
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

pub(super) fn log_softmax(row: &[f32], out: &mut Vec<f32>) {
    out.clear();
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + sum_exp(row, max).ln();
    out.extend(row.iter().map(|&l| (l as f64 - lse) as f32));
}
