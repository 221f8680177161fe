//! MODA's four graphs, written from the candle model's own tensors
//! ([`moda_models::ClipVision::named_tensors`] and friends):
//!
//! - `encoder`: transformers' `CLIPModel.get_image_features` (`modeling_clip.py`);
//! - `projector`: `Linear -> GELU (erf) -> Linear`, then the prefix axis;
//! - `decoder`: `OPTForCausalLM` (`modeling_opt.py`) from `inputs_embeds`, with the KV cache in
//!   optimum's layout (`past_key_values.{i}.key|value` -> `present.{i}.key|value`,
//!   `[batch, heads, past, head_dim]`). Positions (`cumsum(mask) * mask - 1`, plus OPT's offset
//!   of 2) are computed inside the graph from `attention_mask`; self-attention is ONNX
//!   Runtime's `com.microsoft.MultiHeadAttention` (CPU kernel), fed the cache through its
//!   `past_key`/`past_value` inputs and `present_key`/`present_value` outputs, the padding as
//!   its int32 `key_padding_mask` (`attention_mask` cast) and causality as `unidirectional = 1`
//!   (offset by the past length in the kernel), so one graph serves the first step
//!   (`past = 0`) and every later one, with no `If`;
//! - `embed_tokens`: a `Gather` over the token embedding table.
//!
//! Shapes are written for ONNX Runtime's CPU fusions: `LayerNormalization` (opset 17),
//! an attention layer's query, key and value projections as one product (their weights
//! stacked) split in three, `MatMul` + `Add` with pre-transposed `[in, out]` weights, GELU
//! as transformers' erf formula (`GeluFusion`), quick GELU as `x * Sigmoid(1.702 x)`
//! (`QuickGeluFusion`). The attention scale is folded into the query projection (exact for
//! head sizes that are powers of 4), so the decoder's `MultiHeadAttention` runs with
//! `scale = 1`. ONNX Runtime's `AttentionFusion` does not match OPT's decoder with a dynamic
//! KV cache, hence the contrib op written directly; the encoder's attention is the same op,
//! without cache, mask or causality.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_onnx::onnx::ModelProto;
use moda_models::{Activation, CaptionModel, ClipVisionConfig, OptConfig};

use moda_sdk::manifest::{
    Quantization, ATTENTION_MASK, HEAD_IDS, IMAGE_EMBEDS, INPUTS_EMBEDS, INPUT_IDS, LOGITS,
    PIXEL_VALUES, PREFIX_EMBEDS, VOCAB_SIZE_METADATA,
};

use crate::graph::{Attr, Dim, Elem, GraphBuilder};
use crate::{Error, Result};

/// A declared input or output of a graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its name in the graph (the names [`moda_sdk::manifest::Role`] gives).
    pub name: String,
    /// Its element type.
    pub elem: Elem,
    /// Its dimensions.
    pub dims: Vec<Dim>,
}

impl TensorSpec {
    fn new(name: &str, elem: Elem, dims: Vec<Dim>) -> Self {
        Self {
            name: name.to_string(),
            elem,
            dims,
        }
    }

    /// Declares it as an input of `g` and returns its value name.
    fn declare_input(&self, g: &mut GraphBuilder) -> String {
        g.input(&self.name, self.elem, &self.dims)
    }
}

/// A graph's declared inputs or outputs, in order.
pub type Signature = Vec<TensorSpec>;

/// A written graph and its signature.
pub struct Graph {
    /// The model.
    pub model: ModelProto,
    /// Its inputs.
    pub inputs: Signature,
    /// Its outputs.
    pub outputs: Signature,
    /// Inputs with a default in the graph, which a run may leave out.
    pub optional_inputs: Signature,
}

/// Block-wise weight quantization of the decoder's linear layers and LM head, as ONNX
/// Runtime's `com.microsoft.MatMulNBits`: symmetric, one f32 scale per block of
/// `block_size` weights along the input dimension, codes offset by the default zero point
/// `2^(bits - 1)`, packed low bits first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightQuant {
    /// 4 or 8.
    pub bits: u32,
    /// Weights per block along K (a power of two, at least 16).
    pub block_size: usize,
    /// `MatMulNBits`' `accuracy_level` (4: int8 dot products on CPU).
    pub accuracy_level: i64,
}

impl WeightQuant {
    /// The `MatMulNBits` parameters of a bundle's quantization, if any, with blocks of
    /// `block_size` weights instead of the kind's default.
    pub fn of(quantization: Quantization, block_size: Option<usize>) -> Option<Self> {
        let q = match quantization {
            Quantization::None => return None,
            Quantization::Int8 => Self::INT8,
            Quantization::Int4 => Self::INT4,
        };
        Some(Self {
            block_size: block_size.unwrap_or(q.block_size),
            ..q
        })
    }

    /// Whether `block_size` is one `MatMulNBits` takes: a power of two from 16 to 256.
    pub fn valid_block_size(block_size: usize) -> bool {
        block_size.is_power_of_two() && (16..=256).contains(&block_size)
    }

    /// int8, blocks of 128: as close to fp32 as blocks of 32 (the demo's descriptions and
    /// the verification's logits are the same), 9% fewer bytes per decode step (a scale
    /// per 128 weights instead of per 32) and about 20% faster steps.
    pub const INT8: Self = Self {
        bits: 8,
        block_size: 128,
        accuracy_level: 4,
    };
    /// int4, blocks of 32: a scale per 32 weights, the finer blocks that round-to-nearest
    /// int4 needs to stay close to the fp32 model (blocks of 128 read 14% fewer bytes and
    /// step about 20% faster, for a coarser approximation).
    pub const INT4: Self = Self {
        bits: 4,
        block_size: 32,
        accuracy_level: 4,
    };

    /// Quantizes `w` (row-major `[n, k]`): packed codes `[n, k_blocks, blob]` and scales
    /// `[n * k_blocks]`.
    pub fn quantize(&self, w: &[f32], n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let bs = self.block_size;
        let kb = k.div_ceil(bs);
        let qmax = ((1i32 << (self.bits - 1)) - 1) as f32;
        let zp = 1i32 << (self.bits - 1);
        let blob = bs * self.bits as usize / 8;
        let mut packed = vec![0u8; n * kb * blob];
        let mut scales = vec![0f32; n * kb];
        let mut codes = vec![0u8; bs];
        for r in 0..n {
            let row = &w[r * k..(r + 1) * k];
            for b in 0..kb {
                let block = &row[b * bs..((b + 1) * bs).min(k)];
                let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = absmax / qmax;
                scales[r * kb + b] = scale;
                for (j, c) in codes.iter_mut().enumerate() {
                    let v = block.get(j).copied().unwrap_or(0.0);
                    let q = if scale > 0.0 {
                        (v / scale).round().clamp(-qmax - 1.0, qmax) as i32
                    } else {
                        0
                    };
                    *c = (q + zp) as u8;
                }
                let out = &mut packed[(r * kb + b) * blob..(r * kb + b + 1) * blob];
                if self.bits == 8 {
                    out.copy_from_slice(&codes);
                } else {
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = (codes[2 * i] & 0x0f) | ((codes[2 * i + 1] & 0x0f) << 4);
                    }
                }
            }
        }
        (packed, scales)
    }
}

/// Tensors by name, with errors that name the missing one.
struct Named(HashMap<String, Tensor>);

impl Named {
    fn new(list: Vec<(String, Tensor)>) -> Self {
        Self(list.into_iter().collect())
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.0
            .get(name)
            .ok_or_else(|| Error::Internal(format!("the model has no tensor `{name}`")))
    }

