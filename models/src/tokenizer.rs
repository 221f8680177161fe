//! OPT's tokenizer: GPT-2's byte-level BPE with OPT's special tokens (`<s>`=0, `<pad>`=1,
//! `</s>`=2, `<unk>`=3) and `</s>` put in front of the text as BOS.
//!
//! Reference implementation: `transformers`' slow `GPT2Tokenizer` (`tokenization_gpt2.py`) as
//! configured by `facebook/opt-125m` (`add_bos_token: true`, `add_prefix_space: false`), and its
//! fast twin built by `convert_slow_tokenizer.GPT2Converter` (the `tokenizer.json` layout).
//!
//! # Design
//! - Two ways in, one behaviour: a `tokenizer.json`, or `vocab.json` + `merges.txt` (plus the
//!   optional `special_tokens_map.json` / `tokenizer_config.json`), which this module turns into
//!   the same `tokenizers::Tokenizer` that `GPT2Converter` would build: BPE model, ByteLevel
//!   pre-tokenizer (`add_prefix_space=false`), ByteLevel decoder, and the special tokens
//!   registered as *special added tokens*, so that a literal `</s>` in the text becomes id 2 as
//!   the slow tokenizer's trie does.
//! - **The BOS is added by this module, never by the `tokenizer.json` post-processor.**
//!   `transformers`' `tokenizer.json` files for OPT may or may not carry a post-processor that
//!   adds the BOS, depending on the version that wrote them. [`ModaTokenizer::encode`]
//!   therefore always encodes *without* special tokens and prepends the BOS id itself when
//!   `add_bos` is set, so both paths give identical ids whatever the file says.
//! - Where `add_bos` and the BOS token come from, first match wins: `tokenizer_config.json`'s
//!   `add_bos_token` / `special_tokens_map.json`'s and `tokenizer_config.json`'s `bos_token`
//!   (when loading a directory); else the `tokenizer.json`'s `TemplateProcessing`
//!   post-processor (a leading special token means "add this BOS", none means "no BOS"); else
//!   OPT's default: add `</s>`.
//! - [`ModaTokenizer::save`] writes a `tokenizer.json` whose post-processor states the BOS
//!   explicitly (a `TemplateProcessing` with or without the BOS), so the file is
//!   self-describing: [`ModaTokenizer::from_tokenizer_json`] gives the same ids, and other
//!   `tokenizers` users calling `encode(text, add_special_tokens=true)` get them too.
//! - Truncation and padding stored in a `tokenizer.json` are dropped: `encode` returns the
//!   whole text.
//! - [`ModaTokenizer::decode`] refuses ids outside the vocabulary with an error (the
//!   `tokenizers` crate would silently skip them). It applies no
//!   `clean_up_tokenization_spaces`, like `transformers` with that option off; invalid UTF-8
//!   from partial byte sequences becomes U+FFFD, like the slow tokenizer's `errors="replace"`.
//! - A `tokenizer.json` may come with a bundle from anywhere: a panic of the `tokenizers` crate
//!   while encoding or decoding (some of its components panic on settings such a file can
//!   hold) is returned as an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// File names of a Hugging Face tokenizer directory.
const TOKENIZER_JSON: &str = "tokenizer.json";
const VOCAB_JSON: &str = "vocab.json";
const MERGES_TXT: &str = "merges.txt";
const SPECIAL_TOKENS_MAP_JSON: &str = "special_tokens_map.json";
const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";

/// A special token as `transformers` stores it (`AddedToken`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token's text, e.g. `</s>`.
    pub content: String,
    /// Swallow whitespace on the left when matching.
    pub lstrip: bool,
    /// Swallow whitespace on the right when matching.
    pub rstrip: bool,
    /// Match only as a whole word.
    pub single_word: bool,
    /// Match against normalized text (there is no normalizer for OPT, so this is moot).
    pub normalized: bool,
    /// Whether it is special (skipped by `decode(.., skip_special_tokens = true)`).
    pub special: bool,
}

impl SpecialToken {
    /// A plain special token: no stripping, not single-word, not normalized.
    pub fn new(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            lstrip: false,
            rstrip: false,
            single_word: false,
            normalized: false,
            special: true,
        }
    }

    fn to_added(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
            .normalized(self.normalized)
    }
}

/// The special tokens of a tokenizer and whether a BOS goes in front of the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    /// The BOS token (`</s>` for OPT).
    pub bos: String,
    /// The end-of-sequence token (`</s>`).
    pub eos: String,
    /// The padding token (`<pad>`); when absent from the vocabulary, the EOS id pads.
    pub pad: String,
    /// Put the BOS in front of the text (`add_bos_token`).
    pub add_bos: bool,
    /// Every added token to register, in order (BOS, EOS, PAD, UNK, ... included).
    pub tokens: Vec<SpecialToken>,
}

