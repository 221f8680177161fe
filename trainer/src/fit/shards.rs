//! Data parallelism on the CPU: a micro-batch split into shards that run forward and backward
//! at once, each on its own thread with its own dropout generator, on a rayon pool of one
//! thread per shard; their gradients are added into the optimizer's in shard order.

use candle_core::Device;
use moda_models::CaptionModel;

use crate::error::{Error, Result};
use crate::optim::AdamW;

use super::batches::{loss_sum, select_images, Prepared};

/// `n` samples in `k` contiguous, near-equal, non-empty ranges (fewer when `n < k`).
pub(super) fn shard_ranges(n: usize, k: usize) -> Vec<std::ops::Range<usize>> {
    let k = k.clamp(1, n.max(1));
    (0..k)
        .map(|i| (i * n / k)..((i + 1) * n / k))
        .filter(|r| !r.is_empty())
        .collect()
}

/// The dropout generator state of shard `k` of a micro-batch whose model state is `state`
/// (SplitMix64's finaliser over the state plus `k + 1` golden-ratio increments).
pub(super) fn shard_seed(state: u64, k: usize) -> u64 {
    let mut z = state.wrapping_add((k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One shard's summed loss, predicted tokens and gradients of the summed loss.
pub(super) type ShardResult = Result<(f64, usize, candle_core::backprop::GradStore)>;

/// The thread pool the shards of a micro-batch run on ([`sharded_step`]): one thread per
/// shard, made on first use (a process trains with one shard count).
pub(super) fn shard_pool(shards: usize) -> Result<&'static rayon::ThreadPool> {
    if let Some(pool) = SHARD_POOL.get() {
        return Ok(pool);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(shards.max(1))
        .thread_name(|i| format!("shard-{i}"))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start the training threads: {e}")))?;
    Ok(SHARD_POOL.get_or_init(|| pool))
}

/// Runs `tasks` as tasks of `pool` (as many at once as it has threads) and returns their
/// results in order; a task that panics gives an error naming `what`.
pub(super) fn on_pool<T, F>(pool: &rayon::ThreadPool, tasks: Vec<F>, what: &str) -> Vec<Result<T>>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let mut slots: Vec<Option<Result<T>>> = tasks.iter().map(|_| None).collect();
    pool.scope(|sc| {
        for (task, slot) in tasks.into_iter().zip(slots.iter_mut()) {
            sc.spawn(move |_| {
                *slot = Some(
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)).unwrap_or_else(
                        |_| Err(Error::InvalidArgument(format!("{what} panicked"))),
                    ),
                );
            });
        }
    });
    slots
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::InvalidArgument(format!("{what} did not run")))))
        .collect()
}

/// Runs `f` in [`shard_pool`]'s pool when there is one, so that the parallel iterators in it
/// (the optimizer's) use every core: rayon's global pool then has one thread, the cores being
/// divided between the shards for candle's products.
pub(super) fn on_all_cores<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match SHARD_POOL.get() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// [`shard_pool`]'s pool, once made.
pub(super) static SHARD_POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();

/// Forward and backward of one micro-batch split into `shards` on as many threads (CPU), each
/// on a clone of the model (shared weights) with a dropout generator of its own; the model's
/// generator then moves on by one draw. Returns the micro-batch's mean loss; the gradients of
/// that mean, divided by `grad_accum`, are added to `optimizer`. The result depends on the
/// number of shards (dropout draws, summation order), not on the number of cores.
#[allow(clippy::too_many_arguments)]
pub(super) fn sharded_step(
    model: &CaptionModel,
    data: &Prepared,
    draws: Option<&[crate::augment::Draw]>,
    idx: &[usize],
    shards: &[std::ops::Range<usize>],
    pad: u32,
    device: &Device,
    grad_accum: usize,
    optimizer: &mut AdamW,
) -> Result<f32> {
    let base = model.decoder().dropout_state();
    // The shards run as tasks of a rayon pool of one thread per shard. An op of a shard that
    // splits its rows on rayon (our kernels, some of candle's) then splits them on that pool,
    // from inside it: the shard's thread runs them itself, and a thread done with its shard
    // steals some. On plain threads of their own, the shards' splits all went to rayon's
    // global pool (one thread: the cores are divided between the shards) and each shard slept
    // while they queued there.
    let tasks: Vec<_> = shards
        .iter()
        .enumerate()
        .map(|(k, range)| {
            let fork = model.clone();
            if let Some(b) = base {
                fork.decoder().set_dropout_state(shard_seed(b, k));
            }
            let range = range.clone();
            move || -> ShardResult {
                let draws = draws.map(|d| &d[range.clone()]);
                let imgs = select_images(data, &idx[range.clone()], device, draws)?;
                let (sum, count) = loss_sum(&fork, data, &imgs, &idx[range], pad, device)?;
                let value = sum.to_scalar::<f32>()? as f64;
                let grads = sum.backward()?;
                Ok((value, count, grads))
            }
        })
        .collect();
    let pool = shard_pool(shards.len())?;
    let results = on_pool(pool, tasks, "a training shard");
    if let Some(b) = base {
        model
            .decoder()
            .set_dropout_state(shard_seed(b, shards.len()));
    }
    let parts = results.into_iter().collect::<Result<Vec<_>>>()?;
    let count = parts.iter().map(|p| p.1).sum::<usize>().max(1);
    let mean = parts.iter().map(|p| p.0).sum::<f64>() / count as f64;
    if mean.is_finite() {
        let scale = 1.0 / (count as f64 * grad_accum as f64);
        let stores: Vec<_> = parts.iter().map(|p| &p.2).collect();
        on_all_cores(|| optimizer.accumulate_scaled(&stores, scale))?;
    }
    Ok(mean as f32)
}