    fn opt(&self, name: &str) -> Option<&Tensor> {
        self.0.get(name)
    }
}

fn d(n: usize) -> Dim {
    Dim::Fixed(n as i64)
}

/// `x W^T + b`, with `W [out, in]` stored transposed and both multiplied by `scale`.
fn linear(
    g: &mut GraphBuilder,
    x: &str,
    t: &Named,
    prefix: &str,
    scale: Option<f64>,
) -> Result<String> {
    linear_q(g, x, t, prefix, scale, None)
}

/// How a linear layer's weight is stored when quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// `MatMulNBits`: block-wise int8 or int4 weights (the decoder: its steps read every
    /// weight once per token, so fewer weight bytes make them faster).
    Blocks(WeightQuant),
    /// ONNX Runtime's `com.microsoft.DynamicQuantizeMatMul`: int8 weights with one scale per
    /// output column, and the activations quantized to 8 bits on each run, so that the
    /// product runs as int8 dot products (VNNI, AVX-512 where the CPU has them). For the
    /// encoder, whose products are compute-bound (197 positions per image): `MatMulNBits`
    /// leaves it as slow as fp32.
    DynamicInt8,
}

impl Quant {
    /// Layers narrower than this keep fp32 weights: they are a small part of any model, and
    /// quantizing them gains nothing and loses the most.
    const MIN_K: usize = 32;

    /// This quantization for a layer of `k` inputs: `None` below [`Quant::MIN_K`]; blocks no
    /// wider than the layer (the largest power of two within `k`), so that the layers of a
    /// model narrower than the kind's block are still quantized.
    fn for_width(self, k: usize) -> Option<Self> {
        if k < Self::MIN_K {
            return None;
        }
        Some(match self {
            Quant::Blocks(q) => {
                let fit = 1usize << (usize::BITS - 1 - k.leading_zeros());
                Quant::Blocks(WeightQuant {
                    block_size: q.block_size.min(fit),
                    ..q
                })
            }
            Quant::DynamicInt8 => Quant::DynamicInt8,
        })
    }
}

/// Symmetric int8 codes of `w` (row-major `[n, k]`) with one scale per row, transposed to
/// `DynamicQuantizeMatMul`'s `[k, n]`: codes in -127..=127, scale `absmax / 127` (1 for a row
/// of zeros).
pub fn quantize_int8_columns(w: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut scales = vec![1f32; n];
    for (r, s) in scales.iter_mut().enumerate() {
        let absmax = w[r * k..(r + 1) * k]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        if absmax > 0.0 {
            *s = absmax / 127.0;
        }
    }
    let mut codes = vec![0i8; n * k];
    for r in 0..n {
        for c in 0..k {
            codes[c * n + r] = (w[r * k + c] / scales[r]).round().clamp(-127.0, 127.0) as i8;
        }
    }
    (codes, scales)
}

/// [`linear`], with the weight quantized when `quant` is given.
fn linear_q(
    g: &mut GraphBuilder,
    x: &str,
    t: &Named,
    prefix: &str,
    scale: Option<f64>,
    quant: Option<Quant>,
) -> Result<String> {
    let stored = store_linear(g, t, prefix, scale, quant)?;
    Ok(stored.apply(g, x))
}

/// A linear layer's weights as initializers of a graph, and how they are multiplied.
struct StoredLinear {
    product: Product,
    /// The bias initializer (scaled as the weight), when the layer has one.
    bias: Option<String>,
}

/// The product of a [`StoredLinear`].
enum Product {
    /// `MatMul` with the fp32 weight stored transposed, `[in, out]`.
    Plain { w: String },
    /// `MatMulNBits`: codes `[out, blocks, blob]`, scales `[out * blocks]`.
    Blocks {
        codes: String,
        scales: String,
        q: WeightQuant,
        n: usize,
        k: usize,
    },
    /// `DynamicQuantizeMatMul` (its inputs, the bias among them when there is one).
    DynamicInt8 { inputs: Vec<String> },
}

/// Writes the initializers of the linear layer `prefix` (its weight quantized when `quant`
/// is given, both weight and bias multiplied by `scale`).
fn store_linear(
    g: &mut GraphBuilder,
    t: &Named,
    prefix: &str,
    scale: Option<f64>,
    quant: Option<Quant>,
) -> Result<StoredLinear> {
    let k_in = t.get(&format!("{prefix}.weight"))?.dim(1)?;
    let quant = quant.and_then(|q| q.for_width(k_in));
    let bias = |g: &mut GraphBuilder| -> Result<Option<String>> {
        t.opt(&format!("{prefix}.bias"))
            .map(|b| {
                let b = match scale {
                    Some(s) => (b * s)?,
                    None => b.clone(),
                };
                g.tensor(&format!("{prefix}.bias"), &b)
            })
            .transpose()
    };
    let Some(quant) = quant else {
        let mut w = t.get(&format!("{prefix}.weight"))?.t()?.contiguous()?;
        if let Some(s) = scale {
            w = (w * s)?;
        }
        let w = g.tensor(&format!("{prefix}.weight.T"), &w)?;
        return Ok(StoredLinear {
            product: Product::Plain { w },
            bias: bias(g)?,
        });
    };
    let mut w = t.get(&format!("{prefix}.weight"))?.clone();
    if let Some(s) = scale {
        w = (w * s)?;
    }
    let (n, k) = w.dims2()?;
    let data = w
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // Its values are not written as they are: check them before they are quantized.
    crate::graph::check_finite(&format!("{prefix}.weight"), &[n as i64, k as i64], &data)?;
    match quant {
        Quant::DynamicInt8 => {
            let (codes, scales) = quantize_int8_columns(&data, n, k);
            let b = g.const_i8(
                &format!("{prefix}.weight.T.i8"),
                &[k as i64, n as i64],
                &codes,
            );
            let sc = g.const_f32(&format!("{prefix}.scales"), &[n as i64], &scales)?;
            let zp = g.const_i8(&format!("{prefix}.zero_points"), &[n as i64], &vec![0; n]);
            // The bias goes in as the op's own input: ONNX Runtime does not fuse a following
            // Add into this op (it does into `MatMulNBits`).
            let mut inputs = vec![b, sc, zp];
            inputs.extend(bias(g)?);
            Ok(StoredLinear {
                product: Product::DynamicInt8 { inputs },
                bias: None,
            })
        }
        Quant::Blocks(q) => {
            let (packed, scales) = q.quantize(&data, n, k);
            let kb = k.div_ceil(q.block_size);
            let blob = q.block_size * q.bits as usize / 8;
            let codes = g.const_u8(
                &format!("{prefix}.weight.q{}", q.bits),
                &[n as i64, kb as i64, blob as i64],
                packed,
            );
            let scales = g.const_f32(&format!("{prefix}.scales"), &[(n * kb) as i64], &scales)?;
            Ok(StoredLinear {
                product: Product::Blocks {
                    codes,
                    scales,
                    q,
                    n,
                    k,
                },
                bias: bias(g)?,
            })
        }
    }
}

