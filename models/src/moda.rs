//! MODA: the frozen CLIP image encoder, the projector and the OPT decoder, put together the way
//! the original FashionOPT notebook does (see `shared/MISSION.md`).
//!
//! The sequence is `[projected image, BOS, description tokens..., </s>]`. The training loss is
//! next-token cross-entropy as `OPTForCausalLM(labels=..)` computes it: labels are the token ids
//! with `-100` at the image position and at padding, logits at position `i` predict label
//! `i + 1`, averaged over the labelled positions (so the image position predicts the BOS).
//! Generation feeds `[projected image, BOS]` and decodes greedily with the KV cache until `</s>`
//! or a length limit.
//!
//! The original recipe's checkpoint is a PyTorch `state_dict` with `opt.*` (the whole
//! `OPTForCausalLM`), `embed_tokens.weight` (the same tensor as the OPT token embedding) and
//! `projection.{0,2}.*`; [`Moda::from_recipe_checkpoint`] loads it.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};

use crate::clip_vision::{ClipVision, ClipVisionConfig};
use crate::error::{Error, Result};
use crate::nn::argmax_last;
use crate::opt::{Cache, DecoderInput, Opt, OptConfig};
use crate::projector::{Projector, ProjectorConfig};
use crate::weights::Weights;

/// The label value that the loss ignores, as PyTorch's `CrossEntropyLoss(ignore_index=-100)`.
pub const IGNORE_INDEX: i64 = -100;

/// Encoder, projector and decoder. A clone shares the weights (candle tensors are reference
/// counted; gradients of a clone's outputs are the same variables') but has a dropout generator
/// of its own.
#[derive(Clone)]
pub struct Moda {
    encoder: ClipVision,
    projector: Projector,
    decoder: Opt,
}

/// A training or evaluation batch in MODA's layout.
#[derive(Debug, Clone)]
pub struct ModaBatch {
    /// Decoder inputs `[b, 1 + t, embed_dim]`: the projected image, then the token embeddings.
    pub inputs_embeds: Tensor,
    /// `[b, 1 + t]`: 1 for the image and real tokens, 0 for padding (f32).
    pub attention_mask: Tensor,
    /// `[b, 1 + t]` (i64): `-100` at the image position and at padding, else the token id.
    pub labels: Tensor,
}

impl Moda {
    /// Puts the three parts together, checking that their sizes agree.
    pub fn new(encoder: ClipVision, projector: Projector, decoder: Opt) -> Result<Self> {
        let p = *projector.config();
        if p.in_dim != encoder.config().projection_dim || p.out_dim != decoder.config().embed_dim()
        {
            return Err(Error::Input(format!(
                "projector {} -> {} does not join an encoder of projection_dim {} to a decoder \
                 of word_embed_proj_dim {}",
                p.in_dim,
                p.out_dim,
                encoder.config().projection_dim,
                decoder.config().embed_dim()
            )));
        }
        Ok(Self {
            encoder,
            projector,
            decoder,
        })
    }

