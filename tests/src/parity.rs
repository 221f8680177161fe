//! Parity checks against the `transformers` fixtures, written once for any candle device: the
//! CPU tests (`tests/tests/models/moda.rs`, `tests/tests/trainer/fit.rs`) and the CUDA ones
//! (`tests/tests/cuda.rs`, built with the `cuda` feature) call the same functions. Inputs come
//! from the fixture files on the CPU and are moved to the device; results are compared on the
//! host.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use moda_models::generate::GenerationOptions;
use moda_models::{CaptionModel, ClipVision, Opt, OptConfig, Projector, ProjectorConfig, Weights};
use trainer::optim::{AdamW, AdamWParams};
use trainer::params::ParamStore;

use crate::{fixture, get, load_refs, max_abs_diff};

/// The f32 parity bound: max |ours - transformers| on embeddings, logits
/// and losses of order 1-10. f32 arithmetic in another summation order (another BLAS, another
/// device) differs by about 1e-6 relative; 1e-4 absolute leaves room for that and still fails
/// on any real difference (a wrong scale, a missing bias, a mask off by one).
pub const F32_TOL: f32 = 1e-4;

/// max |a - b| / max |b|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max");
    max_abs_diff(a, b) / scale.max(1e-12)
}

/// A fixture tensor on `dev`.
fn on(refs: &std::collections::HashMap<String, Tensor>, name: &str, dev: &Device) -> Tensor {
    get(refs, name).to_device(dev).expect("to device")
}

/// The original recipe's `.pth` with the clip_gelu encoder and opt_preln's config, on `dev`.
pub fn load_recipe(dev: &Device) -> CaptionModel {
    CaptionModel::from_recipe_checkpoint(
        &fixture("moda/fashion_opt.pth"),
        &fixture("clip_gelu"),
        &fixture("opt_preln"),
        dev,
    )
    .expect("load the recipe checkpoint")
}

/// Image embeddings of two real photos, and the projector's output, against PyTorch.
pub fn image_embeddings_and_projector(dev: &Device) {
    let model = load_recipe(dev);
    let refs = load_refs("moda/reference.safetensors");
    let clip = load_refs("clip_gelu/reference.safetensors");
    let pixels = Tensor::cat(
        &[
            on(&clip, "pixel_values.photo.jpg", dev),
            on(&clip, "pixel_values.wide.png", dev),
        ],
        0,
    )
    .expect("cat");
    let embeds = model.encode_images(&pixels).expect("encode");
    let d = max_abs_diff(&embeds, get(&refs, "image_embeds"));
    assert!(d <= F32_TOL, "image embeds on {dev:?}: max abs diff {d}");
    let prefix = model
        .project(&on(&refs, "image_embeds", dev))
        .expect("project");
    let d = max_abs_diff(&prefix, get(&refs, "prefix_embeds"));
    assert!(d <= F32_TOL, "projector on {dev:?}: max abs diff {d}");
}

/// The training batch's labels, the logits and the masked loss, against PyTorch.
pub fn loss_labels_and_logits(dev: &Device) {
    let model = load_recipe(dev);
    let refs = load_refs("moda/reference.safetensors");
    let ids = on(&refs, "input_ids", dev);
    let t = ids.dim(1).expect("t");
    let text_mask = on(&refs, "attention_mask", dev)
        .narrow(1, 1, t)
        .expect("text mask");
    let batch = model
        .build_batch(&on(&refs, "prefix_embeds", dev), &ids, &text_mask)
        .expect("batch");
    let want_labels: Vec<Vec<i64>> = get(&refs, "labels").to_vec2().expect("labels");
    let got_labels: Vec<Vec<i64>> = batch.labels.to_vec2().expect("labels");
    assert_eq!(got_labels, want_labels);
    let logits = model.logits(&batch).expect("logits");
    let d = max_abs_diff(&logits, get(&refs, "logits"));
    assert!(d <= F32_TOL, "logits on {dev:?}: max abs diff {d}");
    let loss = model.loss(&batch).expect("loss");
    let d = max_abs_diff(&loss, get(&refs, "loss"));
    assert!(
        d <= F32_TOL,
        "loss on {dev:?}: {loss} vs {}",
        get(&refs, "loss")
    );
}

