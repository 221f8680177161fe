//! MODA's non-linear projector: `Linear(image_dim -> 4 * out) -> GELU (exact, erf) ->
//! Linear(4 * out -> out)`, the original recipe's `nn.Sequential` named `projection`
//! (tensors `projection.0.*` and `projection.2.*`). It turns one image embedding into one
//! prefix embedding in the decoder's input-embedding space.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::nn::Linear;

/// Sizes of the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct ProjectorConfig {
    /// The image embedding size (CLIP's `projection_dim`, 512 for FashionCLIP).
    pub in_dim: usize,
    /// The hidden width (3072 = 4 x 768 in the original recipe).
    pub hidden_dim: usize,
    /// The decoder's input-embedding size (OPT's `word_embed_proj_dim`, 768 for OPT-125m).
    pub out_dim: usize,
}

impl ProjectorConfig {
    /// The original recipe's shape: hidden width four times the output width.
    pub fn new(in_dim: usize, out_dim: usize) -> Self {
        Self {
            in_dim,
            hidden_dim: 4 * out_dim,
            out_dim,
        }
    }
}

/// The projector; its `VarBuilder` is rooted where `projection.0.weight` lives.
#[derive(Debug, Clone)]
pub struct Projector {
    cfg: ProjectorConfig,
    fc1: Linear,
    fc2: Linear,
}

impl Projector {
    /// Builds the projector from tensors `projection.{0,2}.{weight,bias}` under `vb`.
    pub fn new(cfg: &ProjectorConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("projection");
        Ok(Self {
            cfg: *cfg,
            fc1: crate::nn::linear(cfg.in_dim, cfg.hidden_dim, vb.pp("0"))?,
            fc2: crate::nn::linear(cfg.hidden_dim, cfg.out_dim, vb.pp("2"))?,
        })
    }

    /// The tensors under their checkpoint names (`projection.{0,2}.{weight,bias}`).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        crate::nn::push_linear(&mut out, "projection.0", &self.fc1);
        crate::nn::push_linear(&mut out, "projection.2", &self.fc2);
        out
    }

    /// The sizes.
    pub fn config(&self) -> &ProjectorConfig {
        &self.cfg
    }
}

impl Module for Projector {
    /// `[.., in_dim] -> [.., out_dim]`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.apply(&self.fc1)?.gelu_erf()?.apply(&self.fc2)
    }
}