impl SpecialTokens {
    /// OPT's defaults: BOS = EOS = `</s>`, PAD = `<pad>`, `add_bos`, and `<s>`, `<pad>`,
    /// `</s>`, `<unk>` registered as special tokens.
    pub fn opt() -> Self {
        Self {
            bos: "</s>".to_string(),
            eos: "</s>".to_string(),
            pad: "<pad>".to_string(),
            add_bos: true,
            tokens: ["<s>", "<pad>", "</s>", "<unk>"]
                .into_iter()
                .map(SpecialToken::new)
                .collect(),
        }
    }

    /// Reads `special_tokens_map.json` and `tokenizer_config.json` from `dir` (both optional;
    /// [`SpecialTokens::opt`] when neither exists). When they exist, the special tokens they
    /// name (`bos_token`, `eos_token`, `unk_token`, `pad_token`, `sep_token`, `cls_token`,
    /// `mask_token`, `additional_special_tokens`, `added_tokens_decoder`) are exactly the ones
    /// registered, as `transformers` does; `special_tokens_map.json` wins over
    /// `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Ok(DirConfig::read(dir)?.special_tokens())
    }
}

/// What `special_tokens_map.json` and `tokenizer_config.json` say.
#[derive(Debug, Default)]
struct DirConfig {
    /// `bos_token`, `eos_token`, ... -> token (None: explicitly null).
    named: BTreeMap<String, Option<SpecialToken>>,
    /// `additional_special_tokens`.
    additional: Vec<SpecialToken>,
    /// `added_tokens_decoder`, by id.
    decoder: BTreeMap<u64, SpecialToken>,
    /// `add_bos_token`.
    add_bos: Option<bool>,
    /// Whether any of the two files exists.
    found: bool,
}

const NAMED_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::files::read_text_bounded(path, crate::files::TEXT_FILE_MAX_BYTES)
        .map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A token given as `"</s>"` or `{"content": "</s>", "lstrip": false, ...}`.
fn parse_token(path: &Path, key: &str, v: &Value) -> Result<Option<SpecialToken>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(SpecialToken::new(s.clone()))),
        Value::Object(m) => {
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(path, format!("`{key}` has no string `content`")))?;
            let flag =
                |k: &str, default: bool| m.get(k).and_then(Value::as_bool).unwrap_or(default);
            Ok(Some(SpecialToken {
                content: content.to_string(),
                lstrip: flag("lstrip", false),
                rstrip: flag("rstrip", false),
                single_word: flag("single_word", false),
                normalized: flag("normalized", false),
                special: flag("special", true),
            }))
        }
        _ => Err(bad(
            path,
            format!("`{key}` must be a string, an object with `content`, or null"),
        )),
    }
}

impl DirConfig {
    fn read(dir: &Path) -> Result<Self> {
        let mut cfg = DirConfig::default();
        // tokenizer_config.json first, then special_tokens_map.json overrides it.
        for name in [TOKENIZER_CONFIG_JSON, SPECIAL_TOKENS_MAP_JSON] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            cfg.found = true;
            let json = read_json(&path)?;
            let obj = json
                .as_object()
                .ok_or_else(|| bad(&path, "expected a JSON object"))?;
            for key in NAMED_KEYS {
                if let Some(v) = obj.get(key) {
                    cfg.named
                        .insert(key.to_string(), parse_token(&path, key, v)?);
                }
            }
            if let Some(v) = obj.get("additional_special_tokens") {
                let list = match v {
                    Value::Null => Vec::new(),
                    Value::Array(a) => a.clone(),
                    _ => return Err(bad(&path, "`additional_special_tokens` must be a list")),
                };
                cfg.additional.clear();
                for item in &list {
                    if let Some(t) = parse_token(&path, "additional_special_tokens", item)? {
                        cfg.additional.push(t);
                    }
                }
            }
            if let Some(v) = obj.get("add_bos_token") {
                match v {
                    Value::Bool(b) => cfg.add_bos = Some(*b),
                    Value::Null => {}
                    _ => return Err(bad(&path, "`add_bos_token` must be true or false")),
                }
            }
            if let Some(v) = obj.get("added_tokens_decoder") {
                let m = v
                    .as_object()
                    .ok_or_else(|| bad(&path, "`added_tokens_decoder` must be an object"))?;
                for (id, tok) in m {
                    let id: u64 = id.parse().map_err(|_| {
                        bad(
                            &path,
                            format!("`added_tokens_decoder` key {id:?} is not an id"),
                        )
                    })?;
                    if let Some(t) = parse_token(&path, "added_tokens_decoder", tok)? {
                        cfg.decoder.insert(id, t);
                    }
                }
            }
        }
        Ok(cfg)
    }

    fn named(&self, key: &str) -> Option<&SpecialToken> {
        self.named.get(key).and_then(Option::as_ref)
    }

    fn special_tokens(&self) -> SpecialTokens {
        let default = SpecialTokens::opt();
        if !self.found {
            return default;
        }
        let name = |key: &str, fallback: &str| {
            self.named(key)
                .map_or_else(|| fallback.to_string(), |t| t.content.clone())
        };
        // transformers' order: added_tokens_decoder by id, then the named tokens, then the
        // additional ones; the first occurrence of a content wins.
        let mut tokens: Vec<SpecialToken> = Vec::new();
        let mut push = |t: &SpecialToken| {
            if !tokens.iter().any(|x| x.content == t.content) {
                tokens.push(t.clone());
            }
        };
        self.decoder.values().for_each(&mut push);
        NAMED_KEYS
            .iter()
            .filter_map(|k| self.named(k))
            .for_each(&mut push);
        self.additional.iter().for_each(&mut push);
        SpecialTokens {
            bos: name("bos_token", &default.bos),
            eos: name("eos_token", &default.eos),
            pad: name("pad_token", &default.pad),
            add_bos: self.add_bos.unwrap_or(default.add_bos),
            tokens,
        }
    }
}

