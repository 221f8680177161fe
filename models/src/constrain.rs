//! Decoding constrained to a caption schema: the decoder may only write descriptions that
//! fit the template, with the template's literal text and, in each field, one of the values
//! the schema knows ([`crate::schema`]).
//!
//! The constraint works on the **bytes of the text**, not on one tokenization of it. The
//! captions a schema allows form a small automaton: the template's pieces in order, a literal
//! piece a fixed byte string, a field a byte trie of its values (an optional leading space
//! is allowed before the first piece). A token is allowed when its bytes keep the text inside
//! that automaton; `</s>` is allowed once the caption is complete, and then nothing else. So
//! every token sequence whose text fits the schema is allowed (a model that spells a value
//! over unusual tokens is not pushed off its path), and a search constrained this way gives
//! the same tokens as the free search whenever the free search's text already fits. The
//! allowed tokens of a state are found by walking a byte trie of the whole vocabulary
//! alongside the automaton, which visits only the few token prefixes the automaton accepts.
//!
//! **Forced runs.** Where the text that must come next is determined (the template's literal
//! text; the rest of a value once only one value fits; the `</s>` after a complete caption),
//! [`Constraint::forced`] gives its tokens as the tokenizer would write them, so that the
//! search feeds them to the decoder in one multi-token step instead of one step per token.
//! Only whole pre-tokenizer pieces are forced (the BPE never merges across them), except at
//! the end of the caption, where nothing follows: the last piece of a determined text could
//! still merge with what comes after it. With OPT's tokenizer, `Blue Casual Jeans for Men`
//! after `Blue Casual` forces ` Jeans` and ` for` once `Jeans` is the only value that fits.

use crate::generate::Constrain;
use crate::schema::{CaptionSchema, Piece};
use crate::tokenizer::{ModaTokenizer, TokenBytes};

/// Why a schema cannot constrain decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the caption schema cannot constrain decoding: {0}")]
pub struct ConstraintError(pub String);

/// The longest text a forced run looks ahead, in bytes.
const MAX_FORCED_BYTES: usize = 4096;

/// A byte trie in flat arrays: node `n`'s children (sorted by byte) are
/// `child_bytes[child_starts[n]..child_starts[n + 1]]` with their nodes at the same places of
/// `child_nodes`, and what ends at node `n` is `ends[end_starts[n]..end_starts[n + 1]]`. Built
/// at once from every key (a vocabulary of 50k tokens takes a few milliseconds and no
/// allocation per node). Node 0 is the root.
#[derive(Debug, Clone)]
struct Trie<T> {
    child_starts: Vec<u32>,
    child_bytes: Vec<u8>,
    child_nodes: Vec<u32>,
    end_starts: Vec<u32>,
    ends: Vec<T>,
}

impl<T: Copy> Trie<T> {
    /// The trie of `keys`: each key's bytes and what ends there. Items that end at the same
    /// node keep the order of `keys`.
    fn build(keys: &[(&[u8], T)]) -> Self {
        // Breadth first: node `i` covers `order[lo..hi]`, the keys that start with its `depth`
        // bytes; sorting that range by the byte at `depth` (keys that end there first) groups
        // its children, which become the next nodes in order, so children are contiguous.
        let mut order: Vec<u32> = (0..keys.len() as u32).collect();
        let mut nodes: Vec<(usize, usize, usize)> = vec![(0, keys.len(), 0)];
        let mut trie = Self {
            child_starts: vec![0],
            child_bytes: Vec::new(),
            child_nodes: Vec::new(),
            end_starts: vec![0],
            ends: Vec::new(),
        };
        let byte_at = |k: u32, depth: usize| -> u16 {
            keys[k as usize]
                .0
                .get(depth)
                .map_or(0, |&b| u16::from(b) + 1)
        };
        let mut i = 0;
        while i < nodes.len() {
            let (lo, hi, depth) = nodes[i];
            let range = &mut order[lo..hi];
            // Stable, so the items of one key stay in order.
            range.sort_by_key(|&k| byte_at(k, depth));
            let mut j = lo;
            while j < hi && byte_at(order[j], depth) == 0 {
                trie.ends.push(keys[order[j] as usize].1);
                j += 1;
            }
            while j < hi {
                let b = byte_at(order[j], depth);
                let first = j;
                while j < hi && byte_at(order[j], depth) == b {
                    j += 1;
                }
                trie.child_bytes.push((b - 1) as u8);
                trie.child_nodes.push(nodes.len() as u32);
                nodes.push((first, j, depth + 1));
            }
            trie.child_starts.push(trie.child_bytes.len() as u32);
            trie.end_starts.push(trie.ends.len() as u32);
            i += 1;
        }
        trie
    }
}