impl StoredLinear {
    /// `x W^T + b` in `g` (the graph that holds the weights, or a subgraph of it).
    fn apply(&self, g: &mut GraphBuilder, x: &str) -> String {
        let y = match &self.product {
            Product::Plain { w } => g.op("MatMul", &[x, w], vec![]),
            Product::DynamicInt8 { inputs } => {
                let mut all = vec![x];
                all.extend(inputs.iter().map(String::as_str));
                g.contrib_op("DynamicQuantizeMatMul", &all, vec![])
            }
            Product::Blocks {
                codes,
                scales,
                q,
                n,
                k,
            } => g.contrib_op(
                "MatMulNBits",
                &[x, codes, scales],
                vec![
                    ("K", Attr::Int(*k as i64)),
                    ("N", Attr::Int(*n as i64)),
                    ("bits", Attr::Int(q.bits as i64)),
                    ("block_size", Attr::Int(q.block_size as i64)),
                    ("accuracy_level", Attr::Int(q.accuracy_level)),
                ],
            ),
        };
        match &self.bias {
            Some(b) => g.op("Add", &[&y, b], vec![]),
            None => y,
        }
    }
}

/// An attention layer's query, key and value projections (`{attn}.q_proj`, `k_proj`,
/// `v_proj`) as one product: their weights stacked along the output axis (`[3 d, d]`, the
/// query's scaled by `q_scale`), one `MatMul` or quantized product, then a `Split` into the
/// three. One product reads the three matrices as one stream and is one thread-pool dispatch
/// instead of three; a decode step reads each small matrix once, so fewer, longer streams
/// cost less. A missing bias counts as zeros, as in the model.
fn qkv_projection(
    g: &mut GraphBuilder,
    x: &str,
    t: &Named,
    attn: &str,
    q_scale: f64,
    quant: Option<Quant>,
) -> Result<[String; 3]> {
    let names = ["q_proj", "k_proj", "v_proj"].map(|p| format!("{attn}.{p}"));
    let weights = names
        .iter()
        .map(|n| t.get(&format!("{n}.weight")))
        .collect::<Result<Vec<_>>>()?;
    let q = (weights[0] * q_scale)?;
    let stacked = Tensor::cat(&[&q, weights[1], weights[2]], 0)?;
    let fused = format!("{attn}.qkv_proj");
    let mut list = vec![(format!("{fused}.weight"), stacked)];
    let biases: Vec<Option<&Tensor>> = names.iter().map(|n| t.opt(&format!("{n}.bias"))).collect();
    if biases.iter().any(Option::is_some) {
        let mut parts = Vec::with_capacity(3);
        for (i, (b, w)) in biases.iter().zip(&weights).enumerate() {
            let b = match b {
                Some(b) => (*b).clone(),
                None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?,
            };
            parts.push(if i == 0 { (b * q_scale)? } else { b });
        }
        list.push((format!("{fused}.bias"), Tensor::cat(&parts, 0)?));
    }
    let y = linear_q(g, x, &Named::new(list), &fused, None, quant)?;
    let sizes = weights
        .iter()
        .map(|w| Ok(w.dim(0)? as i64))
        .collect::<Result<Vec<_>>>()?;
    let sizes = g.ints(&format!("{fused}.split"), &sizes);
    let outs = [g.fresh("q"), g.fresh("k"), g.fresh("v")];
    g.push(
        "Split",
        &[&y, &sizes],
        &[&outs[0], &outs[1], &outs[2]],
        vec![("axis", Attr::Int(-1))],
    );
    Ok(outs)
}

fn layer_norm(g: &mut GraphBuilder, x: &str, t: &Named, prefix: &str, eps: f64) -> Result<String> {
    let w = g.tensor(
        &format!("{prefix}.weight"),
        t.get(&format!("{prefix}.weight"))?,
    )?;
    let b = match t.opt(&format!("{prefix}.bias")) {
        Some(b) => g.tensor(&format!("{prefix}.bias"), b)?,
        None => {
            let n = t.get(&format!("{prefix}.weight"))?.elem_count();
            g.const_f32("zeros", &[n as i64], &vec![0.0; n])?
        }
    };
    Ok(g.op(
        "LayerNormalization",
        &[x, &w, &b],
        vec![
            ("axis", Attr::Int(-1)),
            ("epsilon", Attr::Float(eps as f32)),
        ],
    ))
}

fn activation(g: &mut GraphBuilder, x: &str, act: Activation) -> Result<String> {
    match act {
        Activation::Relu => Ok(g.op("Relu", &[x], vec![])),
        Activation::QuickGelu => {
            let a = g.const_f32("quick_gelu_alpha", &[], &[1.702])?;
            let ax = g.op("Mul", &[x, &a], vec![]);
            let s = g.op("Sigmoid", &[&ax], vec![]);
            Ok(g.op("Mul", &[x, &s], vec![]))
        }
        Activation::Gelu => {
            // 0.5 x (1 + erf(x / sqrt 2)), as torch exports nn.GELU.
            let sqrt2 = g.const_f32("sqrt2", &[], &[std::f32::consts::SQRT_2])?;
            let one = g.const_f32("one", &[], &[1.0])?;
            let half = g.const_f32("half", &[], &[0.5])?;
            let q = g.op("Div", &[x, &sqrt2], vec![]);
            let e = g.op("Erf", &[&q], vec![]);
            let e1 = g.op("Add", &[&e, &one], vec![]);
            let m = g.op("Mul", &[x, &e1], vec![]);
            Ok(g.op("Mul", &[&m, &half], vec![]))
        }
        Activation::GeluTanh => {
            // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
            let c = g.const_f32("gelu_c", &[], &[(2.0f32 / std::f32::consts::PI).sqrt()])?;
            let k = g.const_f32("gelu_k", &[], &[0.044715])?;
            let one = g.const_f32("one", &[], &[1.0])?;
            let half = g.const_f32("half", &[], &[0.5])?;
            let x2 = g.op("Mul", &[x, x], vec![]);
            let x3 = g.op("Mul", &[&x2, x], vec![]);
            let kx3 = g.op("Mul", &[&x3, &k], vec![]);
            let inner = g.op("Add", &[x, &kx3], vec![]);
            let ci = g.op("Mul", &[&inner, &c], vec![]);
            let th = g.op("Tanh", &[&ci], vec![]);
            let t1 = g.op("Add", &[&th, &one], vec![]);
            let m = g.op("Mul", &[x, &t1], vec![]);
            Ok(g.op("Mul", &[&m, &half], vec![]))
        }
    }
}

fn parse_act(name: &str, key: &str) -> Result<Activation> {
    Ok(Activation::parse(
        name,
        std::path::Path::new("config.json"),
        key,
    )?)
}

/// The image encoder: `pixel_values [batch, C, S, S]` -> `image_embeds [batch, projection_dim]`;
/// `quant` quantizes the transformer's linear layers (not the patch convolution, not the
/// projection).
pub fn encoder(model: &CaptionModel, quant: Option<Quant>) -> Result<Graph> {
    let cfg: &ClipVisionConfig = model.encoder_config();
    let t = Named::new(model.encoder().named_tensors());
    let act = parse_act(&cfg.hidden_act, "hidden_act")?;
    let eps = cfg.layer_norm_eps;
    let s = cfg.image_size;
    let mut g = GraphBuilder::new();
    let input = TensorSpec::new(
        PIXEL_VALUES,
        Elem::F32,
        vec![Dim::named("batch"), d(cfg.num_channels), d(s), d(s)],
    );
    let pix = input.declare_input(&mut g);
    let xs = vision_embeddings(&mut g, &t, cfg, &pix)?;
    let mut xs = layer_norm(&mut g, &xs, &t, "vision_model.pre_layrnorm", eps)?;
    for i in 0..cfg.num_hidden_layers {
        xs = vision_layer(&mut g, &t, cfg, act, quant, i, &xs)?;
    }
    let zero = g.const_i64("cls_index", &[], &[0]);
    let cls = g.op("Gather", &[&xs, &zero], vec![("axis", Attr::Int(1))]);
    let cls = layer_norm(&mut g, &cls, &t, "vision_model.post_layernorm", eps)?;
    let emb = linear(&mut g, &cls, &t, "visual_projection", None)?;
    let output = TensorSpec::new(
        IMAGE_EMBEDS,
        Elem::F32,
        vec![Dim::named("batch"), d(cfg.projection_dim)],
    );
    g.output(&emb, &output.name, output.elem, &output.dims);
    Ok(Graph {
        model: g.finish(
            "moda_encoder",
            "CLIP vision tower + visual_projection (CLIPModel.get_image_features)",
            &[],
        ),
        inputs: vec![input],
        outputs: vec![output],
        optional_inputs: Vec::new(),
    })
}

