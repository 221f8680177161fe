//! The training loss: `moda_models::moda::causal_lm_loss` (next-token cross-entropy, labels
//! `-100` ignored, mean over the rest), with a fused CPU kernel for f32.
//!
//! With a vocabulary of 50,272 the logits of one batch of 32 are 34 M values; the composed
//! candle version (log-softmax from max, exp, sum, log, then gather) allocates several
//! tensors of that size forward and backward. The fused op reads the logits where the LM head
//! wrote them (every position; the last of each sequence predicts nothing and is skipped, so
//! no shifted copy is made, nor, backward, a zero-padded one), computes each row's
//! log-sum-exp once, and backward writes `softmax - one_hot`, scaled by the incoming
//! gradient, straight into the gradient buffer, from the log-sum-exp the forward's output
//! gives back. Exponentials are taken eight lanes at a time (`wide`). Other devices and dtypes
//! use the composed version.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use moda_models::fused::cpu_slice;
use moda_models::moda::IGNORE_INDEX;
use rayon::prelude::*;
use wide::f32x8;

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
    if labels.dims() != [b, s] {
        return Err(crate::error::Error::InvalidArgument(format!(
            "labels of shape {:?} for logits {:?}",
            labels.dims(),
            logits.dims()
        )));
    }
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 || s < 2 {
        return Ok((moda_models::moda::causal_lm_loss(logits, labels)?, 1));
    }
    // Every position's row, as the LM head wrote them (a view, no copy).
    let rows = logits.contiguous()?.reshape((b * s, v))?;
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
    // Position i of a sequence predicts label i + 1; the last position predicts nothing.
    let mut row_targets = vec![SKIP; b * s];
    for (seq, chunk) in targets.chunks(s - 1).enumerate() {
        for (i, &t) in chunk.iter().enumerate() {
            if t != IGNORE_INDEX {
                row_targets[seq * s + i] = t as u32;
            }
        }
    }
    let targets = Tensor::from_vec(row_targets, b * s, logits.device())?;
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

/// Lanes of [`f32x8`].
const LANES: usize = 8;

/// `x`'s largest value.
fn max(x: &[f32]) -> f32 {
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let m = chunks.fold(f32x8::splat(f32::NEG_INFINITY), |m, c| {
        m.max(f32x8::from(<[f32; LANES]>::try_from(c).unwrap_or_default()))
    });
    m.to_array().into_iter().fold(tail, f32::max)
}

/// `exp(x - shift)` for each value of `x`, into `out` (as long as `x`), and their sum.
/// `f32x8::exp` is within 2e-7 of `f32::exp` (relative) and flushes results under about
/// 1e-38 to zero, which a sum of at least 1 cannot tell.
fn exp_shifted(x: &[f32], shift: f32, out: Option<&mut [f32]>) -> f32 {
    let s = f32x8::splat(shift);
    let lanes =
        |c: &[f32]| (f32x8::from(<[f32; LANES]>::try_from(c).unwrap_or_default()) - s).exp();
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    let mut sum = f32x8::ZERO;
    let mut tail = 0f32;
    match out {
        Some(out) => {
            let mut out_chunks = out.chunks_exact_mut(LANES);
            for (c, o) in chunks.zip(&mut out_chunks) {
                let e = lanes(c);
                sum += e;
                o.copy_from_slice(&e.to_array());
            }
            for (v, o) in rem.iter().zip(out_chunks.into_remainder()) {
                *o = (v - shift).exp();
                tail += *o;
            }
        }
        None => {
            for c in chunks {
                sum += lanes(c);
            }
            tail = rem.iter().map(|v| (v - shift).exp()).sum();
        }
    }
    sum.reduce_add() + tail
}

