//! The caption schema: how a description is built from a product's attributes, and which
//! values each attribute took in training. It travels with the model (the trainer records it
//! in the checkpoint's `config.json`, the exporter copies it into the bundle's `moda.json`) so
//! that whoever runs the model can read a description back into attributes with the one parser
//! of the workspace, [`CaptionSchema::parse`].
//!
//! - [`CaptionTemplate`]: text with `{Field}` placeholders (`{{` and `}}` are literal braces),
//!   e.g. `{Colour} {Usage} {ProductType} for {Gender} - {Category} {SubCategory}`; it fills
//!   captions from catalog rows ([`CaptionTemplate::render`]) and is stored as that string.
//! - [`CaptionSchema`]: a template and, per field, the values seen in training with how often
//!   each was seen ([`FieldSchema`]). A field's value list is a closed vocabulary, so that a
//!   token trie per field can be built from it.
//!
//! Reading a description back ([`CaptionSchema::parse`]) is ambiguous when values contain
//! spaces or one value is a prefix of another (`Navy Blue` / `Blue`, `Smart Casual` /
//! `Casual`). The rule: the description is first matched with every field restricted to its
//! known values, fields taken left to right, each trying its known values longest first and
//! backing off only when the rest of the text does not fit (leftmost-longest). If no such
//! reading exists, the literal text of the template is matched with each field taking any
//! non-empty text (known values first, then the shortest text that lets the rest fit), and a
//! field whose text is then not one of its known values is `None`: a description never yields
//! a value outside the schema. A field for which the schema has no values (a catalog column
//! with none recorded) takes its text as it is.
//!
//! A text that fits neither way may stop partway through the template (the token limit or a
//! stop string cut it, or the model ended it early): it is then read as the start of a
//! caption, first with known values only, then with any text as before, and a field is read
//! only where the template's literal text after it follows it in full (`Blue Casual Sho` gives
//! `Colour` and `Usage`; `Blue Casual Shoes` gives them too, since `Shoes` may be the start
//! of a longer value, and `Blue Casual Shoes for` adds `ProductType`). A field with no literal
//! text after it is never read from such a text, and a text whose beginning does not fit the
//! template's literal parts yields `None` for every field.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// The template of the original recipe's captions.
pub const DEFAULT_TEMPLATE: &str =
    "{Colour} {Usage} {ProductType} for {Gender} - {Category} {SubCategory}";

/// A malformed caption template, or a schema that does not agree with its template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("caption template {template:?}: {msg}")]
pub struct TemplateError {
    /// The template.
    pub template: String,
    /// What is wrong.
    pub msg: String,
}

/// One piece of a template: literal text or a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Literal text, braces unescaped.
    Text(String),
    /// A `{Field}` placeholder (the name trimmed).
    Field(String),
}

/// A caption template: text with `{Field}` placeholders; `{{` and `}}` are literal braces.
/// Serialised as the template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionTemplate {
    source: String,
    pieces: Vec<Piece>,
}

impl CaptionTemplate {
    /// Parses a template. An unclosed `{`, an empty `{}`, a `{` inside a placeholder, a lone
    /// `}` or a template without any placeholder is an error.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let bad = |msg: &str| TemplateError {
            template: template.to_string(),
            msg: msg.to_string(),
        };
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') => return Err(bad("`{` inside a placeholder")),
                            Some(c) => name.push(c),
                            None => return Err(bad("unclosed `{`")),
                        }
                    }
                    let name = name.trim().to_string();
                    if name.is_empty() {
                        return Err(bad("empty placeholder `{}`"));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Field(name));
                }
                '}' => return Err(bad("`}` without `{` (write `}}` for a literal brace)")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Field(_))) {
            return Err(bad("no `{Column}` placeholder"));
        }
        Ok(Self {
            source: template.to_string(),
            pieces,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The literal texts and fields, in order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The fields the template uses, in order of first use.
    pub fn columns(&self) -> Vec<&str> {
        let mut seen = Vec::new();
        for p in &self.pieces {
            if let Piece::Field(c) = p {
                if !seen.contains(&c.as_str()) {
                    seen.push(c.as_str());
                }
            }
        }
        seen
    }

    /// Fills the template from `get(field)`; `Err` names the first field that has no value
    /// (`None` or empty once trimmed).
    pub fn render<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(c) => match get(c).map(str::trim) {
                    Some(v) if !v.is_empty() => out.push_str(v),
                    _ => return Err(c.clone()),
                },
            }
        }
        Ok(out)
    }
}

