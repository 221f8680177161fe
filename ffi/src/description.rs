//! `moda_description`: a generated description and its accessors.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, CString};

use moda_sdk::{Description, Finish, Norm};

use crate::error::{boundary, c_string, status, Failure, MODA_ERR_INVALID_ARGUMENT, MODA_OK};

/// Where the time of a description went, in milliseconds. In a batch every image reports
/// the batch's times except decode_ms and n_tokens, which are the image's own.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct moda_timings {
    /// Decoding and preprocessing the image(s).
    pub preprocess_ms: f64,
    /// The image encoder.
    pub encoder_ms: f64,
    /// The projector.
    pub projector_ms: f64,
    /// The decoder over the image prefix and the BOS token.
    pub prefill_ms: f64,
    /// The decoder steps after the prefill.
    pub decode_ms: f64,
    /// The whole call.
    pub total_ms: f64,
    /// Tokens generated.
    pub n_tokens: usize,
}

/// A generated description (opaque): its text, tokens, log-probabilities, timings and the
/// attributes read from its text, or, for an image of a batch that failed, its status and
/// message.
///
/// Made by moda_model_describe(), moda_model_describe_stream() and
/// moda_model_describe_batch(); freed by moda_description_free().
/// Threads: immutable; its accessors may be called from any number of threads at once.
#[derive(Debug)]
pub struct moda_description {
    status: c_int,
    errmsg: CString,
    /// The text's bytes followed by a NUL.
    text: Vec<u8>,
    token_ids: Vec<c_uint>,
    logprobs: Vec<f32>,
    timings: moda_timings,
    /// Decoder runs for this description (`Timings::decoder_runs`).
    decoder_runs: usize,
    /// Runs of its batch that computed the listed tokens' logits only
    /// (`Timings::listed_runs`).
    listed_runs: usize,
    /// Why generation ended; `None` for an image that failed.
    finish: Option<Finish>,
    /// One per field of the bundle's caption schema, in the template's order; none when the
    /// bundle has no schema or the image failed.
    attributes: Vec<Field>,
    /// The image embedding the encoder computed on the way (as the model gives it); empty
    /// for an image that failed.
    embedding: Vec<f32>,
}

/// A field of the caption schema and its value in a description, as C strings.
#[derive(Debug)]
struct Field {
    name: CString,
    /// `None` when the text yields no value.
    value: Option<CString>,
    /// NaN when there is no value or it has no confidence.
    confidence: f32,
    alternatives: Vec<(CString, f32)>,
}

/// `s` up to its first NUL byte, as a C string (a text holds one only if the model generated it).
fn cut_at_nul(s: &str) -> CString {
    let bytes = s.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).unwrap_or_default()
}

/// The attributes of `attributes` (none: the bundle has no schema) in the order of `fields`,
/// the names of the schema's fields in the template's order. A key that `fields` lacks (which
/// the SDK never gives) comes after them, in the map's order.
fn fields_in_order(
    attributes: Option<BTreeMap<String, Option<moda_sdk::Attribute>>>,
    fields: &[String],
) -> Vec<Field> {
    let Some(mut map) = attributes else {
        return Vec::new();
    };
    let mut ordered: Vec<(String, Option<moda_sdk::Attribute>)> = fields
        .iter()
        .map(|name| (name.clone(), map.remove(name).flatten()))
        .collect();
    ordered.extend(map);
    ordered
        .into_iter()
        .map(|(name, a)| Field {
            name: cut_at_nul(&name),
            confidence: a.as_ref().and_then(|a| a.confidence).unwrap_or(f32::NAN),
            alternatives: a.as_ref().map_or_else(Vec::new, |a| {
                a.alternatives
                    .iter()
                    .map(|(v, c)| (cut_at_nul(v), *c))
                    .collect()
            }),
            value: a.map(|a| cut_at_nul(&a.value)),
        })
        .collect()
}

