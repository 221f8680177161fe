//! `moda_model`: an opened bundle; describe and embed.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::OnceLock;

use moda_sdk::{
    Constrain, Description, GenerationOptions, ImageInput, ImageLimits, Moda, Norm, OpenOptions,
};

use crate::description::moda_description;
use crate::error::{
    boundary, status, Failure, HandleErrors, MODA_ERR_BUFFER_TOO_SMALL, MODA_ERR_RUNTIME, MODA_OK,
};
use crate::image::{moda_image, path_of, Image};

/// How moda_model_open() sets a model up. Start from moda_model_default_params() and change
/// the fields you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moda_model_params {
    /// sizeof(moda_model_params) as the caller's header declares it; moda_model_default_params()
    /// sets it. It lets a later libmoda add fields without breaking programs built against this
    /// header; a size this library does not know is MODA_ERR_INVALID_ARGUMENT.
    pub struct_size: usize,
    /// Threads ONNX Runtime uses inside one graph run; 0 picks the cores this process may use
    /// (at most 8), shared among the sessions; more than the cores this process may use is
    /// capped at that number. Default 0.
    pub n_threads: c_int,
    /// Most session sets the model keeps (at least 1). Calls on one model from several threads
    /// each take an idle set; with 1 they take turns. Each further set costs another copy of
    /// the weights in memory, made the first time that many calls overlap. Default 1.
    pub n_sessions: c_int,
    /// Non-zero: check every file's SHA-256 against the manifest when opening (reads the whole
    /// bundle once). Sizes are always checked. Default 0.
    pub verify_checksums: c_int,
    /// Non-zero: let ONNX Runtime optimise the graphs (fuse operators). Default 1.
    pub optimize: c_int,
    /// Largest image width accepted, in pixels (checked before decoding). Default 16384.
    pub max_image_width: c_uint,
    /// Largest image height accepted, in pixels. Default 16384.
    pub max_image_height: c_uint,
    /// Largest allocation an image decoder may make, in bytes. Default 512 MiB.
    pub max_image_alloc: usize,
    /// Non-zero: build only what embeddings need (the encoder's and the projector's sessions;
    /// no decoder, token embedding, tokenizer or caption constraint). Opening takes about half the time
    /// and memory; moda_model_describe() and its siblings then fail with
    /// MODA_ERR_INVALID_ARGUMENT. Default 0.
    pub embeddings_only: c_int,
}

/// The size of moda_model_params before embeddings_only was added: a program built against
/// that header passes it, and gets a model that describes as well as embeds.
const MODEL_PARAMS_V1_SIZE: usize = std::mem::offset_of!(moda_model_params, embeddings_only);

/// moda_generation_params.constrain: constrain decoding when the bundle has a caption schema
/// whose every field lists its values, generate free text otherwise.
pub const MODA_CONSTRAIN_AUTO: c_int = 0;
/// moda_generation_params.constrain: the description must fit the bundle's caption schema (the
/// template's text and, in each field, one of the values it lists); an error when the bundle
/// has no such schema.
pub const MODA_CONSTRAIN_SCHEMA: c_int = 1;
/// moda_generation_params.constrain: free text; the decoder may write anything, e.g. a value
/// the catalog never had (which then reads as a NULL attribute).
pub const MODA_CONSTRAIN_NONE: c_int = 2;

/// How moda_model_describe() and its siblings generate. Start from
/// moda_generation_default_params() (greedy search with the bundle's length limit) and change
/// the fields you need; the ranges are those of transformers' generate().
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moda_generation_params {
    /// sizeof(moda_generation_params) as the caller's header declares it;
    /// moda_generation_default_params() sets it (see moda_model_params.struct_size).
    pub struct_size: usize,
    /// Most tokens to generate, the final </s> included; 0 takes the bundle's default
    /// (generation.max_new_tokens in moda.json). Default 0.
    pub max_new_tokens: c_int,
    /// </s> is forbidden until this many tokens have been generated. Default 0.
    pub min_new_tokens: c_int,
    /// Beams for beam search (1 to 64); 1 is greedy search or sampling. Default 1.
    pub num_beams: c_int,
    /// Non-zero: sample from the distribution instead of taking the most likely token (not
    /// with num_beams > 1). Default 0.
    pub do_sample: c_int,
    /// Sampling temperature (> 0). Default 1.0.
    pub temperature: f32,
    /// Sample among the top_k most likely tokens only; 0 turns it off. Default 50.
    pub top_k: c_int,
    /// Sample among the smallest set of tokens whose probabilities add up to top_p, in (0, 1];
    /// 1.0 turns it off. Default 1.0.
    pub top_p: f32,
    /// Seed of the sampler; each image gets its own generator seeded with it, so an image's
    /// description does not depend on the rest of its batch. Default 0.
    pub seed: u64,
    /// Penalty on tokens already generated (> 0; 1.0 is none). Default 1.0.
    pub repetition_penalty: f32,
    /// Forbid repeating any n-gram of this size; 0 turns it off. Default 0.
    pub no_repeat_ngram_size: c_int,
    /// Beam search: a finished hypothesis scores sum(logprobs) / length^length_penalty.
    /// Default 1.0.
    pub length_penalty: f32,
    /// Stop strings (transformers' stop_strings): an array of stop_strings_len NUL-terminated
    /// UTF-8 strings, read during the call only. Generation of an image stops once its text
    /// holds one of them, and its description ends before the first of them. NULL: the
    /// bundle's (generation.stop_strings in moda.json, e.g. "<\\s>" for a bundle of the
    /// original recipe's checkpoint); non-NULL with stop_strings_len 0: none. At most 64, none
    /// empty. Default NULL and 0.
    pub stop_strings: *const *const c_char,
    /// Strings in stop_strings. Default 0.
    pub stop_strings_len: usize,
    /// Whether the description must fit the bundle's caption schema: MODA_CONSTRAIN_AUTO,
    /// MODA_CONSTRAIN_SCHEMA or MODA_CONSTRAIN_NONE (any other value is
    /// MODA_ERR_INVALID_ARGUMENT). Default MODA_CONSTRAIN_AUTO.
    pub constrain: c_int,
}