impl Default for CaptionTemplate {
    fn default() -> Self {
        // The default template is a valid literal; build it without a fallible path.
        let field = |s: &str| Piece::Field(s.to_string());
        let text = |s: &str| Piece::Text(s.to_string());
        Self {
            source: DEFAULT_TEMPLATE.to_string(),
            pieces: vec![
                field("Colour"),
                text(" "),
                field("Usage"),
                text(" "),
                field("ProductType"),
                text(" for "),
                field("Gender"),
                text(" - "),
                field("Category"),
                text(" "),
                field("SubCategory"),
            ],
        }
    }
}

impl std::fmt::Display for CaptionTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl Serialize for CaptionTemplate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for CaptionTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A value of a field and how many training captions had it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueCount {
    /// The value, as it appears in captions.
    pub value: String,
    /// Training captions with it.
    pub count: u64,
}

/// One field of a schema: its name (the template's placeholder) and its known values, most
/// frequent first (ties by value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSchema {
    /// The placeholder's name, e.g. `Colour`.
    pub name: String,
    /// The values seen in training with their counts; empty when none were recorded (the
    /// field then takes any text).
    #[serde(default)]
    pub values: Vec<ValueCount>,
}

impl FieldSchema {
    /// Whether `value` is one of the field's known values.
    pub fn knows(&self, value: &str) -> bool {
        self.values.iter().any(|v| v.value == value)
    }
}

/// A field's value read from a description by [`CaptionSchema::parse`].
pub type Attributes = BTreeMap<String, Option<String>>;

/// The most values a schema may list over all fields, and the longest value: a bundle's
/// schema comes from anywhere and is parsed on every description.
pub const MAX_SCHEMA_VALUES: usize = 1 << 16;
/// The longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024;

/// A caption template and the values each of its fields took in training; see the module
/// documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptionSchema {
    /// The template captions are made with.
    pub template: CaptionTemplate,
    /// One entry per field of the template, in the template's order.
    pub fields: Vec<FieldSchema>,
}

impl CaptionSchema {
    /// A schema with no recorded values: every field takes any text.
    pub fn from_template(template: CaptionTemplate) -> Self {
        let fields = template
            .columns()
            .into_iter()
            .map(|name| FieldSchema {
                name: name.to_string(),
                values: Vec::new(),
            })
            .collect();
        Self { template, fields }
    }