/// Greedy decoding with the KV cache, through the shared search, gives PyTorch's tokens.
pub fn greedy_decoding(dev: &Device) {
    let model = load_recipe(dev);
    let refs = load_refs("moda/reference.safetensors");
    let want: Vec<Vec<i64>> = get(&refs, "greedy.tokens").to_vec2().expect("tokens");
    let steps = want[0].len();
    let opts = GenerationOptions::default().with_max_new_tokens(Some(steps));
    let got: Vec<Vec<u32>> = model
        .generate(&on(&refs, "prefix_embeds", dev), &opts)
        .expect("generate")
        .into_iter()
        .map(|g| g.token_ids)
        .collect();
    let eos = model.decoder().config().eos_token_id as i64;
    for (r, w) in want.iter().enumerate() {
        // The reference loop runs a fixed number of steps; ours stops at `</s>`.
        let n = w.iter().position(|t| *t == eos).map_or(w.len(), |p| p + 1);
        let w: Vec<u32> = w[..n].iter().map(|t| *t as u32).collect();
        assert_eq!(got[r], w, "row {r} on {dev:?}");
    }
}

/// Beam search through the shared search on the candle model: each beam's KV cache follows
/// its beam through the reorderings. Checked without the cache: the log-probabilities it
/// reports for its tokens are the full (uncached) decoder's log-softmax over the same
/// sequence. A batch gives each image what it gets alone, and one beam is greedy search.
pub fn beam_search(dev: &Device) {
    let model = load_recipe(dev);
    let refs = load_refs("moda/reference.safetensors");
    let prefix = on(&refs, "prefix_embeds", dev);
    let n = prefix.dim(0).expect("rows");
    let max_new = 12;
    let beams = GenerationOptions::default()
        .with_max_new_tokens(Some(max_new))
        .with_num_beams(4);
    let got = model.generate(&prefix, &beams).expect("beam search");
    assert_eq!(got.len(), n);
    let cfg = model.decoder().config();
    for (i, g) in got.iter().enumerate() {
        let len = g.token_ids.len();
        assert!(len >= 1 && len <= max_new, "row {i}: {len} tokens");
        assert!(
            len == max_new || g.token_ids.last() == Some(&cfg.eos_token_id),
            "row {i}: {:?} neither ends at </s> nor reaches the limit",
            g.token_ids
        );
        assert_eq!(g.logprobs.len(), len);
        // [prefix, BOS, tokens but the last] in one uncached pass: position 1 + j predicts
        // token j.
        let mut ids = vec![cfg.bos_token_id];
        ids.extend(&g.token_ids[..len - 1]);
        let ids = Tensor::from_vec(ids, (1, len), dev).expect("ids");
        let tokens = model.decoder().embed_tokens(&ids).expect("embed");
        let row = prefix.narrow(0, i, 1).expect("prefix row");
        let input = Tensor::cat(&[&row, &tokens], 1).expect("cat");
        let logits = model
            .decoder()
            .forward(moda_models::DecoderInput::Embeds(&input), None, None)
            .expect("forward");
        let lsm = candle_nn::ops::log_softmax(&logits.squeeze(0).expect("row"), 1)
            .expect("log_softmax")
            .to_device(&Device::Cpu)
            .expect("to cpu")
            .to_vec2::<f32>()
            .expect("values");
        for (j, (&t, &lp)) in g.token_ids.iter().zip(&g.logprobs).enumerate() {
            let want = lsm[1 + j][t as usize];
            assert!(
                (lp - want).abs() < 1e-4,
                "row {i} token {j}: beam search says {lp}, the uncached decoder {want}"
            );
        }
        // Alone, the image gets the same.
        let alone = model
            .generate(&prefix.narrow(0, i, 1).expect("row"), &beams)
            .expect("beam search alone");
        assert_eq!(alone[0].token_ids, g.token_ids, "row {i}: batch vs alone");
    }
    // One beam is greedy search (timings aside).
    let one = beams.clone().with_num_beams(1);
    let greedy = GenerationOptions::default().with_max_new_tokens(Some(max_new));
    let tokens = |o: &GenerationOptions| -> Vec<(Vec<u32>, Vec<f32>)> {
        model
            .generate(&prefix, o)
            .expect("generate")
            .into_iter()
            .map(|g| (g.token_ids, g.logprobs))
            .collect()
    };
    assert_eq!(tokens(&one), tokens(&greedy));
}

/// The tensors `train_step/reference.safetensors` holds before and after each step.
const TRAIN_STEP_TENSORS: [&str; 6] = [
    "projection.0.weight",
    "projection.0.bias",
    "projection.2.weight",
    "projection.2.bias",
    "opt.model.decoder.layers.0.self_attn.q_proj.weight",
    "opt.model.decoder.embed_tokens.weight",
];