/// The size of moda_generation_params before stop_strings was added: a program built against
/// that header passes it, and gets the bundle's stop strings and MODA_CONSTRAIN_AUTO.
const GENERATION_PARAMS_V1_SIZE: usize = std::mem::offset_of!(moda_generation_params, stop_strings);

/// The size of moda_generation_params before constrain was added: a program built against
/// that header passes it, and gets MODA_CONSTRAIN_AUTO.
const GENERATION_PARAMS_V2_SIZE: usize = std::mem::offset_of!(moda_generation_params, constrain);

/// One generated token, as moda_token_callback sees it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moda_token {
    /// Which image: its index in the batch (0 for moda_model_describe_stream()).
    pub image: usize,
    /// The token's index in its description (0, 1, 2, ...).
    pub index: usize,
    /// The token id.
    pub id: c_uint,
    /// Its log-probability (see moda_description_logprobs()).
    pub logprob: f32,
    /// The text this token adds to the description, UTF-8, NUL-terminated; it may be "" (for
    /// </s>, or while a character split across tokens is incomplete). The pieces of one image
    /// add up to its final text, except that a character still incomplete when generation
    /// ends (U+FFFD in the text) is not passed. Valid only during the callback.
    pub text: *const c_char,
    /// Bytes in text, without the NUL.
    pub text_len: usize,
}

/// Called once per generated token, in order for each image, on the thread that called
/// describe. Return 0 to go on; any other value stops generating for that image (its
/// description keeps the tokens so far, this one included; it is not an error). With beam
/// search (num_beams > 1) the tokens are only known at the end and are passed then.
///
/// The callback must return normally (no longjmp, no C++ exception) and must not call
/// describe or embed on the same model (with one session it would wait for itself forever).
pub type moda_token_callback =
    Option<unsafe extern "C" fn(token: *const moda_token, user_data: *mut c_void) -> c_int>;

/// An opened bundle (opaque): ONNX Runtime sessions of its four graphs, the tokenizer and the
/// image preprocessing. Made by moda_model_open(), freed by moda_model_free().
///
/// Threads: every function taking a moda_model may be called from any number of threads at
/// once on the same model, except moda_model_free().
#[derive(Debug)]
pub struct moda_model {
    moda: Moda,
    errors: HandleErrors,
}

/// The default model parameters (see moda_model_params).
///
/// Threads: any thread.
#[no_mangle]
pub extern "C" fn moda_model_default_params() -> moda_model_params {
    let fallback = moda_model_params {
        struct_size: std::mem::size_of::<moda_model_params>(),
        n_threads: 0,
        n_sessions: 1,
        verify_checksums: 0,
        optimize: 1,
        max_image_width: 16384,
        max_image_height: 16384,
        max_image_alloc: 512 << 20,
        embeddings_only: 0,
    };
    boundary(fallback, || {
        let o = OpenOptions::default();
        let l = o.image_limits;
        moda_model_params {
            struct_size: std::mem::size_of::<moda_model_params>(),
            n_threads: o.intra_threads.map_or(0, |n| n as c_int),
            n_sessions: o.sessions as c_int,
            verify_checksums: o.verify_checksums.into(),
            optimize: o.optimize.into(),
            max_image_width: l.max_width,
            max_image_height: l.max_height,
            max_image_alloc: usize::try_from(l.max_alloc).unwrap_or(usize::MAX),
            embeddings_only: o.embeddings_only.into(),
        }
    })
}

