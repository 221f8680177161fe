//! MODA's caption model ([`CaptionModel`]): the frozen CLIP image encoder, the projector and
//! the OPT decoder, put together the way the original FashionOPT notebook does.
//!
//! The sequence is `[projected image, BOS, description tokens..., </s>]`. The training loss is
//! next-token cross-entropy as `OPTForCausalLM(labels=..)` computes it: labels are the token ids
//! with `-100` at the image position and at padding, logits at position `i` predict label
//! `i + 1`, averaged over the labelled positions (so the image position predicts the BOS).
//! Generation feeds `[projected image, BOS]` with the KV cache, then one token per row as the
//! workspace's one search ([`crate::generate`], shared with the SDK) chooses them: greedy by
//! default, sampling or beam search ([`CaptionDecoder`] is the decoding state it drives).
//!
//! The original recipe's checkpoint is a PyTorch `state_dict` with `opt.*` (the whole
//! `OPTForCausalLM`), `embed_tokens.weight` (the same tensor as the OPT token embedding) and
//! `projection.{0,2}.*`; [`CaptionModel::from_recipe_checkpoint`] loads it.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};

use crate::clip_vision::{ClipVision, ClipVisionConfig};
use crate::constrain::Constraint;
use crate::error::{Error, Result};
use crate::generate::{
    self, Detokenize, Generated, GenerationOptions, Search, StepModel, TokenSink,
};
use crate::opt::{Cache, DecoderInput, Opt, OptConfig};
use crate::projector::{Projector, ProjectorConfig};
use crate::weights::Weights;

/// The label value that the loss ignores, as PyTorch's `CrossEntropyLoss(ignore_index=-100)`.
pub const IGNORE_INDEX: i64 = -100;

/// Encoder, projector and decoder. A clone shares the weights (candle tensors are reference
/// counted; gradients of a clone's outputs are the same variables') but has a dropout generator
/// of its own.
#[derive(Clone)]
pub struct CaptionModel {
    encoder: ClipVision,
    projector: Projector,
    decoder: Opt,
}

/// A training or evaluation batch in MODA's layout.
#[derive(Debug, Clone)]
pub struct CaptionBatch {
    /// Decoder inputs `[b, 1 + t, embed_dim]`: the projected image, then the token embeddings.
    pub inputs_embeds: Tensor,
    /// `[b, 1 + t]`: 1 for the image and real tokens, 0 for padding (f32).
    pub attention_mask: Tensor,
    /// `[b, 1 + t]` (i64): `-100` at the image position and at padding, else the token id.
    pub labels: Tensor,
}

impl CaptionModel {
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
    ) -> Result<CaptionBatch> {
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
        Ok(CaptionBatch {
            inputs_embeds,
            attention_mask,
            labels,
        })
    }

    /// Logits `[b, 1 + t, vocab]` of a batch.
    pub fn logits(&self, batch: &CaptionBatch) -> Result<Tensor> {
        self.decoder.forward(
            DecoderInput::Embeds(&batch.inputs_embeds),
            Some(&batch.attention_mask),
            None,
        )
    }

    /// The mean next-token cross-entropy of a batch (a scalar f32 tensor).
    pub fn loss(&self, batch: &CaptionBatch) -> Result<Tensor> {
        causal_lm_loss(&self.logits(batch)?, &batch.labels)
    }

    /// The most tokens [`CaptionModel::generate`] can generate after a one-position prefix
    /// (what [`CaptionModel::project`] gives): the prefix and the BOS take a position each, and
    /// the last token generated is never fed back.
    pub fn max_new_tokens_limit(&self) -> usize {
        self.decoder
            .config()
            .max_position_embeddings
            .saturating_sub(1)
    }

    /// Starts decoding prefix embeddings `[n, prefix_len, embed_dim]`: feeds `[prefix, BOS]`
    /// with the KV cache for `n * beams` rows (each image's prefix repeated `beams` times, next
    /// to each other, as beam search lays out its beams) and returns the decoding state and
    /// the logits after the BOS, `[n * beams * vocab]`, which is where
    /// [`generate::generate`] starts.
    pub fn prefill(
        &self,
        prefix_embeds: &Tensor,
        beams: usize,
    ) -> Result<(CaptionDecoder<'_>, Vec<f32>)> {
        let (n, _, _) = prefix_embeds.dims3()?;
        if n == 0 || beams == 0 {
            return Err(Error::Input(format!(
                "cannot decode {n} images with {beams} beams"
            )));
        }
        let device = prefix_embeds.device().clone();
        let dtype = prefix_embeds.dtype();
        let rows = n * beams;
        let prefix = if beams == 1 {
            prefix_embeds.clone()
        } else {
            let idx: Vec<u32> = (0..rows).map(|r| (r / beams) as u32).collect();
            prefix_embeds.index_select(&Tensor::from_vec(idx, rows, &device)?, 0)?
        };
        let bos = Tensor::full(self.decoder.config().bos_token_id, (rows, 1), &device)?;
        let bos = self.decoder.embed_tokens(&bos)?.to_dtype(dtype)?;
        let input = Tensor::cat(&[&prefix, &bos], 1)?;
        let mut state = CaptionDecoder {
            model: self,
            cache: Cache::new(self.decoder.config()),
            rows,
            dtype,
            device,
        };
        let logits = state.run(&input, false)?;
        Ok((state, logits))
    }

    /// Descriptions of prefix embeddings `[n, prefix_len, embed_dim]` with the workspace's one
    /// search ([`generate::generate`], the same as the SDK's over ONNX Runtime): greedy by
    /// default, sampling or beam search as `options` say. `options.max_new_tokens` of `None`
    /// generates until `</s>` or until the decoder's positions run out. One result per image,
    /// the final `</s>` included when one was generated. Stop strings need the tokenizer: see
    /// [`CaptionModel::generate_with`].
    pub fn generate(
        &self,
        prefix_embeds: &Tensor,
        options: &GenerationOptions,
    ) -> Result<Vec<Generated>> {
        self.generate_with(prefix_embeds, options, None, None, None)
    }

    /// [`CaptionModel::generate`] with the text of tokens for `options.stop_strings` (the
    /// tokenizer's decode, special tokens skipped) and a callback that sees each token as it
    /// is chosen (image, token, log-probability) and stops that image by returning `false`,
    /// and the caption schema's constraint (resolved from `options.constrain` with
    /// [`crate::constrain::resolve`]).
    pub fn generate_with<'a>(
        &self,
        prefix_embeds: &Tensor,
        options: &GenerationOptions,
        text: Option<Detokenize<'a>>,
        sink: Option<TokenSink<'a>>,
        constraint: Option<&'a Constraint>,
    ) -> Result<Vec<Generated>> {
        let (n, prefix_len, _) = prefix_embeds.dims3()?;
        let cfg = self.decoder.config();
        let room = cfg.max_position_embeddings.saturating_sub(prefix_len);
        let max_new = options.max_new_tokens.unwrap_or(room);
        options.validate(max_new)?;
        if max_new > room {
            return Err(Error::Input(format!(
                "max_new_tokens {max_new} is more than this model's {} positions allow after a \
                 prefix of {prefix_len} (at most {room})",
                cfg.max_position_embeddings
            )));
        }
        let (mut state, first) = self.prefill(prefix_embeds, options.num_beams)?;
        let mut search =
            Search::new(cfg.vocab_size, cfg.eos_token_id, max_new).with_constraint(constraint);
        search.text = text;
        search.sink = sink;
        generate::generate(&mut state, first, n, options, search)
    }
}