/// The BOS a `tokenizer.json`'s post-processor adds: `Some(Some(token))` for a
/// `TemplateProcessing` whose single template starts with a special token, `Some(None)` for
/// one that does not, `None` when there is no `TemplateProcessing`.
fn template_bos(post_processor: &Value) -> Option<Option<String>> {
    fn find(pp: &Value) -> Option<Option<String>> {
        match pp.get("type").and_then(Value::as_str) {
            Some("TemplateProcessing") => {
                let first = pp.get("single")?.as_array()?.first();
                Some(
                    first
                        .and_then(|p| p.get("SpecialToken"))
                        .and_then(|s| s.get("id"))
                        .and_then(Value::as_str)
                        .map(str::to_string),
                )
            }
            Some("Sequence") => pp.get("processors")?.as_array()?.iter().find_map(find),
            _ => None,
        }
    }
    find(post_processor)
}

/// OPT's tokenizer (GPT-2 byte-level BPE, BOS = `</s>`), wrapping a `tokenizers::Tokenizer`.
/// Clones share the wrapped tokenizer (its vocabulary and merges are tens of thousands of
/// strings in hash maps: copying them took several milliseconds for OPT's).
#[derive(Debug, Clone)]
pub struct ModaTokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    source: PathBuf,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    add_bos: bool,
}

