//! Greedy search and sampling: every row extended by one token per step, each row finished on
//! `</s>`, a stop string or its length, with forced runs of tokens under a constraint fed
//! in one step.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::constrain::{Constraint, ConstraintState};

use super::logits::{
    argmax, log_softmax_at, mask_to, other_choices, process, raw_of, sample, warp,
};
use super::options::GenerationOptions;
use super::Result;
use super::{check_len, GenerateError, Generated, Search, StepModel};

/// One row of greedy search or sampling.
pub(super) struct Row {
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
pub(super) fn greedy_or_sample<M: StepModel + ?Sized>(
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
pub(super) fn tokens_read(
    c: &Constraint,
    rs: &[Row],
    runs: &[Vec<u32>],
    lens: &[usize],
) -> Option<Vec<u32>> {
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

/// Chooses a row's next token from its logits (processed, constrained, then greedy or
/// sampled) and commits it.
#[allow(clippy::too_many_arguments)]
pub(super) fn choose<E: From<GenerateError>>(
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
pub(super) fn commit_forced<E: From<GenerateError>>(
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
pub(super) fn commit<E: From<GenerateError>>(
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
