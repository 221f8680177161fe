//! Status codes, the thread-local last error, and the panic boundary every exported body
//! runs behind.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;
use std::thread::ThreadId;

/// Success. Every function that returns an int status returns MODA_OK (0) when it succeeded
/// and one of the MODA_ERR_* codes otherwise. New codes may be added: treat an unknown
/// non-zero code as a failure, and use moda_status_string() to name it.
pub const MODA_OK: c_int = 0;
/// An argument is wrong: a NULL pointer where one is needed, a parameter out of range, an
/// image struct of an unknown kind.
pub const MODA_ERR_INVALID_ARGUMENT: c_int = 1;
/// The bundle directory, its manifest (moda.json) or one of its files is missing or wrong.
pub const MODA_ERR_BUNDLE: c_int = 2;
/// ONNX Runtime could not be loaded, or refused a graph or a session setting.
pub const MODA_ERR_RUNTIME: c_int = 3;
/// Running the model failed (ONNX Runtime failed during a run, or the tokenizer could not
/// decode the generated tokens).
pub const MODA_ERR_INFERENCE: c_int = 4;
/// An image could not be read, decoded or preprocessed (missing file, not an image,
/// truncated, larger than the limits, an RGB buffer of the wrong size).
pub const MODA_ERR_IMAGE: c_int = 5;
/// A caller's output buffer is too small; the message says how large it must be.
pub const MODA_ERR_BUFFER_TOO_SMALL: c_int = 6;
/// A bug in libmoda: a Rust panic was caught at the C boundary, or an internal check failed.
/// The message says where. The handle stays usable, but please report it.
pub const MODA_ERR_PANIC: c_int = 7;

/// A failed call: its status code and message.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub code: c_int,
    pub msg: String,
}

impl Failure {
    pub(crate) fn new(code: c_int, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::new(MODA_ERR_INVALID_ARGUMENT, msg)
    }

    /// `MODA_ERR_BUFFER_TOO_SMALL` when `out_len` floats cannot hold one embedding of `dim`.
    pub(crate) fn check_embedding_room(f: &str, out_len: usize, dim: usize) -> Result<(), Self> {
        if out_len < dim {
            return Err(Self::new(
                MODA_ERR_BUFFER_TOO_SMALL,
                format!(
                    "{f}: out holds {out_len} floats but the embedding has {dim} \
                     (moda_model_embedding_size)"
                ),
            ));
        }
        Ok(())
    }

    /// `func: name is NULL`.
    pub(crate) fn null(func: &str, name: &str) -> Self {
        Self::invalid(format!("{func}: {name} is NULL"))
    }
}

impl From<moda_sdk::Error> for Failure {
    fn from(e: moda_sdk::Error) -> Self {
        use moda_sdk::Error as E;
        let code = match &e {
            E::Bundle { .. } => MODA_ERR_BUNDLE,
            E::Runtime(_) => MODA_ERR_RUNTIME,
            E::Run { .. } | E::Tokenizer(_) => MODA_ERR_INFERENCE,
            E::Image { .. } => MODA_ERR_IMAGE,
            E::InvalidArgument(_) => MODA_ERR_INVALID_ARGUMENT,
            // Internal invariants, and any kind a later SDK adds before libmoda names it.
            _ => MODA_ERR_PANIC,
        };
        Self::new(code, e.to_string())
    }
}

/// A C string of `msg` (a NUL inside, which no message should hold, becomes `\0`).
pub(crate) fn c_string(msg: &str) -> CString {
    CString::new(msg.replace('\0', "\\0")).unwrap_or_default()
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    LAST_ERROR.with(|e| *e.borrow_mut() = c_string(msg));
}

/// The message of a panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    format!("internal error in libmoda (please report it): {what}")
}

/// Runs `f`, returning `on_panic` if it panics (the panic is this thread's last error).
/// Every exported function that returns no status runs behind this.
pub(crate) fn boundary<R>(on_panic: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            set_last_error(&panic_message(p.as_ref()));
            on_panic
        }
    }
}

/// The per-thread error messages of one handle.
#[derive(Debug, Default)]
pub(crate) struct HandleErrors(Mutex<HashMap<ThreadId, CString>>);

impl HandleErrors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ThreadId, CString>> {
        // Inserting or removing one entry leaves the map consistent if a panic interrupts.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the outcome of this thread's latest call on the handle: a failure's message
    /// is kept until the thread's next call on it; a success forgets it.
    fn record(&self, failure: Option<&str>) {
        let id = std::thread::current().id();
        let mut map = self.lock();
        match failure {
            Some(msg) => {
                map.insert(id, c_string(msg));
            }
            None => {
                map.remove(&id);
            }
        }
    }

