//! The CLIP vision tower and visual projection: transformers' `CLIPModel.get_image_features`
//! (`models/clip/modeling_clip.py`: `CLIPVisionEmbeddings`, `CLIPEncoderLayer`,
//! `CLIPVisionTransformer`, `visual_projection`), as candle-transformers' `clip/vision_model.rs`
//! lays it out. Radford et al., "Learning Transferable Visual Models From Natural Language
//! Supervision" (2021). FashionCLIP is a fine-tuned ViT-B/32 of this shape.
//!
//! Reads the `config.json` of a full `CLIPModel` (`vision_config` + top-level `projection_dim`)
//! or of a `CLIPVisionModel(WithProjection)` (the vision keys at the top level). The text tower's
//! tensors are ignored.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{
    attention, fused_self_attention, layer_norm_fwd, merge_heads, push_layer_norm, push_linear,
    read_json, split_heads, Activation, Linear,
};
use crate::weights::Weights;

fn d_hidden() -> usize {
    768
}
fn d_intermediate() -> usize {
    3072
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_act() -> String {
    "quick_gelu".to_string()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_proj() -> usize {
    512
}

/// `CLIPVisionConfig`, with transformers' key names and defaults (ViT-B/32).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct ClipVisionConfig {
    /// Width of the transformer.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    /// Number of encoder layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Input channels (3).
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    /// Input resolution (square).
    #[serde(default = "d_image")]
    pub image_size: usize,
    /// Patch size (square).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// The MLP activation, as named in transformers (`quick_gelu`, `gelu`, ...).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Size of the image embedding (`visual_projection` output).
    #[serde(default = "d_proj")]
    pub projection_dim: usize,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: d_hidden(),
            intermediate_size: d_intermediate(),
            num_hidden_layers: d_layers(),
            num_attention_heads: d_heads(),
            num_channels: d_channels(),
            image_size: d_image(),
            patch_size: d_patch(),
            hidden_act: d_act(),
            layer_norm_eps: d_eps(),
            projection_dim: d_proj(),
        }
    }
}

#[derive(Deserialize)]
struct FullClipConfig {
    vision_config: Option<serde_json::Value>,
    /// Older CLIPConfig files (transformers 4.1x-4.2x) also, or only, carry this.
    vision_config_dict: Option<serde_json::Value>,
    projection_dim: Option<usize>,
}

