//! OPT, as transformers' `OPTForCausalLM` (`models/opt/modeling_opt.py`): the whole family, not
//! only OPT-125m. Zhang et al., "OPT: Open Pre-trained Transformer Language Models" (2022).
//!
//! - `do_layer_norm_before` true (pre-LN, 125m and most sizes) and false (post-LN, 350m);
//! - `word_embed_proj_dim != hidden_size` (`project_in` / `project_out`, 350m);
//! - tied or untied `lm_head`;
//! - learned positions with OPT's offset of 2, computed from the attention mask
//!   (`cumsum(mask) * mask - 1`), so that left and right padding both work;
//! - input from token ids or from `inputs_embeds` (in `word_embed_proj_dim` space, before
//!   `project_in`, as transformers takes them), and an explicit KV cache (candle `llama.rs`
//!   style) laid out `[batch, heads, past, head_dim]`, as the ONNX decoder's
//!   `past_key_values.{i}.key|value`.
//!
//! Training mode ([`Opt::train`]) applies the residual-branch dropout of transformers'
//! `OPTDecoderLayer` (config `dropout`, after self-attention and after `fc2`) with a seeded
//! generator of its own, so that a run is reproducible and resumable; `attention_dropout`,
//! `activation_dropout` and `layerdrop` (all 0 in the OPT checkpoints) are not applied. It is
//! off by default: inference never drops.
//!
//! Checkpoints name the decoder `model.decoder.*` (saved from `OPTForCausalLM`), `decoder.*`
//! (the facebook/opt-* files, saved from `OPTModel`), or carry a prefix (the original MODA
//! recipe's `opt.model.decoder.*`); [`Opt::new`] takes a `VarBuilder` at the `OPTForCausalLM`
//! level and finds the decoder under it.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{
    attention, fused_self_attention, layer_norm_fwd, merge_heads, push_layer_norm, push_linear,
    read_json, split_heads, Activation, Linear,
};
use crate::weights::Weights;

fn d_vocab() -> usize {
    50272
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_ffn() -> usize {
    3072
}
fn d_heads() -> usize {
    12
}
fn d_max_pos() -> usize {
    2048
}
fn d_true() -> bool {
    true
}
fn d_act() -> String {
    "relu".to_string()
}
fn d_pad() -> u32 {
    1
}
fn d_bos() -> u32 {
    2
}
fn d_eos() -> u32 {
    2
}

/// `OPTConfig`, with transformers' key names and defaults (OPT-125m's geometry).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct OptConfig {
    /// Rows of the token embedding (and of the logits).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Width of the transformer.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Number of decoder layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Width of the feed-forward block.
    #[serde(default = "d_ffn")]
    pub ffn_dim: usize,
    /// Attention heads per layer.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Longest sequence the learned positions cover.
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    /// Pre-LN (true) or post-LN (false) blocks.
    #[serde(default = "d_true")]
    pub do_layer_norm_before: bool,
    /// Set on some checkpoints to drop the decoder's final LayerNorm.
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Size of the token embedding; defaults to `hidden_size`.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    /// The feed-forward activation.
    #[serde(default = "d_act")]
    pub activation_function: String,
    /// Whether the linear layers have biases.
    #[serde(default = "d_true")]
    pub enable_bias: bool,
    /// Whether the LayerNorms have weights and biases.
    #[serde(default = "d_true")]
    pub layer_norm_elementwise_affine: bool,
    /// Whether `lm_head` shares the token embedding.
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// `<pad>`.
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
    /// The BOS that OPT's tokenizer puts in front (`</s>`).
    #[serde(default = "d_bos")]
    pub bos_token_id: u32,
    /// `</s>`.
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    /// Dropout probability of the residual branches (training only).
    #[serde(default)]
    pub dropout: f64,
}

