//! The training loss: `moda_models::moda::causal_lm_loss` (next-token cross-entropy, labels
//! `-100` ignored, mean over the rest), with a fused CPU kernel for f32.
//!
//! With a vocabulary of 50,272 the logits of one batch of 32 are 34 M values; the composed
//! candle version (log-softmax from max, exp, sum, log, then gather) allocates several
//! tensors of that size forward and backward. The fused op computes each row's
//! log-sum-exp once and, backward, `softmax - one_hot` scaled by the incoming gradient
//! straight into the gradient buffer. Other devices and dtypes use the composed version.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use moda_models::fused::cpu_slice;
use moda_models::moda::IGNORE_INDEX;
use rayon::prelude::*;

use crate::error::Result;

/// Ignored row marker in the fused op's targets.
const SKIP: u32 = u32::MAX;

/// The mean next-token cross-entropy of `logits [b, s, V]` against `labels [b, s]`, as
/// `OPTForCausalLM(labels=..)`: logits at `i` predict `labels[i + 1]`.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (sum, count) = causal_lm_loss_sum(logits, labels)?;
    // A count of 1 is also what the composed path reports with its mean.
    Ok(if count > 1 {
        (sum / count as f64)?
    } else {
        sum
    })
}

/// The summed next-token cross-entropy and the number of predicted tokens (labels not
/// `-100`), so that shards of a batch combine into the batch's mean. Other devices or dtypes
/// than f32 on the CPU (or a single position) get the mean from the composed version and a
/// count of 1.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, s, v) = logits.dims3()?;
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 || s < 2 {
        return Ok((moda_models::moda::causal_lm_loss(logits, labels)?, 1));
    }
    let rows = logits
        .narrow(1, 0, s - 1)?
        .contiguous()?
        .reshape((b * (s - 1), v))?;
    let targets: Vec<i64> = labels
        .narrow(1, 1, s - 1)?
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1()?;
    if let Some(bad) = targets
        .iter()
        .find(|&&t| t != IGNORE_INDEX && !(0..v as i64).contains(&t))
    {
        return Err(crate::error::Error::InvalidArgument(format!(
            "label {bad} outside a vocabulary of {v}"
        )));
    }
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let targets: Vec<u32> = targets
        .into_iter()
        .map(|t| if t == IGNORE_INDEX { SKIP } else { t as u32 })
        .collect();
    let targets = Tensor::from_vec(targets, b * (s - 1), logits.device())?;
    let nll = rows.apply_op2(&targets, CrossEntropy)?;
    Ok((nll.sum_all()?, count))
}

/// Runs `f(row_index, out_row)` over `n` rows of `width` outputs on rayon's pool (the one
/// candle's CPU ops use, sized by `RAYON_NUM_THREADS`).
fn par_rows(n: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; n * width];
    if width > 0 {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    }
    out
}

/// `log(sum(exp(x)))`, stably.
fn log_sum_exp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = x.iter().map(|v| (v - m).exp()).sum();
    m + s.ln()
}

/// Per-row negative log-likelihood `[n]` of `(logits [n, V], targets [n])`.
struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let x = cpu_slice::<f32>(s1, l1, "cross-entropy")?;
        let t = cpu_slice::<u32>(s2, l2, "cross-entropy")?;
        let out = par_rows(n, 1, |i, o| {
            let target = t[i];
            if target != SKIP {
                let row = &x[i * v..(i + 1) * v];
                o[0] = log_sum_exp(row) - row[target as usize];
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = logits.apply_op3_no_bwd(targets, &grad_res.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(grad), None))
    }
}

/// `d nll / d logits` scaled by the incoming gradient: `(softmax(x) - one_hot(t)) * g`.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let x = cpu_slice::<f32>(s1, l1, "cross-entropy")?;
        let t = cpu_slice::<u32>(s2, l2, "cross-entropy")?;
        let g = cpu_slice::<f32>(s3, l3, "cross-entropy")?;
        // Targets were checked against the vocabulary in `causal_lm_loss`.
        let out = par_rows(n, v, |i, o| {
            let target = t[i];
            if target == SKIP || g[i] == 0.0 {
                return;
            }
            let row = &x[i * v..(i + 1) * v];
            let lse = log_sum_exp(row);
            for (o, xv) in o.iter_mut().zip(row) {
                *o = (xv - lse).exp() * g[i];
            }
            o[target as usize] -= g[i];
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
