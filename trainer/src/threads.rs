//! How long candle's element-wise worker threads spin between ops.
//!
//! candle's CPU backend runs element-wise ops of 64k values or more on a pool of its own
//! (threads `candle-bp-*`, one fewer than the cores), whose workers spin for
//! `CANDLE_BARRIER_POOL_SPIN_LIMIT` pauses (25,000 by default) after each op before they sleep.
//! A training step alternates those ops with matrix products on rayon's pool, which keeps
//! every core busy; a worker still spinning then takes a core from a product. The trainer
//! parks them at once: the real-size step (`examples/bench_step.rs`) is faster for it on 2
//! cores and the tiny preset's epochs are unchanged (`docs/PERFORMANCE.md` has the figures).

/// The spin limit the trainer runs with unless the user sets one: park at once.
const SPIN_LIMIT: &str = "0";

/// Sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to 0 unless it is already set. candle reads it once,
/// when its pool starts (at the first large element-wise op), so call this at start-up, before
/// other threads run. Returns whether it set the variable.
pub fn park_idle_elementwise_workers() -> bool {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_some() {
        return false;
    }
    // Edition 2021: `set_var` is safe; it is called before any thread reads the environment.
    std::env::set_var(VAR, SPIN_LIMIT);
    true
}