/// CLIP's embeddings of `pix`: the patch convolution, flattened to `[batch, patches, hidden]`,
/// the class embedding in front, plus the position embeddings.
fn vision_embeddings(
    g: &mut GraphBuilder,
    t: &Named,
    cfg: &ClipVisionConfig,
    pix: &str,
) -> Result<String> {
    let (h, p) = (cfg.hidden_size, cfg.patch_size as i64);
    let e = "vision_model.embeddings";
    let wp = g.tensor(
        &format!("{e}.patch_embedding.weight"),
        t.get(&format!("{e}.patch_embedding.weight"))?,
    )?;
    let conv = g.op(
        "Conv",
        &[pix, &wp],
        vec![
            ("kernel_shape", Attr::Ints(vec![p, p])),
            ("strides", Attr::Ints(vec![p, p])),
        ],
    );
    let flat_shape = g.ints("patch_shape", &[0, h as i64, -1]);
    let flat = g.op("Reshape", &[&conv, &flat_shape], vec![]);
    let patches = g.op(
        "Transpose",
        &[&flat],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let batch = g.op(
        "Shape",
        &[pix],
        vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
    );
    let rest = g.ints("class_shape_rest", &[1, h as i64]);
    let class_shape = g.op("Concat", &[&batch, &rest], vec![("axis", Attr::Int(0))]);
    let class = t.get(&format!("{e}.class_embedding"))?.reshape((1, 1, h))?;
    let class = g.tensor(&format!("{e}.class_embedding"), &class)?;
    let class = g.op("Expand", &[&class, &class_shape], vec![]);
    let xs = g.op("Concat", &[&class, &patches], vec![("axis", Attr::Int(1))]);
    let pos = g.tensor(
        &format!("{e}.position_embedding.weight"),
        t.get(&format!("{e}.position_embedding.weight"))?,
    )?;
    Ok(g.op("Add", &[&xs, &pos], vec![]))
}

/// CLIP vision layer `i` on `xs` (pre-LN): self-attention as plain `MatMul`/`Softmax` (no
/// cache), then the MLP, each with its residual.
fn vision_layer(
    g: &mut GraphBuilder,
    t: &Named,
    cfg: &ClipVisionConfig,
    act: Activation,
    quant: Option<Quant>,
    i: usize,
    xs: &str,
) -> Result<String> {
    let (heads, hd) = (cfg.num_attention_heads, cfg.head_dim());
    let eps = cfg.layer_norm_eps;
    let scale = (hd as f64).powf(-0.5);
    let l = format!("vision_model.encoder.layers.{i}");
    let attn = format!("{l}.self_attn");
    let n1 = layer_norm(g, xs, t, &format!("{l}.layer_norm1"), eps)?;
    let [q, k, v] = qkv_projection(g, &n1, t, &attn, scale, quant)?;
    // One fused kernel for the heads' scores, softmax and context (ONNX Runtime's
    // `MultiHeadAttention`, as in the decoder, without a cache, mask or causality): q, k and
    // v stay `[batch, tokens, heads * hd]`, q already scaled.
    let ctx = g.fresh("vision_mha");
    g.push_contrib(
        "MultiHeadAttention",
        &[&q, &k, &v],
        &[&ctx],
        vec![
            ("num_heads", Attr::Int(heads as i64)),
            ("scale", Attr::Float(1.0)),
        ],
    );
    let a = linear_q(g, &ctx, t, &format!("{attn}.out_proj"), None, quant)?;
    let xs = g.op("Add", &[xs, &a], vec![]);
    let n2 = layer_norm(g, &xs, t, &format!("{l}.layer_norm2"), eps)?;
    let f = linear_q(g, &n2, t, &format!("{l}.mlp.fc1"), None, quant)?;
    let f = activation(g, &f, act)?;
    let f = linear_q(g, &f, t, &format!("{l}.mlp.fc2"), None, quant)?;
    Ok(g.op("Add", &[&xs, &f], vec![]))
}

/// The projector: `image_embeds [batch, in]` -> `prefix_embeds [batch, 1, embed_dim]`.
pub fn projector(model: &CaptionModel) -> Result<Graph> {
    let cfg = *model.projector().config();
    let t = Named::new(model.projector().named_tensors());
    let mut g = GraphBuilder::new();
    let input = TensorSpec::new(
        IMAGE_EMBEDS,
        Elem::F32,
        vec![Dim::named("batch"), d(cfg.in_dim)],
    );
    let x = input.declare_input(&mut g);
    let y = linear(&mut g, &x, &t, "projection.0", None)?;
    let y = activation(&mut g, &y, Activation::Gelu)?;
    let y = linear(&mut g, &y, &t, "projection.2", None)?;
    let axes = g.ints("prefix_axis", &[1]);
    let y = g.op("Unsqueeze", &[&y, &axes], vec![]);
    let output = TensorSpec::new(
        PREFIX_EMBEDS,
        Elem::F32,
        vec![Dim::named("batch"), d(1), d(cfg.out_dim)],
    );
    g.output(&y, &output.name, output.elem, &output.dims);
    Ok(Graph {
        model: g.finish(
            "moda_projector",
            "MODA projector: Linear, exact GELU, Linear",
            &[],
        ),
        inputs: vec![input],
        outputs: vec![output],
        optional_inputs: Vec::new(),
    })
}

/// The token embedding lookup: `input_ids [batch, sequence]` (int64) ->
/// `inputs_embeds [batch, sequence, embed_dim]`.
pub fn embed_tokens(model: &CaptionModel) -> Result<Graph> {
    let cfg: &OptConfig = model.decoder().config();
    let mut g = GraphBuilder::new();
    let input = TensorSpec::new(
        INPUT_IDS,
        Elem::I64,
        vec![Dim::named("batch"), Dim::named("sequence")],
    );
    let ids = input.declare_input(&mut g);
    let table = g.tensor(
        "model.decoder.embed_tokens.weight",
        model.decoder().embedding_table(),
    )?;
    let y = g.op("Gather", &[&table, &ids], vec![("axis", Attr::Int(0))]);
    let output = TensorSpec::new(
        INPUTS_EMBEDS,
        Elem::F32,
        vec![
            Dim::named("batch"),
            Dim::named("sequence"),
            d(cfg.embed_dim()),
        ],
    );
    g.output(&y, &output.name, output.elem, &output.dims);
    Ok(Graph {
        model: g.finish("moda_embed_tokens", "OPT token embedding lookup", &[]),
        inputs: vec![input],
        outputs: vec![output],
        optional_inputs: Vec::new(),
    })
}

pub use moda_sdk::manifest::cache_names;

/// What every part of the decoder graph reads: the weights and the shape of the model.
struct DecoderParts<'a> {
    cfg: &'a OptConfig,
    t: Named,
    act: Activation,
    quant: Option<WeightQuant>,
}