/// The default generation parameters: greedy search up to the bundle's max_new_tokens (see
/// moda_generation_params).
///
/// Threads: any thread.
#[no_mangle]
pub extern "C" fn moda_generation_default_params() -> moda_generation_params {
    let fallback = moda_generation_params {
        struct_size: std::mem::size_of::<moda_generation_params>(),
        max_new_tokens: 0,
        min_new_tokens: 0,
        num_beams: 1,
        do_sample: 0,
        temperature: 1.0,
        top_k: 50,
        top_p: 1.0,
        seed: 0,
        repetition_penalty: 1.0,
        no_repeat_ngram_size: 0,
        length_penalty: 1.0,
        stop_strings: std::ptr::null(),
        stop_strings_len: 0,
        constrain: MODA_CONSTRAIN_AUTO,
    };
    boundary(
        fallback,
        || generation_params(&GenerationOptions::default()),
    )
}

fn generation_params(g: &GenerationOptions) -> moda_generation_params {
    let int = |n: usize| c_int::try_from(n).unwrap_or(c_int::MAX);
    moda_generation_params {
        struct_size: std::mem::size_of::<moda_generation_params>(),
        max_new_tokens: g.max_new_tokens.map_or(0, int),
        min_new_tokens: int(g.min_new_tokens),
        num_beams: int(g.num_beams),
        do_sample: g.do_sample.into(),
        temperature: g.temperature,
        top_k: int(g.top_k),
        top_p: g.top_p,
        seed: g.seed,
        repetition_penalty: g.repetition_penalty,
        no_repeat_ngram_size: int(g.no_repeat_ngram_size),
        length_penalty: g.length_penalty,
        // The strings of the defaults are the bundle's: NULL.
        stop_strings: std::ptr::null(),
        stop_strings_len: 0,
        constrain: match g.constrain {
            Constrain::Auto => MODA_CONSTRAIN_AUTO,
            Constrain::Schema => MODA_CONSTRAIN_SCHEMA,
            Constrain::None => MODA_CONSTRAIN_NONE,
        },
    }
}

/// The SDK's [`Constrain`] of moda_generation_params.constrain, or an error naming the field.
fn constrain(func: &str, v: c_int) -> Result<Constrain, Failure> {
    match v {
        MODA_CONSTRAIN_AUTO => Ok(Constrain::Auto),
        MODA_CONSTRAIN_SCHEMA => Ok(Constrain::Schema),
        MODA_CONSTRAIN_NONE => Ok(Constrain::None),
        _ => Err(Failure::invalid(format!(
            "{func}: constrain is {v}; use MODA_CONSTRAIN_AUTO ({MODA_CONSTRAIN_AUTO}), \
             MODA_CONSTRAIN_SCHEMA ({MODA_CONSTRAIN_SCHEMA}) or MODA_CONSTRAIN_NONE \
             ({MODA_CONSTRAIN_NONE})"
        ))),
    }
}

/// The stop strings of `p`: `None` for NULL (the bundle's), else each string, which must be
/// UTF-8.
///
/// # Safety
/// `p.stop_strings` is NULL or points at `p.stop_strings_len` pointers, each NULL or a
/// NUL-terminated string.
unsafe fn stop_strings(
    func: &str,
    p: &moda_generation_params,
) -> Result<Option<Vec<String>>, Failure> {
    if p.stop_strings.is_null() {
        return Ok(None);
    }
    let max = moda_sdk::generate::MAX_STOP_STRINGS;
    if p.stop_strings_len > max {
        return Err(Failure::invalid(format!(
            "{func}: stop_strings_len is {}; at most {max}",
            p.stop_strings_len
        )));
    }
    let mut out = Vec::with_capacity(p.stop_strings_len);
    for i in 0..p.stop_strings_len {
        // SAFETY: the caller's promise: `i` is within the array.
        let s = unsafe { *p.stop_strings.add(i) };
        if s.is_null() {
            return Err(Failure::invalid(format!(
                "{func}: stop_strings[{i}] is NULL"
            )));
        }
        // SAFETY: the caller's promise: a NUL-terminated string.
        let s = unsafe { CStr::from_ptr(s) }
            .to_str()
            .map_err(|_| Failure::invalid(format!("{func}: stop_strings[{i}] is not UTF-8")))?;
        out.push(s.to_string());
    }
    Ok(Some(out))
}

/// A non-negative count, or an error naming the field.
fn count(func: &str, field: &str, v: c_int) -> Result<usize, Failure> {
    usize::try_from(v)
        .map_err(|_| Failure::invalid(format!("{func}: {field} is {v}; it must not be negative")))
}

