//! Verification of a written bundle: its graphs run in ONNX Runtime (the SDK's own set-up,
//! [`moda_sdk::runtime`]) on probe inputs, compared with the candle model they came from.
//!
//! Probes: two deterministic pseudo-random images; their embeddings through the projector;
//! four token ids through `embed_tokens`; a prefill of `[prefix, four tokens]` with the second
//! row left-padded by one position, then [`DECODE_STEPS`] cached steps of one token each
//! (the cache fed back from `present.*`), each compared with candle's own KV-cache decoding.
//! At the prefill and the last step the decoder runs a second time with a list of token ids
//! ([`HEAD_IDS`]): its logits must be the whole head's at those tokens.

use std::borrow::Cow;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use moda_models::{Cache, CaptionModel, DecoderInput};
use moda_sdk::runtime::{session_from_file, SessionOptions};
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor as OrtTensor;

use moda_sdk::manifest::{
    Role, ATTENTION_MASK, HEAD_IDS, IMAGE_EMBEDS, INPUTS_EMBEDS, INPUT_IDS, LOGITS, PIXEL_VALUES,
    PREFIX_EMBEDS,
};

use crate::{Error, Quantize, Result};

/// Largest accepted difference of image embeddings and projector outputs.
pub const EMBED_TOLERANCE: f32 = 1e-4;
/// Largest accepted difference of decoder logits.
pub const LOGITS_TOLERANCE: f32 = 1e-3;
/// Cached decode steps after the prefill.
pub const DECODE_STEPS: usize = 4;

/// The largest absolute differences found, per graph.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Measurements {
    /// `encoder` `image_embeds`.
    pub encoder: f32,
    /// `projector` `prefix_embeds`.
    pub projector: f32,
    /// `embed_tokens` `inputs_embeds`.
    pub embed_tokens: f32,
    /// `decoder` `logits` of the prefill.
    pub decoder_prefill: f32,
    /// `decoder` `logits`, the largest over the cached steps.
    pub decoder_steps: f32,
    /// `decoder` `logits` for a list of tokens ([`HEAD_IDS`]) against the whole head's
    /// logits at those tokens (not candle's), the largest at the prefill and the last step.
    pub decoder_listed: f32,
    /// For a quantized decoder: the share of positions (prefill and cached steps, probe
    /// tokens fed to both) where its argmax token equals the fp32 candle model's.
    pub greedy_agreement: Option<f32>,
    /// For a quantized decoder: the lowest cosine similarity between its logits and fp32's
    /// over those positions.
    pub min_logits_cosine: Option<f32>,
    /// For a quantized encoder: the lowest cosine similarity between its image embeddings
    /// and fp32's.
    pub min_embeds_cosine: Option<f32>,
}

/// Lowest accepted cosine similarity between a quantized decoder's logits and fp32's, at
/// every probe position. Argmax agreement is reported, not enforced: on random-weight models
/// (the fixtures, the benchmark model) the logits are nearly flat and the argmax is noise.
pub fn min_cosine(quantize: Quantize) -> f32 {
    match quantize {
        Quantize::Int4 => 0.7,
        _ => 0.95,
    }
}

/// Lowest accepted cosine similarity between a quantized encoder's image embeddings and
/// fp32's.
pub fn min_embeds_cosine(quantize: Quantize) -> f32 {
    match quantize {
        Quantize::Int4 => 0.9,
        _ => 0.98,
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += *x as f64 * *x as f64;
        bb += *y as f64 * *y as f64;
    }
    (ab / (aa.sqrt() * bb.sqrt()).max(1e-30)) as f32
}
/// Largest accepted difference between listed logits and the whole head's at the same
/// tokens, relative to the whole head's largest logit at that position. fp32: the same
/// products summed in another order, float noise. Quantized: `MatMulNBits` (accuracy level 4)
/// quantizes its inputs to 8 bits per block, each within 1/254 of the block's largest, where
/// the listed product multiplies the fp32 inputs by the same dequantized weights; on OPT-125m's
/// int4 head the two differ by 0.2% of the largest logit, a tenth of this bound.
pub fn listed_tolerance(quantize: Quantize) -> f32 {
    match quantize {
        Quantize::None => 1e-5,
        _ => 2e-2,
    }
}

