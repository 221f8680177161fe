//! What training reads: every caption's token ids and the image side (the frozen encoder's
//! cached embeddings, or pixels when the encoder trains) prepared once ([`Prepared`]), a
//! micro-batch's inputs and summed loss, and the validation loss.

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use moda_models::preprocess::ImageProcessor;
use moda_models::tokenizer::ModaTokenizer;
use moda_models::CaptionModel;

use crate::data::Catalog;
use crate::embed_cache::{EmbeddingCache, EncoderFingerprint};
use crate::error::{Error, Result};

use super::config::FitConfig;
use super::shards::{on_pool, SHARD_POOL};
use super::trainee::{embedded_encoder_fingerprint, Trainee};
use super::FitOptions;

/// Token ids of a caption: BOS, the text, `</s>`.
pub(super) fn caption_ids(tok: &ModaTokenizer, caption: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(caption)?;
    ids.push(tok.eos_id());
    Ok(ids)
}

/// A micro-batch's `input_ids` and text mask, right-padded.
pub(super) fn pad_batch(ids: &[&Vec<u32>], pad: u32, device: &Device) -> Result<(Tensor, Tensor)> {
    let t = ids.iter().map(|v| v.len()).max().unwrap_or(1);
    let mut flat = Vec::with_capacity(ids.len() * t);
    let mut mask = Vec::with_capacity(ids.len() * t);
    for v in ids {
        for j in 0..t {
            flat.push(v.get(j).copied().unwrap_or(pad));
            mask.push(if j < v.len() { 1f32 } else { 0f32 });
        }
    }
    Ok((
        Tensor::from_vec(flat, (ids.len(), t), device)?,
        Tensor::from_vec(mask, (ids.len(), t), device)?,
    ))
}

/// The prepared data: token ids per sample and the image side.
pub(crate) struct Prepared {
    pub(crate) ids: Vec<Vec<u32>>,
    /// `[n, projection_dim]` embeddings of every sample (frozen encoder).
    pub(crate) embeds: Option<Tensor>,
    /// `[n, 3, h, w]` pixel values of every sample, when the encoder trains (preprocessed
    /// once, kept in memory).
    pub(crate) pixels: Option<Tensor>,
}

/// The image inputs of samples `idx`, in order: rows of the cached embeddings, or their pixel
/// values for the trained encoder, image `i` transformed by `draws[i]` when given (pixels
/// only: cached embeddings are not augmented).
pub(super) fn select_images(
    data: &Prepared,
    idx: &[usize],
    device: &Device,
    draws: Option<&[crate::augment::Draw]>,
) -> Result<Tensor> {
    let rows: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let rows = Tensor::new(rows.as_slice(), device)?;
    match (&data.embeds, &data.pixels) {
        (Some(e), _) => Ok(e.index_select(&rows, 0)?),
        (None, Some(px)) => {
            let px = px.index_select(&rows, 0)?;
            let Some(draws) = draws else {
                return Ok(px);
            };
            let (n, c, h, w) = px.dims4()?;
            let mut values: Vec<f32> = px.flatten_all()?.to_vec1()?;
            crate::augment::apply(&mut values, c, h, w, draws);
            Ok(Tensor::from_vec(values, (n, c, h, w), device)?)
        }
        (None, None) => Err(Error::InvalidArgument("no image inputs prepared".into())),
    }
}

/// The summed loss of samples `idx` whose image inputs are `images` (see [`select_images`]),
/// and the number of predicted tokens.
pub(super) fn loss_sum(
    model: &CaptionModel,
    data: &Prepared,
    images: &Tensor,
    idx: &[usize],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, usize)> {
    let image_embeds = if data.embeds.is_some() {
        images.clone()
    } else {
        model.encode_images(images)?
    };
    let ids: Vec<&Vec<u32>> = idx.iter().map(|&i| &data.ids[i]).collect();
    let (input_ids, text_mask) = pad_batch(&ids, pad, device)?;
    let prefix = model.project(&image_embeds)?;
    let batch = model.build_batch(&prefix, &input_ids, &text_mask)?;
    crate::loss::causal_lm_loss_sum(&model.logits(&batch)?, &batch.labels)
}

/// The mean loss of one micro-batch of sample indices, image `i` transformed by `draws[i]`
/// when given.
pub(super) fn batch_loss(
    model: &CaptionModel,
    data: &Prepared,
    idx: &[usize],
    pad: u32,
    device: &Device,
    draws: Option<&[crate::augment::Draw]>,
) -> Result<Tensor> {
    let images = select_images(data, idx, device, draws)?;
    let (sum, count) = loss_sum(model, data, &images, idx, pad, device)?;
    Ok((sum / count.max(1) as f64)?)
}