/// The generation options of `p` (NULL: the defaults).
///
/// # Safety
/// `p` is NULL or points at a `moda_generation_params` of this header (whose stop strings
/// are as [`stop_strings`] needs them), or of a header before `stop_strings` or `constrain`.
unsafe fn generation_options(
    func: &str,
    p: *const moda_generation_params,
) -> Result<GenerationOptions, Failure> {
    if p.is_null() {
        return Ok(GenerationOptions::default());
    }
    // A struct of a header before stop_strings or constrain: its fields, then the defaults of
    // the rest.
    // SAFETY: every version of the struct starts with struct_size.
    let size = unsafe { std::ptr::addr_of!((*p).struct_size).read_unaligned() };
    let copy;
    let p: &moda_generation_params = if size == GENERATION_PARAMS_V1_SIZE
        || size == GENERATION_PARAMS_V2_SIZE
    {
        // SAFETY: the caller's struct has `size` bytes, a prefix of this one's layout.
        copy = unsafe { over_defaults(p, size, generation_params(&GenerationOptions::default())) };
        &copy
    } else {
        // SAFETY: the caller's promise.
        let p = unsafe { &*p };
        struct_size::<moda_generation_params>(
            func,
            "moda_generation_params",
            "moda_generation_default_params",
            p.struct_size,
        )?;
        p
    };
    let max = count(func, "max_new_tokens", p.max_new_tokens)?;
    // SAFETY: the caller's promise on the struct covers its stop strings.
    let stop_strings = unsafe { stop_strings(func, p) }?;
    Ok(GenerationOptions::default()
        .with_max_new_tokens((max > 0).then_some(max))
        .with_min_new_tokens(count(func, "min_new_tokens", p.min_new_tokens)?)
        .with_num_beams(count(func, "num_beams", p.num_beams)?)
        .with_do_sample(p.do_sample != 0)
        .with_temperature(p.temperature)
        .with_top_k(count(func, "top_k", p.top_k)?)
        .with_top_p(p.top_p)
        .with_seed(p.seed)
        .with_repetition_penalty(p.repetition_penalty)
        .with_no_repeat_ngram_size(count(func, "no_repeat_ngram_size", p.no_repeat_ngram_size)?)
        .with_length_penalty(p.length_penalty)
        .with_stop_strings(stop_strings)
        .with_constrain(constrain(func, p.constrain)?))
}

/// A params struct of an earlier header: its `size` bytes at `p` over `defaults` (whose
/// fields after them, the ones that header did not have, stay).
///
/// # Safety
/// `p` is readable for `size` bytes, and `size` is at most `size_of::<T>()`.
unsafe fn over_defaults<T: Copy>(p: *const T, size: usize, defaults: T) -> T {
    let mut out = defaults;
    debug_assert!(size <= std::mem::size_of::<T>());
    // SAFETY: the caller's promise; `out` is a whole `T`, so `size` bytes fit.
    unsafe {
        std::ptr::copy_nonoverlapping(
            p.cast::<u8>(),
            std::ptr::addr_of_mut!(out).cast::<u8>(),
            size,
        );
    }
    out
}

/// Checks a params struct's `struct_size` against this header's (the callers take the sizes of
/// earlier headers before this check). A zero or other size means a struct not set up from its
/// `*_default_params()` function, or a header of another libmoda version.
fn struct_size<T>(func: &str, name: &str, defaults: &str, got: usize) -> Result<(), Failure> {
    let want = std::mem::size_of::<T>();
    if got == want {
        return Ok(());
    }
    Err(Failure::invalid(format!(
        "{func}: {name}.struct_size is {got}, not {want}: start from {defaults}() (which sets \
         it), and build against the moda.h of this libmoda ({})",
        env!("CARGO_PKG_VERSION")
    )))
}

fn open_options(p: &moda_model_params) -> Result<OpenOptions, Failure> {
    let f = "moda_model_open";
    struct_size::<moda_model_params>(
        f,
        "moda_model_params",
        "moda_model_default_params",
        p.struct_size,
    )?;
    let threads = count(f, "n_threads", p.n_threads)?;
    if p.n_sessions < 1 {
        return Err(Failure::invalid(format!(
            "{f}: n_sessions is {}; it must be at least 1",
            p.n_sessions
        )));
    }
    if p.max_image_width == 0 || p.max_image_height == 0 || p.max_image_alloc == 0 {
        return Err(Failure::invalid(format!(
            "{f}: max_image_width, max_image_height and max_image_alloc must be positive \
             (they are {}, {} and {})",
            p.max_image_width, p.max_image_height, p.max_image_alloc
        )));
    }
    Ok(OpenOptions::default()
        .with_intra_threads((threads > 0).then_some(threads))
        .with_sessions(p.n_sessions as usize)
        .with_verify_checksums(p.verify_checksums != 0)
        .with_image_limits(ImageLimits {
            max_width: p.max_image_width,
            max_height: p.max_image_height,
            max_alloc: p.max_image_alloc as u64,
        })
        .with_optimize(p.optimize != 0)
        .with_embeddings_only(p.embeddings_only != 0))
}

/// The open options of `p` (NULL: the defaults).
///
/// # Safety
/// `p` is NULL or points at a `moda_model_params` of this header, or of the header before
/// `embeddings_only` (whose struct is that many bytes shorter).
unsafe fn model_options(p: *const moda_model_params) -> Result<OpenOptions, Failure> {
    if p.is_null() {
        return open_options(&moda_model_default_params());
    }
    // SAFETY: every version of the struct starts with struct_size.
    let size = unsafe { std::ptr::addr_of!((*p).struct_size).read_unaligned() };
    if size == MODEL_PARAMS_V1_SIZE {
        // A struct of the header before embeddings_only: its fields, then the defaults of the
        // rest.
        // SAFETY: the caller's struct has `size` bytes, a prefix of this one's layout.
        let mut copy = unsafe { over_defaults(p, size, moda_model_default_params()) };
        copy.struct_size = std::mem::size_of::<moda_model_params>();
        return open_options(&copy);
    }
    // SAFETY: the caller's promise.
    open_options(unsafe { &*p })
}

