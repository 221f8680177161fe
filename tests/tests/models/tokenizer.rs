//! OPT's tokenizer from `tokenizer.json` and from `vocab.json` + `merges.txt` (what
//! facebook/opt-125m ships) gives the ids of transformers' `GPT2Tokenizer`, BOS included.

use moda_models::tokenizer::ModaTokenizer;
use moda_tests::{fixture, TempDir};

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let path = fixture("tokenizer/tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).expect("read cases");
    serde_json::from_str(&text).expect("parse cases")
}

/// The tokenizer directory without `tokenizer.json`, as facebook/opt-125m ships it.
fn vocab_merges_only() -> TempDir {
    let dir = TempDir::new("tok");
    for f in [
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture(&format!("tokenizer/{f}")), dir.path().join(f)).expect("copy");
    }
    dir
}

#[test]
fn both_tokenizer_paths_give_transformers_ids() {
    let json = ModaTokenizer::from_dir(&fixture("tokenizer")).expect("tokenizer.json");
    let dir = vocab_merges_only();
    let bpe = ModaTokenizer::from_dir(dir.path()).expect("vocab + merges");
    let cases = cases();
    assert!(cases.len() >= 10, "too few tokenizer cases");
    for c in &cases {
        assert_eq!(
            json.encode(&c.text).expect("encode"),
            c.ids,
            "tokenizer.json: {:?}",
            c.text
        );
        assert_eq!(
            bpe.encode(&c.text).expect("encode"),
            c.ids,
            "vocab+merges: {:?}",
            c.text
        );
    }
    assert_eq!(json.bos_id(), 2);
    assert_eq!(bpe.eos_id(), 2);
    assert_eq!(bpe.pad_id(), 1);
}

#[test]
fn decode_round_trips_and_rejects_unknown_ids() {
    let tok = ModaTokenizer::from_dir(&fixture("tokenizer")).expect("tokenizer");
    for c in cases() {
        // Without the BOS and keeping special tokens, byte-level BPE gives the text back.
        let text = tok.decode(&c.ids[1..], false).expect("decode");
        assert_eq!(text, c.text, "round trip of {:?}", c.text);
        // Skipping special tokens drops the BOS.
        let skipped = tok.decode(&c.ids[..1], true).expect("decode");
        assert_eq!(skipped, "");
    }
    assert!(tok.decode(&[u32::MAX], true).is_err());
}

#[test]
fn saved_tokenizer_json_gives_the_same_ids() {
    let dir = vocab_merges_only();
    let bpe = ModaTokenizer::from_dir(dir.path()).expect("vocab + merges");
    let out = TempDir::new("tok-save");
    let path = out.path().join("tokenizer.json");
    bpe.save(&path).expect("save");
    let again = ModaTokenizer::from_tokenizer_json(&path).expect("reload");
    for c in cases() {
        assert_eq!(
            again.encode(&c.text).expect("encode"),
            c.ids,
            "{:?}",
            c.text
        );
    }
}