/// The decoder's declared inputs and outputs, and the values the layers share.
struct DecoderIo {
    inputs: Signature,
    /// `logits` first, then each layer's `present` key and value.
    outputs: Signature,
    /// The `inputs_embeds` value.
    embeds: String,
    /// The `attention_mask` value (int64).
    mask: String,
}

/// OPT's LayerNorm epsilon (PyTorch's default).
const OPT_LAYER_NORM_EPS: f64 = 1e-5;
/// The prefix of OPT's decoder tensors.
const OPT_DECODER: &str = "model.decoder";

/// The decoder with its KV cache (see the module documentation); `quant` quantizes its
/// linear layers and LM head.
pub fn decoder(model: &CaptionModel, quant: Option<WeightQuant>) -> Result<Graph> {
    let cfg: &OptConfig = model.decoder().config();
    let parts = DecoderParts {
        cfg,
        t: Named::new(model.decoder().named_tensors()),
        act: parse_act(&cfg.activation_function, "activation_function")?,
        quant,
    };
    let mut g = GraphBuilder::new();
    let io = declare_decoder_io(&mut g, cfg);
    let pos_emb = position_embeddings(&mut g, &parts, &io)?;
    // Padding for `MultiHeadAttention`: its `key_padding_mask` is int32 `[batch, total]` (1 keep,
    // 0 pad); causality comes from its `unidirectional` attribute, offset by the past length.
    let mask_i32 = g.op("Cast", &[&io.mask], vec![("to", Attr::Int(6))]); // INT32
    let mut xs = match parts.t.opt(&format!("{OPT_DECODER}.project_in.weight")) {
        Some(_) => parts.linear(&mut g, &io.embeds, "project_in", None)?,
        None => io.embeds.clone(),
    };
    xs = g.op("Add", &[&xs, &pos_emb], vec![]);
    for i in 0..cfg.num_hidden_layers {
        xs = decoder_layer(&mut g, &parts, i, &xs, &mask_i32)?;
    }
    let logits = decoder_head(&mut g, &parts, xs)?;
    for (i, spec) in io.outputs.iter().enumerate() {
        // The present tensors are already named by the attention ops; only declare them.
        let value = if i == 0 { &logits } else { &spec.name };
        g.output(value, &spec.name, spec.elem, &spec.dims);
    }
    Ok(Graph {
        model: g.finish(
            "moda_decoder",
            "OPTForCausalLM from inputs_embeds with a KV cache",
            // What the graph's inputs and outputs cannot tell: how many positions its
            // position table holds and how many tokens its LM head scores (the SDK checks the
            // manifest's `max_positions` and `vocab_size` against them).
            &[
                (
                    crate::MAX_POSITIONS_METADATA,
                    cfg.max_position_embeddings.to_string(),
                ),
                (VOCAB_SIZE_METADATA, cfg.vocab_size.to_string()),
            ],
        ),
        inputs: io.inputs,
        outputs: io.outputs,
        optional_inputs: vec![TensorSpec::new(
            HEAD_IDS,
            Elem::I64,
            vec![Dim::named("ids")],
        )],
    })
}

impl DecoderParts<'_> {
    /// [`linear_q`] of the decoder's layer `name` (under `model.decoder`).
    fn linear(
        &self,
        g: &mut GraphBuilder,
        x: &str,
        name: &str,
        scale: Option<f64>,
    ) -> Result<String> {
        let prefix = format!("{OPT_DECODER}.{name}");
        linear_q(g, x, &self.t, &prefix, scale, self.quant.map(Quant::Blocks))
    }

    /// [`layer_norm`] of the decoder's `name` (under `model.decoder`).
    fn layer_norm(&self, g: &mut GraphBuilder, x: &str, name: &str) -> Result<String> {
        let prefix = format!("{OPT_DECODER}.{name}");
        layer_norm(g, x, &self.t, &prefix, OPT_LAYER_NORM_EPS)
    }
}

/// Declares the decoder's inputs (`inputs_embeds`, `attention_mask`, each layer's past key and
/// value) and lists its outputs (`logits`, each layer's present key and value), with the
/// names [`moda_sdk::manifest::Role::Decoder`] gives.
fn declare_decoder_io(g: &mut GraphBuilder, cfg: &OptConfig) -> DecoderIo {
    let (heads, hd) = (cfg.num_attention_heads, cfg.head_dim());
    let batch = || Dim::named("batch");
    let cache = |seq: &str| vec![batch(), d(heads), Dim::named(seq), d(hd)];
    let mut inputs = vec![
        TensorSpec::new(
            INPUTS_EMBEDS,
            Elem::F32,
            vec![batch(), Dim::named("sequence"), d(cfg.embed_dim())],
        ),
        TensorSpec::new(
            ATTENTION_MASK,
            Elem::I64,
            vec![batch(), Dim::named("total_sequence")],
        ),
    ];
    // The logits' last axis is the vocabulary, or the tokens `head_ids` lists.
    let mut outputs = vec![TensorSpec::new(
        LOGITS,
        Elem::F32,
        vec![batch(), Dim::named("sequence"), Dim::named("logit_columns")],
    )];
    for i in 0..cfg.num_hidden_layers {
        let [pk, pv, k, v] = cache_names(i);
        for name in [pk, pv] {
            inputs.push(TensorSpec::new(&name, Elem::F32, cache("past_sequence")));
        }
        for name in [k, v] {
            outputs.push(TensorSpec::new(&name, Elem::F32, cache("total_sequence")));
        }
    }
    // Every input is declared, in order; the cache inputs are used by name in the layers.
    let values: Vec<String> = inputs.iter().map(|spec| spec.declare_input(g)).collect();
    let (embeds, mask) = (values[0].clone(), values[1].clone());
    DecoderIo {
        inputs,
        outputs,
        embeds,
        mask,
    }
}

/// OPT's learned position embeddings of the new tokens. Positions are computed from the mask:
/// `cumsum(mask) * mask - 1`, plus OPT's offset of 2, for the last `sequence` columns (the
/// mask covers the past as well).
fn position_embeddings(
    g: &mut GraphBuilder,
    parts: &DecoderParts,
    io: &DecoderIo,
) -> Result<String> {
    let mask = &io.mask;
    let one_i = g.const_i64("axis1", &[], &[1]);
    let cs = g.op("CumSum", &[mask, &one_i], vec![]);
    let csm = g.op("Mul", &[&cs, mask], vec![]);
    let offset = g.const_i64("position_offset", &[], &[1]);
    let pos = g.op("Add", &[&csm, &offset], vec![]);
    let seq = g.op(
        "Shape",
        &[&io.embeds],
        vec![("start", Attr::Int(1)), ("end", Attr::Int(2))],
    );
    let neg_seq = g.op("Neg", &[&seq], vec![]);
    let end = g.ints("slice_end", &[i64::MAX]);
    let axes1 = g.ints("axes1", &[1]);
    let pos = g.op("Slice", &[&pos, &neg_seq, &end, &axes1], vec![]);
    let name = format!("{OPT_DECODER}.embed_positions.weight");
    let pos_table = g.tensor(&name, parts.t.get(&name)?)?;
    Ok(g.op("Gather", &[&pos_table, &pos], vec![("axis", Attr::Int(0))]))
}

