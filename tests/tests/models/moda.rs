//! MODA put together from the original recipe's `.pth` (keys `opt.*`, `embed_tokens.weight`,
//! `projection.*`): projector output, the masked training loss, logits and greedy decoding with
//! the KV cache, against the same module built in PyTorch (`moda_tests::parity`; the same
//! checks run on CUDA in `tests/cuda.rs`), and beam search through the shared search.

use candle_core::Device;
use moda_tests::parity;

#[test]
fn image_embeddings_and_projector_match_pytorch() {
    parity::image_embeddings_and_projector(&Device::Cpu);
}

#[test]
fn loss_labels_and_logits_match_pytorch() {
    parity::loss_labels_and_logits(&Device::Cpu);
}

#[test]
fn greedy_decoding_matches_pytorch() {
    parity::greedy_decoding(&Device::Cpu);
}

#[test]
fn beam_search_runs_on_the_candle_model() {
    parity::beam_search(&Device::Cpu);
}