    /// This thread's message, or "" (the pointer stays valid until this thread's next call
    /// on the handle: other threads only touch their own entries, and moving a `CString`
    /// inside the map does not move its bytes).
    pub(crate) fn current(&self) -> *const c_char {
        let id = std::thread::current().id();
        self.lock().get(&id).map_or(c"".as_ptr(), |m| m.as_ptr())
    }
}

/// Runs `f` behind the panic boundary and returns its status code. The outcome becomes this
/// thread's last error (cleared on success) and, when `handle` is given, the handle's message
/// for this thread.
pub(crate) fn status(
    handle: Option<&HandleErrors>,
    f: impl FnOnce() -> Result<(), Failure>,
) -> c_int {
    let outcome = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Failure::new(MODA_ERR_PANIC, panic_message(p.as_ref()))),
    };
    // Recording must not unwind into C either.
    let recorded = catch_unwind(AssertUnwindSafe(|| {
        let msg = outcome.as_ref().err().map(|f| f.msg.as_str());
        set_last_error(msg.unwrap_or(""));
        if let Some(h) = handle {
            h.record(msg);
        }
    }));
    match (outcome, recorded) {
        (Ok(()), Ok(())) => MODA_OK,
        (Err(f), _) => f.code,
        (Ok(()), Err(_)) => MODA_ERR_PANIC,
    }
}

/// The message of the last call on this thread that returned a status code: "" when that
/// call succeeded (or no call was made yet), otherwise why it failed. Calls that return no
/// status (accessors, constructors, destructors) leave it alone, except that a panic caught
/// in one of them is recorded here.
///
/// Use it after a call that has no handle to ask, such as moda_model_open().
///
/// Ownership: owned by libmoda; valid until this thread's next libmoda call. Never NULL.
/// Threads: each thread has its own last error.
#[no_mangle]
pub extern "C" fn moda_last_error() -> *const c_char {
    boundary(c"".as_ptr(), || LAST_ERROR.with(|e| e.borrow().as_ptr()))
}

/// A short English description of a status code, e.g. "the image could not be read or
/// decoded" for MODA_ERR_IMAGE; unknown codes give "unknown status code".
///
/// Ownership: a static string; do not free it. Never NULL.
/// Threads: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn moda_status_string(status: c_int) -> *const c_char {
    boundary(c"unknown status code".as_ptr(), || {
        let s = match status {
            MODA_OK => c"success",
            MODA_ERR_INVALID_ARGUMENT => c"invalid argument",
            MODA_ERR_BUNDLE => c"the bundle is missing or invalid",
            MODA_ERR_RUNTIME => c"ONNX Runtime could not be loaded or refused a graph",
            MODA_ERR_INFERENCE => c"running the model failed",
            MODA_ERR_IMAGE => c"the image could not be read or decoded",
            MODA_ERR_BUFFER_TOO_SMALL => c"the output buffer is too small",
            MODA_ERR_PANIC => c"internal error in libmoda",
            _ => c"unknown status code",
        };
        s.as_ptr()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_moda_err_panic_and_the_last_error() {
        let handle = HandleErrors::default();
        let code = status(Some(&handle), || panic!("boom"));
        assert_eq!(code, MODA_ERR_PANIC);
        // SAFETY: moda_last_error returns a valid C string.
        let last = unsafe { std::ffi::CStr::from_ptr(moda_last_error()) };
        assert!(last.to_string_lossy().contains("boom"), "{last:?}");
        // SAFETY: as above.
        let mine = unsafe { std::ffi::CStr::from_ptr(handle.current()) };
        assert!(mine.to_string_lossy().contains("boom"), "{mine:?}");
        // A success clears both.
        assert_eq!(status(Some(&handle), || Ok(())), MODA_OK);
        // SAFETY: as above.
        assert!(unsafe { std::ffi::CStr::from_ptr(moda_last_error()) }.is_empty());
        // SAFETY: as above.
        assert!(unsafe { std::ffi::CStr::from_ptr(handle.current()) }.is_empty());
        // Functions without a status return their fallback value.
        assert_eq!(boundary(-1, || -> i32 { panic!("again") }), -1);
    }

    #[test]
    fn every_code_has_a_description() {
        for code in MODA_OK..=MODA_ERR_PANIC {
            // SAFETY: a static C string.
            let s = unsafe { std::ffi::CStr::from_ptr(moda_status_string(code)) };
            assert_ne!(s.to_str().expect("utf-8"), "unknown status code", "{code}");
        }
    }
}