impl Default for OptConfig {
    fn default() -> Self {
        // An empty JSON object deserialises to the defaults above.
        match serde_json::from_str("{}") {
            Ok(c) => c,
            Err(_) => unreachable!("the empty object always deserialises"),
        }
    }
}

/// OPT's learned positions start at index 2 (fairseq's padding offset).
const POSITION_OFFSET: usize = 2;
/// OPT uses PyTorch's default LayerNorm epsilon.
const LAYER_NORM_EPS: f64 = 1e-5;

impl OptConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: OptConfig = read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the geometry and the activation; `path` names the config in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        Activation::parse(&self.activation_function, path, "activation_function")?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                key: "num_attention_heads".to_string(),
                value: self.num_attention_heads.to_string(),
                supported: "a divisor of hidden_size".to_string(),
            });
        }
        Ok(())
    }

    /// Size of the token embedding and of the decoder's inputs and outputs.
    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }
}

/// The KV cache: per layer, keys and values `[batch, heads, past, head_dim]`.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl Cache {
    /// An empty cache for `cfg`'s number of layers.
    pub fn new(cfg: &OptConfig) -> Self {
        Self {
            layers: vec![None; cfg.num_hidden_layers],
        }
    }

    /// How many positions are cached.
    pub fn past_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// The cached keys and values of layer `i`.
    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i).and_then(|l| l.as_ref())
    }

    /// Keeps batch rows `rows` (u32 indices) of every layer, in that order; rows may repeat.
    /// Beam search reorders its beams' caches this way after each step.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// Dropout as `nn.functional.dropout` in train mode: zero each element with probability `p`,
/// scale the rest by `1 / (1 - p)`. The mask comes from a SplitMix64 generator whose state can
/// be saved and restored ([`Opt::dropout_state`]), not from candle's unseedable CPU generator.
struct Dropout {
    p: f64,
    state: Mutex<u64>,
}

impl Clone for Dropout {
    /// A generator of its own, starting from this one's state.
    fn clone(&self) -> Self {
        let state = self
            .state
            .lock()
            .map(|s| *s)
            .unwrap_or_else(|e| *e.into_inner());
        Dropout {
            p: self.p,
            state: Mutex::new(state),
        }
    }
}

/// SplitMix64's increment (Steele, Lea and Flood, 2014).
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Elements per parallel chunk of a dropout mask.
const DROPOUT_CHUNK: usize = 1 << 14;

impl Dropout {
    /// SplitMix64's output for a generator state.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn apply(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        if self.p <= 0.0 {
            return Ok(xs.clone());
        }
        let n = xs.elem_count();
        // SplitMix64 is a counter: the i-th draw after state s is mix(s + (i + 1) * gamma). So
        // the mask is drawn in parallel chunks, and the generator advances by n draws at once;
        // the masks are those of drawing the elements one by one.
        let start = {
            let mut state = self
                .state
                .lock()
                .map_err(|_| candle_core::Error::Msg("dropout generator poisoned".into()))?;
            let s = *state;
            *state = s.wrapping_add(GOLDEN_GAMMA.wrapping_mul(n as u64));
            s
        };
        let p = self.p;
        let mut keep = vec![0u8; n];
        keep.par_chunks_mut(DROPOUT_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let first = (c * DROPOUT_CHUNK) as u64;
                for (j, k) in chunk.iter_mut().enumerate() {
                    let draw = first + j as u64 + 1;
                    let z = Self::mix(start.wrapping_add(GOLDEN_GAMMA.wrapping_mul(draw)));
                    // 53 random bits -> a uniform float in [0, 1).
                    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
                    *k = u8::from(u >= p);
                }
            });
        // Sent to the device as bytes (a quarter of the f32 mask), scaled there: the mask is
        // 0 or 1 / (1 - p), exactly.
        let scale = f64::from((1.0 / (1.0 - p)) as f32);
        let mask = Tensor::from_vec(keep, xs.shape(), xs.device())?
            .to_dtype(xs.dtype())?
            .affine(scale, 0.0)?;
        xs * mask
    }
}

