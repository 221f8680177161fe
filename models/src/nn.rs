//! Building blocks shared by the CLIP and OPT implementations: activations named as in
//! transformers' `ACT2FN`, multi-head reshaping and the attention core, config-file reading.

use std::path::Path;

use candle_core::{DType, Module, Tensor, D};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The activations of `transformers.activations.ACT2FN` that CLIP and OPT checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// `gelu`: exact, with erf.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `relu` (OPT).
    Relu,
}

impl Activation {
    /// The names accepted in `hidden_act` / `activation_function`.
    pub const SUPPORTED: &'static str =
        "quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu";

    /// Parses a `transformers` activation name; `path` and `key` are for the error message.
    pub fn parse(name: &str, path: &Path, key: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => Err(Error::Unsupported {
                path: path.to_path_buf(),
                key: key.to_string(),
                value: other.to_string(),
                supported: Self::SUPPORTED.to_string(),
            }),
        }
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu if crate::fused::applies(xs, None) => crate::fused::relu(xs),
            Self::Relu => xs.relu(),
        }
    }
}

/// candle_nn's `Linear` (`y = x w^T + b`), computed by the fused training kernel while
/// training on the CPU in f32 (see [`crate::fused`]) and by candle_nn's otherwise.
#[derive(Clone, Debug)]
pub(crate) struct Linear(candle_nn::Linear);

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self(candle_nn::Linear::new(weight, bias))
    }
}

impl std::ops::Deref for Linear {
    type Target = candle_nn::Linear;

    fn deref(&self) -> &candle_nn::Linear {
        &self.0
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if crate::fused::applies(xs, Some(self.0.weight())) {
            crate::fused::linear(xs, self.0.weight(), self.0.bias())
        } else {
            self.0.forward(xs)
        }
    }
}

/// A linear layer with a bias, `{prefix}.weight` `[out, in]` and `{prefix}.bias` from `vb`.
pub(crate) fn linear(i: usize, o: usize, vb: candle_nn::VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear(i, o, vb).map(Linear)
}

/// A linear layer without a bias.
pub(crate) fn linear_no_bias(
    i: usize,
    o: usize,
    vb: candle_nn::VarBuilder,
) -> candle_core::Result<Linear> {
    candle_nn::linear_no_bias(i, o, vb).map(Linear)
}

/// Appends a linear layer's tensors as `{prefix}.weight` (`[out, in]`) and `{prefix}.bias`.
pub(crate) fn push_linear(out: &mut Vec<(String, Tensor)>, prefix: &str, l: &candle_nn::Linear) {
    out.push((format!("{prefix}.weight"), l.weight().clone()));
    if let Some(b) = l.bias() {
        out.push((format!("{prefix}.bias"), b.clone()));
    }
}

/// Appends a LayerNorm's tensors as `{prefix}.weight` and `{prefix}.bias`.
pub(crate) fn push_layer_norm(
    out: &mut Vec<(String, Tensor)>,
    prefix: &str,
    ln: &candle_nn::LayerNorm,
) {
    out.push((format!("{prefix}.weight"), ln.weight().clone()));
    if let Some(b) = ln.bias() {
        out.push((format!("{prefix}.bias"), b.clone()));
    }
}

/// Reads and parses a JSON config file, with errors that name it.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        crate::files::read_text_bounded(path, crate::files::TEXT_FILE_MAX_BYTES).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile {
                    path: path.to_path_buf(),
                    what: "model configuration".to_string(),
                }
            } else {
                Error::io(path, e)
            }
        })?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// `[b, seq, heads * head_dim] -> [b, heads, seq, head_dim]`, contiguous.
pub(crate) fn split_heads(
    xs: &Tensor,
    heads: usize,
    head_dim: usize,
) -> candle_core::Result<Tensor> {
    let (b, seq, _) = xs.dims3()?;
    xs.reshape((b, seq, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, heads, seq, head_dim] -> [b, seq, heads * head_dim]`.
pub(crate) fn merge_heads(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (b, heads, seq, head_dim) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, seq, heads * head_dim))
}

/// A LayerNorm that keeps the autograd graph. candle_nn's fused `layer-norm` op (what
/// `LayerNorm::forward` uses on contiguous input) has no backward pass and silently stops
/// gradients, as does `softmax_last_dim` below; when the input or the weight is tracked
/// (training), [`crate::fused::layer_norm`] computes it with its own backward pass (CPU, f32),
/// or, on other devices and dtypes, differentiable primitives do. Inference keeps candle_nn's
/// kernel.
pub(crate) fn layer_norm_fwd(
    ln: &candle_nn::LayerNorm,
    xs: &Tensor,
) -> candle_core::Result<Tensor> {
    if !(xs.track_op() || ln.weight().track_op()) {
        return ln.forward(xs);
    }
    if let Some(bias) = ln.bias() {
        if crate::fused::applies(xs, Some(ln.weight())) && bias.dtype() == DType::F32 {
            return crate::fused::layer_norm(xs, ln.weight(), bias, ln.eps());
        }
    }
    let h = xs.dim(D::Minus1)? as f64;
    let mean = (xs.sum_keepdim(D::Minus1)? / h)?;
    let xc = xs.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / h)?;
    let xs = xc
        .broadcast_div(&(var + ln.eps())?.sqrt()?)?
        .broadcast_mul(ln.weight())?;
    match ln.bias() {
        Some(b) => xs.broadcast_add(b),
        None => Ok(xs),
    }
}

/// Softmax attention over already-scaled queries: `softmax(q k^T + mask) v`, scores in f32.
/// `mask` is additive, broadcastable to `[b, heads, q_len, k_len]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let in_dtype = q.dtype();
    let scores = q
        .to_dtype(DType::F32)?
        .matmul(&k.to_dtype(DType::F32)?.t()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    // The fused softmax has no backward pass: the differentiable one when training.
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let probs = probs.to_dtype(in_dtype)?;
    probs.matmul(&v.contiguous()?)
}

/// Self-attention as one fused op while training on the CPU ([`crate::fused::attention`]):
/// `Some(out(attention(q(x) * scale, k(x), v(x), mask)))` for the projections
/// `[q, k, v, out]`, or `None` where the fused op does not apply (inference, other devices and
/// dtypes), for the caller's composed path.
pub(crate) fn fused_self_attention(
    xs: &Tensor,
    [q, k, v, out]: [&Linear; 4],
    heads: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !crate::fused::applies(xs, Some(q.weight())) {
        return Ok(None);
    }
    let ys = crate::fused::attention(
        &q.forward(xs)?,
        &k.forward(xs)?,
        &v.forward(xs)?,
        mask,
        heads,
        scale,
    )?;
    out.forward(&ys).map(Some)
}