impl moda_description {
    /// A description of `d`; `fields` are the names of the fields of the bundle's caption
    /// schema in the template's order (empty when it has none).
    pub(crate) fn ok(d: Description, fields: &[String]) -> Self {
        let mut text = d.text.into_bytes();
        text.push(0);
        let t = d.timings;
        Self {
            status: MODA_OK,
            errmsg: CString::default(),
            text,
            token_ids: d.token_ids,
            logprobs: d.logprobs,
            attributes: fields_in_order(d.attributes, fields),
            finish: Some(d.finish),
            embedding: d.embedding,
            timings: moda_timings {
                preprocess_ms: t.preprocess_ms,
                encoder_ms: t.encoder_ms,
                projector_ms: t.projector_ms,
                prefill_ms: t.prefill_ms,
                decode_ms: t.decode_ms,
                total_ms: t.total_ms,
                n_tokens: t.tokens,
            },
            decoder_runs: t.decoder_runs,
            listed_runs: t.listed_runs,
        }
    }

    pub(crate) fn failed(f: &Failure) -> Self {
        Self {
            status: f.code,
            errmsg: c_string(&f.msg),
            text: vec![0],
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            timings: moda_timings::default(),
            decoder_runs: 0,
            listed_runs: 0,
            finish: None,
            attributes: Vec::new(),
            embedding: Vec::new(),
        }
    }

    pub(crate) fn into_raw(self) -> *mut moda_description {
        Box::into_raw(Box::new(self))
    }

    /// Field `i`, if there is one.
    fn attribute(&self, i: usize) -> Option<&Field> {
        self.attributes.get(i)
    }
}

/// MODA_OK, or why this image of a batch failed (then the text is "" and there are no
/// tokens). Descriptions from moda_model_describe() and moda_model_describe_stream() are
/// always MODA_OK (those calls return no description when they fail).
/// NULL gives MODA_ERR_INVALID_ARGUMENT.
///
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_status(d: *const moda_description) -> c_int {
    // SAFETY: NULL or a live description (the caller's promise).
    let d = unsafe { d.as_ref() };
    boundary(crate::error::MODA_ERR_PANIC, || {
        d.map_or(crate::error::MODA_ERR_INVALID_ARGUMENT, |d| d.status)
    })
}

/// "" when the status is MODA_OK, otherwise why the image failed (the message names the
/// image). NULL gives "".
///
/// Ownership: owned by d; valid until moda_description_free(d). Never NULL.
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_errmsg(d: *const moda_description) -> *const c_char {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(c"".as_ptr(), || {
        d.map_or(c"".as_ptr(), |d| d.errmsg.as_ptr())
    })
}

/// The description, UTF-8 and NUL-terminated, special tokens removed (e.g. "Blue Casual
/// Jeans for Boys - Apparel Bottomwear"). NULL gives NULL.
///
/// Ownership: owned by d; valid until moda_description_free(d).
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_text(d: *const moda_description) -> *const c_char {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(std::ptr::null(), || {
        d.map_or(std::ptr::null(), |d| d.text.as_ptr().cast())
    })
}

/// The text's length in bytes, without the final NUL (the text holds a NUL byte of its own
/// only if the model generated one). NULL gives 0.
///
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_text_len(d: *const moda_description) -> usize {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(0, || d.map_or(0, |d| d.text.len() - 1))
}

/// Why generation ended: "end_of_text" (the model wrote </s>: the description is complete),
/// "stop_string" (the text reached a stop string and was cut before it), "length" (the token
/// limit, max_new_tokens, came first: the text may be cut short, and the caption schema's later
/// fields missing) or "stopped" (the token callback returned false). "" for an image that
/// failed, and for NULL.
///
/// Ownership: static; never NULL and never to be freed.
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_finish(d: *const moda_description) -> *const c_char {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(c"".as_ptr(), || {
        let name = match d.and_then(|d| d.finish) {
            None => c"",
            Some(Finish::EndOfText) => c"end_of_text",
            Some(Finish::StopString) => c"stop_string",
            Some(Finish::Length) => c"length",
            Some(Finish::Stopped) => c"stopped",
        };
        name.as_ptr()
    })
}