/// Two AdamW steps of two micro-batches each, with gradient clipping, from the recipe's
/// `.pth`: the losses, the gradient norms and the updated parameters against PyTorch
/// (relative 1e-4, the size of [`F32_TOL`]; the updates themselves 1e-2, see below).
pub fn two_adamw_steps(dev: &Device) {
    let refs = load_refs("train_step/reference.safetensors");
    let weights = Weights::from_file(&fixture("moda/fashion_opt.pth")).expect("pth");
    let store = ParamStore::new(Some(weights), vec![], 0);
    let dcfg = OptConfig::from_file(&fixture("opt_preln/config.json")).expect("config");
    let vb = store.var_builder(dev);
    let decoder = Opt::new(&dcfg, vb.pp("opt")).expect("opt");
    let projector = Projector::new(&ProjectorConfig::new(24, dcfg.embed_dim()), vb).expect("proj");
    let encoder = ClipVision::from_dir(&fixture("clip_gelu"), DType::F32, dev).expect("clip");
    let model = CaptionModel::new(encoder, projector, decoder).expect("moda");
    // The tied lm_head is the embedding: one variable, as PyTorch's named_parameters().
    assert!(!store.names().iter().any(|n| n.contains("lm_head")));
    let mut adam = AdamW::new(store.vars(), AdamWParams::default()).expect("adamw");
    for name in TRAIN_STEP_TENSORS {
        let d = max_abs_diff(
            &store.tensors()[name],
            get(&refs, &format!("before.{name}")),
        );
        assert_eq!(d, 0.0, "{name} before the step");
    }
    let embeds = on(&refs, "image_embeds", dev);
    let ids = on(&refs, "input_ids", dev);
    let mask = on(&refs, "text_mask", dev);
    let mut prev: BTreeMap<String, Tensor> = store.snapshot().expect("snapshot");
    for step in 1..=2 {
        for mb in 0..2 {
            let prefix = model
                .project(&embeds.narrow(0, 2 * mb, 2).expect("n"))
                .expect("p");
            let batch = model
                .build_batch(
                    &prefix,
                    &ids.narrow(0, 2 * mb, 2).expect("n"),
                    &mask.narrow(0, 2 * mb, 2).expect("n"),
                )
                .expect("batch");
            // The trainer's loss (fused on the CPU), checked against the model core's
            // composed one.
            let logits = model.logits(&batch).expect("logits");
            let loss = trainer::loss::causal_lm_loss(&logits, &batch.labels).expect("loss");
            let composed = model.loss(&batch).expect("loss");
            assert!(rel_diff(&loss, &composed) <= 1e-5);
            let want = get(&refs, &format!("step{step}.loss{mb}"));
            let d = rel_diff(&loss, want);
            assert!(d <= 1e-4, "step {step} loss {mb}: {loss} vs {want} ({d})");
            let grads = (loss / 2.0).expect("div").backward().expect("backward");
            adam.accumulate(&grads).expect("accumulate");
        }
        let norm = adam.clip_grad_norm(1.0).expect("clip");
        let want: f32 = get(&refs, &format!("step{step}.grad_norm"))
            .to_scalar()
            .expect("norm");
        assert!(
            ((norm as f32 - want) / want).abs() <= 1e-4,
            "step {step} grad norm {norm} vs {want}"
        );
        adam.step().expect("step");
        let now = store.snapshot().expect("snapshot");
        for name in TRAIN_STEP_TENSORS {
            let want = get(&refs, &format!("step{step}.{name}"));
            let d = rel_diff(&now[name], want);
            assert!(d <= 1e-4, "step {step} {name}: relative diff {d}");
            // The update itself (after - before) agrees too, not only the parameter. Looser:
            // on the first steps Adam's update is about lr * sign(grad), so elements whose
            // gradient is near zero (comparable to float noise) may move differently.
            let ours = (&now[name] - &prev[name]).expect("delta");
            let before = if step == 1 {
                get(&refs, &format!("before.{name}")).clone()
            } else {
                get(&refs, &format!("step1.{name}")).clone()
            };
            let theirs = (want - &before).expect("delta");
            let d = rel_diff(&ours, &theirs);
            assert!(d <= 1e-2, "step {step} {name}: update relative diff {d}");
        }
        prev = now;
    }
}

