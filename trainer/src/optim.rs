//! The optimiser side of the original recipe, written out so that its state can be saved and
//! resumed exactly: AdamW as `torch.optim.AdamW` (Loshchilov and Hutter, "Decoupled Weight
//! Decay Regularization", 2019; PyTorch's single-tensor update, step for step), gradient
//! clipping as `torch.nn.utils.clip_grad_norm_`, and the StepLR schedule.
//!
//! candle_nn's `AdamW` computes the same update but keeps its moments private, so a resumed run
//! could not continue with them.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `StepLR(step_size, gamma)` stepped once per epoch: the learning rate of `epoch` (0-based).
pub fn step_lr(base_lr: f64, epoch: usize, step_size: usize, gamma: f64) -> f64 {
    base_lr * gamma.powi((epoch / step_size.max(1)) as i32)
}

/// Linear warm-up over `warmup` epochs, then cosine decay towards zero at `epochs`; the
/// learning rate `progress` epochs into the run (fractional: the trainer passes the middle of
/// each optimizer step, so the first step's rate is small but not 0, and the last's not 0).
pub fn cosine_lr(base_lr: f64, progress: f64, warmup: f64, epochs: f64) -> f64 {
    if warmup > 0.0 && progress < warmup {
        return base_lr * progress.max(0.0) / warmup;
    }
    let span = (epochs - warmup).max(1e-9);
    let t = ((progress - warmup) / span).clamp(0.0, 1.0);
    base_lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// AdamW's hyper-parameters; the defaults are PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    /// Learning rate (set by the schedule before each step).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over named parameters, with gradient accumulation.
pub struct AdamW {
    /// Hyper-parameters.
    pub params: AdamWParams,
    vars: Vec<(String, Var)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    grads: Vec<Option<Tensor>>,
    /// A factor of every accumulated gradient not yet applied to the tensors in `grads`:
    /// clipping records its coefficient here, and the step multiplies each gradient by it as
    /// it reads it, instead of writing every gradient again. 1 when nothing is pending.
    grad_scale: f64,
    step: u64,
}

impl AdamW {
    /// An optimiser over `vars` (name, variable), moments at zero.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        // Separate storages: the CPU step updates the moments in place.
        let zeros = || {
            vars.iter()
                .map(|(_, v)| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let exp_avg = zeros()?;
        let exp_avg_sq = zeros()?;
        let grads = vec![None; vars.len()];
        Ok(Self {
            params,
            vars,
            exp_avg,
            exp_avg_sq,
            grads,
            grad_scale: 1.0,
            step: 0,
        })
    }

    /// The parameters, by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Optimiser steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Adds this backward pass's gradients to the accumulated ones (`loss.backward()`
    /// without `zero_grad()`).
    pub fn accumulate(&mut self, store: &GradStore) -> Result<()> {
        self.add_grads(&[store], None)
    }

    /// Adds `scale` times the gradients of each of `stores`, in order (the shards of a
    /// micro-batch whose loss was a sum: `scale` turns each into its part of the mean).
    pub fn accumulate_scaled(&mut self, stores: &[&GradStore], scale: f64) -> Result<()> {
        self.add_grads(stores, Some(scale))
    }

    // Here and in `clip_grad_norm` and `step`, the CPU's small parameters are shared out over
    // the threads of the current rayon pool; each parameter's arithmetic is the same as on one
    // thread, in the same order, so the result does not depend on the number of threads. The
    // large ones stay on the calling thread, one after another: candle splits their
    // element-wise ops over its own pool, and running two at once only made the threads
    // contend (a real-size step's clipping and AdamW took longer and varied more). On a GPU
    // every op stays on the calling thread, queued on the device's stream in parameter order.
    fn add_grads(&mut self, stores: &[&GradStore], scale: Option<f64>) -> Result<()> {
        // Gradients added after a clip: apply the clip's pending factor to the earlier ones
        // first, so that it does not reach the new ones.
        self.apply_grad_scale()?;
        let add = |(acc, (_, var)): (&mut Option<Tensor>, &(String, Var))| -> Result<()> {
            for store in stores {
                if let Some(g) = store.get(var.as_tensor()) {
                    let g = match scale {
                        Some(s) => (g * s)?,
                        None => g.clone(),
                    };
                    *acc = Some(match acc.take() {
                        Some(acc) => (acc + g)?,
                        None => g,
                    });
                }
            }
            Ok(())
        };
        (self.grads.par_iter_mut().zip(self.vars.par_iter()))
            .filter(|(_, (_, v))| shared_out(v))
            .try_for_each(add)?;
        (self.grads.iter_mut().zip(self.vars.iter()))
            .filter(|(_, (_, v))| !shared_out(v))
            .try_for_each(add)
    }

    /// Whether gradients are waiting for a step.
    pub fn has_grads(&self) -> bool {
        self.grads.iter().any(Option::is_some)
    }

    /// Drops the accumulated gradients (`zero_grad()`).
    pub fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
        self.grad_scale = 1.0;
    }

    /// Multiplies the accumulated gradients by the pending factor (`grad_scale`), as new
    /// tensors: a gradient may share its storage with another one of the backward pass.
    fn apply_grad_scale(&mut self) -> Result<()> {
        let s = std::mem::replace(&mut self.grad_scale, 1.0);
        if s != 1.0 {
            for g in self.grads.iter_mut().flatten() {
                *g = (&*g * s)?;
            }
        }
        Ok(())
    }

    /// `clip_grad_norm_(params, max_norm)`: scales the accumulated gradients so that their
    /// global L2 norm is at most `max_norm`; returns the norm before clipping. The scaling is
    /// recorded, not written: [`AdamW::step`] applies it as it reads each gradient.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        // Each parameter's sum of squares (on some thread, on the CPU), then added in
        // parameter order.
        let square_sum = |g: &Option<Tensor>| -> Result<Option<f64>> {
            let Some(g) = g else { return Ok(None) };
            if fused::takes(&[g]) {
                return Ok(Some(fused::square_sum(g)?));
            }
            Ok(Some(
                g.sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?,
            ))
        };
        let mut sums = (self.grads.par_iter().zip(self.vars.par_iter()))
            .map(|(g, (_, v))| {
                if shared_out(v) {
                    square_sum(g)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        for ((sum, g), (_, v)) in sums.iter_mut().zip(&self.grads).zip(&self.vars) {
            if !shared_out(v) {
                *sum = square_sum(g)?;
            }
        }
        let mut total = 0f64;
        for s in sums.into_iter().flatten() {
            total += s;
        }
        let norm = self.grad_scale * total.sqrt();
        // PyTorch: clip_coef = max_norm / (norm + 1e-6), clamped to 1.
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            self.grad_scale *= coef;
        }
        Ok(norm)
    }

    /// One AdamW step with the accumulated gradients, then `zero_grad()`. Parameters without
    /// a gradient are left alone, as PyTorch does.
    pub fn step(&mut self) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - p.beta1.powi(t);
        let bias_correction2 = 1.0 - p.beta2.powi(t);
        let step_size = p.lr / bias_correction1;
        let bc2_sqrt = bias_correction2.sqrt();
        let update = fused::Update {
            beta1: p.beta1,
            beta2: p.beta2,
            decay: 1.0 - p.lr * p.weight_decay,
            step_size,
            bc2_sqrt,
            eps: p.eps,
            grad_scale: self.grad_scale,
        };
        let grad_scale = std::mem::replace(&mut self.grad_scale, 1.0);
        let grads: Vec<(usize, Tensor)> = self
            .grads
            .iter_mut()
            .enumerate()
            .filter_map(|(i, g)| g.take().map(|g| (i, g)))
            .collect();
        // On the CPU, every parameter's update in one pass in place, the small parameters
        // shared out over the pool's threads and each large one split over them; elsewhere (or
        // for a layout the fused update does not take), the update composed of tensor ops, one
        // parameter after another.
        let (fused, composed): (Vec<_>, Vec<_>) = grads.into_iter().partition(|(i, grad)| {
            fused::takes(&[
                self.vars[*i].1.as_tensor(),
                grad,
                &self.exp_avg[*i],
                &self.exp_avg_sq[*i],
            ])
        });
        let (vars, exp_avg, exp_avg_sq) = (&self.vars, &self.exp_avg, &self.exp_avg_sq);
        let update_in_place = |(i, grad): &(usize, Tensor)| -> Result<()> {
            update.apply(vars[*i].1.as_tensor(), &exp_avg[*i], &exp_avg_sq[*i], grad)?;
            Ok(())
        };
        let (small, large): (Vec<_>, Vec<_>) = fused
            .into_iter()
            .partition(|(i, _)| shared_out(&vars[*i].1));
        small.par_iter().try_for_each(update_in_place)?;
        large.iter().try_for_each(update_in_place)?;
        for (i, grad) in composed {
            let var = &self.vars[i].1;
            // The clip's coefficient, as `clip_grad_norm_` would have applied it.
            let grad = if grad_scale != 1.0 {
                (grad * grad_scale)?
            } else {
                grad
            };
            // param.mul_(1 - lr * weight_decay)
            let theta = (var.as_tensor() * (1.0 - p.lr * p.weight_decay))?;
            // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            let m = (&self.exp_avg[i] + ((&grad - &self.exp_avg[i])? * (1.0 - p.beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * p.beta2)? + (grad.sqr()? * (1.0 - p.beta2))?)?;
            // denom = exp_avg_sq.sqrt() / sqrt(bias_correction2) + eps
            let denom = ((v.sqrt()? / bc2_sqrt)? + p.eps)?;
            // param.addcdiv_(exp_avg, denom, value=-step_size)
            let theta = (theta - ((&m / &denom)? * step_size)?)?;
            var.set(&theta)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`), for a checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("exp_avg.{name}"), self.exp_avg[i].clone());
            out.insert(format!("exp_avg_sq.{name}"), self.exp_avg_sq[i].clone());
        }
        out
    }

    /// Restores the moments and the step count saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (slot, key) in [
                (&mut self.exp_avg[i], format!("exp_avg.{name}")),
                (&mut self.exp_avg_sq[i], format!("exp_avg_sq.{name}")),
            ] {
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::Resume(format!("optimizer state has no tensor `{key}`"))
                })?;
                if t.dims() != var.as_tensor().dims() {
                    return Err(Error::Resume(format!(
                        "optimizer tensor `{key}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    )));
                }
                *slot = t
                    .to_dtype(var.as_tensor().dtype())?
                    .to_device(var.as_tensor().device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Parameters of fewer elements than this are shared out over the rayon pool's threads by
/// the optimizer (see `AdamW::add_grads`): every parameter of the tiny preset (at most 74k
/// elements) and a real-size model's vectors, not its matrices (589k elements and more).
const SHARED_OUT_BELOW: usize = 1 << 18;

/// Whether the optimizer's work on `var` goes to the rayon pool: a small parameter on the CPU.
fn shared_out(var: &Var) -> bool {
    let t = var.as_tensor();
    t.device().is_cpu() && t.elem_count() < SHARED_OUT_BELOW
}

/// AdamW's update and the clipping norm's sums of squares on the CPU, each one pass over the
/// values without temporaries, with PyTorch's order of operations for each element; the
/// tensor path in [`AdamW::step`] is the reference and the fallback for other devices.
///
/// A parameter's values are cut into chunks of a fixed size, handed to the current rayon
/// pool's threads: an element's arithmetic, and the order in which the chunks' sums are added,
/// do not depend on the number of threads.
mod fused {
    use std::cell::Cell;

    use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
    use moda_models::fused::{cpu_slice, cpu_slice_mut};
    use rayon::prelude::*;

    /// The name in error messages.
    const OP: &str = "AdamW";

    /// Values per chunk (128 KiB of f32 per operand).
    const CHUNK: usize = 1 << 15;

    /// Whether every tensor is a contiguous f32 tensor on the CPU, as the passes here take them.
    pub(super) fn takes(ts: &[&Tensor]) -> bool {
        ts.iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
    }

    /// Runs `f` on the values of `t` (contiguous f32 on the CPU) while candle holds its
    /// storage's read lock.
    fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => f(cpu_slice::<f32>(s, layout, OP)?),
            _ => candle_core::bail!("{OP}: a tensor not on the CPU"),
        }
    }

    /// Runs `f` on the values of `t` (contiguous f32 on the CPU), borrowed mutably: an in-place
    /// op whose body is `f`, so that candle holds the storage's write lock meanwhile.
    fn with_values_mut<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
        struct Body<F, R> {
            f: Cell<Option<F>>,
            out: Cell<Option<Result<R>>>,
        }
        impl<F: FnOnce(&mut [f32]) -> Result<R>, R> candle_core::InplaceOp1 for Body<F, R> {
            fn name(&self) -> &'static str {
                "adamw"
            }
            fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
                let values = cpu_slice_mut(s, l, OP)?;
                if let Some(f) = self.f.take() {
                    self.out.set(Some(f(values)));
                }
                Ok(())
            }
        }
        let body = Body {
            f: Cell::new(Some(f)),
            out: Cell::new(None),
        };
        t.inplace_op1(&body)?;
        body.out
            .take()
            .unwrap_or_else(|| candle_core::bail!("{OP}: the in-place op did not run"))
    }

    /// The sum of the squares of `g`'s values (contiguous f32 on the CPU), in f64.
    pub(super) fn square_sum(g: &Tensor) -> Result<f64> {
        with_values(g, |g| {
            let sums: Vec<f64> = g.par_chunks(CHUNK).map(chunk_square_sum).collect();
            Ok(sums.iter().sum())
        })
    }

    /// One chunk's sum of squares, in eight running sums (so that the loop can use vector
    /// registers without reordering an addition), added at the end.
    fn chunk_square_sum(c: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let mut lanes = c.chunks_exact(8);
        for x in &mut lanes {
            for (a, &x) in acc.iter_mut().zip(x) {
                *a += f64::from(x) * f64::from(x);
            }
        }
        for (a, &x) in acc.iter_mut().zip(lanes.remainder()) {
            *a += f64::from(x) * f64::from(x);
        }
        acc.iter().sum()
    }

    /// One AdamW step for one parameter, as `torch.optim.AdamW`'s single-tensor update:
    /// `g = grad * grad_scale` (the clip's coefficient), `m += (g - m) * (1 - beta1)`,
    /// `v = v * beta2 + g * g * (1 - beta2)`, then
    /// `theta = theta * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps)`.
    pub(super) struct Update {
        pub(super) beta1: f64,
        pub(super) beta2: f64,
        pub(super) decay: f64,
        pub(super) step_size: f64,
        pub(super) bc2_sqrt: f64,
        pub(super) eps: f64,
        pub(super) grad_scale: f64,
    }

    impl Update {
        /// Updates `theta`, `m` and `v` in place from `grad`, in one pass over the four.
        pub(super) fn apply(
            &self,
            theta: &Tensor,
            m: &Tensor,
            v: &Tensor,
            grad: &Tensor,
        ) -> Result<()> {
            let n = theta.elem_count();
            if [m, v, grad].iter().any(|t| t.elem_count() != n) {
                candle_core::bail!(
                    "{OP}: a moment or the gradient differs in size from its parameter"
                );
            }
            with_values_mut(theta, |t| {
                with_values_mut(m, |m| {
                    with_values_mut(v, |v| {
                        with_values(grad, |g| {
                            (t.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)))
                                .zip(v.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)))
                                .for_each(|((t, m), (v, g))| self.chunk(t, m, v, g));
                            Ok(())
                        })
                    })
                })
            })
        }

        fn chunk(&self, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
            // Two loops, so that the unclipped one has no multiplication to skip.
            if self.grad_scale != 1.0 {
                let scale = self.grad_scale as f32;
                self.chunk_with(theta, m, v, g, |g| g * scale);
            } else {
                self.chunk_with(theta, m, v, g, |g| g);
            }
        }

        #[inline(always)]
        fn chunk_with(
            &self,
            theta: &mut [f32],
            m: &mut [f32],
            v: &mut [f32],
            g: &[f32],
            grad: impl Fn(f32) -> f32,
        ) {
            let w1 = (1.0 - self.beta1) as f32;
            let (b2, c2) = (self.beta2 as f32, (1.0 - self.beta2) as f32);
            let (decay, step, bc2, eps) = (
                self.decay as f32,
                self.step_size as f32,
                self.bc2_sqrt as f32,
                self.eps as f32,
            );
            let values = theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g);
            for (((t, m), v), &g) in values {
                let g = grad(g);
                *m += (g - *m) * w1;
                *v = *v * b2 + g * g * c2;
                *t = *t * decay - step * (*m / (v.sqrt() / bc2 + eps));
            }
        }
    }
}