/// `*out = NULL` when `out` is not NULL, then the pointer to write to.
///
/// # Safety
/// `out` is NULL or writable.
unsafe fn out_ptr<'a, T>(out: *mut *mut T, func: &str) -> Result<&'a mut *mut T, Failure> {
    // SAFETY: the caller's promise.
    let out = unsafe { out.as_mut() }.ok_or_else(|| Failure::null(func, "out"))?;
    *out = std::ptr::null_mut();
    Ok(out)
}

/// `n` items at `p`, which may be NULL only when `n` is 0.
///
/// # Safety
/// `p` is NULL or valid for `n` items.
unsafe fn slice<'a, T>(p: *const T, n: usize, func: &str, name: &str) -> Result<&'a [T], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::invalid(format!(
            "{func}: {name} is NULL but the count is {n}"
        )));
    }
    // No buffer in a process can be larger (`from_raw_parts`' own requirement).
    if n > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Failure::invalid(format!(
            "{func}: the count of {name}, {n}, is larger than any buffer can be"
        )));
    }
    // SAFETY: the caller's promise.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The model, or an error naming `func`.
fn model<'a>(m: Option<&'a moda_model>, func: &str) -> Result<&'a moda_model, Failure> {
    m.ok_or_else(|| Failure::null(func, "model"))
}

/// Opens the bundle in the directory bundle_dir (written by `exporter onnx`): reads and checks
/// its manifest and files, loads ONNX Runtime on first use (see below), the tokenizer and the
/// image preprocessing, and builds the first session set, so that a broken graph fails here.
/// params may be NULL for the defaults.
///
/// ONNX Runtime (1.31 or newer) is found, in order, at ORT_DYLIB_PATH (a file; when set, the
/// only place tried), next to the executable, next to libmoda itself (where `make install`
/// puts it) and in the MODA repository's .ort/; in a Python onnxruntime package only when
/// the environment variable MODA_ORT_PYTHON is 1 (finding it runs python3).
/// moda_runtime_path() tells which one was loaded.
///
/// On success returns MODA_OK and sets *out to the new model; otherwise sets *out to NULL
/// (when out is not NULL) and returns an error code, with the message in moda_last_error().
///
/// Ownership: bundle_dir and params are only read during the call. Free the model with
/// moda_model_free().
/// Threads: any thread; several models may be opened at once.
#[no_mangle]
pub unsafe extern "C" fn moda_model_open(
    bundle_dir: *const c_char,
    params: *const moda_model_params,
    out: *mut *mut moda_model,
) -> c_int {
    let f = "moda_model_open";
    status(None, || {
        // SAFETY: NULL or writable (the caller's promise).
        let out = unsafe { out_ptr(out, f) }?;
        if bundle_dir.is_null() {
            return Err(Failure::null(f, "bundle_dir"));
        }
        // SAFETY: NUL-terminated (the caller's promise).
        let dir = path_of(unsafe { CStr::from_ptr(bundle_dir) })?;
        // SAFETY: NULL or a readable struct of this header or an earlier one.
        let options = unsafe { model_options(params) }?;
        let moda = Moda::open(dir, &options)?;
        *out = Box::into_raw(Box::new(moda_model {
            moda,
            errors: HandleErrors::default(),
        }));
        Ok(())
    })
}

/// Frees a model and its ONNX Runtime sessions. NULL is allowed and does nothing.
///
/// Ownership: model must come from moda_model_open() and not have been freed already; it is
/// invalid afterwards. Descriptions made with it stay valid (free them separately).
/// Threads: not while any other call uses the model.
#[no_mangle]
pub unsafe extern "C" fn moda_model_free(model: *mut moda_model) {
    boundary((), || {
        if !model.is_null() {
            // SAFETY: made by `Box::into_raw` in moda_model_open and not freed yet (the
            // caller's promise).
            drop(unsafe { Box::from_raw(model) });
        }
    })
}

/// The message of the last call on model made by this thread: "" if it succeeded, otherwise
/// why it failed. With model NULL (e.g. after moda_model_open() failed) it returns
/// moda_last_error().
///
/// Ownership: owned by libmoda; valid until this thread's next call on model (or
/// moda_model_free()). Never NULL.
/// Threads: any thread; each thread sees the message of its own calls, so concurrent calls on
/// one model do not overwrite each other's messages.
#[no_mangle]
pub unsafe extern "C" fn moda_model_errmsg(model: *const moda_model) -> *const c_char {
    // SAFETY: NULL or a live model.
    let m = unsafe { model.as_ref() };
    match m {
        Some(m) => boundary(c"".as_ptr(), || m.errors.current()),
        None => crate::error::moda_last_error(),
    }
}