impl<T> Trie<T> {
    /// Node `n`'s children: their bytes (sorted) and their nodes.
    fn children(&self, n: usize) -> (&[u8], &[u32]) {
        let (a, b) = (
            self.child_starts[n] as usize,
            self.child_starts[n + 1] as usize,
        );
        (&self.child_bytes[a..b], &self.child_nodes[a..b])
    }

    /// What ends at node `n`.
    fn ends(&self, n: usize) -> &[T] {
        &self.ends[self.end_starts[n] as usize..self.end_starts[n + 1] as usize]
    }

    fn child(&self, n: usize, b: u8) -> Option<usize> {
        let (bytes, nodes) = self.children(n);
        bytes.binary_search(&b).ok().map(|i| nodes[i] as usize)
    }
}

/// One piece of the automaton.
#[derive(Debug, Clone)]
enum Part {
    Text(Vec<u8>),
    /// A field's values: a trie whose nodes end the value with that index.
    Field(Trie<u32>),
}

/// Where the automaton may be: before the optional leading space, inside part `part` (at
/// byte `at` of a literal, or trie node `at` of a field), or past the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Pos {
    Lead,
    At { part: u32, at: u32 },
    End,
}

/// A row's place in the constrained text: the automaton's positions (a value can be a prefix
/// of another, so there can be several) and the text generated so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstraintState {
    pos: Vec<Pos>,
    text: Vec<u8>,
}

impl ConstraintState {
    /// Whether the text is a complete caption (only `</s>` may follow).
    pub fn is_complete(&self) -> bool {
        self.pos == [Pos::End]
    }

    /// The bytes generated so far.
    pub fn text(&self) -> &[u8] {
        &self.text
    }
}

/// A caption schema compiled against a tokenizer, built once per model; see the module
/// documentation.
#[derive(Debug, Clone)]
pub struct Constraint {
    parts: Vec<Part>,
    /// Every token's bytes (by id), in a trie for the allowed-token walk.
    vocab: Trie<u32>,
    token_bytes: TokenBytes,
    eos: u32,
    tokenizer: ModaTokenizer,
}

impl Constraint {
    /// Compiles `schema` for `tokenizer`, whose end-of-sequence token is `eos`. Every field
    /// must list at least one value (a field that takes any text cannot be constrained).
    pub fn new(
        schema: &CaptionSchema,
        tokenizer: &ModaTokenizer,
        eos: u32,
    ) -> Result<Self, ConstraintError> {
        schema.validate().map_err(ConstraintError)?;
        let mut parts = Vec::new();
        for piece in schema.template.pieces() {
            match piece {
                Piece::Text(t) => parts.push(Part::Text(t.as_bytes().to_vec())),
                Piece::Field(name) => {
                    let field = schema
                        .field(name)
                        .ok_or_else(|| ConstraintError(format!("no field named {name:?}")))?;
                    if field.values.is_empty() {
                        return Err(ConstraintError(format!(
                            "the field {name:?} lists no values"
                        )));
                    }
                    let keys: Vec<(&[u8], u32)> = field
                        .values
                        .iter()
                        .enumerate()
                        .map(|(i, v)| (v.value.as_bytes(), i as u32))
                        .collect();
                    parts.push(Part::Field(Trie::build(&keys)));
                }
            }
        }
        let token_bytes = tokenizer.token_bytes();
        let keys: Vec<(&[u8], u32)> = token_bytes
            .iter()
            .filter_map(|(id, bytes)| Some((bytes.filter(|b| !b.is_empty())?, id)))
            .collect();
        let vocab = Trie::build(&keys);
        Ok(Self {
            parts,
            vocab,
            token_bytes,
            eos,
            tokenizer: tokenizer.clone(),
        })
    }