impl ModaTokenizer {
    /// Loads the tokenizer of a model directory: `tokenizer.json` if present, else
    /// `vocab.json` + `merges.txt`; `special_tokens_map.json` and `tokenizer_config.json`
    /// (optional) give the special tokens and `add_bos_token`. A directory with neither
    /// gives [`Error::MissingFile`] naming the directory and the files looked for.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: format!(
                    "tokenizer directory (with {TOKENIZER_JSON}, or {VOCAB_JSON} + {MERGES_TXT})"
                ),
            });
        }
        let cfg = DirConfig::read(dir)?;
        let tokenizer_json = dir.join(TOKENIZER_JSON);
        if tokenizer_json.is_file() {
            return Self::load_tokenizer_json(&tokenizer_json, Some(&cfg));
        }
        let vocab = dir.join(VOCAB_JSON);
        let merges = dir.join(MERGES_TXT);
        match (vocab.is_file(), merges.is_file()) {
            (true, true) => Self::from_vocab_merges(&vocab, &merges, &cfg.special_tokens()),
            (true, false) => Err(Error::MissingFile {
                path: merges,
                what: format!(
                    "BPE merges, needed with {VOCAB_JSON} since there is no {TOKENIZER_JSON} in {}",
                    dir.display()
                ),
            }),
            (false, true) => Err(Error::MissingFile {
                path: vocab,
                what: format!(
                    "BPE vocabulary, needed with {MERGES_TXT} since there is no {TOKENIZER_JSON} in {}",
                    dir.display()
                ),
            }),
            (false, false) => Err(Error::MissingFile {
                path: tokenizer_json,
                what: format!(
                    "tokenizer: looked for {TOKENIZER_JSON}, or {VOCAB_JSON} + {MERGES_TXT}, in {}",
                    dir.display()
                ),
            }),
        }
    }

    /// Loads a `tokenizer.json` on its own: the BOS comes from its `TemplateProcessing`
    /// post-processor if it has one, else OPT's default (`</s>`, added); EOS `</s>`,
    /// PAD `<pad>`.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        Self::load_tokenizer_json(path, None)
    }

    /// [`ModaTokenizer::from_tokenizer_json`] of the contents of a `tokenizer.json` already
    /// in memory; `source` names it in errors and is what [`ModaTokenizer::source`] returns.
    pub fn from_tokenizer_json_bytes(bytes: &[u8], source: &Path) -> Result<Self> {
        Self::parse_tokenizer_json(bytes, source, None)
    }

    fn load_tokenizer_json(path: &Path, cfg: Option<&DirConfig>) -> Result<Self> {
        let bytes = crate::files::read_bounded(path, crate::files::TEXT_FILE_MAX_BYTES)
            .map_err(|e| Error::io(path, e))?;
        Self::parse_tokenizer_json(&bytes, path, cfg)
    }

    fn parse_tokenizer_json(bytes: &[u8], path: &Path, cfg: Option<&DirConfig>) -> Result<Self> {
        // Only the post-processor is read here (the rest is skipped without being built:
        // OPT's file is 2 MB of vocabulary and merges, which the tokenizers crate reads next).
        #[derive(serde::Deserialize)]
        struct PostProcessor {
            #[serde(default)]
            post_processor: Option<Value>,
        }
        let json: PostProcessor = serde_json::from_slice(bytes).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let mut inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| bad(path, format!("not a valid tokenizer.json: {e}")))?;
        inner
            .with_truncation(None)
            .map_err(|e| bad(path, e.to_string()))?;
        inner.with_padding(None);

        let defaults = SpecialTokens::opt();
        let template = json.post_processor.as_ref().and_then(template_bos);
        let found = cfg.filter(|c| c.found);
        let add_bos = found
            .and_then(|c| c.add_bos)
            .or_else(|| template.as_ref().map(Option::is_some))
            .unwrap_or(defaults.add_bos);
        let named = |key: &str| found.and_then(|c| c.named(key)).map(|t| t.content.clone());
        let bos = named("bos_token")
            .or_else(|| template.clone().flatten())
            .unwrap_or(defaults.bos);
        let eos = named("eos_token").unwrap_or(defaults.eos);
        let pad = named("pad_token").unwrap_or(defaults.pad);

        // Special tokens named by the config but absent from the file's added tokens are
        // registered, as transformers' fast tokenizer does at load time.
        if let Some(c) = found {
            let present: Vec<String> = inner
                .get_added_tokens_decoder()
                .into_values()
                .map(|t| t.content)
                .collect();
            let extra: Vec<AddedToken> = c
                .special_tokens()
                .tokens
                .iter()
                .filter(|t| !present.contains(&t.content))
                .map(SpecialToken::to_added)
                .collect();
            if !extra.is_empty() {
                inner
                    .add_special_tokens(extra)
                    .map_err(|e| bad(path, format!("cannot add its special tokens: {e}")))?;
            }
        }
        Self::finish(inner, path, &bos, &eos, &pad, add_bos)
    }

    /// Builds the tokenizer from GPT-2 style `vocab.json` and `merges.txt`, with `special`'s
    /// tokens registered as special added tokens.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path, special: &SpecialTokens) -> Result<Self> {
        let vocab_map = read_vocab(vocab)?;
        let merge_list = read_merges(merges)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab_map, merge_list)
            .build()
            .map_err(|e| bad(merges, format!("cannot build the BPE model: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added: Vec<AddedToken> = special.tokens.iter().map(SpecialToken::to_added).collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| bad(vocab, format!("cannot add the special tokens: {e}")))?;
        // BOS / EOS / PAD must be known tokens; register them if `tokens` forgot them.
        for name in [&special.bos, &special.eos] {
            if inner.token_to_id(name).is_none() {
                inner
                    .add_special_tokens([SpecialToken::new(name.clone()).to_added()])
                    .map_err(|e| bad(vocab, format!("cannot add {name}: {e}")))?;
            }
        }
        let mut tok = Self::finish(
            inner,
            vocab,
            &special.bos,
            &special.eos,
            &special.pad,
            special.add_bos,
        )?;
        let pp = tok.post_processor()?;
        Arc::make_mut(&mut tok.inner).with_post_processor(Some(pp));
        Ok(tok)
    }

    fn finish(
        inner: tokenizers::Tokenizer,
        source: &Path,
        bos: &str,
        eos: &str,
        pad: &str,
        add_bos: bool,
    ) -> Result<Self> {
        let id = |name: &str, what: &str| {
            inner.token_to_id(name).ok_or_else(|| {
                bad(
                    source,
                    format!("{what} token {name:?} is not in the vocabulary"),
                )
            })
        };
        let bos_id = id(bos, "BOS")?;
        let eos_id = id(eos, "EOS")?;
        let pad_id = inner.token_to_id(pad).unwrap_or(eos_id);
        Ok(Self {
            inner: Arc::new(inner),
            source: source.to_path_buf(),
            bos_id,
            eos_id,
            pad_id,
            add_bos,
        })
    }

    /// The post-processor stating the BOS policy, as `GPT2Converter` writes it.
    fn post_processor(&self) -> Result<PostProcessorWrapper> {
        let seq = |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
        let value = if self.add_bos {
            let bos = self
                .inner
                .id_to_token(self.bos_id)
                .ok_or_else(|| bad(&self.source, "the BOS id has no token"))?;
            let special =
                |type_id: u32| serde_json::json!({"SpecialToken": {"id": bos, "type_id": type_id}});
            serde_json::json!({
                "type": "TemplateProcessing",
                "single": [special(0), seq("A", 0)],
                "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [self.bos_id], "tokens": [bos]}},
            })
        } else {
            serde_json::json!({
                "type": "TemplateProcessing",
                "single": [seq("A", 0)],
                "pair": [seq("A", 0), seq("B", 1)],
                "special_tokens": {},
            })
        };
        serde_json::from_value(value).map_err(|e| {
            bad(
                &self.source,
                format!("cannot build the post-processor: {e}"),
            )
        })
    }

    /// Token ids of `text`, with the BOS in front when `add_bos` (as `transformers`'
    /// `GPT2Tokenizer` for OPT gives them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode_no_bos(text)?;
        if !self.add_bos {
            return Ok(ids);
        }
        let mut out = Vec::with_capacity(ids.len() + 1);
        out.push(self.bos_id);
        out.extend(ids);
        Ok(out)
    }

    /// Token ids of `text` alone, without BOS (special tokens written in the text, such as
    /// `</s>`, still map to their ids).
    pub fn encode_no_bos(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.guarded(
            || format!("cannot encode {text:?}"),
            || self.inner.encode_fast(text, false),
        )?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; special tokens are left out when `skip_special_tokens`. An id
    /// outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(bad_id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(bad(
                &self.source,
                format!(
                    "cannot decode id {bad_id}: not in the vocabulary (size {})",
                    self.vocab_size()
                ),
            ));
        }
        self.guarded(
            || "cannot decode".to_string(),
            || self.inner.decode(ids, skip_special_tokens),
        )
    }

    /// Runs a call into the `tokenizers` crate, its errors and its panics turned into errors
    /// that start with `what`: some of its components panic on settings that a hostile
    /// `tokenizer.json` can hold (a `Strip` decoder whose `stop` is longer than a token indexes
    /// before the token's start).
    fn guarded<T>(
        &self,
        what: impl FnOnce() -> String,
        f: impl FnOnce() -> tokenizers::Result<T>,
    ) -> Result<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(bad(&self.source, format!("{}: {e}", what()))),
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                Err(bad(
                    &self.source,
                    format!("{}: the tokenizer failed ({msg})", what()),
                ))
            }
        }
    }

    /// The bytes each token id stands for in decoded text, by id (`None` for special tokens
    /// and ids without a token): for a byte-level BPE (OPT's), the token's characters mapped
    /// back through GPT-2's byte-to-character table, so that a token holding part of a UTF-8
    /// character has its bytes; for other tokenizers, the token decoded on its own.
    pub fn token_bytes(&self) -> TokenBytes {
        let table = byte_level_table();
        let added = self.inner.get_added_tokens_decoder();
        let byte_level = matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let n = self.vocab_size();
        let mut out = TokenBytes {
            data: Vec::with_capacity(n * 8),
            starts: Vec::with_capacity(n + 1),
            known: Vec::with_capacity(n),
        };
        out.starts.push(0);
        for id in 0..n as u32 {
            let mark = out.data.len();
            let known = if let Some(a) = added.get(&id) {
                if !a.special {
                    out.data.extend_from_slice(a.content.as_bytes());
                }
                !a.special
            } else if let Some(token) = self.inner.id_to_token(id) {
                if byte_level {
                    let mut all = true;
                    for c in token.chars() {
                        match table.get(c as usize).copied().flatten() {
                            Some(b) => out.data.push(b),
                            None => {
                                all = false;
                                break;
                            }
                        }
                    }
                    all
                } else if let Ok(text) = self.decode(&[id], false) {
                    out.data.extend_from_slice(text.as_bytes());
                    true
                } else {
                    false
                }
            } else {
                false
            };
            if !known {
                out.data.truncate(mark);
            }
            out.known.push(known);
            // Offsets fit in u32: a tokenizer.json is at most a few hundred megabytes.
            out.starts
                .push(u32::try_from(out.data.len()).unwrap_or(u32::MAX));
        }
        out
    }

    /// Byte offsets in `text` where the pre-tokenizer's pieces start (the BPE merges tokens
    /// only within a piece); `[0]` when the tokenizer has no pre-tokenizer or it fails.
    pub fn piece_starts(&self, text: &str) -> Vec<usize> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let Some(pre) = self.inner.get_pre_tokenizer() else {
            return vec![0];
        };
        let split = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut pts = PreTokenizedString::from(text);
            pre.pre_tokenize(&mut pts).ok()?;
            Some(
                pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
                    .into_iter()
                    .map(|(_, (start, _), _)| start)
                    .collect::<Vec<usize>>(),
            )
        }));
        match split {
            Ok(Some(starts)) if !starts.is_empty() => starts,
            _ => vec![0],
        }
    }

    /// The BOS id (2, `</s>`, for OPT).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The end-of-sequence id (2, `</s>`, for OPT).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The padding id (1, `<pad>`, for OPT; the EOS id if the tokenizer has no PAD token).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Whether [`ModaTokenizer::encode`] puts the BOS in front.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The number of tokens, added tokens included (50265 for OPT; the model's embedding
    /// table, 50272, is padded beyond it).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The file the tokenizer was loaded from (used in error messages).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes a `tokenizer.json` (atomically: a temporary file in the same directory, then a
    /// rename) from which [`ModaTokenizer::from_tokenizer_json`] gives the same ids. Its
    /// post-processor states the BOS policy explicitly.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tok = tokenizers::Tokenizer::clone(&self.inner);
        tok.with_post_processor(Some(self.post_processor()?));
        let text = tok
            .to_string(true)
            .map_err(|e| bad(path, format!("cannot serialize the tokenizer: {e}")))?;
        crate::files::write_atomic(path, text.as_bytes()).map_err(|e| Error::io(path, e))
    }
}

