//! Shared helpers for the integration tests: where the fixtures are, how to read the reference
//! tensors that `scripts/make_fixtures.py` computed with `transformers`, and how to compare.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub mod bad_images;
pub mod fuzz;
pub mod parity;
pub mod training;

/// `tests/fixtures`, wherever the tests run from; `MODA_TEST_FIXTURES` overrides it for a test
/// binary run outside the tree it was built in (scripts/gpu_check.sh on the device machine).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("MODA_TEST_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

/// A fixture path under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// All tensors of a reference safetensors file, on the CPU.
pub fn load_refs(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture(rel);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read reference file {}: {e}", path.display()))
}

/// One reference tensor by name, with a message naming what is missing.
pub fn get<'a>(refs: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    refs.get(name)
        .unwrap_or_else(|| panic!("reference tensor `{name}` missing"))
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .expect("a");
    let b = b
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .expect("b");
    let a = a.to_vec1::<f32>().expect("a values");
    let b = b.to_vec1::<f32>().expect("b values");
    max_abs_diff_slices(&a, &b)
}

/// The largest absolute difference between two slices of the same length.
pub fn max_abs_diff_slices(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Cosine similarity of two vectors (any shape, flattened).
pub fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("a");
    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("b");
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A fresh temporary directory, `moda-test-<tag>-<random>` under the system temp dir, removed
/// on drop (a `tempfile::TempDir`: unique names, created without races).
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// Creates it; `tag` names the test in the directory's name.
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("moda-test-{tag}-"))
            .tempdir()
            .expect("create temp dir");
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Exports the original recipe's fixture (clip_gelu encoder, `moda/fashion_opt.pth` projector
/// and OPT, opt_preln's tokenizer) as a verified fp32 bundle at `out`, replacing what is there,
/// and returns `out`. Tests call it once per test binary (behind a `OnceLock`) with a path
/// under `CARGO_TARGET_TMPDIR`.
pub fn export_recipe_bundle(out: &Path, quantize: exporter::Quantize) -> PathBuf {
    let opts = exporter::ExportOptions {
        checkpoint: fixture("moda/fashion_opt.pth"),
        out: out.to_path_buf(),
        encoder: fixture("clip_gelu").display().to_string(),
        decoder: fixture("opt_preln").display().to_string(),
        quantize,
        block_size: None,
        force: true,
        verify: true,
        max_new_tokens: exporter::DEFAULT_MAX_NEW_TOKENS,
        caption_template: None,
        catalog: None,
    };
    if let Err(e) = exporter::export_onnx(&opts) {
        panic!("export the recipe fixture to {}: {e}", out.display());
    }
    out.to_path_buf()
}

/// The recipe fixture exported to `out` with a caption schema: `template`'s fields, their
/// values counted over the CSV at `catalog` (a column per field).
pub fn export_recipe_bundle_with_schema(out: &Path, template: &str, catalog: &Path) -> PathBuf {
    let opts = exporter::ExportOptions {
        checkpoint: fixture("moda/fashion_opt.pth"),
        out: out.to_path_buf(),
        encoder: fixture("clip_gelu").display().to_string(),
        decoder: fixture("opt_preln").display().to_string(),
        quantize: exporter::Quantize::None,
        block_size: None,
        force: true,
        verify: false,
        max_new_tokens: exporter::DEFAULT_MAX_NEW_TOKENS,
        caption_template: Some(template.to_string()),
        catalog: Some(catalog.to_path_buf()),
    };
    if let Err(e) = exporter::export_onnx(&opts) {
        panic!(
            "export the recipe fixture with a schema to {}: {e}",
            out.display()
        );
    }
    out.to_path_buf()
}

/// The id of a process that has exited (for tests of what is left behind by processes that
/// are gone).
pub fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait");
    pid
}

/// A running process (`sleep 60`), killed when dropped (a failed test leaves none behind): a
/// pid that is alive, beside [`dead_pid`]'s.
pub struct LiveProcess(std::process::Child);

impl LiveProcess {
    /// Starts it.
    pub fn start() -> Self {
        Self(
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("spawn sleep"),
        )
    }

    /// Its pid.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for LiveProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
