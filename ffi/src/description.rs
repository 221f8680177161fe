//! `moda_description`: a generated description and its accessors.

use std::ffi::{c_char, c_int, c_uint, CString};

use moda_sdk::Description;

use crate::error::{boundary, c_string, status, Failure, MODA_OK};

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

/// A generated description (opaque): its text, tokens, log-probabilities and timings, or, for
/// an image of a batch that failed, its status and message.
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
}

impl moda_description {
    pub(crate) fn ok(d: Description) -> Self {
        let mut text = d.text.into_bytes();
        text.push(0);
        let t = d.timings;
        Self {
            status: MODA_OK,
            errmsg: CString::default(),
            text,
            token_ids: d.token_ids,
            logprobs: d.logprobs,
            timings: moda_timings {
                preprocess_ms: t.preprocess_ms,
                encoder_ms: t.encoder_ms,
                projector_ms: t.projector_ms,
                prefill_ms: t.prefill_ms,
                decode_ms: t.decode_ms,
                total_ms: t.total_ms,
                n_tokens: t.tokens,
            },
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
        }
    }

    pub(crate) fn into_raw(self) -> *mut moda_description {
        Box::into_raw(Box::new(self))
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