fn read_vocab(path: &Path) -> Result<tokenizers::models::bpe::Vocab> {
    let json = read_json(path)?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad(path, "expected a JSON object of token -> id"))?;
    obj.iter()
        .map(|(token, id)| {
            id.as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .map(|id| (token.clone(), id))
                .ok_or_else(|| bad(path, format!("token {token:?} has id {id}, not a u32")))
        })
        .collect()
}

/// `merges.txt`: an optional `#version` line, then `left right` per line (blank lines
/// ignored, as the slow tokenizer's `split("\n")[1:-1]` drops the trailing one).
fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = crate::files::read_text_bounded(path, crate::files::TEXT_FILE_MAX_BYTES)
        .map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || (i == 0 && line.starts_with("#version")) {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(bad(
                    path,
                    format!(
                        "line {}: expected two tokens separated by one space, got {line:?}",
                        i + 1
                    ),
                ))
            }
        }
    }
    Ok(merges)
}

/// GPT-2's byte-level table read backwards: the character a byte-level BPE writes for each
/// byte (printable Latin-1 bytes stand for themselves, the others for U+0100 onwards, in
/// order) mapped to that byte.
fn byte_level_table() -> Vec<Option<u8>> {
    // GPT-2's characters for the 256 bytes: printable bytes stand for themselves, the others
    // for the characters from U+0100 on, in byte order; indexed by character.
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256usize;
    let mut table = vec![None; 256 + 256];
    for b in 0..=255u8 {
        let c = if printable(b) {
            usize::from(b)
        } else {
            next += 1;
            next - 1
        };
        table[c] = Some(b);
    }
    table
}