impl ClipVisionConfig {
    /// Reads `config.json` of a `CLIPModel` or `CLIPVisionModelWithProjection` checkpoint.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        let json_err = |e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        };
        let full: FullClipConfig = serde_json::from_value(value.clone()).map_err(json_err)?;
        let vision = full
            .vision_config
            .filter(|v| !v.is_null())
            .or(full.vision_config_dict.filter(|v| !v.is_null()));
        let cfg = match vision {
            Some(vision) => {
                let mut cfg: ClipVisionConfig = serde_json::from_value(vision).map_err(json_err)?;
                // In a full CLIPModel the projection size is the top-level `projection_dim`.
                cfg.projection_dim = full.projection_dim.unwrap_or_else(d_proj);
                cfg
            }
            None => serde_json::from_value(value).map_err(json_err)?,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the geometry and the activation; `path` names the config in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        Activation::parse(&self.hidden_act, path, "hidden_act")?;
        let bad = |key: &str, value: String, supported: &str| Error::Unsupported {
            path: path.to_path_buf(),
            key: key.to_string(),
            value,
            supported: supported.to_string(),
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(bad(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                "a divisor of hidden_size",
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(bad(
                "patch_size",
                self.patch_size.to_string(),
                "a divisor of image_size",
            ));
        }
        Ok(())
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Number of patches plus the class token.
    pub fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

#[derive(Clone)]
struct Embeddings {
    patch: Conv2d,
    class: Tensor,
    positions: Tensor,
}

impl Embeddings {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let conv_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let patch = candle_nn::conv2d_no_bias(
            cfg.num_channels,
            cfg.hidden_size,
            cfg.patch_size,
            conv_cfg,
            vb.pp("patch_embedding"),
        )?;
        let class = vb.get(cfg.hidden_size, "class_embedding")?;
        let positions = vb.get(
            (cfg.num_positions(), cfg.hidden_size),
            "position_embedding.weight",
        )?;
        Ok(Self {
            patch,
            class,
            positions,
        })
    }

    /// The patch embedding `[b, patches, hidden]`: CLIP's convolution, whose stride is its
    /// kernel's size, so that each output is one whole patch (channels x p x p, the kernel's
    /// own order) times the kernel, taken as that matrix product: the pixels cut into rows of
    /// patches against the kernel as a `[hidden, channels * p * p]` matrix (rows and columns
    /// past the last whole patch dropped, as the convolution does). While training, its
    /// backward is then two matrix products (the trainer's fused linear layer on the CPU),
    /// where candle's convolution backward is a dilated convolution for the kernel and a
    /// transposed convolution, run element by element, for the pixels.
    fn patches(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let kernel = self.patch.weight();
        let (hidden, c, p, _) = kernel.dims4()?;
        let (b, _, h, w) = pixel_values.dims4()?;
        let (gh, gw) = (h / p, w / p);
        let rows = pixel_values
            .narrow(2, 0, gh * p)?
            .narrow(3, 0, gw * p)?
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, c * p * p))?;
        crate::nn::Linear::new(kernel.reshape((hidden, c * p * p))?, None).forward(&rows)
    }
}

impl Module for Embeddings {
    fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixel_values.dim(0)?;
        let patches = self.patches(pixel_values)?;
        let hidden = self.class.dim(0)?;
        let class = self.class.reshape((1, 1, hidden))?.repeat((b, 1, 1))?;
        Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.positions)
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
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q: crate::nn::linear(h, h, vb.pp("q_proj"))?,
            k: crate::nn::linear(h, h, vb.pp("k_proj"))?,
            v: crate::nn::linear(h, h, vb.pp("v_proj"))?,
            out: crate::nn::linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            scale: (cfg.head_dim() as f64).powf(-0.5),
        })
    }
}

impl Module for SelfAttention {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let proj = [&self.q, &self.k, &self.v, &self.out];
        if let Some(ys) = fused_self_attention(xs, proj, self.heads, self.scale, None)? {
            return Ok(ys);
        }
        let q = split_heads(
            &(self.q.forward(xs)? * self.scale)?,
            self.heads,
            self.head_dim,
        )?;
        let k = split_heads(&self.k.forward(xs)?, self.heads, self.head_dim)?;
        let v = split_heads(&self.v.forward(xs)?, self.heads, self.head_dim)?;
        let ys = attention(&q, &k, &v, None)?;
        self.out.forward(&merge_heads(&ys)?)
    }
}

#[derive(Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    act: Activation,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(cfg: &ClipVisionConfig, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: crate::nn::linear(h, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            act,
            fc2: crate::nn::linear(cfg.intermediate_size, h, vb.pp("mlp").pp("fc2"))?,
        })
    }
}

impl Module for EncoderLayer {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let residual = xs;
        let xs = (residual
            + self
                .self_attn
                .forward(&layer_norm_fwd(&self.layer_norm1, xs)?)?)?;
        let residual = &xs;
        let ys = layer_norm_fwd(&self.layer_norm2, &xs)?
            .apply(&self.fc1)?
            .apply(&self.act)?
            .apply(&self.fc2)?;
        residual + ys
    }
}

/// The CLIP vision tower with its visual projection: pixel values in, image embeddings out.
#[derive(Clone)]
pub struct ClipVision {
    cfg: ClipVisionConfig,
    embeddings: Embeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
}

impl ClipVision {
    /// Builds the model from a `VarBuilder` rooted at the checkpoint's top level (where
    /// `vision_model.*` and `visual_projection.weight` live).
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let act = match Activation::parse(&cfg.hidden_act, Path::new("config.json"), "hidden_act") {
            Ok(a) => a,
            Err(e) => candle_core::bail!("{e}"),
        };
        let vm = vb.pp("vision_model");
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, act, vm.pp("encoder").pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embeddings: Embeddings::new(cfg, vm.pp("embeddings"))?,
            pre_layrnorm: candle_nn::layer_norm(h, cfg.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: candle_nn::layer_norm(h, cfg.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection: crate::nn::linear_no_bias(
                h,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?,
        })
    }