/// `log(sum(exp(x)))`, stably.
fn log_sum_exp(x: &[f32]) -> f32 {
    let m = max(x);
    m + exp_shifted(x, m, None).ln()
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
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Each row's loss beside its incoming gradient, `[n, 2]`: the loss gives the row's
        // log-sum-exp back (`nll + x[target]`) without a second pass over the row.
        let loss_grad = Tensor::stack(&[&res.detach(), &grad_res.detach()], 1)?;
        let grad = logits.apply_op3_no_bwd(targets, &loss_grad, &CrossEntropyGrad)?;
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
        let lg = cpu_slice::<f32>(s3, l3, "cross-entropy")?;
        if t.len() != n || lg.len() != 2 * n {
            candle_core::bail!(
                "cross-entropy: {} targets, {} losses for {n} rows",
                t.len(),
                lg.len() / 2
            );
        }
        // Targets were checked against the vocabulary in `causal_lm_loss`.
        let out = par_rows(n, v, |i, o| {
            let (target, nll, g) = (t[i], lg[2 * i], lg[2 * i + 1]);
            if target == SKIP || g == 0.0 {
                return;
            }
            let row = &x[i * v..(i + 1) * v];
            // The forward wrote nll = lse - x[target].
            let lse = nll + row[target as usize];
            exp_shifted(row, lse, Some(&mut *o));
            if g != 1.0 {
                o.iter_mut().for_each(|o| *o *= g);
            }
            o[target as usize] -= g;
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The largest difference between `a` and `b`, relative to `b`'s largest magnitude.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("a");
        let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("b");
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        diff / scale
    }

    /// The fused loss and its gradient against candle's autograd of the composed loss
    /// (log-softmax, gather, mean), on logits spread over a wide range (some rows far from
    /// zero, a vocabulary that is not a multiple of the eight lanes), with ignored labels.
    #[test]
    fn fused_loss_matches_composed() -> Result<()> {
        let dev = Device::Cpu;
        let (b, s, v) = (3usize, 5usize, 37usize);
        let logits: Vec<f32> = (0..b * s * v)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 24.0 + (i / v) as f32 * 3.0)
            .collect();
        let logits = Var::from_vec(logits, (b, s, v), &dev)?;
        let mut labels: Vec<i64> = (0..b * s).map(|i| (i * 13 % v) as i64).collect();
        labels[2] = IGNORE_INDEX;
        labels[s + 4] = IGNORE_INDEX;
        labels[2 * s + 1] = IGNORE_INDEX;
        let labels = Tensor::from_vec(labels, (b, s), &dev)?;

        let fused = causal_lm_loss(logits.as_tensor(), &labels)?;
        let composed = moda_models::moda::causal_lm_loss(logits.as_tensor(), &labels)?;
        // Both sum f32 exponentials of the same values in different orders and with
        // different exp implementations (2e-7 apart): a few ulps of a loss near 10.
        let (f, c) = (fused.to_scalar::<f32>()?, composed.to_scalar::<f32>()?);
        assert!((f - c).abs() <= 1e-5 * c.abs(), "fused {f}, composed {c}");

        let gf = fused.backward()?;
        let gc = composed.backward()?;
        let (gf, gc) = (
            gf.get(logits.as_tensor()).expect("fused gradient"),
            gc.get(logits.as_tensor()).expect("composed gradient"),
        );
        // Softmax probabilities from a log-sum-exp recovered from the loss (one rounding of
        // a value near 10, about 1e-6 relative) against candle's: 1e-5 of the largest entry.
        let r = rel(gf, gc);
        assert!(r <= 1e-5, "gradient differs by {r} of its largest entry");
        // The last position of every sequence predicts nothing: its gradient is zero.
        let last: Vec<f32> = gf.narrow(1, s - 1, 1)?.flatten_all()?.to_vec1()?;
        assert!(last.iter().all(|&x| x == 0.0));
        Ok(())
    }

    #[test]
    fn labels_of_another_shape_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((2, 4, 9), DType::F32, &dev)?;
        let labels = Tensor::zeros((2, 3), DType::I64, &dev)?;
        let err = causal_lm_loss(&logits, &labels).expect_err("shape mismatch");
        assert!(err.to_string().contains("labels of shape"), "{err}");
        Ok(())
    }

    #[test]
    fn exp_lanes_match_the_scalar_exp() {
        let x: Vec<f32> = (0..203).map(|i| -(i as f32) * 0.37 + 5.0).collect();
        let mut out = vec![0f32; x.len()];
        let sum = exp_shifted(&x, 2.0, Some(&mut out));
        for (o, v) in out.iter().zip(&x) {
            let want = (v - 2.0).exp();
            // wide's exp: within 2e-7 relative of libm's where the result is a normal f32.
            if want > 1e-37 {
                assert!(
                    (o - want).abs() <= 4e-7 * want,
                    "exp({v} - 2): {o}, want {want}"
                );
            }
        }
        let want: f32 = x.iter().map(|v| (v - 2.0).exp()).sum();
        assert!((sum - want).abs() <= 1e-6 * want);
        assert!((exp_shifted(&x, 2.0, None) - sum).abs() <= 1e-6 * want);
        assert_eq!(max(&x), 5.0);
    }
}