/// Every token's bytes, by id, in one buffer: see [`ModaTokenizer::token_bytes`].
#[derive(Debug, Clone, Default)]
pub struct TokenBytes {
    data: Vec<u8>,
    /// Token `id`'s bytes are `data[starts[id]..starts[id + 1]]`.
    starts: Vec<u32>,
    known: Vec<bool>,
}

impl TokenBytes {
    /// The bytes of token `id`, `None` for special tokens and ids without a token.
    pub fn get(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        if !*self.known.get(i)? {
            return None;
        }
        let (a, b) = (*self.starts.get(i)?, *self.starts.get(i + 1)?);
        self.data.get(a as usize..b as usize)
    }

    /// The number of ids (the tokenizer's vocabulary size).
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether there are no ids.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Every id with its bytes (`None` as in [`TokenBytes::get`]).
    pub fn iter(&self) -> impl Iterator<Item = (u32, Option<&[u8]>)> + '_ {
        (0..self.len() as u32).map(|id| (id, self.get(id)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use crate::testutil::TempDir;

    /// GPT-2's `bytes_to_unicode`.
    fn byte_chars() -> Vec<char> {
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut out = vec![' '; 256];
        for (b, c) in bs.iter().zip(cs) {
            out[*b as usize] = char::from_u32(c).unwrap();
        }
        out
    }

    const MERGES: &[(&str, &str)] = &[
        ("h", "e"),
        ("l", "l"),
        ("he", "ll"),
        ("hell", "o"),
        ("Ġ", "w"),
        ("o", "r"),
        ("Ġw", "or"),
        ("l", "d"),
        ("Ġwor", "ld"),
    ];

    /// A tiny OPT-like tokenizer directory: 4 specials, 256 byte tokens, a few merges.
    fn tiny_dir(dir: &Path, with_special_files: bool) {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<s>", "<pad>", "</s>", "<unk>"].iter().enumerate() {
            vocab.insert(t.to_string(), i.into());
        }
        for c in byte_chars() {
            let n = vocab.len();
            vocab.insert(c.to_string(), n.into());
        }
        for (a, b) in MERGES {
            let n = vocab.len();
            vocab.insert(format!("{a}{b}"), n.into());
        }
        std::fs::write(
            dir.join("vocab.json"),
            serde_json::to_string(&Value::Object(vocab)).unwrap(),
        )
        .unwrap();
        let mut merges = "#version: 0.2\n".to_string();
        for (a, b) in MERGES {
            merges.push_str(&format!("{a} {b}\n"));
        }
        std::fs::write(dir.join("merges.txt"), merges).unwrap();
        if with_special_files {
            let tok = |c: &str| serde_json::json!({"content": c, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false});
            std::fs::write(
                dir.join("special_tokens_map.json"),
                serde_json::json!({"bos_token": tok("</s>"), "eos_token": tok("</s>"), "unk_token": tok("</s>"), "pad_token": tok("<pad>")}).to_string(),
            )
            .unwrap();
            std::fs::write(
                dir.join("tokenizer_config.json"),
                serde_json::json!({"add_bos_token": true, "add_prefix_space": false, "errors": "replace", "bos_token": tok("</s>"), "eos_token": tok("</s>"), "unk_token": tok("</s>"), "pad_token": tok("<pad>")}).to_string(),
            )
            .unwrap();
        }
    }

    fn id_of(t: &ModaTokenizer, s: &str) -> u32 {
        t.token_to_id(s).unwrap()
    }

    #[test]
    fn vocab_merges_encode_decode() {
        let d = TempDir::new();
        tiny_dir(&d.0, true);
        let t = ModaTokenizer::from_dir(&d.0).unwrap();
        assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (2, 2, 1));
        assert_eq!(t.vocab_size(), 4 + 256 + MERGES.len());
        let hello = id_of(&t, "hello");
        let world = id_of(&t, "Ġworld");
        assert_eq!(t.encode("hello world").unwrap(), vec![2, hello, world]);
        assert_eq!(t.encode_no_bos("hello world").unwrap(), vec![hello, world]);
        assert_eq!(t.encode("").unwrap(), vec![2]);
        // A literal </s> is the special token; <s> is not special for OPT's files.
        let ids = t.encode("hello</s>").unwrap();
        assert_eq!(ids, vec![2, hello, 2]);
        let ids = t.encode("<s>").unwrap();
        assert_eq!(ids.len(), 4, "{ids:?}");
        // Round trips, including non-ASCII bytes.
        for text in ["hello world", "  héllo\n wörld 🙂 ", "hello</s> world"] {
            let ids = t.encode_no_bos(text).unwrap();
            assert_eq!(t.decode(&ids, false).unwrap(), text);
        }
        let ids = t.encode("hello world</s>").unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), "</s>hello world</s>");
        assert_eq!(t.decode(&ids, true).unwrap(), "hello world");
        // Out-of-range ids are errors, not panics.
        let err = t.decode(&[hello, 999_999], false).unwrap_err();
        assert!(err.to_string().contains("999999"), "{err}");
        assert!(t.decode(&[u32::MAX], true).is_err());
        // Partial UTF-8 decodes lossily.
        let ids = t.encode_no_bos("é").unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(t.decode(&ids[..1], false).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn token_bytes_spell_the_text_byte_for_byte() {
        let d = TempDir::new();
        tiny_dir(&d.0, true);
        let t = ModaTokenizer::from_dir(&d.0).unwrap();
        let bytes = t.token_bytes();
        assert_eq!(bytes.len(), t.vocab_size());
        // Special tokens (here `<pad>` and `</s>`) and ids outside the vocabulary have none;
        // `<s>` and `<unk>` are plain tokens in OPT's files.
        for id in [1, 2, t.vocab_size() as u32, u32::MAX] {
            assert_eq!(bytes.get(id), None, "id {id}");
        }
        assert_eq!(bytes.get(0), Some(&b"<s>"[..]));
        assert_eq!(bytes.get(id_of(&t, "Ġworld")), Some(&b" world"[..]));
        // Each of the 256 byte tokens is its byte, through GPT-2's table.
        for (b, c) in byte_chars().into_iter().enumerate() {
            assert_eq!(bytes.get(id_of(&t, &c.to_string())), Some(&[b as u8][..]));
        }
        // A text's tokens spell its bytes, a character split over two tokens included.
        for text in ["hello world", "  héllo\n wörld 🙂 "] {
            let spelled: Vec<u8> = t
                .encode_no_bos(text)
                .unwrap()
                .into_iter()
                .flat_map(|id| bytes.get(id).unwrap().to_vec())
                .collect();
            assert_eq!(spelled, text.as_bytes());
        }
        assert_eq!(
            bytes.iter().filter(|(_, b)| b.is_none()).count(),
            2,
            "only the two special tokens have no bytes"
        );
    }

    #[test]
    fn defaults_without_special_files() {
        let d = TempDir::new();
        tiny_dir(&d.0, false);
        let t = ModaTokenizer::from_dir(&d.0).unwrap();
        assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (2, 2, 1));
        assert!(t.add_bos());
        assert_eq!(t.encode("<s></s><unk><pad>").unwrap(), vec![2, 0, 2, 3, 1]);
        assert_eq!(t.decode(&[2, 0, 3, 1], true).unwrap(), "");
    }

    #[test]
    fn tokenizer_json_paths_agree() {
        let d = TempDir::new();
        tiny_dir(&d.0, true);
        let slow = ModaTokenizer::from_dir(&d.0).unwrap();
        let texts = ["hello world", "hello</s>world", " héllo  wörld!\n", ""];

        // save -> from_tokenizer_json / from_dir (tokenizer.json now preferred).
        let out = TempDir::new();
        let path = out.0.join("tokenizer.json");
        slow.save(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(&out.0).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary file left behind");
        let fast = ModaTokenizer::from_tokenizer_json(&path).unwrap();
        slow.save(&d.0.join("tokenizer.json")).unwrap();
        let fast_dir = ModaTokenizer::from_dir(&d.0).unwrap();
        for text in texts {
            let want = slow.encode(text).unwrap();
            assert_eq!(fast.encode(text).unwrap(), want, "{text:?}");
            assert_eq!(fast_dir.encode(text).unwrap(), want, "{text:?}");
            // Other tokenizers users get the BOS through the post-processor.
            let raw = fast.inner().encode(text, true).unwrap();
            assert_eq!(raw.get_ids(), &want[..], "{text:?}");
        }
        assert_eq!(fast.vocab_size(), slow.vocab_size());

        // A transformers-style tokenizer.json whose post-processor adds no BOS (ByteLevel):
        // encode still puts the BOS in front.
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["post_processor"] = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
        std::fs::write(&path, json.to_string()).unwrap();
        let bytelevel = ModaTokenizer::from_tokenizer_json(&path).unwrap();
        for text in texts {
            assert_eq!(bytelevel.encode(text).unwrap(), slow.encode(text).unwrap());
        }

        // add_bos_token: false in tokenizer_config.json wins, on both paths.
        std::fs::write(
            d.0.join("tokenizer_config.json"),
            r#"{"add_bos_token": false, "bos_token": "</s>"}"#,
        )
        .unwrap();
        let no_bos = ModaTokenizer::from_dir(&d.0).unwrap();
        assert_eq!(
            no_bos.encode("hello").unwrap(),
            slow.encode_no_bos("hello").unwrap()
        );
        // ... and the saved file says so.
        no_bos.save(&path).unwrap();
        let reloaded = ModaTokenizer::from_tokenizer_json(&path).unwrap();
        assert!(!reloaded.add_bos());
        std::fs::remove_file(d.0.join("tokenizer.json")).unwrap();
        let no_bos_slow = ModaTokenizer::from_dir(&d.0).unwrap();
        assert_eq!(
            no_bos_slow.encode("hello").unwrap(),
            no_bos.encode("hello").unwrap()
        );
    }

    #[test]
    fn missing_files_are_named() {
        let d = TempDir::new();
        let err = ModaTokenizer::from_dir(&d.0).unwrap_err();
        let msg = err.to_string();
        for needle in [
            "tokenizer.json",
            "vocab.json",
            "merges.txt",
            d.0.to_str().unwrap(),
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
        tiny_dir(&d.0, false);
        std::fs::remove_file(d.0.join("merges.txt")).unwrap();
        let err = ModaTokenizer::from_dir(&d.0).unwrap_err();
        match err {
            Error::MissingFile { path, .. } => assert_eq!(path, d.0.join("merges.txt")),
            other => panic!("{other}"),
        }
        let err = ModaTokenizer::from_dir(&d.0.join("nope")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = ModaTokenizer::from_tokenizer_json(&d.0.join("tokenizer.json")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn bad_files_are_named() {
        let d = TempDir::new();
        tiny_dir(&d.0, true);
        std::fs::write(d.0.join("special_tokens_map.json"), "{not json").unwrap();
        let err = ModaTokenizer::from_dir(&d.0).unwrap_err();
        assert!(
            matches!(&err, Error::Json { path, .. } if path.ends_with("special_tokens_map.json")),
            "{err}"
        );
        std::fs::remove_file(d.0.join("special_tokens_map.json")).unwrap();

        std::fs::write(d.0.join("tokenizer.json"), "[1, 2").unwrap();
        let err = ModaTokenizer::from_dir(&d.0).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        std::fs::write(d.0.join("tokenizer.json"), r#"{"model": 3}"#).unwrap();
        let err = ModaTokenizer::from_dir(&d.0).unwrap_err();
        assert!(
            matches!(&err, Error::Tokenizer { path, .. } if path.ends_with("tokenizer.json")),
            "{err}"
        );
        std::fs::remove_file(d.0.join("tokenizer.json")).unwrap();

        std::fs::write(d.0.join("vocab.json"), "{\"a\": ").unwrap();
        let err = ModaTokenizer::from_dir(&d.0).unwrap_err();
        assert!(err.to_string().contains("vocab.json"), "{err}");
        std::fs::write(d.0.join("vocab.json"), r#"{"a": -1}"#).unwrap();
        let err = ModaTokenizer::from_dir(&d.0).unwrap_err();
        assert!(err.to_string().contains("vocab.json"), "{err}");

        tiny_dir(&d.0, true);
        std::fs::write(d.0.join("merges.txt"), "#version: 0.2\nh e\nbroken\n").unwrap();
        let err = ModaTokenizer::from_dir(&d.0).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("merges.txt") && msg.contains("line 3"),
            "{msg}"
        );
        std::fs::write(d.0.join("merges.txt"), "#version: 0.2\nq z\n").unwrap();
        let err = ModaTokenizer::from_dir(&d.0).unwrap_err();
        assert!(err.to_string().contains("merges.txt"), "{err}");
    }

    #[test]
    fn a_panicking_decoder_is_an_error() {
        // The `tokenizers` crate's Strip decoder indexes before the start of a token made only
        // of its `content` when `stop` is longer than the token.
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Strip", "content": "a", "start": 0, "stop": 5},
            "model": {"type": "WordLevel", "vocab": {"</s>": 0, "a": 1}, "unk_token": "</s>"},
        });
        let tok = ModaTokenizer::from_tokenizer_json_bytes(
            json.to_string().as_bytes(),
            Path::new("strip/tokenizer.json"),
        )
        .unwrap();
        assert_eq!(tok.source(), Path::new("strip/tokenizer.json"));
        let err = tok.decode(&[1], false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("strip/tokenizer.json") && msg.contains("the tokenizer failed"),
            "{msg}"
        );
    }
}