/// Decoder layer `i` on `xs`: self-attention with the layer's cache, then the MLP, each with
/// its residual and LayerNorm (before for pre-LN models, after for post-LN ones).
fn decoder_layer(
    g: &mut GraphBuilder,
    parts: &DecoderParts,
    i: usize,
    xs: &str,
    mask_i32: &str,
) -> Result<String> {
    let pre_ln = parts.cfg.do_layer_norm_before;
    let l = format!("layers.{i}");
    let ln1 = format!("{l}.self_attn_layer_norm");
    let ln2 = format!("{l}.final_layer_norm");
    let a_in = if pre_ln {
        parts.layer_norm(g, xs, &ln1)?
    } else {
        xs.to_string()
    };
    let a = self_attention(g, parts, i, &a_in, mask_i32)?;
    let mut xs = g.op("Add", &[xs, &a], vec![]);
    if !pre_ln {
        xs = parts.layer_norm(g, &xs, &ln1)?;
    }
    let f_in = if pre_ln {
        parts.layer_norm(g, &xs, &ln2)?
    } else {
        xs.clone()
    };
    let f = parts.linear(g, &f_in, &format!("{l}.fc1"), None)?;
    let f = activation(g, &f, parts.act)?;
    let f = parts.linear(g, &f, &format!("{l}.fc2"), None)?;
    xs = g.op("Add", &[&xs, &f], vec![]);
    if !pre_ln {
        xs = parts.layer_norm(g, &xs, &ln2)?;
    }
    Ok(xs)
}

/// Layer `i`'s self-attention as ONNX Runtime's `MultiHeadAttention`, which also writes the
/// layer's `present` key and value outputs.
fn self_attention(
    g: &mut GraphBuilder,
    parts: &DecoderParts,
    i: usize,
    x: &str,
    mask_i32: &str,
) -> Result<String> {
    let cfg = parts.cfg;
    let attn = format!("layers.{i}.self_attn");
    let scale = (cfg.head_dim() as f64).powf(-0.5);
    let quant = parts.quant.map(Quant::Blocks);
    let [q, k, v] = qkv_projection(
        g,
        x,
        &parts.t,
        &format!("{OPT_DECODER}.{attn}"),
        scale,
        quant,
    )?;
    // q, k, v stay `[batch, seq, heads * hd]`; the kernel splits the heads, appends k and v
    // to the past (`present = concat(past, new)`, `[batch, heads, total, hd]`) and writes
    // the context back as `[batch, seq, heads * hd]`. q is already scaled (above). Masked
    // scores get `mask_filter_value`, the lowest finite f32 as in the candle model and
    // transformers (not the kernel's default -10000), so that even a fully masked row (a
    // padded query) attends as theirs does: uniformly, and finite.
    let [pk, pv, ok, ov] = cache_names(i);
    let ctx = g.fresh("mha");
    g.push_contrib(
        "MultiHeadAttention",
        &[&q, &k, &v, "", mask_i32, "", &pk, &pv],
        &[&ctx, &ok, &ov],
        vec![
            ("num_heads", Attr::Int(cfg.num_attention_heads as i64)),
            ("unidirectional", Attr::Int(1)),
            ("scale", Attr::Float(1.0)),
            ("mask_filter_value", Attr::Float(f32::MIN)),
        ],
    );
    parts.linear(g, &ctx, &format!("{attn}.out_proj"), None)
}

/// The final LayerNorm and `project_out` (where the model has them), then the LM head
/// ([`lm_head`]).
fn decoder_head(g: &mut GraphBuilder, parts: &DecoderParts, mut xs: String) -> Result<String> {
    if parts
        .t
        .opt(&format!("{OPT_DECODER}.final_layer_norm.weight"))
        .is_some()
    {
        xs = parts.layer_norm(g, &xs, "final_layer_norm")?;
    }
    if parts
        .t
        .opt(&format!("{OPT_DECODER}.project_out.weight"))
        .is_some()
    {
        xs = parts.linear(g, &xs, "project_out", None)?;
    }
    let head = store_linear(g, &parts.t, "lm_head", None, parts.quant.map(Quant::Blocks))?;
    lm_head(g, &xs, &head)
}