    /// Loads `config.json` and the weights of a Hugging Face CLIP directory. Tensors of the
    /// text tower and known buffers are ignored; any other tensor the model does not use is an
    /// error that lists them.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = ClipVisionConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::from_dir(dir)?;
        Self::from_weights(&cfg, &weights, dtype, device)
    }

    /// Builds the model from opened weights, checking that every vision tensor is used.
    pub fn from_weights(
        cfg: &ClipVisionConfig,
        weights: &Weights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let model =
            Self::new(cfg, weights.var_builder(dtype, device)).map_err(|e| weights.explain(e))?;
        let unexpected: Vec<String> = weights
            .unused()
            .into_iter()
            .filter(|n| !Self::ignorable(n))
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedKeys {
                path: weights.source().to_path_buf(),
                keys: unexpected,
            });
        }
        Ok(model)
    }

    /// Checkpoint tensors that `get_image_features` does not use and that are expected in CLIP
    /// checkpoints: the text tower, the temperature, and registered buffers.
    fn ignorable(name: &str) -> bool {
        name.starts_with("text_model.")
            || name == "text_projection.weight"
            || name == "logit_scale"
            || name.ends_with("position_ids")
    }

    /// Every tensor of the model under its Hugging Face name (`vision_model.*`,
    /// `visual_projection.weight`), as the model holds it: what an exporter writes.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let e = &self.embeddings;
        let p = "vision_model.embeddings";
        out.push((
            format!("{p}.patch_embedding.weight"),
            e.patch.weight().clone(),
        ));
        out.push((format!("{p}.class_embedding"), e.class.clone()));
        out.push((
            format!("{p}.position_embedding.weight"),
            e.positions.clone(),
        ));
        push_layer_norm(&mut out, "vision_model.pre_layrnorm", &self.pre_layrnorm);
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("vision_model.encoder.layers.{i}");
            push_layer_norm(&mut out, &format!("{p}.layer_norm1"), &l.layer_norm1);
            let a = &l.self_attn;
            push_linear(&mut out, &format!("{p}.self_attn.q_proj"), &a.q);
            push_linear(&mut out, &format!("{p}.self_attn.k_proj"), &a.k);
            push_linear(&mut out, &format!("{p}.self_attn.v_proj"), &a.v);
            push_linear(&mut out, &format!("{p}.self_attn.out_proj"), &a.out);
            push_layer_norm(&mut out, &format!("{p}.layer_norm2"), &l.layer_norm2);
            push_linear(&mut out, &format!("{p}.mlp.fc1"), &l.fc1);
            push_linear(&mut out, &format!("{p}.mlp.fc2"), &l.fc2);
        }
        push_layer_norm(
            &mut out,
            "vision_model.post_layernorm",
            &self.post_layernorm,
        );
        push_linear(&mut out, "visual_projection", &self.visual_projection);
        out
    }

    /// The configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// `pixel_values [b, 3, image_size, image_size]` -> image embeddings `[b, projection_dim]`
    /// (not normalised), as `CLIPModel.get_image_features`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixel_values.dims4()?;
        let s = self.cfg.image_size;
        if c != self.cfg.num_channels || h != s || w != s {
            return Err(Error::Input(format!(
                "pixel_values of shape {:?}, the encoder takes [batch, {}, {s}, {s}]",
                pixel_values.dims(),
                self.cfg.num_channels
            )));
        }
        let mut xs = layer_norm_fwd(&self.pre_layrnorm, &self.embeddings.forward(pixel_values)?)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        let pooled = layer_norm_fwd(&self.post_layernorm, &xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }
}

impl std::fmt::Debug for ClipVision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipVision")
            .field("config", &self.cfg)
            .finish()
    }
}
