//! `moda-sdk bench`: where the time of one description goes, and how fast a batch runs.
//!
//! Greedy search with exactly `tokens` generated tokens (`min_new_tokens = max_new_tokens`,
//! so `</s>` cannot end it early), one warm-up run, then the median over `reps` runs of each
//! stage ([`Timings`]). Per-token decode times are read from [`Timings::step_ms`] around an
//! early step (5) and a late one (60, or the last step for shorter runs): the mean of up to
//! five steps centred on it, which smooths one-step noise without hiding a trend. "Step `i`"
//! is the `i`-th decoder run after the prefill (1-based): it feeds generated token `i` with
//! `i + 1` positions already in the KV cache and yields token `i + 1`, the way
//! `scripts/bench_sdk.py` counts PyTorch's steps.
//!
//! Peak memory is the process's high-water resident set (`VmHWM` in `/proc/self/status`,
//! Linux only), read before the bandwidth measurement below allocates its buffer.
//!
//! **The memory floor of a decode step.** A step of one image reads every weight of the
//! decoder graph once (its linear layers and LM head; of the position table only a row, so
//! that table is left out) and the KV cache of the positions before it; it cannot take less
//! than those bytes divided by the machine's read bandwidth. `bench` measures that bandwidth
//! in the same run ([`read_bandwidth_gb_s`]: a sum over a 256 MiB buffer, larger than the
//! caches, on as many threads as ONNX Runtime uses, best of 12 passes: on a virtual machine
//! the first few passes over fresh memory can run at half the speed of the later ones) and
//! reports, beside the early and late steps, the bytes they read and their floor. The weight
//! bytes are the sizes of the decoder's files (the graph and its external data) less the
//! position table's: their few other bytes (graph, names, the padding that aligns each tensor
//! to a page) count too, a fraction of a percent.
//!
//! **A constrained description.** For a bundle with a caption schema, each run also describes
//! the image under the schema (greedy, the default a catalog job uses): its time, its decoder
//! runs (forced text goes in with the token before it) and how many of them computed the
//! logits of the allowed tokens only ([`moda_sdk::Timings::listed_runs`]).

use serde::{Deserialize, Serialize};

use moda_sdk::GenerationOptions;
use moda_sdk::{Error, Result};
use moda_sdk::{ImageInput, Moda, Timings};

/// The most measured runs `bench` makes.
pub const MAX_REPS: usize = 10_000;

/// The early step whose time [`BenchReport::token_ms_early`] reports.
pub const EARLY_STEP: usize = 5;
/// The late step whose time [`BenchReport::token_ms_late`] reports (or the last step).
pub const LATE_STEP: usize = 60;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchOptions {
    /// Tokens generated per description (forced: no early stop).
    pub max_new_tokens: usize,
    /// Measured runs (after one warm-up); medians are reported.
    pub reps: usize,
    /// Copies of the image described as one batch for the images/s figure.
    pub batch_size: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            reps: 5,
            batch_size: 8,
        }
    }
}

/// The measurements, medians over the runs; times in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The image, as named.
    pub image: String,
    /// The bundle's weight quantization.
    pub quantization: String,
    /// ONNX Runtime's intra-op threads.
    pub threads: usize,
    /// Tokens generated per description.
    pub tokens: usize,
    /// Measured runs.
    pub reps: usize,
    /// Images in the batch run.
    pub batch: usize,
    /// Decoding and preprocessing the image.
    pub preprocess_ms: f64,
    /// The image encoder.
    pub encoder_ms: f64,
    /// The projector.
    pub projector_ms: f64,
    /// The decoder over the image prefix and the BOS.
    pub prefill_ms: f64,
    /// All decoder steps after the prefill.
    pub decode_ms: f64,
    /// The step [`BenchReport::token_ms_early`] is centred on; `None` with fewer than 2 tokens.
    pub early_step: Option<usize>,
    /// Time of one decoder step around [`BenchReport::early_step`].
    pub token_ms_early: Option<f64>,
    /// The step [`BenchReport::token_ms_late`] is centred on.
    pub late_step: Option<usize>,
    /// Time of one decoder step around [`BenchReport::late_step`].
    pub token_ms_late: Option<f64>,
    /// The median time of every step, in order (step 1 first).
    pub step_ms: Vec<f64>,
    /// One whole description (`Moda::describe`).
    pub describe_ms: f64,
    /// Generated tokens per second of the whole description.
    pub tokens_per_s: f64,
    /// Decoder steps per second (the decode phase alone).
    pub decode_tokens_per_s: Option<f64>,
    /// One `Moda::describe_batch` of `batch` copies.
    pub batch_ms: f64,
    /// Images per second of the batch run.
    pub images_per_s: f64,
    /// The process's peak resident memory in MiB (`None` where it cannot be read).
    pub peak_rss_mb: Option<f64>,
    /// The machine's read bandwidth measured in this run, GB/s (see the module documentation).
    pub read_gb_per_s: f64,
    /// Bytes the early step reads (decoder weights and KV cache).
    pub step_bytes_early: Option<u64>,
    /// The early step's floor: its bytes at the measured bandwidth.
    pub floor_ms_early: Option<f64>,
    /// Bytes the late step reads.
    pub step_bytes_late: Option<u64>,
    /// The late step's floor.
    pub floor_ms_late: Option<f64>,
    /// One description under the bundle's caption schema (`None` without one), to its end.
    #[serde(default)]
    pub constrained: Option<ConstrainedReport>,
}