    /// A schema whose values are counted from rows: `get(row, field)` gives a row's value
    /// (trimmed here; empty and missing values are not counted).
    pub fn from_rows<R>(
        template: CaptionTemplate,
        rows: impl IntoIterator<Item = R>,
        get: impl Fn(&R, &str) -> Option<String>,
    ) -> Self {
        let mut schema = Self::from_template(template);
        let mut counts: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); schema.fields.len()];
        for row in rows {
            for (f, c) in schema.fields.iter().zip(counts.iter_mut()) {
                if let Some(v) = get(&row, &f.name) {
                    let v = v.trim();
                    if !v.is_empty() {
                        *c.entry(v.to_string()).or_default() += 1;
                    }
                }
            }
        }
        for (f, c) in schema.fields.iter_mut().zip(counts) {
            f.values = c
                .into_iter()
                .map(|(value, count)| ValueCount { value, count })
                .collect();
            f.values
                .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.value.cmp(&b.value)));
        }
        schema
    }

    /// The field named `name`.
    pub fn field(&self, name: &str) -> Option<&FieldSchema> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Adds `value` to field `name` with a count of 0 unless it is known (used to read
    /// descriptions of a catalog with values training never saw).
    pub fn add_value(&mut self, name: &str, value: &str) {
        let value = value.trim();
        if value.is_empty() {
            return;
        }
        if let Some(f) = self.fields.iter_mut().find(|f| f.name == name) {
            if !f.knows(value) {
                f.values.push(ValueCount {
                    value: value.to_string(),
                    count: 0,
                });
            }
        }
    }

    /// Checks that the fields are exactly the template's, in its order, and that the values
    /// are non-empty, trimmed, distinct within a field and within the size limits.
    pub fn validate(&self) -> Result<(), String> {
        let columns = self.template.columns();
        let names: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
        if names != columns {
            return Err(format!(
                "the schema's fields ({}) are not the template's ({})",
                names.join(", "),
                columns.join(", ")
            ));
        }
        let total: usize = self.fields.iter().map(|f| f.values.len()).sum();
        if total > MAX_SCHEMA_VALUES {
            return Err(format!(
                "the schema lists {total} values; at most {MAX_SCHEMA_VALUES} are allowed"
            ));
        }
        for f in &self.fields {
            let mut seen = HashSet::new();
            for v in &f.values {
                if v.value.is_empty() || v.value.trim() != v.value {
                    return Err(format!(
                        "field {:?} has the value {:?}; values are non-empty and trimmed",
                        f.name, v.value
                    ));
                }
                if v.value.len() > MAX_VALUE_BYTES {
                    return Err(format!(
                        "field {:?} has a value of {} bytes; at most {MAX_VALUE_BYTES}",
                        f.name,
                        v.value.len()
                    ));
                }
                if !seen.insert(v.value.as_str()) {
                    return Err(format!(
                        "field {:?} lists the value {:?} twice",
                        f.name, v.value
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads a description back into its fields: every field of the template, each with its
    /// value or `None` (see the module documentation for the rule, and for a text that stops
    /// partway through the template). Surrounding white space of `text` is ignored.
    pub fn parse(&self, text: &str) -> Attributes {
        self.parse_spans(text)
            .into_iter()
            .map(|(name, span)| (name, span.map(|r| text[r].to_string())))
            .collect()
    }

    /// [`CaptionSchema::parse`], giving where each value is in `text` (byte ranges of `text`
    /// itself, surrounding white space included in the offsets) instead of the value; a field
    /// used twice in the template gives its first place.
    pub fn parse_spans(&self, text: &str) -> BTreeMap<String, Option<std::ops::Range<usize>>> {
        let start = text.len() - text.trim_start().len();
        let trimmed = text.trim();
        let mut out: BTreeMap<String, Option<std::ops::Range<usize>>> =
            self.fields.iter().map(|f| (f.name.clone(), None)).collect();
        let whole = Matcher::new(self, true, false)
            .run(trimmed)
            .or_else(|| Matcher::new(self, false, false).run(trimmed));
        let (found, prefix) = match whole {
            Some(found) => (Some(found), false),
            None => (
                Matcher::new(self, true, true)
                    .run(trimmed)
                    .or_else(|| Matcher::new(self, false, true).run(trimmed)),
                true,
            ),
        };
        if let Some(found) = found {
            for (name, (a, b)) in found {
                let value = &trimmed[a..b];
                let known = match self.field(&name) {
                    Some(f) => f.values.is_empty() || f.knows(value),
                    None => false,
                };
                let keep = known && (!prefix || self.closed(&name, &trimmed[b..]));
                if keep {
                    out.insert(name, Some(start + a..start + b));
                }
            }
        }
        out
    }

    /// Whether field `name`, its value read from the start of a text that stops partway
    /// through the template, is followed in `after` (the text after the value) by the whole
    /// literal text that follows the field's first place in the template (its trailing white
    /// space aside where the text ends with it; a literal of white space only must be there).
    fn closed(&self, name: &str, after: &str) -> bool {
        let pieces = self.template.pieces();
        let Some(at) = pieces
            .iter()
            .position(|p| matches!(p, Piece::Field(f) if f == name))
        else {
            return false;
        };
        let Some(Piece::Text(t)) = pieces.get(at + 1) else {
            return false;
        };
        // The text was trimmed: a literal it ends with may have lost its trailing white space.
        let lead = t.trim_end();
        after.starts_with(t.as_str()) || (!lead.is_empty() && after == lead)
    }
}

/// One backtracking match of a text against a schema's template; `strict` allows only known
/// values in the fields that have some; `prefix` lets the text end anywhere in the template
/// (at a piece, inside a literal, or inside a field's value: a field the text ends in is not
/// read). Failed (piece, offset) pairs are remembered, so that the work is bounded by pieces x
/// offsets x candidates.
struct Matcher<'a> {
    schema: &'a CaptionSchema,
    strict: bool,
    prefix: bool,
    failed: HashSet<(usize, usize)>,
    /// Whether failures may be remembered: not when a field appears twice, as whether the
    /// rest fits then depends on the value read the first time.
    memo: bool,
    /// Steps left: a schema comes from anywhere, and without the memo a template could make
    /// the search take exponential time; once spent, the text reads as not fitting.
    budget: usize,
}

/// The most steps one match may take (far more than any real caption needs).
const MATCH_BUDGET: usize = 1 << 21;

impl<'a> Matcher<'a> {
    fn new(schema: &'a CaptionSchema, strict: bool, prefix: bool) -> Self {
        let fields = schema
            .template
            .pieces()
            .iter()
            .filter(|p| matches!(p, Piece::Field(_)))
            .count();
        Self {
            schema,
            strict,
            prefix,
            failed: HashSet::new(),
            memo: fields == schema.template.columns().len(),
            budget: MATCH_BUDGET,
        }
    }

    /// Each field's (start, end) in `text`.
    fn run(mut self, text: &str) -> Option<BTreeMap<String, (usize, usize)>> {
        let mut out = BTreeMap::new();
        self.go(0, text, 0, &mut out).then_some(out)
    }

    /// The end offsets a field may take at `rest`: its known values that `rest` starts with,
    /// longest first; then, unless strict (or the field has no values), every other non-empty
    /// split at a character boundary, shortest first.
    fn candidates(&self, field: &str, rest: &str) -> Vec<usize> {
        let known = self.schema.field(field).map_or(&[][..], |f| &f.values[..]);
        let mut ends: Vec<usize> = known
            .iter()
            .filter(|v| rest.starts_with(v.value.as_str()))
            .map(|v| v.value.len())
            .collect();
        ends.sort_unstable_by(|a, b| b.cmp(a));
        ends.dedup();
        if !self.strict || known.is_empty() {
            let n = ends.len();
            for (i, _) in rest.char_indices().skip(1) {
                if !ends[..n].contains(&i) {
                    ends.push(i);
                }
            }
            if !rest.is_empty() && !ends[..n].contains(&rest.len()) {
                ends.push(rest.len());
            }
        }
        ends
    }

    /// Whether `rest`, the end of a text, may be the start of a value of `field`: of a known
    /// value, or of any text where the field takes any.
    fn ends_inside(&self, field: &str, rest: &str) -> bool {
        let known = self.schema.field(field).map_or(&[][..], |f| &f.values[..]);
        if !self.strict || known.is_empty() {
            return true;
        }
        known.iter().any(|v| v.value.starts_with(rest))
    }

    fn go(
        &mut self,
        piece: usize,
        text: &str,
        offset: usize,
        out: &mut BTreeMap<String, (usize, usize)>,
    ) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        let rest = &text[offset..];
        let Some(p) = self.schema.template.pieces().get(piece) else {
            return rest.is_empty();
        };
        if self.prefix && rest.is_empty() {
            // The text ends where this piece would start.
            return true;
        }
        if self.failed.contains(&(piece, offset)) {
            return false;
        }
        let ok = match p {
            Piece::Text(t) => {
                (rest.starts_with(t.as_str()) && self.go(piece + 1, text, offset + t.len(), out))
                    || (self.prefix && t.starts_with(rest))
            }
            Piece::Field(name) => {
                // A field used twice must read the same value both times.
                if let Some(&(a, b)) = out.get(name) {
                    let value = &text[a..b];
                    (rest.starts_with(value) && self.go(piece + 1, text, offset + b - a, out))
                        || (self.prefix && value.starts_with(rest))
                } else {
                    let name = name.clone();
                    let mut ok = false;
                    for end in self.candidates(&name, rest) {
                        out.insert(name.clone(), (offset, offset + end));
                        if self.go(piece + 1, text, offset + end, out) {
                            ok = true;
                            break;
                        }
                    }
                    if !ok {
                        out.remove(&name);
                        // The text may end inside this field's value (which is then not read).
                        ok = self.prefix && self.ends_inside(&name, rest);
                    }
                    ok
                }
            }
        };
        if !ok && self.memo {
            self.failed.insert((piece, offset));
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(values: &[(&str, &[&str])]) -> CaptionSchema {
        let mut s = CaptionSchema::from_template(CaptionTemplate::default());
        for (name, vals) in values {
            for v in *vals {
                s.add_value(name, v);
            }
        }
        s
    }

    fn demo() -> CaptionSchema {
        schema(&[
            ("Colour", &["Blue", "Navy Blue", "Navy"]),
            ("Usage", &["Casual", "Smart Casual", "Blue Casual"]),
            ("ProductType", &["Tshirts", "Casual Shoes", "Shoes"]),
            ("Gender", &["Men", "Women"]),
            ("Category", &["Apparel", "Footwear"]),
            ("SubCategory", &["Topwear", "Shoes"]),
        ])
    }

    fn get<'a>(a: &'a Attributes, k: &str) -> Option<&'a str> {
        a.get(k).and_then(|v| v.as_deref())
    }

    #[test]
    fn templates_parse_render_and_refuse_bad_ones() {
        let t = CaptionTemplate::parse(DEFAULT_TEMPLATE).expect("default");
        assert_eq!(t, CaptionTemplate::default());
        assert_eq!(
            t.columns(),
            [
                "Colour",
                "Usage",
                "ProductType",
                "Gender",
                "Category",
                "SubCategory"
            ]
        );
        let t = CaptionTemplate::parse("{{{Colour}}} { ProductType }!").expect("braces");
        let row = |c: &str| match c {
            "Colour" => Some("Blue"),
            "ProductType" => Some(" Jeans "),
            _ => None,
        };
        assert_eq!(t.render(row).expect("render"), "{Blue} Jeans!");
        assert_eq!(t.columns(), ["Colour", "ProductType"]);
        let t = CaptionTemplate::parse("{Colour} {Pattern}").expect("template");
        assert_eq!(t.render(row).expect_err("no pattern"), "Pattern");
        for bad in ["{Colour", "{} x", "x } y", "no placeholder", "{a{b}}"] {
            let e = CaptionTemplate::parse(bad).expect_err(bad);
            assert_eq!(e.template, bad);
        }
    }

    #[test]
    fn values_with_spaces_are_read_whole() {
        let a = demo().parse("Navy Blue Smart Casual Casual Shoes for Women - Footwear Shoes");
        assert_eq!(get(&a, "Colour"), Some("Navy Blue"));
        assert_eq!(get(&a, "Usage"), Some("Smart Casual"));
        assert_eq!(get(&a, "ProductType"), Some("Casual Shoes"));
        assert_eq!(get(&a, "Gender"), Some("Women"));
        assert_eq!(get(&a, "Category"), Some("Footwear"));
        assert_eq!(get(&a, "SubCategory"), Some("Shoes"));
        // Spans are byte ranges of the text as given.
        let text = "  Navy Blue Casual Tshirts for Men - Apparel Topwear";
        let spans = demo().parse_spans(text);
        assert_eq!(spans["Colour"], Some(2..11));
        assert_eq!(&text[spans["Usage"].clone().expect("usage")], "Casual");
        // Surrounding spaces do not matter.
        assert_eq!(
            demo().parse("  Blue Casual Tshirts for Men - Apparel Topwear \n"),
            demo().parse("Blue Casual Tshirts for Men - Apparel Topwear")
        );
    }

    #[test]
    fn ambiguous_prefixes_take_the_longest_known_value_that_lets_the_rest_fit() {
        // "Navy Blue Casual": Navy Blue + Casual, or Navy + Blue Casual; leftmost-longest
        // gives the first field its longest known value.
        let a = demo().parse("Navy Blue Casual Tshirts for Men - Apparel Topwear");
        assert_eq!(get(&a, "Colour"), Some("Navy Blue"));
        assert_eq!(get(&a, "Usage"), Some("Casual"));
        // The longest value backs off when the rest would not fit: with "Smart Casual" the
        // only Usage that fits after "Navy", Colour is "Navy" and not "Navy Blue".
        let s = schema(&[
            ("Colour", &["Navy", "Navy Blue"]),
            ("Usage", &["Blue Smart"]),
            ("ProductType", &["Tshirts"]),
            ("Gender", &["Men"]),
            ("Category", &["Apparel"]),
            ("SubCategory", &["Topwear"]),
        ]);
        let a = s.parse("Navy Blue Smart Tshirts for Men - Apparel Topwear");
        assert_eq!(get(&a, "Colour"), Some("Navy"));
        assert_eq!(get(&a, "Usage"), Some("Blue Smart"));
        // Casual Shoes (ProductType) and Shoes (SubCategory) share a word.
        let a = demo().parse("Blue Casual Shoes for Men - Footwear Shoes");
        assert_eq!(get(&a, "Usage"), Some("Casual"));
        assert_eq!(get(&a, "ProductType"), Some("Shoes"));
    }

    #[test]
    fn unknown_values_are_none_and_the_others_still_read() {
        let a = demo().parse("Teal Casual Tshirts for Men - Apparel Topwear");
        assert_eq!(get(&a, "Colour"), None);
        assert_eq!(a.get("Colour"), Some(&None));
        assert_eq!(get(&a, "Usage"), Some("Casual"));
        assert_eq!(get(&a, "SubCategory"), Some("Topwear"));
        // A value with more words than any known one: unknown, the rest read.
        let a = demo().parse("Blue Casual Tshirts for Unisex Kids - Apparel Topwear");
        assert_eq!(get(&a, "Gender"), None);
        assert_eq!(get(&a, "ProductType"), Some("Tshirts"));
        assert_eq!(get(&a, "Category"), Some("Apparel"));
        // Text that does not fit the template at all: every field None, every field listed.
        let a = demo().parse("garbage");
        assert_eq!(a.len(), 6);
        assert!(a.values().all(Option::is_none));
        assert!(demo().parse("").values().all(Option::is_none));
    }

    #[test]
    fn a_text_cut_short_gives_the_fields_closed_before_the_cut() {
        let read = |t: &str| {
            let a = demo().parse(t);
            assert_eq!(a.len(), 6, "{t:?}: every field listed");
            a.into_iter()
                .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
        };
        // Cut inside a value, at its end, inside the literal after it, after that literal.
        assert_eq!(read("Blue Casual Sho"), ["Colour=Blue", "Usage=Casual"]);
        assert_eq!(read("Blue Casual Shoes"), ["Colour=Blue", "Usage=Casual"]);
        assert_eq!(
            read("Blue Casual Shoes fo"),
            ["Colour=Blue", "Usage=Casual"]
        );
        assert_eq!(
            read("Blue Casual Shoes for"),
            ["Colour=Blue", "ProductType=Shoes", "Usage=Casual"]
        );
        assert_eq!(
            read("Navy Blue Smart Casual Casual Shoes for Women - Footwear"),
            [
                "Colour=Navy Blue",
                "Gender=Women",
                "ProductType=Casual Shoes",
                "Usage=Smart Casual"
            ]
        );
        // A value cut inside a word is not read, even where the cut text is a known value
        // ("Navy" of "Navy Blue" is one; the space after it is missing).
        assert_eq!(read("Navy"), Vec::<String>::new());
        assert_eq!(read("Navy Blue Casual"), ["Colour=Navy Blue"]);
        // Unknown values stay None, and what follows them is still read when closed.
        assert_eq!(
            read("Teal Casual Tshirts for"),
            ["ProductType=Tshirts", "Usage=Casual"]
        );
        assert_eq!(
            read("Blue, Casual Shoes for"),
            ["ProductType=Shoes", "Usage=Casual"]
        );
        // No literal part of the template in it: nothing is closed, nothing read.
        assert_eq!(read("BlueCasualShoesfor"), Vec::<String>::new());
        // The spans of a cut text are byte ranges of the text as given.
        let text = " Blue Casual Sh";
        let spans = demo().parse_spans(text);
        assert_eq!(spans["Colour"], Some(1..5));
        assert_eq!(spans["Usage"], Some(6..12));
        assert_eq!(spans["ProductType"], None);
    }

    #[test]
    fn a_field_without_values_takes_any_text() {
        let s = CaptionSchema::from_template(
            CaptionTemplate::parse("{Colour} {ProductType} for {Gender}").expect("template"),
        );
        let a = s.parse("Navy Blue Casual Shoes for Men");
        // Shortest first: Colour one word, ProductType the rest up to " for ".
        assert_eq!(get(&a, "Colour"), Some("Navy"));
        assert_eq!(get(&a, "ProductType"), Some("Blue Casual Shoes"));
        assert_eq!(get(&a, "Gender"), Some("Men"));
    }

    #[test]
    fn counts_from_rows_most_frequent_first_and_json_round_trip() {
        let rows = [
            [("Colour", "Blue"), ("Usage", "Casual")],
            [("Colour", " Red "), ("Usage", "Casual")],
            [("Colour", "Blue"), ("Usage", "")],
        ];
        let t = CaptionTemplate::parse("{Colour} {Usage}").expect("template");
        let s = CaptionSchema::from_rows(t, rows.iter(), |r, f| {
            r.iter().find(|(k, _)| *k == f).map(|(_, v)| v.to_string())
        });
        s.validate().expect("valid");
        let colour = s.field("Colour").expect("colour");
        assert_eq!(
            colour.values,
            [
                ValueCount {
                    value: "Blue".into(),
                    count: 2
                },
                ValueCount {
                    value: "Red".into(),
                    count: 1
                }
            ]
        );
        assert_eq!(s.field("Usage").expect("usage").values.len(), 1);
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["template"], "{Colour} {Usage}");
        assert_eq!(json["fields"][0]["values"][0]["value"], "Blue");
        assert_eq!(json["fields"][0]["values"][0]["count"], 2);
        let back: CaptionSchema = serde_json::from_value(json.clone()).expect("back");
        assert_eq!(back, s);
        // A bad template is a deserialisation error; fields that disagree fail validation.
        let mut bad = json.clone();
        bad["template"] = "{Colour".into();
        assert!(serde_json::from_value::<CaptionSchema>(bad).is_err());
        let mut bad = json;
        bad["fields"][1]["name"] = "Gender".into();
        let s: CaptionSchema = serde_json::from_value(bad).expect("parses");
        assert!(s.validate().expect_err("fields").contains("Gender"));
    }

    #[test]
    fn duplicate_or_untrimmed_values_are_refused() {
        let mut s = demo();
        s.fields[0].values.push(ValueCount {
            value: "Blue".into(),
            count: 1,
        });
        assert!(s.validate().expect_err("twice").contains("twice"));
        let mut s = demo();
        s.fields[0].values[0].value = " Blue".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn a_repeated_field_reads_the_same_value_and_cannot_run_away() {
        let t = CaptionTemplate::parse("{Colour} {Colour} {Usage}").expect("template");
        let mut s = CaptionSchema::from_template(t);
        for v in ["Blue", "Navy Blue", "Navy"] {
            s.add_value("Colour", v);
        }
        s.add_value("Usage", "Casual");
        let a = s.parse("Navy Blue Navy Blue Casual");
        assert_eq!(get(&a, "Colour"), Some("Navy Blue"));
        assert_eq!(get(&a, "Usage"), Some("Casual"));
        // The two places disagree: no strict reading; the loose one finds none either, as the
        // field must read the same text twice.
        let a = s.parse("Navy Blue Casual");
        assert_eq!(get(&a, "Colour"), None);
        // Many overlapping fields and a repeated one (no memo): the step budget ends it.
        let mut template: Vec<String> = (0..12).map(|i| format!("{{F{i}}}")).collect();
        template.push("{F0}".into());
        let mut s =
            CaptionSchema::from_template(CaptionTemplate::parse(&template.join(" ")).expect("t"));
        for f in 0..12 {
            for n in 1..20 {
                s.add_value(&format!("F{f}"), &vec!["a"; n].join(" "));
            }
        }
        let text = vec!["a"; 300].join(" ") + " b";
        let t = std::time::Instant::now();
        let _ = s.parse(&text);
        assert!(t.elapsed().as_secs() < 20, "{:?}", t.elapsed());
    }

    #[test]
    fn pathological_schemas_parse_quickly() {
        // Many overlapping values over many fields: the failure memo keeps this linear-ish.
        let template = (0..12)
            .map(|i| format!("{{F{i}}}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut s = CaptionSchema::from_template(CaptionTemplate::parse(&template).expect("t"));
        for f in 0..12 {
            for n in 1..20 {
                s.add_value(&format!("F{f}"), &vec!["a"; n].join(" "));
            }
        }
        s.validate().expect("valid");
        let text = vec!["a"; 200].join(" ") + " b";
        let t = std::time::Instant::now();
        let a = s.parse(&text);
        // The last field is left with text no value matches ("... b").
        assert_eq!(a["F11"], None);
        assert_eq!(a["F0"].as_deref(), Some(vec!["a"; 19].join(" ").as_str()));
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }
}