/// Mean loss over `idx` in eval mode (no dropout), in batches of `bs`.
pub(super) fn evaluate_loss(
    model: &mut CaptionModel,
    data: &Prepared,
    idx: &[usize],
    bs: usize,
    pad: u32,
    device: &Device,
) -> Result<f64> {
    let was = model.decoder().dropout_state();
    model.decoder_mut().eval();
    let mut sum = 0f64;
    let mut n = 0usize;
    let chunks: Vec<&[usize]> = idx.chunks(bs.max(1)).collect();
    let one = |model: &CaptionModel, chunk: &[usize]| -> Result<f64> {
        Ok(batch_loss(model, data, chunk, pad, device, None)?
            .detach()
            .to_scalar::<f32>()? as f64)
    };
    // With sharded training the batches go to the shards' pool, as many at once as it has
    // threads; the losses are added in batch order all the same.
    let losses: Vec<Result<f64>> = match SHARD_POOL.get() {
        Some(pool) => {
            let tasks: Vec<_> = chunks
                .iter()
                .map(|chunk| {
                    let fork = model.clone();
                    move || one(&fork, chunk)
                })
                .collect();
            on_pool(pool, tasks, "a validation batch")
        }
        None => chunks.iter().map(|chunk| one(model, chunk)).collect(),
    };
    let result = (|| -> Result<()> {
        for (chunk, l) in chunks.iter().zip(losses) {
            sum += l? * chunk.len() as f64;
            n += chunk.len();
        }
        Ok(())
    })();
    if let Some(s) = was {
        model.decoder_mut().train(s);
    }
    result?;
    Ok(sum / n.max(1) as f64)
}

/// What training needs of the catalog: every caption's token ids, and either the cached
/// embeddings of the frozen encoder or, when the encoder trains, the pixel values.
pub(super) fn prepare_data(
    catalog: &Catalog,
    t: &Trainee,
    cfg: &FitConfig,
    opts: &FitOptions,
) -> Result<Prepared> {
    let ids = catalog
        .samples
        .iter()
        .map(|s| caption_ids(&t.tokenizer, &s.caption))
        .collect::<Result<Vec<_>>>()?;
    let max_len = ids.iter().map(Vec::len).max().unwrap_or(0) + 1;
    if max_len > t.ckpt.decoder.max_position_embeddings {
        return Err(Error::InvalidArgument(format!(
            "the longest caption takes {max_len} positions, the decoder has {}",
            t.ckpt.decoder.max_position_embeddings
        )));
    }
    let processor = ImageProcessor::new(t.ckpt.preprocessor.clone())?;
    if cfg.train_encoder {
        // The encoder changes every step: no embedding cache, but the pixels are computed
        // once, not every epoch.
        let pixels = preprocess_all(catalog, &processor, &opts.device)?;
        return Ok(Prepared {
            ids,
            embeds: None,
            pixels: Some(pixels),
        });
    }
    let embeds = cached_embeddings(catalog, t, &processor, opts)?;
    Ok(Prepared {
        ids,
        embeds: Some(embeds),
        pixels: None,
    })
}

/// The `[n, 3, h, w]` pixel values of every sample, preprocessed on one thread per core.
pub(super) fn preprocess_all(
    catalog: &Catalog,
    processor: &ImageProcessor,
    device: &Device,
) -> Result<Tensor> {
    let limits = moda_models::preprocess::ImageLimits::default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = catalog.samples.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<Result<Vec<f32>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = catalog
            .samples
            .chunks(chunk)
            .map(|c| {
                let limits = &limits;
                sc.spawn(move || -> Result<Vec<f32>> {
                    let mut out = Vec::new();
                    for s in c {
                        out.extend(processor.preprocess_path(&s.image, limits)?);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::InvalidArgument(
                        "image preprocessing panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let mut px = Vec::new();
    for p in parts {
        px.extend(p?);
    }
    let (h, w) = processor.config().output_size();
    Ok(Tensor::from_vec(px, (catalog.len(), 3, h, w), device)?)
}

/// The frozen encoder's `[n, projection_dim]` embeddings of every sample, read from the
/// embedding cache or computed into it. The cache is keyed by the encoder: the fingerprint of
/// an external model's directory, or of an embedded encoder's configuration and weights.
pub(super) fn cached_embeddings(
    catalog: &Catalog,
    t: &Trainee,
    processor: &ImageProcessor,
    opts: &FitOptions,
) -> Result<Tensor> {
    let fingerprint = match &t.encoder_dir {
        Some(dir) => EncoderFingerprint::from_dir(dir)?,
        None => embedded_encoder_fingerprint(t)?,
    };
    let cache = EmbeddingCache::open(opts.cache_dir.clone(), fingerprint)?;
    let pb = if opts.progress {
        let pb = ProgressBar::new(catalog.len() as u64);
        pb.set_style(
            ProgressStyle::with_template("embedding images {bar:30} {pos}/{len} {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let embeds = cache.get_or_compute(
        &catalog.samples,
        t.model.encoder(),
        processor,
        &opts.device,
        64,
        &pb,
    )?;
    pb.finish_and_clear();
    Ok(embeds.to_dtype(DType::F32)?)
}