    /// Loads the original recipe's FashionOPT `state_dict` (`.pth`): the decoder's
    /// `config.json` comes from `decoder_dir`, the frozen encoder from `encoder_dir`.
    /// Tensors the model does not use are an error that lists them.
    pub fn from_recipe_checkpoint(
        checkpoint: &Path,
        encoder_dir: &Path,
        decoder_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let encoder = ClipVision::from_dir(encoder_dir, DType::F32, device)?;
        let dcfg = OptConfig::from_file(&decoder_dir.join("config.json"))?;
        let weights = Weights::from_file(checkpoint)?;
        let vb = weights.var_builder(DType::F32, device);
        let pcfg = ProjectorConfig {
            in_dim: encoder.config().projection_dim,
            hidden_dim: weights
                .shape("projection.0.weight")
                .and_then(|s| s.first().copied())
                .unwrap_or(4 * dcfg.embed_dim()),
            out_dim: dcfg.embed_dim(),
        };
        let decoder = Opt::new(&dcfg, vb.pp("opt")).map_err(|e| weights.explain(e))?;
        let projector = Projector::new(&pcfg, vb.clone()).map_err(|e| weights.explain(e))?;
        let unexpected: Vec<String> = weights
            .unused()
            .into_iter()
            .filter(|n| {
                // `embed_tokens.weight` is the notebook's alias of the OPT token embedding.
                n != "embed_tokens.weight"
                    && !(dcfg.tie_word_embeddings && n == "opt.lm_head.weight")
            })
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedKeys {
                path: checkpoint.to_path_buf(),
                keys: unexpected,
            });
        }
        Self::new(encoder, projector, decoder)
    }

    /// The image encoder.
    pub fn encoder(&self) -> &ClipVision {
        &self.encoder
    }

    /// The projector.
    pub fn projector(&self) -> &Projector {
        &self.projector
    }

    /// The decoder.
    pub fn decoder(&self) -> &Opt {
        &self.decoder
    }

    /// The decoder, to switch it between training and inference mode ([`Opt::train`]).
    pub fn decoder_mut(&mut self) -> &mut Opt {
        &mut self.decoder
    }

    /// The encoder's configuration.
    pub fn encoder_config(&self) -> &ClipVisionConfig {
        self.encoder.config()
    }

    /// `pixel_values [b, 3, H, W]` -> image embeddings `[b, projection_dim]`.
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.encoder.forward(pixel_values)
    }

    /// Image embeddings `[b, projection_dim]` -> prefix embeddings `[b, 1, embed_dim]`.
    pub fn project(&self, image_embeds: &Tensor) -> Result<Tensor> {
        Ok(self.projector.forward(image_embeds)?.unsqueeze(1)?)
    }

    /// Builds `[prefix, tokens]` with its mask and labels. `input_ids [b, t]` start with the BOS
    /// and end with `</s>` where the caption is complete; `text_mask [b, t]` is 1 for real tokens
    /// and 0 for padding.
    pub fn build_batch(
        &self,
        prefix_embeds: &Tensor,
        input_ids: &Tensor,
        text_mask: &Tensor,
    ) -> Result<ModaBatch> {
        let (b, t) = input_ids.dims2()?;
        if prefix_embeds.dims3()?.0 != b || text_mask.dims() != [b, t] {
            return Err(Error::Input(format!(
                "prefix {:?}, input_ids {:?} and text mask {:?} do not agree",
                prefix_embeds.dims(),
                input_ids.dims(),
                text_mask.dims()
            )));
        }
        let device = input_ids.device();
        let tokens = self.decoder.embed_tokens(input_ids)?;
        let inputs_embeds = Tensor::cat(
            &[prefix_embeds, &tokens.to_dtype(prefix_embeds.dtype())?],
            1,
        )?;
        let text_mask = text_mask.to_dtype(DType::F32)?;
        let ones = Tensor::ones((b, 1), DType::F32, device)?;
        let attention_mask = Tensor::cat(&[&ones, &text_mask], 1)?;
        let ignore = Tensor::full(IGNORE_INDEX, (b, t), device)?;
        let ids = input_ids.to_dtype(DType::I64)?;
        let text_labels = text_mask.gt(0.5)?.where_cond(&ids, &ignore)?;
        let labels = Tensor::cat(
            &[&Tensor::full(IGNORE_INDEX, (b, 1), device)?, &text_labels],
            1,
        )?;
        Ok(ModaBatch {
            inputs_embeds,
            attention_mask,
            labels,
        })
    }

    /// Logits `[b, 1 + t, vocab]` of a batch.
    pub fn logits(&self, batch: &ModaBatch) -> Result<Tensor> {
        self.decoder.forward(
            DecoderInput::Embeds(&batch.inputs_embeds),
            Some(&batch.attention_mask),
            None,
        )
    }

    /// The mean next-token cross-entropy of a batch (a scalar f32 tensor).
    pub fn loss(&self, batch: &ModaBatch) -> Result<Tensor> {
        causal_lm_loss(&self.logits(batch)?, &batch.labels)
    }

    /// Greedy decoding with the KV cache from prefix embeddings `[b, 1, embed_dim]`: feeds
    /// `[prefix, BOS]`, then one token at a time. Each row stops at `</s>` (included in its
    /// output) or after `max_new_tokens`. Returns the generated ids per row.
    pub fn generate_greedy(
        &self,
        prefix_embeds: &Tensor,
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let cfg = self.decoder.config();
        let (b, _, _) = prefix_embeds.dims3()?;
        let device = prefix_embeds.device();
        let bos = Tensor::full(cfg.bos_token_id, (b, 1), device)?;
        let bos = self
            .decoder
            .embed_tokens(&bos)?
            .to_dtype(prefix_embeds.dtype())?;
        let mut input = Tensor::cat(&[prefix_embeds, &bos], 1)?;
        let mut cache = Cache::new(cfg);
        let mut out = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for _ in 0..max_new_tokens {
            let total = cache.past_len() + input.dim(1)?;
            let mask = Tensor::ones((b, total), DType::F32, device)?;
            let logits = self.decoder.forward(
                DecoderInput::Embeds(&input),
                Some(&mask),
                Some(&mut cache),
            )?;
            let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?;
            let next = argmax_last(&last)?.to_vec1::<u32>()?;
            for (i, &tok) in next.iter().enumerate() {
                if !done[i] {
                    out[i].push(tok);
                    done[i] = tok == cfg.eos_token_id;
                }
            }
            if done.iter().all(|d| *d) {
                break;
            }
            let ids = Tensor::from_vec(next, (b, 1), device)?;
            input = self
                .decoder
                .embed_tokens(&ids)?
                .to_dtype(prefix_embeds.dtype())?;
        }
        Ok(out)
    }
}

/// `OPTForCausalLM`'s loss: logits at position `i` predict `labels[i + 1]`; positions labelled
/// [`IGNORE_INDEX`] are left out; the mean over the rest.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    if labels.dims() != [b, s] || s < 2 {
        return Err(Error::Input(format!(
            "labels of shape {:?} for logits {:?}",
            labels.dims(),
            logits.dims()
        )));
    }
    let logits = logits
        .narrow(1, 0, s - 1)?
        .to_dtype(DType::F32)?
        .reshape((b * (s - 1), v))?;
    let labels = labels
        .narrow(1, 1, s - 1)?
        .to_dtype(DType::I64)?
        .flatten_all()?;
    let keep = labels.ne(IGNORE_INDEX)?;
    let zeros = labels.zeros_like()?;
    let targets = keep.where_cond(&labels, &zeros)?.to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let keep = keep.to_dtype(DType::F32)?;
    let count = keep.sum_all()?;
    let total = (picked * &keep)?.sum_all()?.neg()?;
    Ok(total.broadcast_div(&count.maximum(1f64)?)?)
}

impl std::fmt::Debug for Moda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moda")
            .field("encoder", &self.encoder)
            .field("projector", self.projector.config())
            .field("decoder", &self.decoder)
            .finish()
    }
}