/// The size of an image embedding (moda_model_embed() writes this many floats), 512 for
/// FashionCLIP. NULL gives 0.
///
/// Threads: any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn moda_model_embedding_size(model: *const moda_model) -> usize {
    // SAFETY: NULL or a live model.
    let m = unsafe { model.as_ref() };
    boundary(0, || {
        m.map_or(0, |m| m.moda.manifest().model.projection_dim)
    })
}

/// Describes one image with params (NULL: moda_generation_default_params()).
///
/// On success returns MODA_OK and sets *out to a new description (free it with
/// moda_description_free()); otherwise sets *out to NULL (when out is not NULL) and returns
/// an error code, e.g. MODA_ERR_IMAGE for a file that is not an image, with the message in
/// moda_model_errmsg(model) and moda_last_error().
///
/// Ownership: image (and the memory it points at) and params are only read during the call.
/// Threads: may run on one model from many threads at once (see moda_model_params.n_sessions).
#[no_mangle]
pub unsafe extern "C" fn moda_model_describe(
    model: *mut moda_model,
    image: *const moda_image,
    params: *const moda_generation_params,
    out: *mut *mut moda_description,
) -> c_int {
    // SAFETY: the same contract.
    unsafe {
        describe_one(
            "moda_model_describe",
            model,
            image,
            params,
            None,
            std::ptr::null_mut(),
            out,
        )
    }
}

/// moda_model_describe(), calling callback (when not NULL) with each token as it is
/// generated, and user_data.
///
/// Ownership: user_data is passed to callback as it is; libmoda does not keep it.
/// Threads: as moda_model_describe(); the callback runs on the calling thread.
#[no_mangle]
pub unsafe extern "C" fn moda_model_describe_stream(
    model: *mut moda_model,
    image: *const moda_image,
    params: *const moda_generation_params,
    callback: moda_token_callback,
    user_data: *mut c_void,
    out: *mut *mut moda_description,
) -> c_int {
    // SAFETY: the same contract.
    unsafe {
        describe_one(
            "moda_model_describe_stream",
            model,
            image,
            params,
            callback,
            user_data,
            out,
        )
    }
}

/// Calls the C callback for each token; NUL-terminates the text in a reused buffer.
struct TokenSink {
    callback: moda_token_callback,
    user_data: *mut c_void,
    text: Vec<u8>,
}

impl TokenSink {
    fn new(callback: moda_token_callback, user_data: *mut c_void) -> Self {
        Self {
            callback,
            user_data,
            text: Vec::new(),
        }
    }