/// The LM head over the hidden states `xs`: every token's logits when the optional input
/// [`HEAD_IDS`] is empty (its default), else only the logits of the tokens it lists, in its
/// order. An `If` on its length picks the branch, and ONNX Runtime runs only that one: the
/// full product (`MatMulNBits` reads the whole quantized head) or the listed rows of the same
/// weights (`Gather`, or `GatherBlockQuantized` for quantized weights, which dequantizes just
/// those rows) and a product with them. A constrained step needs a few dozen tokens' logits;
/// the head is about a third of what an int4 step of OPT-125m reads.
fn lm_head(g: &mut GraphBuilder, xs: &str, head: &StoredLinear) -> Result<String> {
    let dims = [
        Dim::named("batch"),
        Dim::named("sequence"),
        Dim::named("logit_columns"),
    ];
    let ids = g.input_with_default(HEAD_IDS, Elem::I64, &[Dim::named("ids")], &[0], Vec::new());
    let count = g.op("Size", &[&ids], vec![]);
    let zero = g.const_i64("zero", &[], &[0]);
    let every = g.op("Equal", &[&count, &zero], vec![]);

    let mut full = g.subgraph();
    let y = head.apply(&mut full, xs);
    g.resume_after(&full);
    let full = full.into_subgraph("lm_head_every_token", &[(&y, Elem::F32, &dims)]);

    // The selected rows' weights, prepared in the outer graph where they are constants (ONNX
    // Runtime folds them once, at load).
    let mut listed = g.subgraph();
    let y = match &head.product {
        Product::Plain { w } => {
            // `w` is `[in, out]`: the listed tokens are columns.
            let cols = listed.op("Gather", &[w, &ids], vec![("axis", Attr::Int(1))]);
            listed.op("MatMul", &[xs, &cols], vec![])
        }
        Product::Blocks {
            codes,
            scales,
            q,
            n,
            k,
        } => {
            // `GatherBlockQuantized` wants the scales shaped as the codes, with the quantized
            // axis counted in blocks: `[out, blocks, 1]`.
            let kb = k.div_ceil(q.block_size);
            let shape = g.ints("lm_head.scales.shape", &[*n as i64, kb as i64, 1]);
            let scales = g.op("Reshape", &[scales, &shape], vec![]);
            let rows = listed.contrib_op(
                "GatherBlockQuantized",
                &[codes, &ids, &scales],
                vec![
                    ("gather_axis", Attr::Int(0)),
                    ("quantize_axis", Attr::Int(2)),
                    ("block_size", Attr::Int(q.block_size as i64)),
                    ("bits", Attr::Int(q.bits as i64)),
                ],
            );
            // `[ids, blocks, block]` -> `[ids, in]` (the last block's padding cut off).
            let flat = g.ints("lm_head.rows.shape", &[-1, (kb * q.block_size) as i64]);
            let mut rows = listed.op("Reshape", &[&rows, &flat], vec![]);
            if kb * q.block_size != *k {
                let (start, end, axis) = (
                    g.ints("lm_head.slice.start", &[0]),
                    g.ints("lm_head.slice.end", &[*k as i64]),
                    g.ints("lm_head.slice.axis", &[1]),
                );
                rows = listed.op("Slice", &[&rows, &start, &end, &axis], vec![]);
            }
            let cols = listed.op(
                "Transpose",
                &[&rows],
                vec![("perm", Attr::Ints(vec![1, 0]))],
            );
            listed.op("MatMul", &[xs, &cols], vec![])
        }
        Product::DynamicInt8 { .. } => {
            return Err(Error::Internal(
                "the LM head is never stored as DynamicQuantizeMatMul".into(),
            ))
        }
    };
    let y = match &head.bias {
        Some(b) => {
            let b = listed.op("Gather", &[b, &ids], vec![("axis", Attr::Int(0))]);
            listed.op("Add", &[&y, &b], vec![])
        }
        None => y,
    };
    g.resume_after(&listed);
    let listed = listed.into_subgraph("lm_head_listed_tokens", &[(&y, Elem::F32, &dims)]);
    let out = g.fresh("logits");
    g.push(
        "If",
        &[&every],
        &[&out],
        vec![
            ("then_branch", Attr::Graph(full)),
            ("else_branch", Attr::Graph(listed)),
        ],
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{quantize_int8_columns, Quant, Quantization, WeightQuant};

    /// An ONNX Runtime session (one thread, the SDK's set-up) of the graph `g` builds.
    fn test_session(name: &str, g: crate::graph::GraphBuilder) -> ort::session::Session {
        use prost::Message;
        let bytes = g.finish(name, "test", &[]).encode_to_vec();
        let options = moda_sdk::runtime::SessionOptions {
            intra_threads: Some(1),
            ..Default::default()
        };
        let path = std::path::PathBuf::from(format!("{name}.onnx"));
        moda_sdk::runtime::session_from_bytes(&path, &bytes, None, &options).expect("session")
    }

    /// Dequantizes as `MatMulNBits` does: `(code - 2^(bits-1)) * scale`, low nibble first.
    fn dequantize(q: &WeightQuant, packed: &[u8], scales: &[f32], n: usize, k: usize) -> Vec<f32> {
        let bs = q.block_size;
        let kb = k.div_ceil(bs);
        let blob = bs * q.bits as usize / 8;
        let zp = 1i32 << (q.bits - 1);
        let mut out = vec![0f32; n * k];
        for r in 0..n {
            for c in 0..k {
                let (b, j) = (c / bs, c % bs);
                let base = (r * kb + b) * blob;
                let code = if q.bits == 8 {
                    packed[base + j] as i32
                } else {
                    let byte = packed[base + j / 2];
                    (if j % 2 == 0 { byte & 0x0f } else { byte >> 4 }) as i32
                };
                out[r * k + c] = (code - zp) as f32 * scales[r * kb + b];
            }
        }
        out
    }

    #[test]
    fn int8_columns_round_trip_within_half_a_step_and_are_transposed() {
        let (n, k) = (5, 40);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 * (1 + i / k) as f32)
            .collect();
        let (codes, scales) = quantize_int8_columns(&w, n, k);
        assert_eq!((codes.len(), scales.len()), (n * k, n));
        for r in 0..n {
            let absmax = w[r * k..(r + 1) * k]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert!((scales[r] - absmax / 127.0).abs() <= 1e-7);
            for c in 0..k {
                // Codes are [k, n]: column r of row c.
                let back = codes[c * n + r] as f32 * scales[r];
                assert!((back - w[r * k + c]).abs() <= scales[r] / 2.0 + 1e-6);
            }
        }
        // A row of zeros keeps a scale of 1 and codes of 0.
        let (codes, scales) = quantize_int8_columns(&[0.0; 8], 1, 8);
        assert_eq!(scales, vec![1.0]);
        assert!(codes.iter().all(|&c| c == 0));
    }

    #[test]
    fn blocks_fit_the_layer() {
        let block = |q: Quant| match q {
            Quant::Blocks(w) => w.block_size,
            Quant::DynamicInt8 => 0,
        };
        let int8 = Quant::Blocks(WeightQuant::INT8);
        assert_eq!(WeightQuant::INT8.block_size, 128);
        assert_eq!(WeightQuant::INT4.block_size, 32);
        // Narrower than 32 inputs: fp32, in every kind.
        assert_eq!(int8.for_width(16), None);
        assert_eq!(Quant::DynamicInt8.for_width(31), None);
        assert_eq!(Quant::DynamicInt8.for_width(32), Some(Quant::DynamicInt8));
        // Blocks no wider than the layer: the largest power of two within it.
        for (k, want) in [(32, 32), (100, 64), (128, 128), (768, 128), (3072, 128)] {
            assert_eq!(int8.for_width(k).map(block), Some(want), "k = {k}");
        }
        let int4 = Quant::Blocks(WeightQuant::INT4);
        assert_eq!(int4.for_width(768).map(block), Some(32));
        // A block size asked for replaces the kind's, and only in a quantized bundle.
        let of = WeightQuant::of;
        assert_eq!(
            of(Quantization::Int4, Some(128)).map(|q| q.block_size),
            Some(128)
        );
        assert_eq!(of(Quantization::Int8, None).map(|q| q.bits), Some(8));
        assert_eq!(of(Quantization::None, Some(64)), None);
        for bs in [16, 32, 64, 128, 256] {
            assert!(WeightQuant::valid_block_size(bs), "{bs}");
        }
        for bs in [0, 8, 48, 100, 512] {
            assert!(!WeightQuant::valid_block_size(bs), "{bs}");
        }
    }

    #[test]
    fn quantization_round_trips_within_half_a_step() {
        let (n, k) = (3, 70); // K not a multiple of the block size
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let int8_32 = WeightQuant {
            block_size: 32,
            ..WeightQuant::INT8
        };
        for q in [WeightQuant::INT8, int8_32, WeightQuant::INT4] {
            let (packed, scales) = q.quantize(&w, n, k);
            let kb = k.div_ceil(q.block_size);
            assert_eq!(packed.len(), n * kb * q.block_size * q.bits as usize / 8);
            assert_eq!(scales.len(), n * kb);
            let back = dequantize(&q, &packed, &scales, n, k);
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let step = scales[(i / k) * kb + (i % k) / q.block_size];
                assert!(
                    (a - b).abs() <= 0.5 * step + 1e-6,
                    "bits {}: {a} vs {b}",
                    q.bits
                );
            }
        }
    }

    /// The joined q, k, v product against the three products computed here, in ONNX Runtime:
    /// fp32 (float rounding only) and int8 blocks (bounded by both quantizations), with the
    /// query scaled and a missing key bias taken as zeros, as the model does.
    #[test]
    fn qkv_projection_matches_three_products() {
        use super::{qkv_projection, Named};
        use crate::graph::{Dim, Elem, GraphBuilder};
        use candle_core::{Device, Tensor};

        let (d, rows, scale) = (64usize, 3usize, 0.125f64);
        // Deterministic values in [-1, 1): weights, biases and the input.
        let vals = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
                .collect()
        };
        let w: Vec<Vec<f32>> = (0..3).map(|j| vals(d * d, j + 1)).collect();
        let b = [Some(vals(d, 7)), None, Some(vals(d, 9))];
        let x = vals(rows * d, 11);
        let mut list = Vec::new();
        for (j, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let t = Tensor::from_vec(w[j].clone(), (d, d), &Device::Cpu).expect("weight");
            list.push((format!("attn.{p}.weight"), t));
            if let Some(bias) = &b[j] {
                let t = Tensor::from_vec(bias.clone(), d, &Device::Cpu).expect("bias");
                list.push((format!("attn.{p}.bias"), t));
            }
        }
        let t = Named::new(list);
        // The reference: y_j = (x W_j^T + b_j), times the scale for the query.
        let reference = |j: usize| -> Vec<f64> {
            let mut y = vec![0f64; rows * d];
            for r in 0..rows {
                for o in 0..d {
                    let mut acc = b[j].as_ref().map_or(0.0, |b| f64::from(b[o]));
                    for i in 0..d {
                        acc += f64::from(x[r * d + i]) * f64::from(w[j][o * d + i]);
                    }
                    y[r * d + o] = if j == 0 { acc * scale } else { acc };
                }
            }
            y
        };
        for quant in [None, Some(Quant::Blocks(WeightQuant::INT8))] {
            let mut g = GraphBuilder::new();
            let dims = [Dim::Fixed(1), Dim::Fixed(rows as i64), Dim::Fixed(d as i64)];
            let xin = g.input("x", Elem::F32, &dims);
            let outs = qkv_projection(&mut g, &xin, &t, "attn", scale, quant).expect("graph");
            let names = ["q", "k", "v"].map(String::from);
            for (o, n) in outs.iter().zip(&names) {
                g.output(o, n, Elem::F32, &dims);
            }
            let mut session = test_session("qkv", g);
            let input = crate::verify::f32_raw("qkv", vec![1, rows as i64, d as i64], x.clone())
                .expect("input");
            let got = crate::verify::run(&mut session, "qkv", vec![("x".into(), input)], &names)
                .expect("run");
            let x_max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (j, out) in got.iter().enumerate() {
                assert_eq!(out.shape, vec![1, rows, d], "{}", names[j]);
                let want = reference(j);
                let s = if j == 0 { scale } else { 1.0 };
                let w_max = w[j].iter().fold(0f32, |m, v| m.max(v.abs()));
                for r in 0..rows {
                    let x_l1: f32 = x[r * d..(r + 1) * d].iter().map(|v| v.abs()).sum();
                    for o in 0..d {
                        let w_l1: f32 = w[j][o * d..(o + 1) * d].iter().map(|v| v.abs()).sum();
                        // fp32: rounding of d products and sums, far under 1e-4 of the terms'
                        // size. int8 (one block of 64 here): each weight within half a step
                        // (w_max / 254) and, with accuracy level 4, each input too (x_max /
                        // 254), so the product moves by at most the sum of both bounds.
                        let bound = match quant {
                            None => 1e-4 * f64::from(x_l1 * w_max),
                            Some(_) => {
                                f64::from(x_l1 * w_max / 254.0 + w_l1 * x_max / 254.0) * 1.01
                            }
                        } * s;
                        let (a, e) = (f64::from(out.data[r * d + o]), want[r * d + o]);
                        assert!(
                            (a - e).abs() <= bound,
                            "{} {quant:?} row {r} column {o}: {a} against {e} (bound {bound})",
                            names[j]
                        );
                    }
                }
            }
        }
    }
    #[test]
    fn lm_head_lists_the_tokens_asked_for() {
        use super::{lm_head, store_linear, Named};
        use crate::graph::{Dim, Elem, GraphBuilder};
        use candle_core::{Device, Tensor};
        use moda_sdk::manifest::HEAD_IDS;

        // 80 inputs: not a whole number of blocks (int4 blocks of 32, int8 of 64 here), so
        // the listed rows' padding is cut off.
        let (k, n, rows) = (80usize, 300usize, 2usize);
        let vals = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
                .collect()
        };
        let w = vals(n * k, 1);
        let x = vals(rows * k, 3);
        let ids: Vec<i64> = vec![299, 0, 17, 150, 17];
        for (quant, bias) in [
            (None, Some(vals(n, 5))),
            (Some(WeightQuant::INT8), None),
            (Some(WeightQuant::INT4), Some(vals(n, 7))),
        ] {
            let mut list = vec![(
                "lm_head.weight".to_string(),
                Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).expect("weight"),
            )];
            if let Some(b) = &bias {
                let t = Tensor::from_vec(b.clone(), n, &Device::Cpu).expect("bias");
                list.push(("lm_head.bias".to_string(), t));
            }
            let t = Named::new(list);
            let mut g = GraphBuilder::new();
            let dims = [Dim::Fixed(1), Dim::Fixed(rows as i64), Dim::Fixed(k as i64)];
            let xin = g.input("x", Elem::F32, &dims);
            let head =
                store_linear(&mut g, &t, "lm_head", None, quant.map(Quant::Blocks)).expect("head");
            // The weights as the graph holds them: dequantized codes, or fp32 as they are.
            let held = match quant {
                None => w.clone(),
                Some(q) => {
                    let q = Quant::Blocks(q).for_width(k).expect("quantized");
                    let Quant::Blocks(q) = q else { unreachable!() };
                    let (packed, scales) = q.quantize(&w, n, k);
                    dequantize(&q, &packed, &scales, n, k)
                }
            };
            let y = lm_head(&mut g, &xin, &head).expect("graph");
            let out_dims = [Dim::Fixed(1), Dim::Fixed(rows as i64), Dim::named("cols")];
            g.output(&y, "logits", Elem::F32, &out_dims);
            let mut session = test_session("head", g);
            let run = |session: &mut _, listed: Option<&[i64]>| {
                let mut inputs = vec![(
                    "x".to_string(),
                    crate::verify::f32_raw("head", vec![1, rows as i64, k as i64], x.clone())
                        .expect("input"),
                )];
                if let Some(ids) = listed {
                    let t = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu).expect("ids");
                    inputs.push((
                        HEAD_IDS.to_string(),
                        crate::verify::i64_input("head", &t).expect("ids"),
                    ));
                }
                crate::verify::run(session, "head", inputs, &["logits".to_string()])
                    .expect("run")
                    .remove(0)
            };
            // Not fed: its default, every token. Fed empty: the same.
            let every = run(&mut session, None);
            assert_eq!(every.shape, vec![1, rows, n]);
            assert_eq!(run(&mut session, Some(&[])).data, every.data);
            let listed = run(&mut session, Some(&ids));
            assert_eq!(listed.shape, vec![1, rows, ids.len()], "{quant:?}");
            let x_max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                let x_l1: f32 = xr.iter().map(|v| v.abs()).sum();
                for (j, &id) in ids.iter().enumerate() {
                    let id = id as usize;
                    let wr = &held[id * k..(id + 1) * k];
                    let b = bias.as_ref().map_or(0.0, |b| f64::from(b[id]));
                    let want = b + xr
                        .iter()
                        .zip(wr)
                        .map(|(a, c)| f64::from(*a) * f64::from(*c))
                        .sum::<f64>();
                    let w_l1: f32 = wr.iter().map(|v| v.abs()).sum();
                    // The listed logits multiply fp32 inputs by the weights as held (fp32, or
                    // the codes dequantized): float rounding of k products only.
                    let got = f64::from(listed.data[r * ids.len() + j]);
                    let bound = 1e-5 * f64::from(x_l1 * 1.0f32.max(w_l1 / k as f32)) + 1e-6;
                    assert!(
                        (got - want).abs() <= bound,
                        "{quant:?} row {r} token {id}: {got} against {want} (bound {bound})"
                    );
                    // The whole head's column for the same token: the same for fp32; with
                    // `MatMulNBits`' accuracy level 4 its inputs are quantized to 8 bits (each
                    // within x_max / 254), so it moves by at most w_l1 * x_max / 254.
                    let full = f64::from(every.data[r * n + id]);
                    let bound = match quant {
                        None => bound,
                        Some(_) => f64::from(w_l1 * x_max / 254.0) * 1.01 + bound,
                    };
                    assert!(
                        (full - want).abs() <= bound,
                        "{quant:?} row {r} token {id}: every token's {full} against {want}"
                    );
                }
            }
        }
    }
}
