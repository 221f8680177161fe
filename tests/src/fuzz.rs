//! The bodies of the fuzz targets (`tests/fuzz`, run with `cargo +nightly fuzz`), written once
//! here so that the ordinary test run replays the committed corpora and regressions through
//! the very same code (`tests/bad_input.rs`).
//!
//! Each target takes arbitrary bytes, hands them to a reader of hostile input (an image, a
//! bundle's `moda.json`, a `tokenizer.json`, weight files, a catalog CSV, a job's output file)
//! and must return, whatever the bytes: errors are fine; a panic, a hang or an unbounded
//! allocation is a bug. A few targets also check a property that must hold whenever the
//! input was accepted (a manifest that parses survives a round trip; an output file that
//! opened can be resumed after a record is appended); a failed check panics.
//!
//! Readers that take a path get the bytes through one scratch file per process and thread
//! ([`scratch_dir`]), rewritten for every input.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use moda_cli::catalog::{JobHeader, Record, ResumableOutput};
use moda_models::preprocess::{decode_image, ImageLimits, ImageProcessor, ImageProcessorConfig};
use moda_models::tokenizer::ModaTokenizer;
use moda_models::weights::Weights;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name: the file names under `tests/fuzz/fuzz_targets/` and the folders
/// under `tests/fuzz/corpus/` and `tests/fuzz/regressions/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("image", image),
    ("manifest", manifest),
    ("tokenizer", tokenizer),
    ("safetensors", safetensors),
    ("pth", pth),
    ("catalog_csv", catalog_csv),
    ("resumable_output", resumable_output),
];

/// Most tensors a weights target reads from one input.
const MAX_TENSORS: usize = 64;
/// Most token ids the tokenizer target decodes.
const MAX_IDS: usize = 64;

/// Decodes `data` as an image under small limits (4096x4096, 64 MiB), then preprocesses it
/// with the default CLIP settings (224x224).
pub fn image(data: &[u8]) {
    let _report = EscapeReport;
    let limits = ImageLimits {
        max_width: 4096,
        max_height: 4096,
        max_alloc: 64 << 20,
    };
    let Ok(img) = decode_image(data, "fuzz", &limits) else {
        return;
    };
    if let Ok(processor) = ImageProcessor::new(ImageProcessorConfig::default()) {
        let _ = processor.preprocess(&img);
    }
}

/// Parses and validates `data` as a bundle's `moda.json`; one that is accepted must come back
/// equal from its own JSON (floating-point numbers to within an ulp: serde_json's default
/// parser is not correctly rounded, and the free-form parts, graph shapes included, may hold
/// any number).
pub fn manifest(data: &[u8]) {
    let _report = EscapeReport;
    let Ok(m) = moda_sdk::manifest::parse(data) else {
        return;
    };
    let json = serde_json::to_value(&m).expect("an accepted manifest serialises");
    let text = serde_json::to_vec(&json).expect("a JSON value serialises");
    let again = moda_sdk::manifest::parse(&text)
        .unwrap_or_else(|e| panic!("an accepted manifest, written again, is refused: {e}"));
    let again = serde_json::to_value(&again).expect("an accepted manifest serialises");
    assert!(
        same_json(&again, &json),
        "a manifest changed in a round trip"
    );
}

/// Equal JSON values, floating-point numbers equal to within an ulp.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// Loads `data` as a `tokenizer.json`, then decodes ids taken from the input's bytes (some
/// outside the vocabulary), as the SDK decodes generated ids: all at once, and growing one id
/// at a time.
pub fn tokenizer(data: &[u8]) {
    let _report = EscapeReport;
    let Ok(tok) = ModaTokenizer::from_tokenizer_json_bytes(data, Path::new("fuzz/tokenizer.json"))
    else {
        return;
    };
    let range = tok.vocab_size().saturating_add(3).min(u32::MAX as usize) as u32;
    let mut ids: Vec<u32> = vec![tok.bos_id(), tok.eos_id(), tok.pad_id()];
    ids.extend(
        data.rchunks(2)
            .take(MAX_IDS)
            .map(|c| c.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) % range),
    );
    let _ = tok.decode(&ids, false);
    let known: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| tok.inner().id_to_token(id).is_some())
        .collect();
    for n in 1..=known.len() {
        let _ = tok.decode(&known[..n], true);
    }
}

/// Opens `data` as a safetensors weight file, lists its tensors and reads them.
pub fn safetensors(data: &[u8]) {
    let _report = EscapeReport;
    weights(data, "model.safetensors");
}

/// Opens `data` as a PyTorch zip checkpoint (`.pth`, `pytorch_model.bin`), lists its tensors
/// and reads them. An input that does not start like a zip (`PK`) is the checkpoint's pickle:
/// it is stored as `archive/data.pkl` in a zip beside the storages `archive/data/0` to `3` of
/// [`PTH_STORAGE_BYTES`] bytes each, so that mutations of the pickle reach the pickle reader
/// instead of breaking the zip's offsets.
pub fn pth(data: &[u8]) {
    let _report = EscapeReport;
    if data.starts_with(b"PK") {
        weights(data, "model.pth");
    } else if let Ok(zip) = pth_zip(data) {
        weights(&zip, "model.pth");
    }
}

