//! The Rust side of the C layer's overhead benchmark: times `Moda::describe` directly, as
//! `ffi/examples/bench.c` times `moda_model_describe` through libmoda.so.
//!
//! ```sh
//! cargo build --release -p moda-ffi --example bench
//! target/release/examples/bench BUNDLE_DIR IMAGE [CALLS]
//! cc -O2 ffi/examples/bench.c -Iffi/include -Ltarget/release -lmoda \
//!    -Wl,-rpath,$PWD/target/release -o /tmp/bench_c && /tmp/bench_c BUNDLE_DIR IMAGE [CALLS]
//! ```
//!
//! Both print the mean and the fastest call in milliseconds after 5 warm-up calls, with one
//! intra-op thread (so that the thread pool's scheduling adds no noise).

use std::time::Instant;

use moda_sdk::{GenerationOptions, ImageInput, Moda, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: {} BUNDLE_DIR IMAGE [CALLS]", args[0]);
        std::process::exit(2);
    }
    let calls: usize = args.get(3).map_or(Ok(200), |s| s.parse())?;
    let moda = Moda::open(
        &args[1],
        &OpenOptions::default().with_intra_threads(Some(1)),
    )?;
    let image = ImageInput::Path(args[2].as_ref());
    let opts = GenerationOptions::default();
    let mut tokens = 0;
    for _ in 0..5 {
        tokens = moda.describe(&image, &opts)?.token_ids.len();
    }
    let mut best = f64::MAX;
    let start = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        let d = moda.describe(&image, &opts)?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(d);
    }
    let mean = start.elapsed().as_secs_f64() * 1e3 / calls as f64;
    println!("rust: {calls} calls, {tokens} tokens each: mean {mean:.4} ms, fastest {best:.4} ms");
    Ok(())
}
