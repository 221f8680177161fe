//! MODA put together from the original recipe's `.pth` (keys `opt.*`, `embed_tokens.weight`,
//! `projection.*`): projector output, the masked training loss, logits and greedy decoding with
//! the KV cache, against the same module built in PyTorch.

use candle_core::Device;
use moda_models::Moda;
use moda_tests::{fixture, get, load_refs, max_abs_diff};

/// f32 parity bound of the issue.
const F32_TOL: f32 = 1e-4;

fn load() -> Moda {
    Moda::from_recipe_checkpoint(
        &fixture("moda/fashion_opt.pth"),
        &fixture("clip_gelu"),
        &fixture("opt_preln"),
        &Device::Cpu,
    )
    .expect("load the recipe checkpoint")
}

#[test]
fn image_embeddings_and_projector_match_pytorch() {
    let model = load();
    let refs = load_refs("moda/reference.safetensors");
    let clip = load_refs("clip_gelu/reference.safetensors");
    let pixels = candle_core::Tensor::cat(
        &[
            get(&clip, "pixel_values.photo.jpg"),
            get(&clip, "pixel_values.wide.png"),
        ],
        0,
    )
    .expect("cat");
    let embeds = model.encode_images(&pixels).expect("encode");
    let d = max_abs_diff(&embeds, get(&refs, "image_embeds"));
    assert!(d <= F32_TOL, "image embeds: max abs diff {d}");
    let prefix = model.project(get(&refs, "image_embeds")).expect("project");
    let d = max_abs_diff(&prefix, get(&refs, "prefix_embeds"));
    assert!(d <= F32_TOL, "projector: max abs diff {d}");
}

#[test]
fn loss_labels_and_logits_match_pytorch() {
    let model = load();
    let refs = load_refs("moda/reference.safetensors");
    let ids = get(&refs, "input_ids");
    let mask = get(&refs, "attention_mask");
    let t = ids.dim(1).expect("t");
    let text_mask = mask.narrow(1, 1, t).expect("text mask");
    let batch = model
        .build_batch(get(&refs, "prefix_embeds"), ids, &text_mask)
        .expect("batch");
    let want_labels: Vec<Vec<i64>> = get(&refs, "labels").to_vec2().expect("labels");
    let got_labels: Vec<Vec<i64>> = batch.labels.to_vec2().expect("labels");
    assert_eq!(got_labels, want_labels);
    let logits = model.logits(&batch).expect("logits");
    let d = max_abs_diff(&logits, get(&refs, "logits"));
    assert!(d <= F32_TOL, "logits: max abs diff {d}");
    let loss = model.loss(&batch).expect("loss");
    let d = max_abs_diff(&loss, get(&refs, "loss"));
    assert!(d <= F32_TOL, "loss: {loss} vs {}", get(&refs, "loss"));
}

#[test]
fn greedy_decoding_matches_pytorch() {
    let model = load();
    let refs = load_refs("moda/reference.safetensors");
    let want: Vec<Vec<i64>> = get(&refs, "greedy.tokens").to_vec2().expect("tokens");
    let steps = want[0].len();
    let got = model
        .generate_greedy(get(&refs, "prefix_embeds"), steps)
        .expect("generate");
    let eos = model.decoder().config().eos_token_id as i64;
    for (r, w) in want.iter().enumerate() {
        // The reference loop runs a fixed number of steps; ours stops at `</s>`.
        let n = w.iter().position(|t| *t == eos).map_or(w.len(), |p| p + 1);
        let w: Vec<u32> = w[..n].iter().map(|t| *t as u32).collect();
        assert_eq!(got[r], w, "row {r}");
    }
}
