//! `bench`: runs the library's benchmark of a bundle and prints its report (or its JSON).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use moda_cli::bench::{bench, BenchOptions, BenchReport};
use moda_sdk::ImageInput;

use crate::{open_model_with, BenchArgs};

pub(crate) fn run_bench(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(dir) = &a.profile {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the profile directory {}", dir.display()))?;
    }
    let moda = open_model_with(&a.model, |o| o.with_profile_dir(a.profile.clone()))?;
    let d = moda.manifest().model;
    // As many tokens as `describe` allows (see `bench`).
    let room = d.max_positions.saturating_sub(d.prefix_len).max(1);
    let opts = BenchOptions {
        max_new_tokens: a
            .max_new_tokens
            .unwrap_or(BenchOptions::default().max_new_tokens.min(room)),
        reps: a.reps,
        batch_size: a.batch_size,
    };
    let report = bench(&moda, &ImageInput::Path(&a.image), &opts)?;
    let mut profiles = Vec::new();
    for (role, file) in moda.end_profiling()? {
        let summary = moda_cli::bench::summarize_profile(&file)
            .map_err(|e| anyhow::anyhow!("reading ONNX Runtime's profile: {e}"))?;
        profiles.push((role, summary));
    }
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if a.profile.is_some() {
            v["profiles"] = serde_json::to_value(
                profiles
                    .iter()
                    .map(|(role, s)| (role.name(), s))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )?;
        }
        println!("{v}");
    } else {
        print_bench(&report, moda.dir());
        for (role, p) in &profiles {
            print_profile(*role, p);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A graph's profile: every graph's file and per-run totals; the decoder's operator types.
pub(crate) fn print_profile(role: moda_sdk::manifest::Role, p: &moda_cli::bench::ProfileSummary) {
    println!(
        "profile of the {role} graph ({}): {} runs, {:.3} ms per run, of which kernels {:.3} ms \
         and ONNX Runtime between them {:.3} ms",
        p.file,
        p.runs,
        p.run_ms,
        p.kernels_ms,
        (p.run_ms - p.kernels_ms).max(0.0)
    );
    if role == moda_sdk::manifest::Role::Decoder {
        for (op, n, ms) in &p.ops {
            println!("  {op:<28}{n:8.1} nodes {ms:10.3} ms per run");
        }
    }
}

pub(crate) fn print_bench(r: &BenchReport, dir: &Path) {
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:10.2} ms"));
    println!(
        "{}: bundle {} ({}), {} threads, {} tokens, median of {} runs",
        r.image,
        dir.display(),
        r.quantization,
        r.threads,
        r.tokens,
        r.reps
    );
    println!("  {:<22}{:10.2} ms", "preprocess", r.preprocess_ms);
    println!("  {:<22}{:10.2} ms", "encoder", r.encoder_ms);
    println!("  {:<22}{:10.2} ms", "projector", r.projector_ms);
    println!("  {:<22}{:10.2} ms", "prefill", r.prefill_ms);
    // A step beside its memory floor: the bytes it reads at the bandwidth measured here.
    let floor = |ms: Option<f64>, bytes: Option<u64>, floor: Option<f64>| match (ms, bytes, floor) {
        (Some(ms), Some(b), Some(f)) if f > 0.0 => format!(
            "  (floor {f:.2} ms: {:.0} MB at {:.1} GB/s; {:.2}x)",
            b as f64 / 1e6,
            r.read_gb_per_s,
            ms / f
        ),
        _ => String::new(),
    };
    if let Some(s) = r.early_step {
        println!(
            "  {:<22}{}{}",
            format!("decode step {s}"),
            opt(r.token_ms_early),
            floor(r.token_ms_early, r.step_bytes_early, r.floor_ms_early)
        );
    }
    if let Some(s) = r.late_step.filter(|&s| Some(s) != r.early_step) {
        println!(
            "  {:<22}{}{}",
            format!("decode step {s}"),
            opt(r.token_ms_late),
            floor(r.token_ms_late, r.step_bytes_late, r.floor_ms_late)
        );
    }
    let steps = r
        .decode_tokens_per_s
        .map_or(String::new(), |v| format!("  ({v:.1} steps/s)"));
    println!(
        "  {:<22}{:10.2} ms{steps}",
        "decode, all steps", r.decode_ms
    );
    println!(
        "  {:<22}{:10.2} ms  ({:.1} tokens/s)",
        "describe", r.describe_ms, r.tokens_per_s
    );
    println!(
        "  {:<22}{:10.2} ms  ({:.1} images/s)",
        format!("batch of {}", r.batch),
        r.batch_ms,
        r.images_per_s
    );
    if let Some(c) = &r.constrained {
        println!(
            "  {:<22}{:10.2} ms  ({} tokens, {} decoder runs, {} of them listed; decode {:.2} ms)",
            "describe, schema", c.describe_ms, c.tokens, c.decoder_runs, c.listed_runs, c.decode_ms
        );
    }
    match r.peak_rss_mb {
        Some(m) => println!("  {:<22}{m:10.0} MiB", "peak RSS"),
        None => println!("  {:<22}{:>10}", "peak RSS", "unknown"),
    }
}
