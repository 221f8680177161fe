//! The OPT decoder against `transformers`' `OPTForCausalLM`: a pre-LN model with a tied head
//! (`model.decoder.*` keys, safetensors) and a post-LN one with `project_in/out` and an untied
//! head (bare `decoder.*` keys as the facebook/opt-* files have them, sharded safetensors).

use candle_core::{DType, Device, IndexOp, Tensor};
use moda_models::{Cache, DecoderInput, Opt};
use moda_tests::{fixture, get, load_refs, max_abs_diff};

const MODELS: [&str; 2] = ["opt_preln", "opt_postln"];

// The f32 parity bound, and why it is 1e-4: `moda_tests::parity::F32_TOL`.
use moda_tests::parity::F32_TOL;

fn load(m: &str) -> Opt {
    Opt::from_dir(&fixture(m), DType::F32, &Device::Cpu).expect("load OPT")
}

#[test]
fn logits_match_transformers() {
    for m in MODELS {
        let model = load(m);
        let refs = load_refs(&format!("{m}/reference.safetensors"));
        let ids = get(&refs, "ids.input_ids");
        let got = model
            .forward(DecoderInput::Ids(ids), None, None)
            .expect("forward");
        let d = max_abs_diff(&got, get(&refs, "ids.logits"));
        assert!(d <= F32_TOL, "{m}: max abs diff {d}");
    }
}

#[test]
fn logits_from_inputs_embeds_match_transformers() {
    for m in MODELS {
        let model = load(m);
        let refs = load_refs(&format!("{m}/reference.safetensors"));
        let embeds = get(&refs, "embeds.inputs_embeds");
        let got = model
            .forward(DecoderInput::Embeds(embeds), None, None)
            .expect("forward");
        let d = max_abs_diff(&got, get(&refs, "embeds.logits"));
        assert!(d <= F32_TOL, "{m}: max abs diff {d}");
    }
}

/// Logits at the real (unpadded) positions of row `r`: `[n, vocab]`.
fn real_rows(logits: &Tensor, mask: &[i64], r: usize) -> Tensor {
    let idx: Vec<u32> = mask
        .iter()
        .enumerate()
        .filter(|(_, m)| **m != 0)
        .map(|(i, _)| i as u32)
        .collect();
    let idx = Tensor::new(idx.as_slice(), &Device::Cpu).expect("index");
    logits
        .i(r)
        .expect("row")
        .index_select(&idx, 0)
        .expect("select")
}

#[test]
fn padded_batches_match_transformers_and_each_sequence_alone() {
    for m in MODELS {
        let model = load(m);
        let refs = load_refs(&format!("{m}/reference.safetensors"));
        for case in ["padded", "rpadded"] {
            let ids = get(&refs, &format!("{case}.input_ids"));
            let mask = get(&refs, &format!("{case}.attention_mask"));
            let want = get(&refs, &format!("{case}.logits"));
            let got = model
                .forward(DecoderInput::Ids(ids), Some(mask), None)
                .expect("forward");
            let masks: Vec<Vec<i64>> = mask.to_vec2().expect("mask");
            for (r, row_mask) in masks.iter().enumerate() {
                let ours = real_rows(&got, row_mask, r);
                let d = max_abs_diff(&ours, &real_rows(want, row_mask, r));
                assert!(d <= F32_TOL, "{m} {case} row {r}: max abs diff {d}");
                // The same sequence alone, without padding.
                let alone = real_rows(ids, row_mask, r).unsqueeze(0).expect("unsqueeze");
                let alone = model
                    .forward(DecoderInput::Ids(&alone), None, None)
                    .expect("forward alone")
                    .squeeze(0)
                    .expect("squeeze");
                let d = max_abs_diff(&ours, &alone);
                assert!(
                    d <= F32_TOL,
                    "{m} {case} row {r} vs alone: max abs diff {d}"
                );
            }
        }
    }
}

#[test]
fn kv_cache_decoding_equals_one_full_pass() {
    for m in MODELS {
        let model = load(m);
        let refs = load_refs(&format!("{m}/reference.safetensors"));
        let ids = get(&refs, "ids.input_ids");
        let (b, t) = ids.dims2().expect("dims");
        let full = model
            .forward(DecoderInput::Ids(ids), None, None)
            .expect("full");
        // Token by token from an empty cache, and a prefill of 3 then token by token.
        for prefill in [1, 3] {
            let mut cache = Cache::new(model.config());
            let mut steps = Vec::new();
            let mut pos = 0;
            while pos < t {
                let n = if pos == 0 { prefill } else { 1 };
                let chunk = ids.narrow(1, pos, n).expect("chunk");
                let mask = Tensor::ones((b, pos + n), DType::I64, &Device::Cpu).expect("mask");
                let out = model
                    .forward(DecoderInput::Ids(&chunk), Some(&mask), Some(&mut cache))
                    .expect("step");
                steps.push(out);
                pos += n;
                assert_eq!(cache.past_len(), pos);
            }
            let stepped = Tensor::cat(&steps, 1).expect("cat");
            let d = max_abs_diff(&stepped, &full);
            assert!(d <= F32_TOL, "{m} prefill {prefill}: max abs diff {d}");
        }
    }
}

#[test]
fn kv_cache_decoding_with_left_padding_equals_full_pass() {
    let m = "opt_preln";
    let model = load(m);
    let refs = load_refs(&format!("{m}/reference.safetensors"));
    let ids = get(&refs, "padded.input_ids");
    let mask = get(&refs, "padded.attention_mask");
    let (_, t) = ids.dims2().expect("dims");
    let full = model
        .forward(DecoderInput::Ids(ids), Some(mask), None)
        .expect("full");
    let mut cache = Cache::new(model.config());
    let prefill = t - 2;
    let mut steps = vec![model
        .forward(
            DecoderInput::Ids(&ids.narrow(1, 0, prefill).expect("n")),
            Some(&mask.narrow(1, 0, prefill).expect("n")),
            Some(&mut cache),
        )
        .expect("prefill")];
    for pos in prefill..t {
        steps.push(
            model
                .forward(
                    DecoderInput::Ids(&ids.narrow(1, pos, 1).expect("n")),
                    Some(&mask.narrow(1, 0, pos + 1).expect("n")),
                    Some(&mut cache),
                )
                .expect("step"),
        );
    }
    let stepped = Tensor::cat(&steps, 1).expect("cat");
    let masks: Vec<Vec<i64>> = mask.to_vec2().expect("mask");
    for (r, row_mask) in masks.iter().enumerate() {
        let d = max_abs_diff(
            &real_rows(&stepped, row_mask, r),
            &real_rows(&full, row_mask, r),
        );
        assert!(d <= F32_TOL, "row {r}: max abs diff {d}");
    }
}
