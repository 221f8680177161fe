//! libmoda: the C ABI over the MODA SDK ([`moda_sdk`]).
//!
//! This crate builds `libmoda.so` and `libmoda.a`; `include/moda.h` declares what they export.
//! The header is generated from this crate's source by cbindgen (`cbindgen.toml` beside this
//! crate's `Cargo.toml`), so the doc comments here are written for C readers: they are the
//! header's documentation. The test `tests/tests/ffi.rs` regenerates the header and fails if
//! the checked-in copy differs (`MODA_UPDATE_HEADER=1` rewrites it; `make header` does that).
//!
//! Conventions (sqlite3.h and llama.h): opaque handles, `moda_<object>_<verb>` names,
//! `..._default_params()` functions, `int` status codes with `MODA_OK == 0`, a per-handle
//! error message and a thread-local last error, destructors that accept NULL, and every
//! exported body behind [`std::panic::catch_unwind`] (see `error.rs`), so a bug in the library
//! becomes `MODA_ERR_PANIC` instead of unwinding into C.

#![expect(
    clippy::missing_safety_doc,
    reason = "the C header documents each pointer's contract on every declaration"
)]
#![expect(
    non_camel_case_types,
    reason = "C type names: moda_model, moda_description, ..."
)]
// The doc comments are the header's, in C's plain style: `</s>` is the end-of-sequence token
// as text, not an HTML tag, and `out[i]` an array element, not a link.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::ffi::{c_char, c_int};

// The header follows the order of these modules (keep them apart so rustfmt does not sort
// them): errors, images, models, descriptions.
mod error;

mod image;

mod model;

mod description;

pub use description::*;
pub use error::*;
pub use image::*;
pub use model::*;

/// The library's version as one number: major * 1000000 + minor * 1000 + patch (0.1.0 is
/// 1000). Compare it with moda_version_number() to check that the header matches the library.
pub const MODA_VERSION_NUMBER: c_int = 1000;

const fn parse_version_part(s: &str) -> c_int {
    let b = s.as_bytes();
    let mut n = 0;
    let mut i = 0;
    while i < b.len() {
        n = n * 10 + (b[i] - b'0') as c_int;
        i += 1;
    }
    n
}

const _: () = assert!(
    MODA_VERSION_NUMBER
        == parse_version_part(env!("CARGO_PKG_VERSION_MAJOR")) * 1_000_000
            + parse_version_part(env!("CARGO_PKG_VERSION_MINOR")) * 1_000
            + parse_version_part(env!("CARGO_PKG_VERSION_PATCH")),
    "MODA_VERSION_NUMBER must follow the package version"
);

static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The library's version, e.g. "0.1.0" (the header's MODA_VERSION is the version it was
/// written for).
///
/// Ownership: a static string; do not free it.
/// Threads: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn moda_version() -> *const c_char {
    error::boundary(std::ptr::null(), || VERSION.as_ptr().cast())
}

/// The library's version as a number (see MODA_VERSION_NUMBER).
///
/// Threads: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn moda_version_number() -> c_int {
    error::boundary(0, || MODA_VERSION_NUMBER)
}
