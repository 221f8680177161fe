//! Finding ONNX Runtime (`moda_sdk::runtime`). One test per process: the runtime is loaded once
//! per process, and this test sets `ORT_DYLIB_PATH`.

use moda_sdk::runtime::{runtime, RuntimeError};

/// A wrong `ORT_DYLIB_PATH` is an error that names it and says how to fix it; it is not
/// silently replaced by another library.
#[test]
fn wrong_ort_dylib_path_is_a_clear_error() {
    let bogus = std::env::temp_dir().join("no-such-dir/libonnxruntime.so");
    std::env::set_var("ORT_DYLIB_PATH", &bogus);
    let err = runtime().expect_err("must fail");
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&bogus.display().to_string()), "{msg}");
    assert!(msg.contains("ORT_DYLIB_PATH"), "{msg}");
    assert!(msg.contains("scripts/setup.sh"), "{msg}");
    // The same error again, not a second attempt.
    assert_eq!(runtime().expect_err("still").to_string(), msg);
}