    /// The state before the first generated token.
    pub fn start(&self) -> ConstraintState {
        ConstraintState {
            pos: self.closure(vec![Pos::Lead, Pos::At { part: 0, at: 0 }]),
            text: Vec::new(),
        }
    }

    /// The bytes of token `id` (`None` for special tokens and ids outside the tokenizer).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id)
    }

    /// The tokens allowed after `state`, in no particular order: every token whose bytes keep
    /// the text inside the schema, and `</s>` when the caption is complete.
    pub fn allowed(&self, state: &ConstraintState) -> Vec<u32> {
        let mut out = Vec::new();
        if state.pos.contains(&Pos::End) {
            out.push(self.eos);
        }
        let mut stack = vec![(0usize, state.pos.clone())];
        while let Some((node, pos)) = stack.pop() {
            let (bytes, children) = self.vocab.children(node);
            for (&b, &child) in bytes.iter().zip(children) {
                let next = self.step(&pos, b);
                if next.is_empty() {
                    continue;
                }
                let child = child as usize;
                out.extend_from_slice(self.vocab.ends(child));
                if !self.vocab.children(child).0.is_empty() {
                    stack.push((child, next));
                }
            }
        }
        out
    }

    /// The state after `token`, `None` when the token is not allowed there.
    pub fn advance(&self, state: &ConstraintState, token: u32) -> Option<ConstraintState> {
        if token == self.eos {
            return state.pos.contains(&Pos::End).then(|| ConstraintState {
                pos: vec![Pos::End],
                text: state.text.clone(),
            });
        }
        let bytes = self.token_bytes(token).filter(|b| !b.is_empty())?;
        let mut pos = state.pos.clone();
        for &b in bytes {
            pos = self.step(&pos, b);
            if pos.is_empty() {
                return None;
            }
        }
        let mut text = state.text.clone();
        text.extend_from_slice(bytes);
        Some(ConstraintState { pos, text })
    }

    /// The tokens that must come next after `state` (see the module documentation): the
    /// tokenizer's tokens of the determined text that follows, whole pre-tokenizer pieces
    /// only unless the caption ends there, then `</s>` when it does. Empty when the next text
    /// is not determined (or cannot be tokenized back to exactly its bytes).
    pub fn forced(&self, state: &ConstraintState) -> Vec<u32> {
        let mut pos = state.pos.clone();
        let mut next = Vec::new();
        let complete = loop {
            if pos == [Pos::End] {
                break true;
            }
            if pos.contains(&Pos::End) || next.len() >= MAX_FORCED_BYTES {
                break false;
            }
            match self.next_bytes(&pos)[..] {
                [b] => {
                    pos = self.step(&pos, b);
                    next.push(b);
                }
                _ => break false,
            }
        };
        if next.is_empty() {
            return if complete { vec![self.eos] } else { Vec::new() };
        }
        let done = state.text.len();
        let mut full = state.text.clone();
        full.extend_from_slice(&next);
        let Ok(full) = String::from_utf8(full) else {
            return Vec::new();
        };
        if !full.is_char_boundary(done) {
            return Vec::new();
        }
        let starts = self.tokenizer.piece_starts(&full);
        // Force up to the end of the text when the caption ends there, else up to the start
        // of the text's last piece (which could merge with what follows).
        let end = if complete {
            full.len()
        } else {
            match starts.last() {
                Some(&s) if s > done => s,
                _ => return Vec::new(),
            }
        };
        // Tokenize from the start of the piece the generated text ends in, and keep the
        // tokens after it: they continue the piece as the tokenizer would.
        let from = starts
            .iter()
            .copied()
            .filter(|&s| s <= done)
            .max()
            .unwrap_or(0);
        let Some(text) = full.get(from..end) else {
            return Vec::new();
        };
        let Ok(ids) = self.tokenizer.encode_no_bos(text) else {
            return Vec::new();
        };
        let mut at = from;
        let mut out = Vec::new();
        for id in ids {
            let Some(bytes) = self.token_bytes(id) else {
                return Vec::new();
            };
            if at >= done {
                out.push(id);
            } else if at + bytes.len() > done {
                // A token straddles the end of the generated text: the generated tokens are
                // not the tokenizer's for this piece; force nothing.
                return Vec::new();
            }
            at += bytes.len();
        }
        // The forced tokens must spell exactly the determined text.
        let spelled: Vec<u8> = out
            .iter()
            .filter_map(|&id| self.token_bytes(id))
            .flatten()
            .copied()
            .collect();
        if at != end || spelled != full.as_bytes()[done..end] {
            return Vec::new();
        }
        if complete {
            out.push(self.eos);
        }
        out
    }

    /// The bytes that can come next from `pos`, sorted, without duplicates.
    fn next_bytes(&self, pos: &[Pos]) -> Vec<u8> {
        let mut out = Vec::new();
        for &p in pos {
            match p {
                Pos::Lead => out.push(b' '),
                Pos::End => {}
                Pos::At { part, at } => match &self.parts[part as usize] {
                    Part::Text(t) => out.extend(t.get(at as usize).copied()),
                    Part::Field(trie) => out.extend_from_slice(trie.children(at as usize).0),
                },
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The positions after byte `b` (empty when `b` cannot come next).
    fn step(&self, pos: &[Pos], b: u8) -> Vec<Pos> {
        let mut out = Vec::with_capacity(pos.len());
        for &p in pos {
            match p {
                Pos::Lead => {
                    if b == b' ' {
                        out.push(Pos::At { part: 0, at: 0 });
                    }
                }
                Pos::End => {}
                Pos::At { part, at } => match &self.parts[part as usize] {
                    Part::Text(t) => {
                        if t.get(at as usize) == Some(&b) {
                            out.push(Pos::At { part, at: at + 1 });
                        }
                    }
                    Part::Field(trie) => {
                        if let Some(c) = trie.child(at as usize, b) {
                            out.push(Pos::At { part, at: c as u32 });
                        }
                    }
                },
            }
        }
        if out.is_empty() {
            return out;
        }
        self.closure(out)
    }

    /// Adds the positions reachable without a byte (the end of a literal or of a value is
    /// the start of the next part; past the last part is the end), sorted, without
    /// duplicates.
    fn closure(&self, mut pos: Vec<Pos>) -> Vec<Pos> {
        let mut i = 0;
        while i < pos.len() {
            if let Pos::At { part, at } = pos[i] {
                let next = if part as usize == self.parts.len() {
                    pos[i] = Pos::End;
                    None
                } else {
                    match &self.parts[part as usize] {
                        Part::Text(t) if at as usize == t.len() => Some(part + 1),
                        Part::Field(trie) if !trie.ends(at as usize).is_empty() => Some(part + 1),
                        _ => None,
                    }
                };
                if let Some(part) = next {
                    let p = if part as usize == self.parts.len() {
                        Pos::End
                    } else {
                        Pos::At { part, at: 0 }
                    };
                    if !pos.contains(&p) {
                        pos.push(p);
                    }
                }
            }
            i += 1;
        }
        // A literal fully matched is the next part's start, not a position of its own, and
        // a value that no other value extends is finished.
        pos.retain(|p| match *p {
            Pos::At { part, at } => match &self.parts[part as usize] {
                Part::Text(t) => (at as usize) < t.len(),
                Part::Field(trie) => !trie.children(at as usize).0.is_empty(),
            },
            _ => true,
        });
        pos.sort_unstable();
        pos.dedup();
        pos
    }
}

/// The constraint a search runs under for `mode`: `available` is what the runner has (`None`
/// without a schema, an error when its schema cannot constrain). [`Constrain::Auto`] takes
/// it when there is one; [`Constrain::Schema`] requires it.
pub fn resolve(
    mode: Constrain,
    available: Option<&Result<Constraint, ConstraintError>>,
) -> Result<Option<&Constraint>, ConstraintError> {
    match (mode, available) {
        (Constrain::None, _) | (Constrain::Auto, None | Some(Err(_))) => Ok(None),
        (_, Some(Ok(c))) => Ok(Some(c)),
        (Constrain::Schema, Some(Err(e))) => Err(e.clone()),
        (Constrain::Schema, None) => Err(ConstraintError(
            "the model has no caption schema (a bundle's moda.json \"schema\", a checkpoint's \
             config.json \"schema\")"
                .into(),
        )),
    }
}

/// The values of one field that fit text read from the field's start: those the text is a
/// prefix of, or that the text starts with when what follows the value could be the
/// template's literal text. Used for the alternatives of an attribute.
pub fn values_fitting<'s>(schema: &'s CaptionSchema, field: &str, text: &str) -> Vec<&'s str> {
    let Some(f) = schema.field(field) else {
        return Vec::new();
    };
    let after = literal_after(schema, field).unwrap_or_default();
    f.values
        .iter()
        .map(|v| v.value.as_str())
        .filter(|v| {
            if v.starts_with(text) {
                return true;
            }
            match text.strip_prefix(v) {
                Some(rest) => after.starts_with(rest) || (after.is_empty() && rest.is_empty()),
                None => false,
            }
        })
        .collect()
}

