//! The optimiser side of the original recipe, written out so that its state can be saved and
//! resumed exactly: AdamW as `torch.optim.AdamW` (Loshchilov and Hutter, "Decoupled Weight
//! Decay Regularization", 2019; PyTorch's single-tensor update, step for step), gradient
//! clipping as `torch.nn.utils.clip_grad_norm_`, and the StepLR schedule.
//!
//! candle_nn's `AdamW` computes the same update but keeps its moments private, so a resumed run
//! could not continue with them.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
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
    }

    /// `clip_grad_norm_(params, max_norm)`: scales the accumulated gradients so that their
    /// global L2 norm is at most `max_norm`; returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        // Each parameter's sum of squares (on some thread, on the CPU), then added in
        // parameter order.
        let square_sum = |g: &Option<Tensor>| -> Result<Option<f64>> {
            let Some(g) = g else { return Ok(None) };
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
        let norm = total.sqrt();
        // PyTorch: clip_coef = max_norm / (norm + 1e-6), clamped to 1.
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            let scale = |g: &mut Option<Tensor>| -> Result<()> {
                if let Some(t) = g {
                    *t = (&*t * coef)?;
                }
                Ok(())
            };
            (self.grads.par_iter_mut().zip(self.vars.par_iter()))
                .filter(|(_, (_, v))| shared_out(v))
                .try_for_each(|(g, _)| scale(g))?;
            (self.grads.iter_mut().zip(self.vars.iter()))
                .filter(|(_, (_, v))| !shared_out(v))
                .try_for_each(|(g, _)| scale(g))?;
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
            decay: 1.0 - p.lr * p.weight_decay,
            step_size,
            bc2_sqrt,
            eps: p.eps,
        };
        let grads: Vec<(usize, Tensor)> = self
            .grads
            .iter_mut()
            .enumerate()
            .filter_map(|(i, g)| g.take().map(|g| (i, g)))
            .collect();
        // On the CPU, every parameter's update in place, the parameters shared out over the
        // pool's threads; elsewhere (or for a layout the fused update does not take), the
        // update composed of tensor ops, one parameter after another.
        let (fused, composed): (Vec<_>, Vec<_>) = grads.into_iter().partition(|(i, grad)| {
            let theta = self.vars[*i].1.as_tensor();
            theta.device().is_cpu()
                && [theta, grad, &self.exp_avg[*i], &self.exp_avg_sq[*i]]
                    .iter()
                    .all(|t| t.dtype() == DType::F32 && t.is_contiguous())
        });
        let (vars, exp_avg, exp_avg_sq) = (&self.vars, &self.exp_avg, &self.exp_avg_sq);
        // The same update, in place, in three passes without temporaries.
        let update_in_place = |(i, grad): &(usize, Tensor)| -> Result<()> {
            exp_avg[*i].inplace_op2(grad, &fused::Lerp(1.0 - p.beta1))?;
            exp_avg_sq[*i].inplace_op2(grad, &fused::SqAvg(p.beta2))?;
            vars[*i]
                .1
                .as_tensor()
                .inplace_op3(&exp_avg[*i], &exp_avg_sq[*i], &update)?;
            Ok(())
        };
        let (small, large): (Vec<_>, Vec<_>) = fused
            .into_iter()
            .partition(|(i, _)| shared_out(&vars[*i].1));
        small.par_iter().try_for_each(update_in_place)?;
        large.iter().try_for_each(update_in_place)?;
        for (i, grad) in composed {
            let var = &self.vars[i].1;
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

/// AdamW's three element-wise passes as in-place CPU ops (f32, contiguous), with PyTorch's
/// order of operations; the tensor path in [`AdamW::step`] is the reference and the fallback
/// for other devices.
/// Parameters of fewer elements than this are shared out over the rayon pool's threads by
/// the optimizer (see `AdamW::add_grads`): every parameter of the tiny preset (at most 74k
/// elements) and a real-size model's vectors, not its matrices (589k elements and more).
const SHARED_OUT_BELOW: usize = 1 << 18;

/// Whether the optimizer's work on `var` goes to the rayon pool: a small parameter on the CPU.
fn shared_out(var: &Var) -> bool {
    let t = var.as_tensor();
    t.device().is_cpu() && t.elem_count() < SHARED_OUT_BELOW
}

mod fused {
    use candle_core::{CpuStorage, Layout, Result};
    use moda_models::fused::{cpu_slice, cpu_slice_mut};

    /// The name in error messages.
    const OP: &str = "AdamW";

    /// `m += (g - m) * w` (`exp_avg.lerp_(grad, w)`).
    pub(super) struct Lerp(pub(super) f64);

    impl candle_core::InplaceOp2 for Lerp {
        fn name(&self) -> &'static str {
            "adamw-lerp"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            let w = self.0 as f32;
            let g = cpu_slice::<f32>(s2, l2, OP)?;
            for (m, g) in cpu_slice_mut(s1, l1, OP)?.iter_mut().zip(g) {
                *m += (g - *m) * w;
            }
            Ok(())
        }
    }

    /// `v = v * beta2 + g * g * (1 - beta2)`.
    pub(super) struct SqAvg(pub(super) f64);

    impl candle_core::InplaceOp2 for SqAvg {
        fn name(&self) -> &'static str {
            "adamw-sq-avg"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            let (b2, c) = (self.0 as f32, (1.0 - self.0) as f32);
            let g = cpu_slice::<f32>(s2, l2, OP)?;
            for (v, g) in cpu_slice_mut(s1, l1, OP)?.iter_mut().zip(g) {
                *v = *v * b2 + g * g * c;
            }
            Ok(())
        }
    }

    /// `theta = theta * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps)`.
    pub(super) struct Update {
        pub(super) decay: f64,
        pub(super) step_size: f64,
        pub(super) bc2_sqrt: f64,
        pub(super) eps: f64,
    }

    impl candle_core::InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "adamw-update"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            let (decay, step, bc2, eps) = (
                self.decay as f32,
                self.step_size as f32,
                self.bc2_sqrt as f32,
                self.eps as f32,
            );
            let m = cpu_slice::<f32>(s2, l2, OP)?;
            let v = cpu_slice::<f32>(s3, l3, OP)?;
            for ((t, m), v) in cpu_slice_mut(s1, l1, OP)?.iter_mut().zip(m).zip(v) {
                *t = *t * decay - step * (m / (v.sqrt() / bc2 + eps));
            }
            Ok(())
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
