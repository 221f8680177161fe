//! The decoder's running state for a batch of images ([`DecodeState`]): the search's
//! [`StepModel`], feeding the decoder graph one step at a time with its KV cache, and the text
//! streamed as tokens arrive.
//!
//! ## The KV cache
//! The decoder graph appends each step's keys and values to the past it is given
//! (`Concat` on the sequence axis) and returns the whole cache as `present.*`. The SDK moves
//! those output values, which ONNX Runtime allocated, straight back in as the next step's
//! `past_key_values.*`: no copy is made on the Rust side, nor any per-step allocation of the
//! cache beyond the graph's own concatenation (O(cache) bytes per step, against the weights'
//! hundreds of MB, so the per-token time stays flat). The token embeddings likewise go from
//! the `embed_tokens` graph's output into the decoder without a copy. Beam search reorders the
//! cache rows between steps, which copies it, as every beam search does.
//!
//! ## Listed logits
//! Under constrained decoding a step's logits matter only at the tokens the schema allows
//! after each position fed (the search renormalises over those). Before each run the search
//! tells the decoder which tokens those are ([`StepModel::only_logits_of`]); a decoder graph
//! that takes [`HEAD_IDS`] then computes just those columns of the LM head, and the SDK
//! spreads them into vocabulary-wide rows with minus infinity elsewhere. With OPT-125m's
//! 50,272-row head that is a third of an int4 step's weight reads saved.

use std::borrow::Cow;

use moda_models::tokenizer::ModaTokenizer;
use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor};

use crate::error::{Error, Result};
use crate::generate::StepModel;
use crate::manifest::{Role, HEAD_IDS};

use super::outputs::{check_finite, check_value_shape};
use super::{Moda, Worker};

/// The decoder's running state for one batch.
pub(super) struct DecodeState<'a> {
    pub(super) moda: &'a Moda,
    pub(super) worker: &'a mut Worker,
    /// `present.*` of the last run, in the decoder's input order.
    pub(super) past: Vec<DynValue>,
    /// Positions so far (image prefix, BOS, generated tokens and the padding of ragged
    /// steps).
    pub(super) total: usize,
    pub(super) rows: usize,
    /// The attention mask of those positions, `[rows, total]`: 0 for padding.
    pub(super) mask: Vec<i64>,
    /// The tokens whose logits the next run must return (sorted, unique; every token's when
    /// `None`); taken by that run.
    pub(super) listed: Option<Vec<u32>>,
    /// Runs that returned listed tokens' logits only.
    pub(super) listed_runs: usize,
}