#[cfg(test)]
mod schedule_tests {
    use super::cosine_lr;

    #[test]
    fn cosine_warms_up_then_decays() {
        let (base, warm, n) = (1e-3, 5.0, 100.0);
        // Linear warm-up: a tenth of the way, a tenth of the rate; rising to the base rate.
        assert!((cosine_lr(base, 0.5, warm, n) - 1e-4).abs() < 1e-12);
        assert!((cosine_lr(base, warm, warm, n) - base).abs() < 1e-12);
        // Half-way through the decay, half the rate (cos(pi/2) = 0); at the end, 0.
        assert!((cosine_lr(base, warm + 47.5, warm, n) - base / 2.0).abs() < 1e-12);
        assert!(cosine_lr(base, n, warm, n).abs() < 1e-12);
        // Monotone down after the warm-up, and never negative past the end.
        let mut last = f64::INFINITY;
        for i in 0..=200 {
            let lr = cosine_lr(base, warm + i as f64 * 0.5, warm, n);
            assert!(lr <= last && lr >= 0.0);
            last = lr;
        }
        // No warm-up: the base rate at 0.
        assert!((cosine_lr(base, 0.0, 0.0, n) - base).abs() < 1e-12);
    }
}

#[cfg(test)]
mod adamw_tests {
    use super::{AdamW, AdamWParams};
    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    /// `n` values drawn uniformly from [-1, 1) by a generator seeded with `seed`.
    fn values(n: usize, seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, n, &Device::Cpu).expect("tensor")
    }

    /// Sizes below and above the one from which the optimizer keeps a parameter on the calling
    /// thread, and where candle splits element-wise ops; the last parameter gets no gradient.
    const SIZES: [usize; 6] = [3, 1000, 70_000, 300_000, 17, 600_000];

    /// The parameters before any step, then the gradient norms of three AdamW steps, each
    /// over the gradients of two shards and clipped, in a rayon pool of `threads`, and the
    /// parameters and moments after them.
    fn three_steps(threads: usize) -> (Vec<f64>, BTreeMap<String, Vec<f32>>) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let vars: Vec<(String, Var)> = SIZES
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (
                    format!("p{i}"),
                    Var::from_tensor(&values(n, i as u64)).expect("var"),
                )
            })
            .collect();
        let mut adam = AdamW::new(vars.clone(), AdamWParams::default()).expect("adamw");
        let mut norms = Vec::new();
        for step in 0..3u64 {
            let stores: Vec<_> = (0..2u64)
                .map(|shard| {
                    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).expect("zero");
                    for (i, (_, v)) in vars.iter().enumerate().take(SIZES.len() - 1) {
                        let c = values(SIZES[i], 100 + 10 * step + shard + 1000 * i as u64);
                        let term = (v.as_tensor().sqr().expect("sqr") * c)
                            .expect("mul")
                            .sum_all()
                            .expect("sum");
                        loss = (loss + term).expect("add");
                    }
                    loss.backward().expect("backward")
                })
                .collect();
            let refs: Vec<_> = stores.iter().collect();
            pool.install(|| {
                adam.accumulate_scaled(&refs, 0.5).expect("accumulate");
                norms.push(adam.clip_grad_norm(1.0).expect("clip"));
                adam.step().expect("step");
            });
        }
        let mut state: BTreeMap<String, Vec<f32>> = adam
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.to_vec1().expect("vec")))
            .collect();
        for (name, v) in &vars {
            state.insert(name.clone(), v.as_tensor().to_vec1().expect("vec"));
        }
        (norms, state)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// `torch.optim.AdamW`'s single-tensor update of one element, in f64 (default
    /// hyper-parameters): returns the new `(theta, m, v)`.
    fn reference_step(theta: f64, m: f64, v: f64, g: f64, step: i32) -> (f64, f64, f64) {
        let p = AdamWParams::default();
        let theta = theta * (1.0 - p.lr * p.weight_decay);
        let m = m + (g - m) * (1.0 - p.beta1);
        let v = v * p.beta2 + g * g * (1.0 - p.beta2);
        let bc1 = 1.0 - p.beta1.powi(step);
        let bc2 = 1.0 - p.beta2.powi(step);
        let denom = v.sqrt() / bc2.sqrt() + p.eps;
        (theta - p.lr / bc1 * m / denom, m, v)
    }

    /// The gradient of `sum(theta * c)` with respect to `theta`: `c`, in a GradStore.
    fn grads_of_linear(theta: &Var, c: &Tensor) -> candle_core::backprop::GradStore {
        (theta.as_tensor() * c)
            .expect("mul")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("backward")
    }

    /// Two clipped steps of one parameter larger than a chunk (and not a multiple of one)
    /// against PyTorch's formulas in f64; in the second, gradients are added after the clip,
    /// which must scale only those before it (`clip_grad_norm_` scales the `.grad` it finds).
    #[test]
    fn steps_follow_pytorchs_formulas() {
        let n = 100_003;
        let theta0: Vec<f32> = values(n, 7).to_vec1().expect("vec");
        let var = Var::from_tensor(&values(n, 7)).expect("var");
        let mut adam =
            AdamW::new(vec![("p".into(), var.clone())], AdamWParams::default()).expect("adamw");
        let c: Vec<Tensor> = (0..3).map(|i| values(n, 20 + i)).collect();
        let cv: Vec<Vec<f32>> = c.iter().map(|t| t.to_vec1().expect("vec")).collect();
        let mut want: Vec<(f64, f64, f64)> =
            theta0.iter().map(|&t| (f64::from(t), 0.0, 0.0)).collect();
        // Step 1: gradient c0, clipped to norm 1.
        adam.accumulate(&grads_of_linear(&var, &c[0])).expect("acc");
        let norm = adam.clip_grad_norm(1.0).expect("clip");
        let want_norm = cv[0]
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        // f64 sums of the same squares in another order: equal to about 1e-15 relative.
        assert!(
            (norm - want_norm).abs() <= 1e-12 * want_norm,
            "{norm} vs {want_norm}"
        );
        let coef = 1.0 / (want_norm + 1e-6);
        adam.step().expect("step");
        for (w, &g) in want.iter_mut().zip(&cv[0]) {
            // The step scales the f32 gradient by the f32 coefficient, as candle's `g * coef`.
            let g = f64::from(g * coef as f32);
            *w = reference_step(w.0, w.1, w.2, g, 1);
        }
        // Step 2: gradient c1, clipped (coefficient k), then c2 added unclipped.
        adam.accumulate(&grads_of_linear(&var, &c[1])).expect("acc");
        let norm1 = adam.clip_grad_norm(1.0).expect("clip");
        let k = 1.0 / (norm1 + 1e-6);
        assert!(k < 1.0);
        adam.accumulate(&grads_of_linear(&var, &c[2])).expect("acc");
        adam.step().expect("step");
        for ((w, &g1), &g2) in want.iter_mut().zip(&cv[1]).zip(&cv[2]) {
            let g = f64::from(g1 * k as f32 + g2);
            *w = reference_step(w.0, w.1, w.2, g, 2);
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().expect("vec");
        let state = adam.state_tensors();
        let m: Vec<f32> = state["exp_avg.p"].to_vec1().expect("vec");
        let v: Vec<f32> = state["exp_avg_sq.p"].to_vec1().expect("vec");
        for i in 0..n {
            let (t, wm, wv) = want[i];
            // f32 against f64 over a handful of operations on values of at most 1 in size
            // (theta in [-1, 1], gradients under 1 after the clip): a few units of f32's
            // 6e-8 rounding, far below the 1e-3 that one step moves theta.
            assert!(
                (f64::from(got[i]) - t).abs() <= 1e-6,
                "theta[{i}] {} vs {t}",
                got[i]
            );
            // The moments against their largest possible size, as theta (m is at most 0.2,
            // v at most 2e-3: a sum of gradients of at most 1 in size weighted 0.1 and 0.001).
            assert!(
                (f64::from(m[i]) - wm).abs() <= 1e-7,
                "m[{i}] {} vs {wm}",
                m[i]
            );
            assert!(
                (f64::from(v[i]) - wv).abs() <= 1e-9,
                "v[{i}] {} vs {wv}",
                v[i]
            );
        }
    }

    #[test]
    fn steps_do_not_depend_on_the_thread_count() {
        let (norms, state) = three_steps(1);
        // Clipping took part (every norm above the limit of 1).
        assert!(norms.iter().all(|&n| n > 1.0), "norms {norms:?}");
        for threads in [2, 3] {
            let (n, s) = three_steps(threads);
            assert_eq!(norms, n, "gradient norms with {threads} threads");
            for (name, v) in &state {
                assert_eq!(bits(v), bits(&s[name]), "{name} with {threads} threads");
            }
        }
        // The parameter without a gradient kept its values; the others moved.
        let last = SIZES.len() - 1;
        for (i, &n) in SIZES.iter().enumerate() {
            let before: Vec<f32> = values(n, i as u64).to_vec1().expect("vec");
            let after = &state[&format!("p{i}")];
            assert_eq!(bits(&before) == bits(after), i == last, "p{i}");
        }
    }
}