/// How many tokens were generated, the final end-of-sequence token (</s>) included when one
/// was generated. NULL gives 0.
///
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_n_tokens(d: *const moda_description) -> usize {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(0, || d.map_or(0, |d| d.token_ids.len()))
}

/// How many times the decoder ran for this description: the prefill over the image and each
/// step after it. A step that feeds several tokens the caption schema forces counts once, so
/// a constrained description takes fewer runs than tokens; under beam search, the batch's
/// steps (every image's beams step together). NULL or a failed image gives 0.
///
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_decoder_runs(d: *const moda_description) -> usize {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(0, || d.map_or(0, |d| d.decoder_runs))
}

/// How many decoder runs of the description's batch (the prefill included) computed only the
/// logits of the tokens the caption schema allowed, not every token's: constrained decoding
/// with a bundle whose decoder takes that list. A run reads fewer of the output layer's
/// weights so. NULL or a failed image gives 0.
///
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_listed_runs(d: *const moda_description) -> usize {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(0, || d.map_or(0, |d| d.listed_runs))
}

/// The generated token ids, moda_description_n_tokens(d) of them; NULL when there are none
/// or d is NULL.
///
/// Ownership: owned by d; valid until moda_description_free(d).
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_token_ids(d: *const moda_description) -> *const c_uint {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(std::ptr::null(), || match d {
        Some(d) if !d.token_ids.is_empty() => d.token_ids.as_ptr(),
        _ => std::ptr::null(),
    })
}

/// The log-probability of each generated token (natural log, <= 0), n_tokens of them; NULL
/// when there are none or d is NULL. Under greedy search with no penalties it is the model's
/// own log-probability; otherwise it is taken under the processed logits, as transformers'
/// compute_transition_scores reports it.
///
/// Ownership: owned by d; valid until moda_description_free(d).
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_logprobs(d: *const moda_description) -> *const f32 {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(std::ptr::null(), || match d {
        Some(d) if !d.logprobs.is_empty() => d.logprobs.as_ptr(),
        _ => std::ptr::null(),
    })
}

/// Writes the image's embedding, which the encoder computed on the way to this description
/// (moda_model_embedding_size(model) floats), L2-normalised when normalize is non-zero, to
/// out, which holds out_len floats: what moda_model_embed_batch() writes for the same batch
/// of images, without running the encoder again.
///
/// Returns MODA_OK, MODA_ERR_BUFFER_TOO_SMALL (nothing written) if out_len is less than the
/// embedding size (the message gives the size), or MODA_ERR_INVALID_ARGUMENT if d or out is
/// NULL or d is an image that failed; the message is in moda_last_error().
///
/// Ownership: the caller owns out.
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_embedding(
    d: *const moda_description,
    normalize: c_int,
    out: *mut f32,
    out_len: usize,
) -> c_int {
    let f = "moda_description_embedding";
    status(None, || {
        // SAFETY: NULL or a live description.
        let d = unsafe { d.as_ref() }.ok_or_else(|| Failure::null(f, "d"))?;
        if out.is_null() {
            return Err(Failure::null(f, "out"));
        }
        if d.status != MODA_OK || d.embedding.is_empty() {
            return Err(Failure::new(
                MODA_ERR_INVALID_ARGUMENT,
                format!("{f}: this image failed, so it has no embedding"),
            ));
        }
        let dim = d.embedding.len();
        Failure::check_embedding_room(f, out_len, dim)?;
        // SAFETY: out holds out_len >= dim floats (the caller's promise).
        let out = unsafe { std::slice::from_raw_parts_mut(out, dim) };
        out.copy_from_slice(&d.embedding);
        Norm::unit_if(normalize != 0).apply(out);
        Ok(())
    })
}