impl DecodeState<'_> {
    /// Runs the decoder on `embeds` (`[rows, seq, embed_dim]`, as a value) and returns the last
    /// position's logits `[rows * vocab]`, or every position's `[rows * seq * vocab]`. With
    /// `lens`, row `r`'s positions from `lens[r]` on are padding (masked from then on).
    fn run(
        &mut self,
        embeds: SessionInputValue<'static>,
        seq: usize,
        every_position: bool,
        lens: Option<&[usize]>,
    ) -> Result<Vec<f32>> {
        let m = self.moda;
        let d = m.manifest.model;
        let io = &m.decoder_io;
        let total = self.total + seq;
        let mut mask_data = Vec::with_capacity(self.rows * total);
        for r in 0..self.rows {
            mask_data.extend_from_slice(&self.mask[r * self.total..(r + 1) * self.total]);
            let len = lens.and_then(|l| l.get(r).copied()).unwrap_or(seq);
            mask_data.extend((0..seq).map(|j| i64::from(j < len)));
        }
        let mask = Tensor::from_array(([self.rows, total], mask_data.clone()))
            .map_err(|e| Error::run(Role::Decoder.name(), e))?;
        let mut inputs: Vec<(Cow<'static, str>, SessionInputValue<'static>)> =
            Vec::with_capacity(io.inputs.len());
        inputs.push((Cow::Owned(io.inputs[0].clone()), embeds));
        inputs.push((Cow::Owned(io.inputs[1].clone()), mask.into()));
        if self.past.is_empty() {
            for name in &io.inputs[2..] {
                let empty = Tensor::from_array((
                    [self.rows, d.num_heads, 0, d.head_dim],
                    Vec::<f32>::new(),
                ))
                .map_err(|e| Error::run(Role::Decoder.name(), e))?;
                inputs.push((Cow::Owned(name.clone()), empty.into()));
            }
        } else {
            for (name, v) in io.inputs[2..].iter().zip(self.past.drain(..)) {
                inputs.push((Cow::Owned(name.clone()), v.into()));
            }
        }
        // The listed tokens, when the graph takes them and the list is short enough to gain:
        // past an eighth of the vocabulary, gathering the rows costs about what the whole
        // product does.
        let listed = self
            .listed
            .take()
            .filter(|ids| io.head_ids && m.options.listed_logits && ids.len() * 8 <= d.vocab_size);
        if let Some(ids) = &listed {
            self.listed_runs += 1;
            let ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
            let t = Tensor::from_array(([ids.len()], ids))
                .map_err(|e| Error::run(Role::Decoder.name(), e))?;
            inputs.push((Cow::Borrowed(HEAD_IDS), t.into()));
        }
        let mut outputs = self
            .worker
            .text()?
            .decoder
            .run(inputs)
            .map_err(|e| Error::run(Role::Decoder.name(), e))?;
        let mut past = Vec::with_capacity(io.outputs.len() - 1);
        let cache_shape = [self.rows, d.num_heads, total, d.head_dim];
        for name in &io.outputs[1..] {
            let v = outputs.remove(name.as_str()).ok_or_else(|| {
                Error::run(Role::Decoder.name(), format!("no output named {name}"))
            })?;
            check_value_shape(&v, Role::Decoder, &cache_shape)?;
            past.push(v);
        }
        let logits = outputs
            .remove(io.outputs[0].as_str())
            .ok_or_else(|| Error::run(Role::Decoder.name(), "no logits output"))?;
        drop(outputs);
        self.past = past;
        self.total = total;
        self.mask = mask_data;
        let (shape, data) = logits
            .try_extract_tensor::<f32>()
            .map_err(|e| Error::run(Role::Decoder.name(), e))?;
        let v = d.vocab_size;
        // The columns: every token's, or the listed tokens'.
        let width = listed.as_ref().map_or(v, Vec::len);
        if shape.len() != 3 || shape[0] as usize != self.rows || shape[2] as usize != width {
            return Err(Error::run(
                Role::Decoder.name(),
                format!(
                    "logits have shape {shape:?}, expected [{}, seq, {width}]",
                    self.rows
                ),
            ));
        }
        if shape[1] < 1
            || data.len() as u64 != (self.rows as u64) * (shape[1] as u64) * width as u64
        {
            return Err(Error::run(
                Role::Decoder.name(),
                format!("logits have shape {shape:?}, with no position to read"),
            ));
        }
        let s = shape[1] as usize;
        if every_position && s != seq {
            return Err(Error::run(
                Role::Decoder.name(),
                format!("logits have shape {shape:?}, expected {seq} positions"),
            ));
        }
        // The positions returned: every one, or each row's last.
        let positions: Vec<usize> = if every_position {
            (0..self.rows * s).collect()
        } else {
            (0..self.rows).map(|r| r * s + s - 1).collect()
        };
        let Some(ids) = listed else {
            let mut out = Vec::with_capacity(positions.len() * v);
            for p in positions {
                out.extend_from_slice(&data[p * v..(p + 1) * v]);
            }
            check_finite(Role::Decoder, "logits", &out)?;
            return Ok(out);
        };
        // Vocabulary-wide rows: the listed tokens' logits, minus infinity elsewhere.
        let mut out = vec![f32::NEG_INFINITY; positions.len() * v];
        for (row, p) in out.chunks_exact_mut(v).zip(positions) {
            let got = &data[p * width..(p + 1) * width];
            check_finite(Role::Decoder, "logits", got)?;
            for (&t, &l) in ids.iter().zip(got) {
                if let Some(x) = row.get_mut(t as usize) {
                    *x = l;
                }
            }
        }
        Ok(out)
    }

    pub(super) fn prefill(&mut self, embeds: Vec<f32>) -> Result<Vec<f32>> {
        let e = self.moda.manifest.model.embed_dim;
        let t = Tensor::from_array(([self.rows, 2, e], embeds))
            .map_err(|err| Error::run(Role::Decoder.name(), err))?;
        self.run(t.into(), 2, false, None)
    }
}