/// Cached decode steps for a quantized decoder (more, to measure the agreement).
pub const QUANTIZED_DECODE_STEPS: usize = 24;

/// A float tensor as ONNX Runtime returned it.
pub struct Out {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

fn ort_err(graph: &str, e: impl std::fmt::Display) -> Error {
    Error::Ort {
        graph: graph.to_string(),
        msg: e.to_string(),
    }
}

/// A session for `dir/file` with the SDK's runtime set-up (one thread, full optimisation).
pub fn open(dir: &Path, file: &str) -> Result<Session> {
    let options = SessionOptions {
        intra_threads: Some(1),
        ..Default::default()
    };
    Ok(session_from_file(&dir.join(file), &options)?)
}

/// A candle tensor as an f32 ONNX Runtime input.
pub fn f32_input(graph: &str, t: &Tensor) -> Result<SessionInputValue<'static>> {
    let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    f32_raw(graph, shape, data)
}

/// Shape and values as an f32 ONNX Runtime input (zero-sized shapes allowed).
pub fn f32_raw(graph: &str, shape: Vec<i64>, data: Vec<f32>) -> Result<SessionInputValue<'static>> {
    let v = OrtTensor::from_array((shape, data)).map_err(|e| ort_err(graph, e))?;
    Ok(v.into())
}

/// A candle tensor as an int64 ONNX Runtime input.
pub fn i64_input(graph: &str, t: &Tensor) -> Result<SessionInputValue<'static>> {
    let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
    let data = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    let v = OrtTensor::from_array((shape, data)).map_err(|e| ort_err(graph, e))?;
    Ok(v.into())
}

/// Runs `session` and returns the named float outputs.
pub fn run(
    session: &mut Session,
    graph: &str,
    inputs: Vec<(String, SessionInputValue<'static>)>,
    outputs: &[String],
) -> Result<Vec<Out>> {
    let inputs: Vec<(Cow<'static, str>, SessionInputValue<'static>)> = inputs
        .into_iter()
        .map(|(k, v)| (Cow::Owned(k), v))
        .collect();
    let result = session.run(inputs).map_err(|e| ort_err(graph, e))?;
    let mut out = Vec::with_capacity(outputs.len());
    for name in outputs {
        let value = result
            .get(name)
            .ok_or_else(|| ort_err(graph, format!("no output `{name}`")))?;
        let (shape, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| ort_err(graph, format!("output `{name}`: {e}")))?;
        out.push(Out {
            shape: shape.iter().map(|&d| d as usize).collect(),
            data: data.to_vec(),
        });
    }
    Ok(out)
}

/// The largest absolute difference; a shape mismatch or a NaN is an error naming the output.
/// Compares an output with the candle tensor it should equal.
pub fn compare(
    graph: &str,
    output: &str,
    step: &str,
    got: &Out,
    want: &Tensor,
    tol: f32,
) -> Result<f32> {
    let fail = |diff: f32, detail: String| Error::Verify {
        graph: graph.to_string(),
        output: output.to_string(),
        step: step.to_string(),
        diff,
        tol,
        detail,
    };
    if got.shape != want.dims() {
        return Err(fail(
            f32::INFINITY,
            format!(
                "shape {:?}, the candle model gives {:?}",
                got.shape,
                want.dims()
            ),
        ));
    }
    let want = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut max = 0f32;
    for (a, b) in got.data.iter().zip(&want) {
        let d = (a - b).abs();
        if d.is_nan() {
            return Err(fail(f32::NAN, "a NaN".to_string()));
        }
        max = max.max(d);
    }
    if max > tol {
        return Err(fail(max, String::new()));
    }
    Ok(max)
}

/// Deterministic pseudo-random floats in `[lo, hi)` (a 64-bit LCG; no `rand` needed).
pub fn probe_values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        })
        .collect()
}