fn layer_norm(cfg: &OptConfig, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    let h = cfg.hidden_size;
    if cfg.layer_norm_elementwise_affine {
        candle_nn::layer_norm(h, LAYER_NORM_EPS, vb)
    } else {
        let ones = Tensor::ones(h, vb.dtype(), vb.device())?;
        let zeros = Tensor::zeros(h, vb.dtype(), vb.device())?;
        Ok(LayerNorm::new(ones, zeros, LAYER_NORM_EPS))
    }
}

fn linear(cfg: &OptConfig, i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    if cfg.enable_bias {
        crate::nn::linear(i, o, vb)
    } else {
        crate::nn::linear_no_bias(i, o, vb)
    }
}

#[derive(Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl SelfAttention {
    fn new(cfg: &OptConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q: linear(cfg, h, h, vb.pp("q_proj"))?,
            k: linear(cfg, h, h, vb.pp("k_proj"))?,
            v: linear(cfg, h, h, vb.pp("v_proj"))?,
            out: linear(cfg, h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            scale: (cfg.head_dim() as f64).powf(-0.5),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        bias: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        if cache.is_none() {
            let proj = [&self.q, &self.k, &self.v, &self.out];
            if let Some(ys) = fused_self_attention(xs, proj, self.heads, self.scale, bias)? {
                return Ok(ys);
            }
        }
        let q = split_heads(
            &(self.q.forward(xs)? * self.scale)?,
            self.heads,
            self.head_dim,
        )?;
        let mut k = split_heads(&self.k.forward(xs)?, self.heads, self.head_dim)?;
        let mut v = split_heads(&self.v.forward(xs)?, self.heads, self.head_dim)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let ys = attention(&q, &k, &v, bias)?;
        self.out.forward(&merge_heads(&ys)?)
    }
}

#[derive(Clone)]
struct DecoderLayer {
    self_attn: SelfAttention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    act: Activation,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    pre_ln: bool,
}

impl DecoderLayer {
    fn new(cfg: &OptConfig, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            self_attn_layer_norm: layer_norm(cfg, vb.pp("self_attn_layer_norm"))?,
            fc1: linear(cfg, h, cfg.ffn_dim, vb.pp("fc1"))?,
            act,
            fc2: linear(cfg, cfg.ffn_dim, h, vb.pp("fc2"))?,
            final_layer_norm: layer_norm(cfg, vb.pp("final_layer_norm"))?,
            pre_ln: cfg.do_layer_norm_before,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        bias: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        dropout: Option<&Dropout>,
    ) -> candle_core::Result<Tensor> {
        let drop = |ys: Tensor| match dropout {
            Some(d) => d.apply(&ys),
            None => Ok(ys),
        };
        // Self-attention block.
        let residual = xs;
        let ys = if self.pre_ln {
            layer_norm_fwd(&self.self_attn_layer_norm, xs)?
        } else {
            xs.clone()
        };
        let ys = drop(self.self_attn.forward(&ys, bias, cache)?)?;
        let mut xs = (residual + ys)?;
        if !self.pre_ln {
            xs = layer_norm_fwd(&self.self_attn_layer_norm, &xs)?;
        }
        // Feed-forward block.
        let residual = &xs;
        let ys = if self.pre_ln {
            layer_norm_fwd(&self.final_layer_norm, &xs)?
        } else {
            xs.clone()
        };
        let ys = drop(ys.apply(&self.fc1)?.apply(&self.act)?.apply(&self.fc2)?)?;
        let xs = (residual + ys)?;
        if self.pre_ln {
            Ok(xs)
        } else {
            layer_norm_fwd(&self.final_layer_norm, &xs)
        }
    }
}

