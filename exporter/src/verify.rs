//! Verification of a written bundle: its graphs run in ONNX Runtime (the SDK's own set-up,
//! [`moda_sdk::runtime`]) on probe inputs, compared with the candle model they came from.
//!
//! Probes: two deterministic pseudo-random images; their embeddings through the projector;
//! four token ids through `embed_tokens`; a prefill of `[prefix, four tokens]` with the second
//! row left-padded by one position, then [`DECODE_STEPS`] cached steps of one token each
//! (the cache fed back from `present.*`), each compared with candle's own KV-cache decoding.

use std::borrow::Cow;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use moda_models::{Cache, DecoderInput, Moda};
use moda_sdk::runtime::{session_from_file, SessionOptions};
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor as OrtTensor;

use crate::graphs::cache_names;
use crate::{Error, Result};

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
pub fn min_cosine(quantize: crate::Quantize) -> f32 {
    match quantize {
        crate::Quantize::Int4 => 0.7,
        _ => 0.95,
    }
}

/// Lowest accepted cosine similarity between a quantized encoder's image embeddings and
/// fp32's.
pub fn min_embeds_cosine(quantize: crate::Quantize) -> f32 {
    match quantize {
        crate::Quantize::Int4 => 0.9,
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

/// Runs every graph of the bundle in `dir` on the probes and compares with `model`. Quantized
/// graphs are judged by cosine similarities ([`min_embeds_cosine`], [`min_cosine`]).
pub fn verify_bundle(model: &Moda, dir: &Path, quantize: crate::Quantize) -> Result<Measurements> {
    let quantized = quantize != crate::Quantize::None;
    let dev = Device::Cpu;
    let ecfg = model.encoder_config();
    let dcfg = model.decoder().config();
    let mut m = Measurements::default();
    let b = 2;

    // Encoder.
    let (c, s) = (ecfg.num_channels, ecfg.image_size);
    let pix = Tensor::from_vec(
        probe_values(b * c * s * s, 1, -1.8, 2.1),
        (b, c, s, s),
        &dev,
    )?;
    let want = model.encode_images(&pix)?;
    let mut enc = open(dir, crate::ENCODER_FILE)?;
    let got = run(
        &mut enc,
        "encoder",
        vec![("pixel_values".into(), f32_input("encoder", &pix)?)],
        &["image_embeds".into()],
    )?;
    let tol = if quantized {
        f32::INFINITY
    } else {
        EMBED_TOLERANCE
    };
    m.encoder = compare(
        "encoder",
        "image_embeds",
        "probe images",
        &got[0],
        &want,
        tol,
    )?;
    if quantized {
        let p = ecfg.projection_dim;
        let want_data = want.flatten_all()?.to_vec1::<f32>()?;
        let min_cos = got[0]
            .data
            .chunks(p)
            .zip(want_data.chunks(p))
            .map(|(a, b)| cosine(a, b))
            .fold(1f32, f32::min);
        m.min_embeds_cosine = Some(min_cos);
        let min = min_embeds_cosine(quantize);
        if min_cos.is_nan() || min_cos < min {
            return Err(Error::Verify {
                graph: "encoder".to_string(),
                output: "image_embeds".to_string(),
                step: "probe images".to_string(),
                diff: 1.0 - min_cos,
                tol: 1.0 - min,
                detail: format!(
                    "the {} encoder's embeddings have a cosine similarity of only {min_cos:.4} \
                     with fp32's (at least {min} expected)",
                    quantize.name()
                ),
            });
        }
    }
    drop(enc);

    // Projector, fed the candle embeddings so that each graph is judged alone.
    let prefix = model.project(&want)?;
    let mut proj = open(dir, crate::PROJECTOR_FILE)?;
    let got = run(
        &mut proj,
        "projector",
        vec![("image_embeds".into(), f32_input("projector", &want)?)],
        &["prefix_embeds".into()],
    )?;
    m.projector = compare(
        "projector",
        "prefix_embeds",
        "probe embeddings",
        &got[0],
        &prefix,
        EMBED_TOLERANCE,
    )?;
    drop(proj);

    // Token embeddings.
    let v = dcfg.vocab_size as u32;
    let ids: Vec<u32> = vec![dcfg.bos_token_id, 5 % v, 7 % v, 11 % v];
    let ids = Tensor::from_vec(
        [ids.clone(), ids.iter().rev().copied().collect()].concat(),
        (b, 4),
        &dev,
    )?;
    let tok = model.decoder().embed_tokens(&ids)?;
    let mut emb = open(dir, crate::EMBED_TOKENS_FILE)?;
    let got = run(
        &mut emb,
        "embed_tokens",
        vec![("input_ids".into(), i64_input("embed_tokens", &ids)?)],
        &["inputs_embeds".into()],
    )?;
    m.embed_tokens = compare(
        "embed_tokens",
        "inputs_embeds",
        "probe ids",
        &got[0],
        &tok,
        EMBED_TOLERANCE,
    )?;
    drop(emb);

    // Decoder: prefill, then cached steps.
    let mut dec = open(dir, crate::DECODER_FILE)?;
    let layers = dcfg.num_hidden_layers;
    let (heads, hd) = (dcfg.num_attention_heads, dcfg.head_dim());
    let mut out_names = vec!["logits".to_string()];
    for i in 0..layers {
        let [_, _, k, v] = cache_names(i);
        out_names.push(k);
        out_names.push(v);
    }
    let mut embeds = Tensor::cat(&[&prefix, &tok], 1)?;
    let seq = embeds.dim(1)?;
    let mut mask_rows = vec![1i64; b * seq];
    mask_rows[seq] = 0; // row 1 is left-padded by one position
    let mut mask = Tensor::from_vec(mask_rows, (b, seq), &dev)?;
    let mut cache = Cache::new(dcfg);
    let mut past: Vec<Out> = (0..2 * layers)
        .map(|_| Out {
            shape: vec![b, heads, 0, hd],
            data: Vec::new(),
        })
        .collect();
    let steps = if quantized {
        QUANTIZED_DECODE_STEPS
    } else {
        DECODE_STEPS
    };
    let (mut agree, mut counted) = (0usize, 0usize);
    let mut min_cos = 1f32;
    for step in 0..=steps {
        let want = model.decoder().forward(
            DecoderInput::Embeds(&embeds),
            Some(&mask),
            Some(&mut cache),
        )?;
        let mut inputs = vec![
            ("inputs_embeds".to_string(), f32_input("decoder", &embeds)?),
            ("attention_mask".to_string(), i64_input("decoder", &mask)?),
        ];
        for (i, p) in past.drain(..).enumerate() {
            let [k, v, _, _] = cache_names(i / 2);
            let name = if i % 2 == 0 { k } else { v };
            let shape = p.shape.iter().map(|&d| d as i64).collect();
            inputs.push((name, f32_raw("decoder", shape, p.data)?));
        }
        let mut got = run(&mut dec, "decoder", inputs, &out_names)?;
        let label = if step == 0 {
            "the prefill".to_string()
        } else {
            format!("cached step {step}")
        };
        let tol = if quantized {
            f32::INFINITY
        } else {
            LOGITS_TOLERANCE
        };
        let diff = compare("decoder", "logits", &label, &got[0], &want, tol)?;
        if quantized {
            let v = dcfg.vocab_size;
            let want_data = want.flatten_all()?.to_vec1::<f32>()?;
            let valid = mask
                .narrow(1, mask.dim(1)? - embeds.dim(1)?, embeds.dim(1)?)?
                .flatten_all()?
                .to_vec1::<i64>()?;
            let a = argmax_rows(&got[0].data, v);
            let w = argmax_rows(&want_data, v);
            let rows = got[0].data.chunks(v).zip(want_data.chunks(v));
            for (((x, y), ok), (gr, wr)) in a.iter().zip(&w).zip(&valid).zip(rows) {
                if *ok == 1 {
                    counted += 1;
                    agree += usize::from(x == y);
                    min_cos = min_cos.min(cosine(gr, wr));
                }
            }
        }
        if step == 0 {
            m.decoder_prefill = diff;
        } else {
            m.decoder_steps = m.decoder_steps.max(diff);
        }
        past = got.split_off(1);
        let next: Vec<u32> = (0..b as u32)
            .map(|r| (13 + 17 * step as u32 + 29 * r) % v)
            .collect();
        let next = Tensor::from_vec(next, (b, 1), &dev)?;
        embeds = model.decoder().embed_tokens(&next)?;
        let ones = Tensor::ones((b, 1), DType::I64, &dev)?;
        mask = Tensor::cat(&[&mask, &ones], 1)?;
    }
    if quantized {
        m.greedy_agreement = Some(agree as f32 / counted.max(1) as f32);
        m.min_logits_cosine = Some(min_cos);
        let min = min_cosine(quantize);
        if min_cos.is_nan() || min_cos < min {
            return Err(Error::Verify {
                graph: "decoder".to_string(),
                output: "logits".to_string(),
                step: format!("{counted} probe positions"),
                diff: 1.0 - min_cos,
                tol: 1.0 - min,
                detail: format!(
                    "the {} decoder's logits have a cosine similarity of only {min_cos:.4} \
                     with fp32's (at least {min} expected)",
                    quantize.name()
                ),
            });
        }
    }
    Ok(m)
}