/// Copies the description's timings into *out.
///
/// Returns MODA_OK, or MODA_ERR_INVALID_ARGUMENT if d or out is NULL.
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_timings(
    d: *const moda_description,
    out: *mut moda_timings,
) -> c_int {
    status(None, || {
        // SAFETY: NULL or a live description.
        let d =
            unsafe { d.as_ref() }.ok_or_else(|| Failure::null("moda_description_timings", "d"))?;
        // SAFETY: NULL or writable (the caller's promise).
        let out = unsafe { out.as_mut() }
            .ok_or_else(|| Failure::null("moda_description_timings", "out"))?;
        *out = d.timings;
        Ok(())
    })
}

/// How many attributes d has: the number of fields of the bundle's caption schema (moda.json's
/// "schema"; e.g. 6 for "{Colour} {Usage} {ProductType} for {Gender} - {Category}
/// {SubCategory}"), whether or not the text yields a value for each. 0 when the bundle has no
/// schema, for an image of a batch that failed, and for NULL.
///
/// Attribute i (0 <= i < count) is the i-th field in the template's order; read it with
/// moda_description_attribute_name(), _value(), _confidence() and _alternative_*().
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_attribute_count(d: *const moda_description) -> usize {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(0, || d.map_or(0, |d| d.attributes.len()))
}

/// The name of attribute i, the schema's field (e.g. "Colour"), UTF-8 and NUL-terminated.
/// NULL when d is NULL or i is not less than moda_description_attribute_count(d).
///
/// Ownership: owned by d; valid until moda_description_free(d).
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_attribute_name(
    d: *const moda_description,
    i: usize,
) -> *const c_char {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(std::ptr::null(), || {
        d.and_then(|d| d.attribute(i))
            .map_or(std::ptr::null(), |f| f.name.as_ptr())
    })
}

/// The value of attribute i read from the text (e.g. "Blue"), UTF-8 and NUL-terminated: one of
/// the values the schema lists for the field (any text for a field that lists none). NULL when
/// the text yields no value for the field (it is never a guess), when d is NULL or i is out of
/// range. A value holding a NUL byte (only a model that generates one could give it) is cut
/// at that byte.
///
/// Ownership: owned by d; valid until moda_description_free(d).
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_attribute_value(
    d: *const moda_description,
    i: usize,
) -> *const c_char {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(std::ptr::null(), || {
        d.and_then(|d| d.attribute(i))
            .and_then(|f| f.value.as_ref())
            .map_or(std::ptr::null(), |v| v.as_ptr())
    })
}

/// The confidence of attribute i's value, in [0, 1]: the probability of the tokens that spell
/// it given the image and the tokens before them (exp of the sum of their
/// moda_description_logprobs(); not normalised over the field's other values). NaN (test it
/// with isnan()) when the value is NULL or its tokens cannot be told apart, when d is NULL or
/// i is out of range.
///
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_attribute_confidence(
    d: *const moda_description,
    i: usize,
) -> f32 {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(f32::NAN, || {
        d.and_then(|d| d.attribute(i))
            .map_or(f32::NAN, |f| f.confidence)
    })
}

/// How many alternatives attribute i has: the field's next most likely values, most likely
/// first, when the search could tell (0 when it could not, when the value is NULL, when d is
/// NULL or i is out of range).
///
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_attribute_alternative_count(
    d: *const moda_description,
    i: usize,
) -> usize {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(0, || {
        d.and_then(|d| d.attribute(i))
            .map_or(0, |f| f.alternatives.len())
    })
}

/// The value of alternative j of attribute i, UTF-8 and NUL-terminated (cut at a NUL byte as
/// moda_description_attribute_value() is). NULL when d is NULL or i or j is out of range.
///
/// Ownership: owned by d; valid until moda_description_free(d).
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_attribute_alternative_value(
    d: *const moda_description,
    i: usize,
    j: usize,
) -> *const c_char {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(std::ptr::null(), || {
        d.and_then(|d| d.attribute(i))
            .and_then(|f| f.alternatives.get(j))
            .map_or(std::ptr::null(), |(v, _)| v.as_ptr())
    })
}