    /// Whether to go on.
    fn send(&mut self, image: usize, e: &moda_sdk::TokenEvent<'_>) -> bool {
        let Some(cb) = self.callback else {
            return true;
        };
        self.text.clear();
        self.text.extend_from_slice(e.text.as_bytes());
        self.text.push(0);
        let token = moda_token {
            image,
            index: e.index,
            id: e.token_id,
            logprob: e.logprob,
            text: self.text.as_ptr().cast(),
            text_len: e.text.len(),
        };
        // SAFETY: the caller of describe gave a valid callback; `token` and its text live
        // until it returns.
        unsafe { cb(&token, self.user_data) == 0 }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn describe_one(
    f: &str,
    model: *mut moda_model,
    image: *const moda_image,
    params: *const moda_generation_params,
    callback: moda_token_callback,
    user_data: *mut c_void,
    out: *mut *mut moda_description,
) -> c_int {
    // SAFETY: NULL or a live model (the caller's promise).
    let m = unsafe { model.as_ref() };
    status(m.map(|m| &m.errors), || {
        // SAFETY: NULL or writable.
        let out = unsafe { out_ptr(out, f) }?;
        let m = self::model(m, f)?;
        // SAFETY: NULL or readable.
        let image = unsafe { image.as_ref() }.ok_or_else(|| Failure::null(f, "image"))?;
        // SAFETY: the image's pointers are valid for the call.
        let image = unsafe { Image::from_c(image, f) }?;
        // SAFETY: NULL or readable.
        let options = unsafe { generation_options(f, params) }?;
        let mut sink = TokenSink::new(callback, user_data);
        let d = m
            .moda
            .describe_with(&image.input(), &options, &mut |e| sink.send(0, e))?;
        *out = moda_description::ok(d, &m.moda.attribute_names()).into_raw();
        Ok(())
    })
}

/// The first failed image's failure, naming it, when any failed.
fn batch_failure<T>(f: &str, results: &[Result<T, Failure>]) -> Result<(), Failure> {
    let n = results.len();
    let failed: Vec<(usize, &Failure)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        .collect();
    match failed.first() {
        None => Ok(()),
        Some((i, e)) => Err(Failure::new(
            e.code,
            format!(
                "{f}: image {i} of {n} failed ({} of {n} failed in all): {}",
                failed.len(),
                e.msg
            ),
        )),
    }
}

/// Checks the images; runs `run` on the good ones (with their original indices) and puts
/// its results back in place.
fn per_image<T>(
    f: &str,
    images: &[moda_image],
    run: impl FnOnce(&[ImageInput<'_>], &[usize]) -> Result<Vec<moda_sdk::Result<T>>, Failure>,
) -> Result<Vec<Result<T, Failure>>, Failure> {
    // SAFETY: each image's pointers are valid for the call (the caller's promise).
    if images.len() > moda_sdk::model::MAX_BATCH {
        return Err(Failure::invalid(format!(
            "{f}: {} images in one call; at most {} (split the list)",
            images.len(),
            moda_sdk::model::MAX_BATCH
        )));
    }
    let checked: Vec<Result<Image<'_>, Failure>> = images
        .iter()
        .map(|img| unsafe { Image::from_c(img, f) })
        .collect();
    let good: Vec<usize> = (0..checked.len()).filter(|&i| checked[i].is_ok()).collect();
    let inputs: Vec<ImageInput<'_>> = checked
        .iter()
        .filter_map(|c| c.as_ref().ok().map(Image::input))
        .collect();
    let mut results = run(&inputs, &good)?.into_iter();
    let mut out = Vec::with_capacity(images.len());
    for c in checked {
        out.push(match c {
            Err(e) => Err(e),
            Ok(_) => match results.next() {
                Some(r) => r.map_err(Failure::from),
                None => Err(Failure::new(
                    crate::error::MODA_ERR_PANIC,
                    format!("{f}: the SDK returned too few results"),
                )),
            },
        });
    }
    Ok(out)
}

/// Describes n_images images as one batch through the encoder and the decoder (faster than
/// one call per image); each image gets the description moda_model_describe() would give it.
/// callback (may be NULL) sees every token with moda_token.image, the image's index.
///
/// out must have room for n_images pointers. If the call runs, every out[i] is set to a new
/// description, also for an image that failed (a missing file, not an image, a bad
/// moda_image): check moda_description_status(out[i]). The call then returns MODA_OK if every
/// image succeeded, otherwise the first failed image's code (the message names it and counts
/// the failures). If the whole call fails (NULL arguments, bad params, ONNX Runtime) every
/// out[i] is NULL. images may be NULL when n_images is 0.
///
/// Ownership: free every out[i] with moda_description_free(). images and params are only
/// read during the call.
/// Threads: as moda_model_describe().
#[no_mangle]
pub unsafe extern "C" fn moda_model_describe_batch(
    model: *mut moda_model,
    images: *const moda_image,
    n_images: usize,
    params: *const moda_generation_params,
    callback: moda_token_callback,
    user_data: *mut c_void,
    out: *mut *mut moda_description,
) -> c_int {
    let f = "moda_model_describe_batch";
    // SAFETY: NULL or a live model.
    let m = unsafe { model.as_ref() };
    status(m.map(|m| &m.errors), || {
        // SAFETY: NULL or room for n_images pointers.
        let out = unsafe { slice(out.cast_const(), n_images, f, "out") }?;
        let out = out.as_ptr().cast_mut();
        for i in 0..n_images {
            // SAFETY: in bounds of the caller's array.
            unsafe { *out.add(i) = std::ptr::null_mut() };
        }
        let m = self::model(m, f)?;
        // SAFETY: NULL or n_images readable structs.
        let images = unsafe { slice(images, n_images, f, "images") }?;
        // SAFETY: NULL or readable.
        let options = unsafe { generation_options(f, params) }?;
        let mut sink = TokenSink::new(callback, user_data);
        let results: Vec<Result<Description, Failure>> = per_image(f, images, |inputs, index| {
            Ok(m.moda
                .describe_batch_with(inputs, &options, &mut |e| sink.send(index[e.image], e))?)
        })?;
        let failure = batch_failure(f, &results);
        let fields = m.moda.attribute_names();
        for (i, r) in results.into_iter().enumerate() {
            let d = match r {
                Ok(d) => moda_description::ok(d, &fields),
                Err(e) => moda_description::failed(&e),
            };
            // SAFETY: in bounds.
            unsafe { *out.add(i) = d.into_raw() };
        }
        failure
    })
}

/// Writes the image's embedding (moda_model_embedding_size(model) floats; the CLIP
/// get_image_features vector), L2-normalised when normalize is non-zero (then the cosine
/// similarity of two embeddings is their dot product), to out, which holds out_len floats.
///
/// Returns MODA_OK, MODA_ERR_BUFFER_TOO_SMALL (nothing written) if out_len is less than the
/// embedding size (the message gives the size), or another error code, with the message in
/// moda_model_errmsg(model) and moda_last_error().
///
/// Ownership: the caller owns out; image and its memory are only read during the call.
/// Threads: may run on one model from many threads at once.
#[no_mangle]
pub unsafe extern "C" fn moda_model_embed(
    model: *mut moda_model,
    image: *const moda_image,
    normalize: c_int,
    out: *mut f32,
    out_len: usize,
) -> c_int {
    let f = "moda_model_embed";
    // SAFETY: NULL or a live model.
    let m = unsafe { model.as_ref() };
    status(m.map(|m| &m.errors), || {
        let m = self::model(m, f)?;
        // SAFETY: NULL or readable.
        let image = unsafe { image.as_ref() }.ok_or_else(|| Failure::null(f, "image"))?;
        if out.is_null() {
            return Err(Failure::null(f, "out"));
        }
        let dim = m.moda.manifest().model.projection_dim;
        Failure::check_embedding_room(f, out_len, dim)?;
        // SAFETY: the image's pointers are valid for the call.
        let image = unsafe { Image::from_c(image, f) }?;
        let v = m
            .moda
            .embed(&image.input(), Norm::unit_if(normalize != 0))?;
        // SAFETY: out holds out_len >= dim floats (the caller's promise).
        let out = unsafe { std::slice::from_raw_parts_mut(out, dim) };
        out.copy_from_slice(&v[..dim]);
        Ok(())
    })
}

/// Embeds n_images images as one batch through the encoder. out holds out_len floats, at
/// least n_images * moda_model_embedding_size(model) (else MODA_ERR_BUFFER_TOO_SMALL and
/// nothing written); image i's embedding goes to out[i * size] onwards. statuses (may be
/// NULL) receives each image's status; a failed image's row is filled with zeros.
///
/// Returns MODA_OK if every image succeeded, otherwise the first failed image's code (the
/// message names it and counts the failures; the other images are still embedded), or the
/// whole call's error (then every status is that code).
///
/// Ownership: the caller owns out and statuses; images are only read during the call.
/// Threads: may run on one model from many threads at once.
#[no_mangle]
pub unsafe extern "C" fn moda_model_embed_batch(
    model: *mut moda_model,
    images: *const moda_image,
    n_images: usize,
    normalize: c_int,
    out: *mut f32,
    out_len: usize,
    statuses: *mut c_int,
) -> c_int {
    let f = "moda_model_embed_batch";
    // SAFETY: NULL or a live model.
    let m = unsafe { model.as_ref() };
    let mut ran = false;
    let rc = status(m.map(|m| &m.errors), || {
        let m = self::model(m, f)?;
        // SAFETY: NULL or n_images readable structs.
        let images = unsafe { slice(images, n_images, f, "images") }?;
        let dim = m.moda.manifest().model.projection_dim;
        let need = n_images.saturating_mul(dim);
        // SAFETY: NULL or room for out_len floats.
        let out = unsafe { slice(out.cast_const(), need.min(out_len), f, "out") }?;
        let out = out.as_ptr().cast_mut();
        if out_len < need {
            return Err(Failure::new(
                MODA_ERR_BUFFER_TOO_SMALL,
                format!(
                    "{f}: out holds {out_len} floats but {n_images} embeddings of {dim} need \
                     {need}"
                ),
            ));
        }
        let results = per_image(f, images, |inputs, _| {
            Ok(m.moda.embed_batch(inputs, Norm::unit_if(normalize != 0))?)
        })?;
        ran = true;
        for (i, r) in results.iter().enumerate() {
            // SAFETY: row i is inside the `need` floats checked above.
            let row = unsafe { std::slice::from_raw_parts_mut(out.add(i * dim), dim) };
            match r {
                Ok(v) => row.copy_from_slice(&v[..dim]),
                Err(_) => row.fill(0.0),
            }
            if !statuses.is_null() {
                let code = r.as_ref().map_or_else(|e| e.code, |_| MODA_OK);
                // SAFETY: statuses holds n_images ints (the caller's promise).
                unsafe { *statuses.add(i) = code };
            }
        }
        batch_failure(f, &results)
    });
    // A failure of the whole call: every status is its code.
    if rc != MODA_OK && !ran && !statuses.is_null() {
        boundary((), || {
            for i in 0..n_images {
                // SAFETY: statuses holds n_images ints (the caller's promise).
                unsafe { *statuses.add(i) = rc };
            }
        });
    }
    rc
}

/// The path of the ONNX Runtime library that libmoda loaded, loading it first if no model
/// was opened yet (see moda_model_open() for where it looks); NULL if none could be loaded
/// (the message, listing every place tried, is in moda_last_error()).
///
/// Ownership: owned by libmoda, valid until the process ends.
/// Threads: any thread.
#[no_mangle]
pub extern "C" fn moda_runtime_path() -> *const c_char {
    static PATH: OnceLock<CString> = OnceLock::new();
    let mut path = std::ptr::null();
    let rc = status(None, || {
        let rt = moda_sdk::runtime::runtime()
            .map_err(|e| Failure::new(MODA_ERR_RUNTIME, e.to_string()))?;
        path = PATH
            .get_or_init(|| crate::error::c_string(&rt.library().to_string_lossy()))
            .as_ptr();
        Ok(())
    });
    if rc == MODA_OK {
        path
    } else {
        std::ptr::null()
    }
}