/// One description under the caption schema, medians over the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConstrainedReport {
    /// The whole description.
    pub describe_ms: f64,
    /// Its decoder runs after the prefill.
    pub decode_ms: f64,
    /// Tokens generated.
    pub tokens: usize,
    /// Decoder runs, the prefill included.
    pub decoder_runs: usize,
    /// Of those, the runs that computed the allowed tokens' logits only.
    pub listed_runs: usize,
}

/// Measures `image` with `moda` (see the module documentation).
pub fn bench(moda: &Moda, image: &ImageInput<'_>, opts: &BenchOptions) -> Result<BenchReport> {
    let d = moda.manifest().model;
    if opts.max_new_tokens == 0 || opts.reps == 0 || opts.batch_size == 0 {
        return Err(Error::InvalidArgument(
            "tokens, reps and batch must each be at least 1".into(),
        ));
    }
    if opts.reps > MAX_REPS || opts.batch_size > moda_sdk::model::MAX_BATCH {
        return Err(Error::InvalidArgument(format!(
            "reps must be at most {MAX_REPS} and batch at most {}",
            moda_sdk::model::MAX_BATCH
        )));
    }
    // The prefix and the BOS take a position each; the last token is never fed back, so
    // as many tokens fit as `describe` allows.
    let room = d.max_positions.saturating_sub(d.prefix_len);
    if opts.max_new_tokens > room {
        return Err(Error::InvalidArgument(format!(
            "{} tokens do not fit: the decoder covers {} positions, room for {room} generated \
             tokens after the image",
            opts.max_new_tokens, d.max_positions
        )));
    }
    let gen = GenerationOptions::default()
        .with_max_new_tokens(Some(opts.max_new_tokens))
        .with_min_new_tokens(opts.max_new_tokens)
        // Free text: a caption the schema completes would end before the token count.
        .with_constrain(moda_sdk::Constrain::None);
    let constrained_gen = moda
        .check_constrain(moda_sdk::Constrain::Schema)
        .is_ok()
        .then(|| GenerationOptions::default().with_constrain(moda_sdk::Constrain::Schema));
    let batch: Vec<ImageInput<'_>> = vec![*image; opts.batch_size];
    let describe = || -> Result<Timings> {
        let t = moda.describe(image, &gen)?.timings;
        if t.tokens != opts.max_new_tokens {
            return Err(Error::Internal(format!(
                "generated {} tokens instead of {}",
                t.tokens, opts.max_new_tokens
            )));
        }
        Ok(t)
    };
    let describe_batch = || -> Result<f64> {
        let t = std::time::Instant::now();
        for r in moda.describe_batch(&batch, &gen)? {
            r?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    // Warm-up: first runs allocate ONNX Runtime's arenas.
    describe()?;
    describe_batch()?;
    let mut runs = Vec::with_capacity(opts.reps);
    let mut batch_ms = Vec::with_capacity(opts.reps);
    let mut constrained = Vec::with_capacity(opts.reps);
    for _ in 0..opts.reps {
        runs.push(describe()?);
        batch_ms.push(describe_batch()?);
        if let Some(g) = &constrained_gen {
            constrained.push(moda.describe(image, g)?.timings);
        }
    }
    let med = |f: &dyn Fn(&Timings) -> f64| median(runs.iter().map(f).collect());
    let steps = opts.max_new_tokens - 1;
    let step_ms: Vec<f64> = (0..steps)
        .map(|i| {
            median(
                runs.iter()
                    .filter_map(|t| t.step_ms.get(i).copied())
                    .collect(),
            )
        })
        .collect();
    let at = |step: usize| -> (Option<usize>, Option<f64>) {
        if steps == 0 {
            return (None, None);
        }
        let s = step.clamp(1, steps);
        let lo = s.saturating_sub(2).max(1);
        let hi = (s + 2).min(steps);
        let window = &step_ms[lo - 1..hi];
        (
            Some(s),
            Some(window.iter().sum::<f64>() / window.len() as f64),
        )
    };
    let (early_step, token_ms_early) = at(EARLY_STEP);
    let (late_step, token_ms_late) = at(LATE_STEP);
    let decode_ms = med(&|t| t.decode_ms);
    let describe_ms = med(&|t| t.total_ms);
    let batch_ms = median(batch_ms);
    let peak_rss_mb = peak_rss_mb();
    let read_gb_per_s = read_bandwidth_gb_s(moda.intra_threads());
    let weights = decoder_weight_bytes(moda);
    let bytes = |step: Option<usize>| step.map(|s| weights + kv_bytes(moda, s));
    let floor = |bytes: Option<u64>| bytes.map(|b| b as f64 / (read_gb_per_s * 1e9) * 1e3);
    let (step_bytes_early, step_bytes_late) = (bytes(early_step), bytes(late_step));
    // Greedy search: every run writes the same description, with the same runs.
    let constrained = constrained.first().map(|t| ConstrainedReport {
        describe_ms: median(constrained.iter().map(|t| t.total_ms).collect()),
        decode_ms: median(constrained.iter().map(|t| t.decode_ms).collect()),
        tokens: t.tokens,
        decoder_runs: t.decoder_runs,
        listed_runs: t.listed_runs,
    });
    Ok(BenchReport {
        image: image.name(),
        quantization: moda.manifest().quantization.to_string(),
        threads: moda.intra_threads(),
        tokens: opts.max_new_tokens,
        reps: opts.reps,
        batch: opts.batch_size,
        preprocess_ms: med(&|t| t.preprocess_ms),
        encoder_ms: med(&|t| t.encoder_ms),
        projector_ms: med(&|t| t.projector_ms),
        prefill_ms: med(&|t| t.prefill_ms),
        decode_ms,
        early_step,
        token_ms_early,
        late_step,
        token_ms_late,
        step_ms,
        describe_ms,
        tokens_per_s: per_second(opts.max_new_tokens, describe_ms),
        decode_tokens_per_s: (steps > 0).then(|| per_second(steps, decode_ms)),
        batch_ms,
        images_per_s: per_second(opts.batch_size, batch_ms),
        peak_rss_mb,
        read_gb_per_s,
        step_bytes_early,
        floor_ms_early: floor(step_bytes_early),
        step_bytes_late,
        floor_ms_late: floor(step_bytes_late),
        constrained,
    })
}

/// The weight bytes a decode step reads: the decoder's files' sizes (the graph and its
/// external data), less its position table (`[max_positions + 2, hidden]` f32, of which a
/// step reads one row).
pub fn decoder_weight_bytes(moda: &Moda) -> u64 {
    let m = moda.manifest();
    let d = m.model;
    let size = |name: &str| m.files.get(name).map_or(0, |f| f.bytes);
    let file = m
        .graph(moda_sdk::manifest::Role::Decoder)
        .map_or(0, |g| size(&g.file) + g.data.as_deref().map_or(0, size));
    let positions = ((d.max_positions + 2) * d.hidden_size * 4) as u64;
    file.saturating_sub(positions)
}

/// The KV cache bytes decode step `step` (1-based, see the module documentation) reads for one
/// image: keys and values of every layer for the prefix, the BOS and the tokens before it.
pub fn kv_bytes(moda: &Moda, step: usize) -> u64 {
    let d = moda.manifest().model;
    let past = d.prefix_len + 1 + step;
    (2 * d.num_layers * d.num_heads * d.head_dim * past * 4) as u64
}

/// Passes over the buffer in [`read_bandwidth_gb_s`]: about 0.1 s in all at 30 GB/s.
const BANDWIDTH_PASSES: usize = 12;

/// The machine's read bandwidth in GB/s: the best of `BANDWIDTH_PASSES` (12) passes of `threads`
/// threads summing a 256 MiB buffer, each its own part (see the module documentation).
pub fn read_bandwidth_gb_s(threads: usize) -> f64 {
    const BYTES: usize = 256 << 20;
    // Filled, so that every page is mapped before the timed passes.
    let buf: Vec<u64> = (0..(BYTES / 8) as u64).collect();
    let part = buf.len().div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..BANDWIDTH_PASSES {
        let t = std::time::Instant::now();
        let total = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(part).map(|c| s.spawn(move || sum(c))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max(BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// A wrapping sum with 8 independent accumulators (so that the loads, not the adds, limit it).
fn sum(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for c in &mut chunks {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(w);
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &w| a.wrapping_add(w));
    acc.iter().fold(rest, |a, &w| a.wrapping_add(w))
}

fn per_second(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 / (ms / 1e3)
    } else {
        f64::INFINITY
    }
}

/// The median (the upper one of an even count); 0 for none.
fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The process's peak resident set in MiB: `VmHWM` of `/proc/self/status`.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// One graph's ONNX Runtime profile, summed: what each operator type costs per run of the
/// graph, and how much of a run no operator accounts for (ONNX Runtime's own work between
/// kernels: scheduling, allocating outputs, waking threads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileSummary {
    /// The profile file.
    pub file: String,
    /// Runs recorded (the warm-up included).
    pub runs: usize,
    /// Mean wall time of a run, in ms.
    pub run_ms: f64,
    /// Mean time of all kernels of a run, in ms.
    pub kernels_ms: f64,
    /// Operator types by their mean time per run, largest first: (type, nodes run per run,
    /// ms per run).
    pub ops: Vec<(String, f64, f64)>,
}

/// Sums a profile that ONNX Runtime wrote (a JSON array of trace events: one `model_run`
/// event per run and one `*_kernel_time` event per node run, durations in microseconds).
pub fn summarize_profile(path: &std::path::Path) -> std::result::Result<ProfileSummary, String> {
    #[derive(Deserialize)]
    struct Event {
        #[serde(default)]
        cat: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        dur: f64,
        #[serde(default)]
        args: serde_json::Map<String, serde_json::Value>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let events: Vec<Event> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut runs = 0usize;
    let mut run_us = 0.0;
    let mut kernels_us = 0.0;
    let mut ops: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
    for e in &events {
        match e.cat.as_str() {
            "Session" if e.name == "model_run" => {
                runs += 1;
                run_us += e.dur;
            }
            "Node" if e.name.ends_with("_kernel_time") => {
                let op = e
                    .args
                    .get("op_name")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?")
                    .to_string();
                let entry = ops.entry(op).or_default();
                entry.0 += 1;
                entry.1 += e.dur;
                kernels_us += e.dur;
            }
            _ => {}
        }
    }
    let per_run = |us: f64| {
        if runs > 0 {
            us / runs as f64 / 1e3
        } else {
            0.0
        }
    };
    let mut ops: Vec<(String, f64, f64)> = ops
        .into_iter()
        .map(|(op, (n, us))| (op, n as f64 / runs.max(1) as f64, per_run(us)))
        .collect();
    ops.sort_by(|a, b| b.2.total_cmp(&a.2));
    Ok(ProfileSummary {
        file: path.display().to_string(),
        runs,
        run_ms: per_run(run_us),
        kernels_ms: per_run(kernels_us),
        ops,
    })
}

#[cfg(test)]
mod tests {
    use super::summarize_profile;

    /// Sums against a profile written by hand: two runs (1 and 3 ms), three kernels.
    #[test]
    fn profile_sums_per_run() {
        let dir = std::env::temp_dir().join(format!("moda-profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("p.json");
        let events = r#"[
            {"cat": "Session", "name": "session_initialization", "dur": 50000},
            {"cat": "Session", "name": "model_run", "dur": 1000},
            {"cat": "Node", "name": "mm_1_kernel_time", "dur": 500, "args": {"op_name": "MatMul"}},
            {"cat": "Node", "name": "mm_1_fence_before", "dur": 9, "args": {"op_name": "MatMul"}},
            {"cat": "Node", "name": "add_2_kernel_time", "dur": 100, "args": {"op_name": "Add"}},
            {"cat": "Session", "name": "model_run", "dur": 3000},
            {"cat": "Node", "name": "mm_1_kernel_time", "dur": 700, "args": {"op_name": "MatMul"}}
        ]"#;
        std::fs::write(&file, events).expect("write");
        let p = summarize_profile(&file).expect("summary");
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(p.runs, 2);
        assert!((p.run_ms - 2.0).abs() < 1e-12, "{p:?}");
        assert!((p.kernels_ms - 0.65).abs() < 1e-12, "{p:?}");
        assert_eq!(p.ops.len(), 2);
        assert_eq!((p.ops[0].0.as_str(), p.ops[0].1), ("MatMul", 1.0));
        assert!((p.ops[0].2 - 0.6).abs() < 1e-12);
        assert_eq!((p.ops[1].0.as_str(), p.ops[1].1), ("Add", 0.5));
        assert!((p.ops[1].2 - 0.05).abs() < 1e-12);
        assert!(summarize_profile(&dir.join("missing.json"))
            .expect_err("missing")
            .contains("missing.json"));
    }
}