/// The probability of alternative j of attribute i, in [0, 1]. NaN when d is NULL or i or j
/// is out of range.
///
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_description_attribute_alternative_confidence(
    d: *const moda_description,
    i: usize,
    j: usize,
) -> f32 {
    // SAFETY: NULL or a live description.
    let d = unsafe { d.as_ref() };
    boundary(f32::NAN, || {
        d.and_then(|d| d.attribute(i))
            .and_then(|f| f.alternatives.get(j))
            .map_or(f32::NAN, |&(_, c)| c)
    })
}

/// Frees a description. NULL is allowed and does nothing.
///
/// Ownership: d must come from libmoda and not have been freed already; it (and every
/// pointer its accessors returned) is invalid afterwards.
/// Threads: not while another thread still uses d.
#[no_mangle]
pub unsafe extern "C" fn moda_description_free(d: *mut moda_description) {
    boundary((), || {
        if !d.is_null() {
            // SAFETY: made by `Box::into_raw` in this crate and not freed yet (the caller's
            // promise).
            drop(unsafe { Box::from_raw(d) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn attribute(value: &str, confidence: Option<f32>) -> Option<moda_sdk::Attribute> {
        Some(moda_sdk::Attribute {
            value: value.to_string(),
            confidence,
            alternatives: vec![("Navy\0Blue".to_string(), 0.25)],
        })
    }

    #[test]
    fn attributes_follow_the_template_and_nul_bytes_cut_values() {
        let map: BTreeMap<String, Option<moda_sdk::Attribute>> = [
            ("Colour".to_string(), attribute("Blue", Some(0.5))),
            ("Usage".to_string(), None),
            ("Article".to_string(), attribute("Je\0ans", None)),
        ]
        .into_iter()
        .collect();
        let order = ["Usage", "Colour", "Article", "Gender"].map(String::from);
        let fields = fields_in_order(Some(map), &order);
        let names: Vec<&CStr> = fields.iter().map(|f| f.name.as_c_str()).collect();
        assert_eq!(names, [c"Usage", c"Colour", c"Article", c"Gender"]);
        assert!(fields[0].value.is_none() && fields[0].confidence.is_nan());
        assert!(fields[0].alternatives.is_empty());
        assert_eq!(fields[1].value.as_deref(), Some(c"Blue"));
        assert_eq!(fields[1].confidence, 0.5);
        assert_eq!(fields[1].alternatives[0].0.as_c_str(), c"Navy");
        assert_eq!(fields[2].value.as_deref(), Some(c"Je"));
        assert!(fields[2].confidence.is_nan());
        // A field the SDK left out reads as no value.
        assert!(fields[3].value.is_none());
        assert!(fields_in_order(None, &["Colour".to_string()]).is_empty());
    }

    #[test]
    fn accessors_are_null_safe_and_range_checked() {
        let d = moda_description::failed(&Failure::invalid("x"));
        let p: *const moda_description = &d;
        // SAFETY: NULL or a live description.
        unsafe {
            for d in [p, std::ptr::null()] {
                assert_eq!(moda_description_attribute_count(d), 0);
                assert!(moda_description_attribute_name(d, 0).is_null());
                assert!(moda_description_attribute_value(d, usize::MAX).is_null());
                assert!(moda_description_attribute_confidence(d, 0).is_nan());
                assert_eq!(moda_description_attribute_alternative_count(d, 0), 0);
                assert!(moda_description_attribute_alternative_value(d, 0, 0).is_null());
                assert!(moda_description_attribute_alternative_confidence(d, 0, 0).is_nan());
                assert_eq!(CStr::from_ptr(moda_description_finish(d)), c"");
            }
        }
    }

    #[test]
    fn finish_names_are_the_sdk_ones() {
        for f in [
            Finish::EndOfText,
            Finish::StopString,
            Finish::Length,
            Finish::Stopped,
        ] {
            let mut d = moda_description::failed(&Failure::invalid("x"));
            d.finish = Some(f);
            // SAFETY: a live description; the name is static.
            let name = unsafe { CStr::from_ptr(moda_description_finish(&d)) };
            assert_eq!(name.to_str(), Ok(f.as_str()));
        }
    }
}