/// The literal text that follows the first use of `field` in the template.
fn literal_after(schema: &CaptionSchema, field: &str) -> Option<String> {
    let pieces = schema.template.pieces();
    let i = pieces
        .iter()
        .position(|p| matches!(p, Piece::Field(f) if f == field))?;
    match pieces.get(i + 1) {
        Some(Piece::Text(t)) => Some(t.clone()),
        _ => None,
    }
}

/// A real tokenizer and a schema for the tests of the constraint and of the search.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::schema::{CaptionTemplate, FieldSchema, ValueCount};

    /// The byte-level BPE of the test fixtures (trained on captions of the default template).
    pub(crate) fn tokenizer() -> ModaTokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tokenizer/tokenizer.json");
        ModaTokenizer::from_tokenizer_json(&path).expect("fixture tokenizer")
    }

    /// The default template, with values that have spaces and prefixes of each other.
    pub(crate) fn schema() -> CaptionSchema {
        let values = |vs: &[&str]| {
            vs.iter()
                .map(|v| ValueCount {
                    value: v.to_string(),
                    count: 1,
                })
                .collect()
        };
        let fields = [
            (
                "Colour",
                &["Blue", "Navy Blue", "Black", "White", "Off White"][..],
            ),
            ("Usage", &["Casual", "Smart Casual", "Formal", "Sports"][..]),
            (
                "ProductType",
                &["Jeans", "Shoes", "Casual Shoes", "Tshirts", "Sports Shoes"][..],
            ),
            ("Gender", &["Men", "Women", "Boys", "Girls"][..]),
            ("Category", &["Apparel", "Footwear"][..]),
            ("SubCategory", &["Bottomwear", "Topwear", "Shoes"][..]),
        ];
        CaptionSchema {
            template: CaptionTemplate::default(),
            fields: fields
                .iter()
                .map(|(name, vs)| FieldSchema {
                    name: name.to_string(),
                    values: values(vs),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{schema, tokenizer};
    use super::*;

    fn captions(schema: &CaptionSchema) -> Vec<String> {
        // Every value of every field appears; the other fields cycle.
        let mut out = Vec::new();
        let longest = schema
            .fields
            .iter()
            .map(|f| f.values.len())
            .max()
            .unwrap_or(0);
        for i in 0..longest * 3 {
            let text = schema
                .template
                .render(|name| {
                    let f = schema.field(name)?;
                    Some(
                        f.values[(i * 7 / 3 + name.len()) % f.values.len()]
                            .value
                            .as_str(),
                    )
                })
                .expect("render");
            out.push(text);
        }
        for f in &schema.fields {
            for v in &f.values {
                out.push(
                    schema
                        .template
                        .render(|name| {
                            let g = schema.field(name)?;
                            Some(if name == f.name {
                                &v.value
                            } else {
                                &g.values[0].value
                            })
                        })
                        .expect("render"),
                );
            }
        }
        out
    }

    /// Follows `key` from the root, `None` where the trie has no such path.
    fn walk<T>(trie: &Trie<T>, key: &[u8]) -> Option<usize> {
        key.iter().try_fold(0, |n, &b| trie.child(n, b))
    }

    #[test]
    fn the_flat_trie_holds_every_key_and_only_its_prefixes() {
        // Shared prefixes, a key that is a prefix of others, the empty key, a repeated key
        // (its items in order) and bytes at both ends of the range.
        let keys: Vec<(&[u8], u32)> = vec![
            (b"car", 0),
            (b"cart", 1),
            (b"", 2),
            (b"ca", 3),
            (b"dog", 4),
            (b"car", 5),
            (&[0x00, 0xff], 6),
            (&[0xff], 7),
            (b"cat", 8),
        ];
        let trie = Trie::build(&keys);
        let mut prefixes: Vec<&[u8]> = keys
            .iter()
            .flat_map(|(k, _)| (0..=k.len()).map(|n| &k[..n]))
            .collect();
        prefixes.sort();
        prefixes.dedup();
        // One node per distinct prefix.
        assert_eq!(trie.child_starts.len() - 1, prefixes.len());
        for p in &prefixes {
            let n = walk(&trie, p).unwrap_or_else(|| panic!("{p:?} not found"));
            let want: Vec<u32> = keys
                .iter()
                .filter(|(k, _)| k == p)
                .map(|&(_, v)| v)
                .collect();
            assert_eq!(trie.ends(n), want, "ends of {p:?}");
            // Children sorted, one per next byte of the keys that extend the prefix.
            let mut next: Vec<u8> = keys
                .iter()
                .filter(|(k, _)| k.len() > p.len() && k.starts_with(p))
                .map(|(k, _)| k[p.len()])
                .collect();
            next.sort();
            next.dedup();
            assert_eq!(trie.children(n).0, next, "children of {p:?}");
        }
        for absent in [&b"c"[..], b"cb", b"carts", b"d0", &[0x00], &[0xff, 0x00]] {
            let found = walk(&trie, absent);
            assert_eq!(found.is_some(), prefixes.contains(&absent), "{absent:?}");
        }
        assert_eq!(walk(&trie, b"carts"), None);
        let empty = Trie::<u32>::build(&[]);
        assert_eq!(empty.children(0).0, &[] as &[u8]);
        assert_eq!(empty.ends(0), &[] as &[u32]);
    }

    #[test]
    fn every_caption_of_the_schema_is_allowed_token_by_token() {
        let tok = tokenizer();
        let schema = schema();
        let c = Constraint::new(&schema, &tok, tok.eos_id()).expect("constraint");
        for text in captions(&schema) {
            let ids = tok.encode_no_bos(&text).expect("encode");
            let mut state = c.start();
            for &id in &ids {
                let allowed = c.allowed(&state);
                assert!(allowed.contains(&id), "{text:?}: token {id} in {allowed:?}");
                assert!(
                    !allowed.contains(&tok.eos_id()),
                    "{text:?}: eos in {allowed:?}"
                );
                state = c.advance(&state, id).expect("advance");
            }
            assert!(state.is_complete(), "{text:?}");
            assert_eq!(c.allowed(&state), vec![tok.eos_id()], "{text:?}");
            assert_eq!(state.text(), text.as_bytes());
            // The parse of a constrained text gives every field a known value.
            let parsed = schema.parse(&text);
            assert!(parsed.values().all(Option::is_some), "{text:?}: {parsed:?}");
        }
    }

    #[test]
    fn text_outside_the_schema_is_refused() {
        let tok = tokenizer();
        let schema = schema();
        let c = Constraint::new(&schema, &tok, tok.eos_id()).expect("constraint");
        for bad in [
            "Purple Casual Jeans for Men - Apparel Bottomwear",
            "Blue Casual Jeans for Men Apparel Bottomwear",
            "Blue Casual Jeans for Men - Apparel Bottomwear Topwear",
            "Blue  Casual Jeans for Men - Apparel Bottomwear",
        ] {
            let ids = tok.encode_no_bos(bad).expect("encode");
            let mut state = Some(c.start());
            for &id in &ids {
                state = state.and_then(|s| c.advance(&s, id));
            }
            let complete = state.as_ref().is_some_and(ConstraintState::is_complete);
            assert!(!complete, "{bad:?} was accepted");
        }
        // `</s>` before the caption is complete is not allowed.
        let state = c.start();
        assert!(c.advance(&state, tok.eos_id()).is_none());
        // A field without values cannot be constrained.
        let mut open = schema.clone();
        open.fields[2].values.clear();
        let e = Constraint::new(&open, &tok, tok.eos_id()).expect_err("no values");
        assert!(e.to_string().contains("ProductType"), "{e}");
    }

    /// Follows `text`'s tokens, taking forced runs whole: returns the tokens and how many were
    /// chosen (not forced).
    fn follow(c: &Constraint, tok: &ModaTokenizer, text: &str) -> (Vec<u32>, usize) {
        let target = tok.encode_no_bos(text).expect("encode");
        let mut out = Vec::new();
        let mut chosen = 0;
        let mut state = c.start();
        while out.len() <= target.len() {
            let forced = c.forced(&state);
            if forced.is_empty() {
                let next = target.get(out.len()).copied().unwrap_or(tok.eos_id());
                assert!(c.allowed(&state).contains(&next), "{text:?}");
                state = c.advance(&state, next).expect("allowed");
                out.push(next);
                chosen += 1;
                if next == tok.eos_id() {
                    break;
                }
                continue;
            }
            for t in forced {
                out.push(t);
                if t == tok.eos_id() {
                    return (out, chosen);
                }
                state = c.advance(&state, t).expect("forced token allowed");
            }
        }
        (out, chosen)
    }

    #[test]
    fn forced_runs_are_the_tokenizers_tokens() {
        let tok = tokenizer();
        let schema = schema();
        let c = Constraint::new(&schema, &tok, tok.eos_id()).expect("constraint");
        for text in captions(&schema) {
            let (got, chosen) = follow(&c, &tok, &text);
            let mut want = tok.encode_no_bos(&text).expect("encode");
            want.push(tok.eos_id());
            assert_eq!(got, want, "{text:?}");
            // The literal text (" for", " -") and the final `</s>` at least are forced.
            assert!(
                chosen + 3 <= got.len(),
                "{text:?}: {chosen} of {}",
                got.len()
            );
        }
    }

    #[test]
    fn forced_text_stops_where_the_next_piece_could_merge() {
        let tok = tokenizer();
        let schema = schema();
        let c = Constraint::new(&schema, &tok, tok.eos_id()).expect("constraint");
        // After "Blue Casual Jeans" the text " for " is determined, but its last space
        // belongs to the Gender's first token (" Men"): only " for" is forced.
        let mut state = c.start();
        for id in tok.encode_no_bos("Blue Casual Jeans").expect("encode") {
            state = c.advance(&state, id).expect("advance");
        }
        let forced = c.forced(&state);
        let text = tok.decode(&forced, false).expect("decode");
        assert_eq!(text, " for");
        // "Navy" can only be "Navy Blue": " Blue" is forced with the literal after it.
        let mut state = c.start();
        for id in tok.encode_no_bos("Navy").expect("encode") {
            state = c.advance(&state, id).expect("advance");
        }
        assert_eq!(
            tok.decode(&c.forced(&state), false).expect("decode"),
            " Blue"
        );
    }

    #[test]
    fn values_fitting_reads_a_fields_text() {
        let schema = schema();
        assert_eq!(values_fitting(&schema, "Colour", "Navy"), vec!["Navy Blue"]);
        assert_eq!(
            values_fitting(&schema, "Colour", "Bl"),
            vec!["Blue", "Black"]
        );
        assert_eq!(values_fitting(&schema, "Colour", "Blue "), vec!["Blue"]);
        assert!(values_fitting(&schema, "Colour", "Purple").is_empty());
        assert_eq!(
            values_fitting(&schema, "ProductType", "Casual"),
            vec!["Casual Shoes"]
        );
    }

    #[test]
    fn resolve_follows_the_mode() {
        let tok = tokenizer();
        let c = Constraint::new(&schema(), &tok, tok.eos_id());
        assert!(resolve(Constrain::Auto, Some(&c)).expect("auto").is_some());
        assert!(resolve(Constrain::None, Some(&c)).expect("none").is_none());
        assert!(resolve(Constrain::Auto, None).expect("auto").is_none());
        assert!(resolve(Constrain::Schema, None).is_err());
        let bad = Err(ConstraintError("x".into()));
        assert!(resolve(Constrain::Auto, Some(&bad))
            .expect("auto")
            .is_none());
        assert!(resolve(Constrain::Schema, Some(&bad)).is_err());
    }
}
