//! Peak memory of loading real-size backbones, against the size of their weight files.
//!
//! ```sh
//! cargo run --release -p moda-models --example load_memory -- clip DIR
//! cargo run --release -p moda-models --example load_memory -- opt DIR
//! ```
//! Prints one JSON line: the weight files' total size, the peak resident set (VmHWM) and the
//! ratio. Run one model per process so the peak belongs to that load alone.

use std::path::Path;

use candle_core::{DType, Device};
use moda_models::{ClipVision, Opt};

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.ends_with(".safetensors") || n.ends_with(".bin")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (kind, dir) = match args.as_slice() {
        [_, k, d] => (k.as_str(), Path::new(d)),
        _ => return Err("usage: load_memory clip|opt DIR".into()),
    };
    let before = status_kib("VmRSS:");
    let t = std::time::Instant::now();
    // Keep the model alive until RSS is read.
    let model: Box<dyn std::any::Any> = match kind {
        "clip" => Box::new(ClipVision::from_dir(dir, DType::F32, &Device::Cpu)?),
        "opt" => Box::new(Opt::from_dir(dir, DType::F32, &Device::Cpu)?),
        other => return Err(format!("unknown model kind {other}").into()),
    };
    let secs = t.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:") * 1024;
    let after = status_kib("VmRSS:") * 1024;
    let files = weight_bytes(dir);
    println!(
        "{{\"model\":\"{kind}\",\"dir\":\"{}\",\"weight_file_bytes\":{files},\"rss_before_bytes\":{},\"peak_rss_bytes\":{peak},\"rss_after_load_bytes\":{after},\"peak_over_files\":{:.3},\"load_seconds\":{secs:.2}}}",
        dir.display(),
        before * 1024,
        peak as f64 / files.max(1) as f64
    );
    drop(model);
    Ok(())
}