/// The candle model's decoding state for one batch, as the shared search drives it: the KV
/// cache of every row (one per image, or per beam under beam search), fed one token per row.
/// [`CaptionModel::prefill`] makes one.
pub struct CaptionDecoder<'a> {
    model: &'a CaptionModel,
    cache: Cache,
    rows: usize,
    dtype: DType,
    device: Device,
}

impl CaptionDecoder<'_> {
    /// Rows (images times beams).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Positions in the cache (prefix, BOS and the tokens fed since).
    pub fn past_len(&self) -> usize {
        self.cache.past_len()
    }

    /// Runs the decoder on `input [rows, seq, embed_dim]` with the cache and returns the last
    /// position's logits, `[rows * vocab]` (f32), or every position's, `[rows * seq * vocab]`.
    fn run(&mut self, input: &Tensor, every_position: bool) -> Result<Vec<f32>> {
        // No attention mask: every row is as long as the others (no padding).
        let logits =
            self.model
                .decoder
                .forward(DecoderInput::Embeds(input), None, Some(&mut self.cache))?;
        let logits = if every_position {
            logits
        } else {
            logits.narrow(1, logits.dim(1)? - 1, 1)?
        };
        Ok(logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// The token embeddings of `tokens` (`[rows * seq]`, row by row) as `[rows, seq, embed]`.
    fn embed(&self, tokens: &[u32], seq: usize) -> Result<Tensor> {
        if seq == 0 || tokens.len() != self.rows * seq {
            return Err(Error::Input(format!(
                "{} tokens for {} decoder rows of {seq}",
                tokens.len(),
                self.rows
            )));
        }
        let ids = Tensor::from_vec(tokens.to_vec(), (self.rows, seq), &self.device)?;
        Ok(self
            .model
            .decoder
            .embed_tokens(&ids)?
            .to_dtype(self.dtype)?)
    }
}

impl StepModel for CaptionDecoder<'_> {
    type Error = Error;

    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let input = self.embed(tokens, 1)?;
        self.run(&input, false)
    }

    fn step_many(&mut self, tokens: &[u32], n: usize) -> Result<Vec<f32>> {
        let input = self.embed(tokens, n)?;
        self.run(&input, true)
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if rows.len() != self.rows || rows.iter().any(|&r| r >= self.rows) {
            return Err(Error::Input(format!(
                "cannot reorder {} decoder rows as {rows:?}",
                self.rows
            )));
        }
        if rows.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(());
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), &self.device)?;
        self.cache.select_rows(&idx)
    }
}

impl std::fmt::Debug for CaptionDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptionDecoder")
            .field("rows", &self.rows)
            .field("past_len", &self.cache.past_len())
            .finish()
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

impl std::fmt::Debug for CaptionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptionModel")
            .field("encoder", &self.encoder)
            .field("projector", self.projector.config())
            .field("decoder", &self.decoder)
            .finish()
    }
}