/// Argmax over the last axis of `[b, s, v]` logits, per row and position.
fn argmax_rows(data: &[f32], v: usize) -> Vec<usize> {
    data.chunks(v)
        .map(|row| {
            let mut best = 0;
            for (i, x) in row.iter().enumerate() {
                if *x > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// Probe images and token rows per run.
const PROBE_ROWS: usize = 2;

/// Runs every graph of the bundle in `dir` on the probes and compares with `model`. Quantized
/// graphs are judged by cosine similarities ([`min_embeds_cosine`], [`min_cosine`]).
pub fn verify_bundle(model: &CaptionModel, dir: &Path, quantize: Quantize) -> Result<Measurements> {
    let mut m = Measurements::default();
    let image_embeds = verify_encoder(model, dir, quantize, &mut m)?;
    // Each graph is fed the candle model's values, so that each is judged alone.
    let prefix = verify_projector(model, dir, &image_embeds, &mut m)?;
    let tokens = verify_embed_tokens(model, dir, &mut m)?;
    verify_decoder(model, dir, quantize, &prefix, &tokens, &mut m)?;
    Ok(m)
}

/// The encoder on two pseudo-random images; returns candle's image embeddings.
fn verify_encoder(
    model: &CaptionModel,
    dir: &Path,
    quantize: Quantize,
    m: &mut Measurements,
) -> Result<Tensor> {
    let ecfg = model.encoder_config();
    let (b, c, s) = (PROBE_ROWS, ecfg.num_channels, ecfg.image_size);
    let values = probe_values(b * c * s * s, 1, -1.8, 2.1);
    let pix = Tensor::from_vec(values, (b, c, s, s), &Device::Cpu)?;
    let want = model.encode_images(&pix)?;
    let graph = Role::Encoder.name();
    let mut session = open(dir, Role::Encoder.default_file())?;
    let inputs = vec![(PIXEL_VALUES.to_string(), f32_input(graph, &pix)?)];
    let got = run(&mut session, graph, inputs, &[IMAGE_EMBEDS.to_string()])?;
    let quantized = quantize != Quantize::None;
    let tol = if quantized {
        f32::INFINITY
    } else {
        EMBED_TOLERANCE
    };
    m.encoder = compare(graph, IMAGE_EMBEDS, "probe images", &got[0], &want, tol)?;
    if quantized {
        let min_cos = min_row_cosine(&got[0], &want, ecfg.projection_dim)?;
        m.min_embeds_cosine = Some(min_cos);
        check_cosine(quantize, min_cos, CosineCheck::Embeddings)?;
    }
    Ok(want)
}

/// The projector on candle's image embeddings; returns candle's prefix embeddings.
fn verify_projector(
    model: &CaptionModel,
    dir: &Path,
    image_embeds: &Tensor,
    m: &mut Measurements,
) -> Result<Tensor> {
    let prefix = model.project(image_embeds)?;
    let graph = Role::Projector.name();
    let mut session = open(dir, Role::Projector.default_file())?;
    let inputs = vec![(IMAGE_EMBEDS.to_string(), f32_input(graph, image_embeds)?)];
    let got = run(&mut session, graph, inputs, &[PREFIX_EMBEDS.to_string()])?;
    m.projector = compare(
        graph,
        PREFIX_EMBEDS,
        "probe embeddings",
        &got[0],
        &prefix,
        EMBED_TOLERANCE,
    )?;
    Ok(prefix)
}

/// The token embeddings of four probe ids (the BOS first), the second row reversed; returns
/// candle's.
fn verify_embed_tokens(model: &CaptionModel, dir: &Path, m: &mut Measurements) -> Result<Tensor> {
    let dcfg = model.decoder().config();
    let v = dcfg.vocab_size as u32;
    let ids: Vec<u32> = vec![dcfg.bos_token_id, 5 % v, 7 % v, 11 % v];
    let rows = [ids.clone(), ids.iter().rev().copied().collect()].concat();
    let ids = Tensor::from_vec(rows, (PROBE_ROWS, 4), &Device::Cpu)?;
    let tok = model.decoder().embed_tokens(&ids)?;
    let graph = Role::EmbedTokens.name();
    let mut session = open(dir, Role::EmbedTokens.default_file())?;
    let inputs = vec![(INPUT_IDS.to_string(), i64_input(graph, &ids)?)];
    let got = run(&mut session, graph, inputs, &[INPUTS_EMBEDS.to_string()])?;
    m.embed_tokens = compare(
        graph,
        INPUTS_EMBEDS,
        "probe ids",
        &got[0],
        &tok,
        EMBED_TOLERANCE,
    )?;
    Ok(tok)
}

/// The lowest cosine similarity between the rows (of `width` values) of `got` and `want`.
fn min_row_cosine(got: &Out, want: &Tensor, width: usize) -> Result<f32> {
    let want = want.flatten_all()?.to_vec1::<f32>()?;
    Ok(got
        .data
        .chunks(width)
        .zip(want.chunks(width))
        .map(|(a, b)| cosine(a, b))
        .fold(1f32, f32::min))
}

/// Which quantized output a cosine similarity was measured on.
#[derive(Debug, Clone, Copy)]
enum CosineCheck {
    /// The encoder's image embeddings of the probe images.
    Embeddings,
    /// The decoder's logits at this many probe positions.
    Logits(usize),
}

/// Refuses a quantized graph whose lowest cosine similarity with fp32 is below its bound.
fn check_cosine(quantize: Quantize, min_cos: f32, what: CosineCheck) -> Result<()> {
    let (graph, output, step, min, outputs) = match what {
        CosineCheck::Embeddings => (
            Role::Encoder,
            IMAGE_EMBEDS,
            "probe images".to_string(),
            min_embeds_cosine(quantize),
            "encoder's embeddings",
        ),
        CosineCheck::Logits(n) => (
            Role::Decoder,
            LOGITS,
            format!("{n} probe positions"),
            min_cosine(quantize),
            "decoder's logits",
        ),
    };
    if !min_cos.is_nan() && min_cos >= min {
        return Ok(());
    }
    Err(Error::Verify {
        graph: graph.name().to_string(),
        output: output.to_string(),
        step,
        diff: 1.0 - min_cos,
        tol: 1.0 - min,
        detail: format!(
            "the {} {outputs} have a cosine similarity of only {min_cos:.4} with fp32's (at \
             least {min} expected)",
            quantize.name()
        ),
    })
}

/// How a quantized decoder's logits agree with fp32's over the probe positions.
#[derive(Debug, Clone, Copy)]
struct Agreement {
    /// Positions where the argmax tokens are equal.
    agree: usize,
    /// Positions compared (padding left out).
    counted: usize,
    /// The lowest cosine similarity of the logits.
    min_cos: f32,
}

impl Default for Agreement {
    fn default() -> Self {
        Self {
            agree: 0,
            counted: 0,
            min_cos: 1.0,
        }
    }
}

impl Agreement {
    /// Adds the positions of one run: `got` and `want` are `[rows * seq, vocab]` logits,
    /// `valid` says which positions are not padding.
    fn add(&mut self, got: &[f32], want: &[f32], valid: &[i64], vocab: usize) {
        let a = argmax_rows(got, vocab);
        let w = argmax_rows(want, vocab);
        let rows = got.chunks(vocab).zip(want.chunks(vocab));
        for (((x, y), ok), (gr, wr)) in a.iter().zip(&w).zip(valid).zip(rows) {
            if *ok == 1 {
                self.counted += 1;
                self.agree += usize::from(x == y);
                self.min_cos = self.min_cos.min(cosine(gr, wr));
            }
        }
    }
}

/// The decoder's probe run: its inputs for the next step, candle's cache beside it.
struct DecoderProbe<'m> {
    model: &'m CaptionModel,
    session: Session,
    /// The new positions' embeddings `[rows, seq, embed_dim]`.
    embeds: Tensor,
    /// `[rows, past + seq]`; row 1 is left-padded by one position.
    mask: Tensor,
    /// Candle's KV cache.
    cache: Cache,
    /// ONNX Runtime's `present.*` of the last step, in the decoder's input order.
    past: Vec<Out>,
}

impl<'m> DecoderProbe<'m> {
    /// The prefill's inputs: `[prefix, four tokens]`, the second row left-padded by one.
    fn new(model: &'m CaptionModel, dir: &Path, prefix: &Tensor, tokens: &Tensor) -> Result<Self> {
        let dcfg = model.decoder().config();
        let embeds = Tensor::cat(&[prefix, tokens], 1)?;
        let seq = embeds.dim(1)?;
        let mut mask_rows = vec![1i64; PROBE_ROWS * seq];
        mask_rows[seq] = 0;
        let mask = Tensor::from_vec(mask_rows, (PROBE_ROWS, seq), &Device::Cpu)?;
        let (heads, hd) = (dcfg.num_attention_heads, dcfg.head_dim());
        let past = (0..2 * dcfg.num_hidden_layers)
            .map(|_| Out {
                shape: vec![PROBE_ROWS, heads, 0, hd],
                data: Vec::new(),
            })
            .collect();
        Ok(Self {
            model,
            session: open(dir, Role::Decoder.default_file())?,
            embeds,
            mask,
            cache: Cache::new(dcfg),
            past,
        })
    }

    /// Runs candle and ONNX Runtime on the current inputs; returns (ONNX Runtime's logits,
    /// candle's) and keeps ONNX Runtime's cache for the next step. With `listed`, ONNX Runtime
    /// also runs the same inputs with those [`HEAD_IDS`] first, and their logits come third.
    fn step(&mut self, listed: Option<&[i64]>) -> Result<(Out, Tensor, Option<Out>)> {
        let want = self.model.decoder().forward(
            DecoderInput::Embeds(&self.embeds),
            Some(&self.mask),
            Some(&mut self.cache),
        )?;
        let graph = Role::Decoder.name();
        let mut inputs = vec![
            (INPUTS_EMBEDS.to_string(), f32_input(graph, &self.embeds)?),
            (ATTENTION_MASK.to_string(), i64_input(graph, &self.mask)?),
        ];
        let layers = self.past.len() / 2;
        let outputs = Role::Decoder.output_names(layers);
        let names = Role::Decoder.input_names(layers).into_iter().skip(2);
        let mut again = Vec::new();
        for (name, p) in names.zip(self.past.drain(..)) {
            let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
            if listed.is_some() {
                again.push((name.clone(), f32_raw(graph, shape.clone(), p.data.clone())?));
            }
            inputs.push((name, f32_raw(graph, shape, p.data)?));
        }
        let listed = match listed {
            Some(ids) => {
                let mut first = vec![
                    (INPUTS_EMBEDS.to_string(), f32_input(graph, &self.embeds)?),
                    (ATTENTION_MASK.to_string(), i64_input(graph, &self.mask)?),
                ];
                first.append(&mut again);
                let ids = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu)?;
                first.push((HEAD_IDS.to_string(), i64_input(graph, &ids)?));
                let mut got = run(&mut self.session, graph, first, &outputs[..1])?;
                got.pop()
            }
            None => None,
        };
        let mut got = run(&mut self.session, graph, inputs, &outputs)?;
        self.past = got.split_off(1);
        let logits = got.pop().ok_or_else(|| ort_err(graph, "no logits"))?;
        Ok((logits, want, listed))
    }

    /// Which of the current positions are not padding, row by row.
    fn valid_positions(&self) -> Result<Vec<i64>> {
        let seq = self.embeds.dim(1)?;
        let total = self.mask.dim(1)?;
        Ok(self
            .mask
            .narrow(1, total - seq, seq)?
            .flatten_all()?
            .to_vec1::<i64>()?)
    }

    /// Feeds one more probe token per row (a different one each step).
    fn advance(&mut self, step: usize) -> Result<()> {
        let dev = Device::Cpu;
        let v = self.model.decoder().config().vocab_size as u32;
        let next: Vec<u32> = (0..PROBE_ROWS as u32)
            .map(|r| (13 + 17 * step as u32 + 29 * r) % v)
            .collect();
        let next = Tensor::from_vec(next, (PROBE_ROWS, 1), &dev)?;
        self.embeds = self.model.decoder().embed_tokens(&next)?;
        let ones = Tensor::ones((PROBE_ROWS, 1), DType::I64, &dev)?;
        self.mask = Tensor::cat(&[&self.mask, &ones], 1)?;
        Ok(())
    }
}

/// Compares the logits of a run with [`HEAD_IDS`] `ids` (`[rows, seq, ids]`) with the whole
/// head's `every` (`[rows, seq, vocab]`) at those tokens, within [`listed_tolerance`] of each
/// position's largest logit; returns the largest difference.
fn compare_listed(
    every: &Out,
    listed: &Out,
    ids: &[i64],
    vocab: usize,
    quantize: Quantize,
    label: &str,
) -> Result<f32> {
    let positions = every.data.len() / vocab.max(1);
    let graph = Role::Decoder.name();
    let fail = |diff: f32, tol: f32, detail: String| Error::Verify {
        graph: graph.to_string(),
        output: LOGITS.to_string(),
        step: format!("{label}, with {HEAD_IDS}"),
        diff,
        tol,
        detail,
    };
    let want_shape = [
        &every.shape[..every.shape.len().saturating_sub(1)],
        &[ids.len()],
    ]
    .concat();
    if listed.shape != want_shape {
        return Err(fail(
            f32::INFINITY,
            0.0,
            format!("shape {:?}, expected {want_shape:?}", listed.shape),
        ));
    }
    let mut worst = 0f32;
    for p in 0..positions {
        let row = &every.data[p * vocab..(p + 1) * vocab];
        let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        let tol = listed_tolerance(quantize) * scale;
        for (j, &id) in ids.iter().enumerate() {
            let (a, b) = (listed.data[p * ids.len() + j], row[id as usize]);
            let diff = (a - b).abs();
            if diff.is_nan() || diff > tol {
                return Err(fail(
                    diff,
                    tol,
                    format!("token {id} at position {p}: {a} listed, {b} from the whole head"),
                ));
            }
            worst = worst.max(diff);
        }
    }
    Ok(worst)
}

/// The decoder: a prefill of `[prefix, tokens]`, then cached steps of one token each, each
/// compared with candle's own KV-cache decoding.
fn verify_decoder(
    model: &CaptionModel,
    dir: &Path,
    quantize: Quantize,
    prefix: &Tensor,
    tokens: &Tensor,
    m: &mut Measurements,
) -> Result<()> {
    let quantized = quantize != Quantize::None;
    let (steps, tol) = if quantized {
        (QUANTIZED_DECODE_STEPS, f32::INFINITY)
    } else {
        (DECODE_STEPS, LOGITS_TOLERANCE)
    };
    let vocab = model.decoder().config().vocab_size;
    let mut probe = DecoderProbe::new(model, dir, prefix, tokens)?;
    let mut agreement = Agreement::default();
    // Tokens from both ends of the table and between, out of order, one twice.
    let ids: Vec<i64> = [vocab - 1, 0, vocab / 3, 2, vocab / 2, 0]
        .iter()
        .map(|&t| t as i64)
        .collect();
    for step in 0..=steps {
        let listed = (step == 0 || step == steps).then_some(ids.as_slice());
        let (got, want, listed) = probe.step(listed)?;
        let label = match step {
            0 => "the prefill".to_string(),
            _ => format!("cached step {step}"),
        };
        if let Some(listed) = listed {
            let diff = compare_listed(&got, &listed, &ids, vocab, quantize, &label)?;
            m.decoder_listed = m.decoder_listed.max(diff);
        }
        let diff = compare(Role::Decoder.name(), LOGITS, &label, &got, &want, tol)?;
        if quantized {
            let want = want.flatten_all()?.to_vec1::<f32>()?;
            agreement.add(&got.data, &want, &probe.valid_positions()?, vocab);
        }
        match step {
            0 => m.decoder_prefill = diff,
            _ => m.decoder_steps = m.decoder_steps.max(diff),
        }
        probe.advance(step)?;
    }
    if quantized {
        let a = agreement;
        m.greedy_agreement = Some(a.agree as f32 / a.counted.max(1) as f32);
        m.min_logits_cosine = Some(a.min_cos);
        check_cosine(quantize, a.min_cos, CosineCheck::Logits(a.counted))?;
    }
    Ok(())
}