/// The size of each storage the pth target puts beside a bare pickle.
pub const PTH_STORAGE_BYTES: usize = 256;

/// A PyTorch zip checkpoint holding `pickle` as its `data.pkl`.
pub fn pth_zip(pickle: &[u8]) -> zip::result::ZipResult<Vec<u8>> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", stored)?;
    w.write_all(pickle)?;
    for key in 0..4u8 {
        w.start_file(format!("archive/data/{key}"), stored)?;
        let bytes: Vec<u8> = (0..PTH_STORAGE_BYTES)
            .map(|i| (i as u8).wrapping_mul(37).wrapping_add(key))
            .collect();
        w.write_all(&bytes)?;
    }
    w.start_file("archive/version", stored)?;
    w.write_all(b"3\n")?;
    Ok(w.finish()?.into_inner())
}

fn weights(data: &[u8], name: &str) {
    let Some(path) = scratch_file(name, data) else {
        return;
    };
    let Ok(w) = Weights::from_file(&path) else {
        return;
    };
    for name in w.names().into_iter().take(MAX_TENSORS) {
        let _ = w.shape(&name);
        let _ = w.get_unchecked(&name, DType::F32, &Device::Cpu);
    }
    let _ = w.unused();
}

/// Lists the images of `data` as a catalog CSV (column `image`).
pub fn catalog_csv(data: &[u8]) {
    let _report = EscapeReport;
    let Some(path) = scratch_file("catalog.csv", data) else {
        return;
    };
    let _ = moda_cli::catalog::list_csv(&path, "image", None);
}

/// Opens `data` as the output file of a `describe` job, then of an `embed` job; when it opens,
/// appends a record, and the file must then open again and hold that record.
pub fn resumable_output(data: &[u8]) {
    let _report = EscapeReport;
    for task in ["describe", "embed"] {
        let Some(path) = scratch_file("output.jsonl", data) else {
            return;
        };
        let header = JobHeader {
            task: task.to_string(),
            shard: "0/1".to_string(),
            options: serde_json::json!({"max_new_tokens": 20}),
            model: "0".repeat(64),
        };
        let Ok((mut out, _)) = ResumableOutput::open(&path, &header) else {
            continue;
        };
        let record = Record::Error {
            image: "fuzz.jpg".to_string(),
            image_hex: None,
            error: "fuzz".to_string(),
        };
        if out.append(&record).is_err() {
            continue;
        }
        drop(out);
        let (_, recorded) = ResumableOutput::open(&path, &header).unwrap_or_else(|e| {
            panic!("an output file that opened is refused after a record was appended: {e}")
        });
        assert_eq!(
            recorded.images.get(b"fuzz.jpg".as_slice()),
            Some(&true),
            "the appended record is not read back"
        );
    }
}

/// The scratch folder of this process and thread, where the targets that read files write
/// their input (created on first use; nothing removes it, see [`remove_scratch_dir`]).
pub fn scratch_dir() -> PathBuf {
    let thread: String = format!("{:?}", std::thread::current().id())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    std::env::temp_dir().join(format!("moda-fuzz-{}-{thread}", std::process::id()))
}

/// Removes this thread's [`scratch_dir`].
pub fn remove_scratch_dir() {
    let _ = std::fs::remove_dir_all(scratch_dir());
}

/// `data` written to the file `name` in the [`scratch_dir`]; `None` if the file system
/// refuses (nothing to test then).
fn scratch_file(name: &str, data: &[u8]) -> Option<PathBuf> {
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(name);
    std::fs::write(&path, data).ok()?;
    Some(path)
}

thread_local! {
    /// The message and place of the last panic on this thread, kept by [`init`]'s hook.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// For the fuzz targets' `init`: replaces libfuzzer-sys's panic hook, which aborts on every
/// panic, with one that only remembers the panic's message.
///
/// Some panics are part of the libraries' normal work and are caught where they happen:
/// libjpeg reports a corrupt JPEG by unwinding (the mozjpeg crate's error manager), and the
/// weights reader catches the panics of candle's pickle reader. Under libfuzzer-sys's hook
/// each of those would be reported as a crash. With this hook, a panic that leaves a target is
/// still one (libfuzzer-sys aborts when the target unwinds), and the target prints its message
/// first (see `EscapeReport`).
pub fn init() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let place = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = Some(format!("{msg} at {place}")));
    }));
}

/// Held by every target: dropped while a panic leaves the target, it prints the message that
/// [`init`]'s hook kept (without that hook there is none: the default hook printed it).
struct EscapeReport;

impl Drop for EscapeReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(Some(msg)) = LAST_PANIC.try_with(|p| p.borrow_mut().take()) {
                eprintln!("panic escaped the fuzz target: {msg}");
            }
        }
    }
}
