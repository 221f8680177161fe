//! `--preset tiny`: small random backbones of MODA's architecture and a byte-level BPE
//! tokenizer trained on the catalog's captions, so that the whole loop runs on a laptop CPU in
//! minutes. The settings were measured on synthetic catalogs (see the crate README / report).

use std::path::Path;

use moda_models::preprocess::ImageProcessorConfig;
use moda_models::tokenizer::ModaTokenizer;
use moda_models::{ClipVisionConfig, OptConfig};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// Image side of the tiny encoder (the synthetic photos are 240-400 px squares).
pub const TINY_IMAGE: usize = 64;

/// The tiny CLIP vision tower: ViT with 8 px patches on 64 px images.
pub fn tiny_encoder_config() -> ClipVisionConfig {
    ClipVisionConfig {
        hidden_size: 96,
        intermediate_size: 192,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_channels: 3,
        image_size: TINY_IMAGE,
        patch_size: 8,
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
        projection_dim: 96,
    }
}

/// The tiny encoder's preprocessing: CLIP's, at 64 px.
pub fn tiny_preprocessor_config() -> ImageProcessorConfig {
    ImageProcessorConfig {
        size: moda_models::preprocess::Size::ShortestEdge {
            shortest_edge: TINY_IMAGE as u32,
        },
        crop_size: moda_models::preprocess::CropSize::HeightWidth {
            height: TINY_IMAGE as u32,
            width: TINY_IMAGE as u32,
        },
        ..ImageProcessorConfig::default()
    }
}

/// The tiny OPT decoder for a vocabulary of `vocab_size` tokens.
pub fn tiny_decoder_config(vocab_size: usize) -> OptConfig {
    OptConfig {
        vocab_size,
        hidden_size: 128,
        num_hidden_layers: 2,
        ffn_dim: 512,
        num_attention_heads: 4,
        max_position_embeddings: 64,
        dropout: 0.0,
        ..OptConfig::default()
    }
}

/// The standard deviation of the tiny backbones' normal initialisation (transformers'
/// `init_std` / `initializer_range`).
pub const TINY_INIT_STD: f64 = 0.02;

/// Trains a byte-level BPE on `captions` (GPT-2's pre-tokenizer and decoder, OPT's special
/// tokens `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3) with at most `vocab_size` tokens, and
/// returns it as OPT's tokenizer (BOS `</s>` added in front). `scratch` is a directory where
/// the `tokenizer.json` is written to be loaded back.
pub fn train_tokenizer(
    captions: &[String],
    vocab_size: usize,
    scratch: &Path,
) -> Result<ModaTokenizer> {
    let specials: Vec<AddedToken> = ["<s>", "<pad>", "</s>", "<unk>"]
        .into_iter()
        .map(|t| AddedToken::from(t, true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    tok.train(&mut trainer, captions.iter())
        .map_err(|e| Error::InvalidArgument(format!("cannot train the BPE tokenizer: {e}")))?;
    std::fs::create_dir_all(scratch).map_err(|e| Error::io(scratch, e))?;
    let path = scratch.join(format!(".tiny-tokenizer-{}.json", std::process::id()));
    let text = tok
        .to_string(false)
        .map_err(|e| Error::InvalidArgument(format!("cannot serialize the tokenizer: {e}")))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    let loaded = ModaTokenizer::from_tokenizer_json(&path);
    let _ = std::fs::remove_file(&path);
    Ok(loaded?)
}