/// What the decoder reads: token ids `[b, seq]` or input embeddings `[b, seq, embed_dim]`.
#[derive(Debug, Clone, Copy)]
pub enum DecoderInput<'a> {
    /// Token ids (any integer dtype).
    Ids(&'a Tensor),
    /// Input embeddings in `word_embed_proj_dim` space (what `embed_tokens` returns).
    Embeds(&'a Tensor),
}

/// `OPTForCausalLM`: the decoder and its LM head.
#[derive(Clone)]
pub struct Opt {
    cfg: OptConfig,
    embed_tokens: Embedding,
    embed_positions: Embedding,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<DecoderLayer>,
    final_layer_norm: Option<LayerNorm>,
    lm_head: Linear,
    /// `Some` in training mode.
    dropout: Option<Dropout>,
}

impl Opt {
    /// Builds the model; `vb` is at the `OPTForCausalLM` level: the decoder is found at
    /// `model.decoder` or `decoder`, the untied head at `lm_head`.
    pub fn new(cfg: &OptConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let act = match Activation::parse(
            &cfg.activation_function,
            Path::new("config.json"),
            "activation_function",
        ) {
            Ok(a) => a,
            Err(e) => candle_core::bail!("{e}"),
        };
        let dvb = if vb.contains_tensor("model.decoder.embed_tokens.weight") {
            vb.pp("model").pp("decoder")
        } else {
            vb.pp("decoder")
        };
        let h = cfg.hidden_size;
        let e = cfg.embed_dim();
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, e, dvb.pp("embed_tokens"))?;
        let embed_positions = candle_nn::embedding(
            cfg.max_position_embeddings + POSITION_OFFSET,
            h,
            dvb.pp("embed_positions"),
        )?;
        let (project_in, project_out) = if e != h {
            (
                Some(crate::nn::linear_no_bias(e, h, dvb.pp("project_in"))?),
                Some(crate::nn::linear_no_bias(h, e, dvb.pp("project_out"))?),
            )
        } else {
            (None, None)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, act, dvb.pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = if cfg.has_final_layer_norm() {
            Some(layer_norm(cfg, dvb.pp("final_layer_norm"))?)
        } else {
            None
        };
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            crate::nn::linear_no_bias(e, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            lm_head,
            dropout: None,
        })
    }

    /// Loads `config.json` and the weights of a Hugging Face OPT directory.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = OptConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::from_dir(dir)?;
        let model =
            Self::new(&cfg, weights.var_builder(dtype, device)).map_err(|e| weights.explain(e))?;
        let unexpected: Vec<String> = weights
            .unused()
            .into_iter()
            .filter(|n| !(cfg.tie_word_embeddings && n == "lm_head.weight"))
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedKeys {
                path: weights.source().to_path_buf(),
                keys: unexpected,
            });
        }
        Ok(model)
    }

    /// The configuration.
    pub fn config(&self) -> &OptConfig {
        &self.cfg
    }

    /// Training mode: the config's `dropout` applies, drawn from a generator seeded with
    /// `seed` (PyTorch's `model.train()`).
    pub fn train(&mut self, seed: u64) {
        self.dropout = Some(Dropout {
            p: self.cfg.dropout,
            state: Mutex::new(seed),
        });
    }

    /// Inference mode, the default: no dropout (PyTorch's `model.eval()`).
    pub fn eval(&mut self) {
        self.dropout = None;
    }

    /// Whether the model is in training mode.
    pub fn is_training(&self) -> bool {
        self.dropout.is_some()
    }

    /// The dropout generator's state in training mode (to save with a checkpoint).
    pub fn dropout_state(&self) -> Option<u64> {
        self.dropout
            .as_ref()
            .and_then(|d| d.state.lock().ok().map(|s| *s))
    }

    /// Restores the dropout generator's state; no effect outside training mode.
    pub fn set_dropout_state(&self, state: u64) {
        if let Some(d) = &self.dropout {
            if let Ok(mut s) = d.state.lock() {
                *s = state;
            }
        }
    }

    /// Token ids `[b, t]` -> input embeddings `[b, t, embed_dim]`.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(&ids.to_dtype(DType::U32)?)?)
    }

    /// Every tensor of the model under its `OPTForCausalLM` name (`model.decoder.*` and
    /// `lm_head.weight`, which is the token embedding itself when tied), as the model holds
    /// it: what an exporter writes. LayerNorms without affine parameters appear as ones and
    /// zeros.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let d = "model.decoder";
        out.push((
            format!("{d}.embed_tokens.weight"),
            self.embed_tokens.embeddings().clone(),
        ));
        out.push((
            format!("{d}.embed_positions.weight"),
            self.embed_positions.embeddings().clone(),
        ));
        if let Some(p) = &self.project_in {
            push_linear(&mut out, &format!("{d}.project_in"), p);
        }
        if let Some(p) = &self.project_out {
            push_linear(&mut out, &format!("{d}.project_out"), p);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("{d}.layers.{i}");
            let a = &l.self_attn;
            push_linear(&mut out, &format!("{p}.self_attn.q_proj"), &a.q);
            push_linear(&mut out, &format!("{p}.self_attn.k_proj"), &a.k);
            push_linear(&mut out, &format!("{p}.self_attn.v_proj"), &a.v);
            push_linear(&mut out, &format!("{p}.self_attn.out_proj"), &a.out);
            push_layer_norm(
                &mut out,
                &format!("{p}.self_attn_layer_norm"),
                &l.self_attn_layer_norm,
            );
            push_linear(&mut out, &format!("{p}.fc1"), &l.fc1);
            push_linear(&mut out, &format!("{p}.fc2"), &l.fc2);
            push_layer_norm(
                &mut out,
                &format!("{p}.final_layer_norm"),
                &l.final_layer_norm,
            );
        }
        if let Some(ln) = &self.final_layer_norm {
            push_layer_norm(&mut out, &format!("{d}.final_layer_norm"), ln);
        }
        push_linear(&mut out, "lm_head", &self.lm_head);
        out
    }

    /// The token embedding table `[vocab, embed_dim]`.
    pub fn embedding_table(&self) -> &Tensor {
        self.embed_tokens.embeddings()
    }

    /// Runs the decoder and the LM head: logits `[b, seq, vocab]`.
    ///
    /// `attention_mask` is `[b, past + seq]` (1 for real tokens, 0 for padding; any dtype);
    /// `None` means all ones. With a `cache`, `past` is what it holds and it is extended by this
    /// call's keys and values.
    pub fn forward(
        &self,
        input: DecoderInput<'_>,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor> {
        let hidden = self.decode(input, attention_mask, cache)?;
        Ok(self.lm_head.forward(&hidden)?)
    }

    /// The decoder's output before the LM head, `[b, seq, embed_dim]`.
    pub fn decode(
        &self,
        input: DecoderInput<'_>,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut Cache>,
    ) -> Result<Tensor> {
        let embeds = match input {
            DecoderInput::Ids(ids) => self.embed_tokens(ids)?,
            DecoderInput::Embeds(x) => x.clone(),
        };
        let (b, seq, e) = embeds.dims3()?;
        if e != self.cfg.embed_dim() {
            return Err(Error::Input(format!(
                "decoder input embeddings of width {e}, the model takes {}",
                self.cfg.embed_dim()
            )));
        }
        let past = cache.as_ref().map(|c| c.past_len()).unwrap_or(0);
        let total = past + seq;
        if total > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence of {total} positions, the model has {}",
                self.cfg.max_position_embeddings
            )));
        }
        let device = embeds.device().clone();
        let mask = match attention_mask {
            Some(m) => {
                if m.dims() != [b, total] {
                    return Err(Error::Input(format!(
                        "attention_mask of shape {:?}, expected [{b}, {total}]",
                        m.dims()
                    )));
                }
                m.to_dtype(DType::F32)?
            }
            None => Tensor::ones((b, total), DType::F32, &device)?,
        };
        // Positions as transformers computes them: cumsum(mask) * mask - 1, plus the offset.
        let positions = ((mask.cumsum(1)? * &mask)? + (POSITION_OFFSET as f64 - 1.0))?
            .narrow(1, past, seq)?
            .to_dtype(DType::U32)?;
        let pos_embeds = self.embed_positions.forward(&positions)?;
        let mut xs = match &self.project_in {
            Some(p) => p.forward(&embeds)?,
            None => embeds,
        };
        let pos_embeds = pos_embeds.to_dtype(xs.dtype())?;
        xs = (xs + pos_embeds)?;
        let bias = attention_bias(&mask, seq, past)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = match cache.as_deref_mut() {
                Some(c) => c.layers.get_mut(i),
                None => None,
            };
            xs = layer.forward(&xs, bias.as_ref(), slot, self.dropout.as_ref())?;
        }
        if let Some(ln) = &self.final_layer_norm {
            xs = layer_norm_fwd(ln, &xs)?;
        }
        if let Some(p) = &self.project_out {
            xs = p.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// The additive attention bias `[b, 1, seq, past + seq]`: 0 where query `i` may see key `j`
/// (causal and not padding), the lowest finite value elsewhere (as transformers does, so that a
/// fully masked row stays finite). `None` when nothing is masked (one new token, no padding).
fn attention_bias(mask: &Tensor, seq: usize, past: usize) -> candle_core::Result<Option<Tensor>> {
    let (b, total) = mask.dims2()?;
    let device = mask.device();
    let padded = mask
        .min_keepdim(D::Minus1)?
        .flatten_all()?
        .min(0)?
        .to_scalar::<f32>()?
        < 0.5;
    if seq == 1 && !padded {
        return Ok(None);
    }
    let q_pos = Tensor::arange(past as u32, (past + seq) as u32, device)?.reshape((seq, 1))?;
    let k_pos = Tensor::arange(0u32, total as u32, device)?.reshape((1, total))?;
    let causal = k_pos.broadcast_le(&q_pos)?.to_dtype(DType::F32)?; // [seq, total]
    let allowed = causal
        .reshape((1, 1, seq, total))?
        .broadcast_mul(&mask.reshape((b, 1, 1, total))?)?;
    let zeros = Tensor::zeros((b, 1, seq, total), DType::F32, device)?;
    let min = Tensor::full(f32::MIN, (b, 1, seq, total), device)?;
    Ok(Some(allowed.gt(0.5)?.where_cond(&zeros, &min)?))
}

impl std::fmt::Debug for Opt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opt").field("config", &self.cfg).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dropout mask, drawn in parallel chunks, is the one of SplitMix64 drawn element by
    /// element (the published algorithm, written out here), over several chunks, and the
    /// generator ends where n sequential draws leave it.
    #[test]
    fn dropout_mask_is_sequential_splitmix64() -> candle_core::Result<()> {
        let p = 0.3;
        let state0 = 0x0123_4567_89AB_CDEFu64;
        let d = Dropout {
            p,
            state: Mutex::new(state0),
        };
        let n = 2 * DROPOUT_CHUNK + 77;
        let ones = Tensor::ones(n, DType::F32, &Device::Cpu)?;
        let got = d.apply(&ones)?.to_vec1::<f32>()?;
        let keep = (1.0 / (1.0 - p)) as f32;
        let mut s = state0;
        let mut dropped = 0;
        for (i, g) in got.iter().enumerate() {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            let want = if u < p { 0.0 } else { keep };
            assert_eq!(*g, want, "element {i}");
            dropped += usize::from(u < p);
        }
        assert_eq!(*d.state.lock().expect("state"), s);
        // About p of them dropped (n = 32845: 3 standard deviations are 0.008).
        let frac = dropped as f64 / n as f64;
        assert!((frac - p).abs() < 0.01, "dropped {frac}");
        Ok(())
    }
}