impl StepModel for DecodeState<'_> {
    type Error = Error;

    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let embeds = self.moda.embed_tokens(self.worker, tokens)?;
        self.run(embeds.into(), 1, false, None)
    }

    fn step_many(&mut self, tokens: &[u32], n: usize) -> Result<Vec<f32>> {
        if n == 0 || tokens.len() != self.rows * n {
            return Err(Error::Internal(format!(
                "{} tokens for {} decoder rows of {n}",
                tokens.len(),
                self.rows
            )));
        }
        let embeds = self.moda.embed_tokens_rows(self.worker, tokens, n)?;
        self.run(embeds.into(), n, true, None)
    }

    fn ragged(&self) -> bool {
        true
    }

    fn selects_logits(&self) -> bool {
        self.moda.decoder_io.head_ids && self.moda.options.listed_logits
    }

    fn only_logits_of(&mut self, mut ids: Vec<u32>) {
        // Ids past the decoder's vocabulary have no logits (a tokenizer may be larger).
        ids.retain(|&t| (t as usize) < self.moda.manifest.model.vocab_size);
        self.listed = Some(ids);
    }

    fn step_ragged(&mut self, tokens: &[u32], n: usize, lens: &[usize]) -> Result<Vec<f32>> {
        if n == 0
            || tokens.len() != self.rows * n
            || lens.len() != self.rows
            || lens.iter().any(|&l| l == 0 || l > n)
        {
            return Err(Error::Internal(format!(
                "{} tokens for {} decoder rows of {n} (lengths {lens:?})",
                tokens.len(),
                self.rows
            )));
        }
        let embeds = self.moda.embed_tokens_rows(self.worker, tokens, n)?;
        self.run(embeds.into(), n, true, Some(lens))
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if rows.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(());
        }
        let mut out = Vec::with_capacity(self.past.len());
        for v in &self.past {
            let (shape, data) = v
                .try_extract_tensor::<f32>()
                .map_err(|e| Error::run(Role::Decoder.name(), e))?;
            let dims: Vec<usize> = shape.iter().map(|&x| x as usize).collect();
            let per_row: usize = dims[1..].iter().product();
            let mut g = Vec::with_capacity(rows.len() * per_row);
            for &r in rows {
                g.extend_from_slice(&data[r * per_row..(r + 1) * per_row]);
            }
            let mut new_dims = dims.clone();
            new_dims[0] = rows.len();
            let t = Tensor::from_array((new_dims, g))
                .map_err(|e| Error::run(Role::Decoder.name(), e))?;
            out.push(t.into_dyn());
        }
        self.past = out;
        let total = self.total;
        self.mask = rows
            .iter()
            .flat_map(|&r| self.mask[r * total..(r + 1) * total].iter().copied())
            .collect();
        Ok(())
    }
}

/// The text of generated ids, special tokens left out. Ids the tokenizer does not know are
/// skipped, as `transformers`' `decode` does: a model's embedding table is often larger than
/// its tokenizer's vocabulary (OPT-125m: 50272 rows, 50265 tokens), and those rows can be
/// generated.
pub(super) fn decode_text(tok: &ModaTokenizer, ids: &[u32]) -> Result<String> {
    let known: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| tok.inner().id_to_token(id).is_some())
        .collect();
    tok.decode(&known, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Turns a growing list of token ids into text pieces whose concatenation is the decoded
/// text: a piece is emitted once the text decoded so far no longer ends in an incomplete
/// character.
#[derive(Default)]
pub(super) struct TextStream {
    pub(super) ids: Vec<u32>,
    pub(super) emitted: usize,
}

impl TextStream {
    pub(super) fn push(&mut self, tok: &ModaTokenizer, id: u32) -> String {
        self.ids.push(id);
        let Ok(text) = decode_text(tok, &self.ids) else {
            return String::new();
        };
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return String::new();
        }
        let piece = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        piece
    }
}
