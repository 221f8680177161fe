//! Beam search: `num_beams` hypotheses per image, scored by their summed log-probabilities
//! with `transformers`' length penalty, the model's cache reordered between steps.

use crate::constrain::{Constraint, ConstraintState};

use super::logits::{log_softmax, mask_to, other_choices, process, raw_of};
use super::options::GenerationOptions;
use super::Result;
use super::{check_len, Generated, Search, StepModel};

/// The tokens whose logits the constrained beam search reads after its next step: those each
/// beam's text allows next, over the images still searching (a finished image's rows are
/// carried, not read). Every other logit is masked before it is read. Sorted, without
/// repeats; `None` when a beam has no state to follow (never, for beams the search made).
pub(super) fn beam_tokens_read(
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

#[derive(Clone)]
pub(super) struct Beam {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    alternatives: Vec<Vec<(u32, f32)>>,
    forced: Vec<bool>,
    score: f32,
    state: Option<ConstraintState>,
}

pub(super) struct Hypotheses {
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
pub(super) fn beam_search<M: StepModel + ?Sized>(
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