/// One training step of a tiny-preset model (its encoder trained, dropout off) on `dev`: the
/// loss and every parameter's gradient, on the host, by name (`encoder.` and `decoder.`
/// prefixes). The weights are drawn on the host from fixed seeds, so every device starts from
/// the same ones; `pixels [b, 3, 64, 64]`, `ids [b, t]` (u32) and `mask [b, t]` are host
/// tensors, moved to `dev`. This is the path `trainer fit --preset tiny` takes: the patch
/// embedding, the ViT, the projector and OPT, the trainer's loss, candle's backward; except
/// that the decoder's activation is GELU, not ReLU. At ReLU's kink a pre-activation within
/// rounding of 0 takes the other branch on another device, and that unit's gradient changes
/// by its own size: seen on the CPU against itself with the weights moved by 1e-7 relative,
/// for 1 in 60 random inputs. (ReLU's backward on each device is checked against PyTorch by
/// [`two_adamw_steps`].)
pub fn tiny_step(
    dev: &Device,
    pixels: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
) -> (f32, BTreeMap<String, Tensor>) {
    use trainer::params::NewInit;
    use trainer::preset;
    let ecfg = preset::tiny_encoder_config();
    let mut dcfg = preset::tiny_decoder_config(64);
    dcfg.dropout = 0.0;
    dcfg.activation_function = "gelu".into();
    let enc_store = ParamStore::new(None, preset::tiny_encoder_init(&ecfg), 1);
    let encoder = ClipVision::new(&ecfg, enc_store.var_builder(dev)).expect("encoder");
    let dec_store = ParamStore::new(
        None,
        vec![
            ("projection.".into(), NewInit::TorchLinear),
            ("opt.".into(), NewInit::Normal(preset::TINY_INIT_STD)),
        ],
        2,
    );
    let vb = dec_store.var_builder(dev);
    let decoder = Opt::new(&dcfg, vb.pp("opt")).expect("decoder");
    let pcfg = ProjectorConfig::new(ecfg.projection_dim, dcfg.embed_dim());
    let projector = Projector::new(&pcfg, vb).expect("projector");
    let model = CaptionModel::new(encoder, projector, decoder).expect("model");
    let to = |t: &Tensor| t.to_device(dev).expect("to device");
    let embeds = model.encode_images(&to(pixels)).expect("encode");
    let prefix = model.project(&embeds).expect("project");
    let batch = model
        .build_batch(&prefix, &to(ids), &to(mask))
        .expect("batch");
    let logits = model.logits(&batch).expect("logits");
    let loss = trainer::loss::causal_lm_loss(&logits, &batch.labels).expect("loss");
    let grads = loss.backward().expect("backward");
    let mut out = BTreeMap::new();
    for (prefix, store) in [("encoder.", &enc_store), ("decoder.", &dec_store)] {
        for (name, var) in store.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {prefix}{name}"));
            out.insert(
                format!("{prefix}{name}"),
                g.to_device(&Device::Cpu).expect("to host"),
            );
        }
    }
    let loss = loss
        .to_device(&Device::Cpu)
        .and_then(|l| l.to_scalar::<f32>())
        .expect("loss");
    (loss, out)
}

/// [`tiny_step`] on `dev` against the CPU, on fresh random inputs (4 images, 9 tokens, two
/// rows padded): the losses within 1e-5 relative, and every parameter's gradient within
/// `1e-4 * max |cpu gradient|`. The CPU against itself with its weights moved by 1e-7
/// relative (rounding-level, as another device's arithmetic) differs by at most 3.2e-6 of
/// that over 100 random inputs; a wrong backward kernel differs by its own size. The keys'
/// biases are left out: their exact gradient is 0 (a bias added to every key shifts each row
/// of attention scores by one constant, which the softmax removes), so what either device
/// computes there is rounding noise. Prints the ten largest differences.
pub fn tiny_step_gradients_match_the_cpu(dev: &Device) {
    let (b, t) = (4, 9);
    let pixels = Tensor::randn(0f32, 1.0, (b, 3, 64, 64), &Device::Cpu).expect("pixels");
    let ids = Tensor::rand(4f32, 63.0, (b, t), &Device::Cpu)
        .and_then(|x| x.to_dtype(DType::U32))
        .expect("ids");
    let mut m = vec![1u32; b * t];
    for r in [1, 3] {
        for c in t - 2..t {
            m[r * t + c] = 0;
        }
    }
    let mask = Tensor::from_vec(m, (b, t), &Device::Cpu).expect("mask");
    let (want_loss, want) = tiny_step(&Device::Cpu, &pixels, &ids, &mask);
    let (loss, got) = tiny_step(dev, &pixels, &ids, &mask);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    let d = ((loss - want_loss) / want_loss).abs();
    assert!(d <= 1e-5, "loss {loss} against the CPU's {want_loss} ({d})");
    let mut diffs: Vec<(f32, &String)> = want
        .iter()
        .filter(|(name, _)| !name.ends_with("k_proj.bias"))
        .map(|(name, w)| (rel_diff(&got[name], w), name))
        .collect();
    diffs.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (d, name) in diffs.iter().take(10) {
        eprintln!("{name}: {d:.2e}");
    }
    let bad: Vec<_> = diffs
        .iter()
        .filter(|(d, _)| d.is_nan() || *d > 1e-4)
        .collect();
    assert!(bad.is_empty(), "gradients off the CPU's: {bad:?}");
}
