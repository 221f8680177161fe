//! Training kernels for the CPU (f32): linear layers, LayerNorm, ReLU and softmax attention as
//! single candle ops with a hand-written backward pass.
//!
//! Built from candle primitives, a training step spends more time around the matrix
//! products than in them: a LayerNorm is ten tensors forward and about thirty backward, each a
//! fresh allocation; a bias's gradient is a strided reduction (on one thread) plus a zero tensor
//! and an add; a weight's gradient goes through a transposed copy; attention is about twenty ops
//! (head splits and merges, two batched products, the mask, five for the softmax). Fused, each
//! of these is one op that writes its output once, and bias gradients are column sums spread
//! over the thread pool. The measurements (per op and for the whole real-size training step of
//! `trainer/examples/bench_step.rs`, against PyTorch) are in `docs/PERFORMANCE.md`.
//!
//! These ops are used only where they can run: while training (an input or a weight is
//! tracked), on the CPU, in f32. Inference keeps candle's own kernels, and other devices and
//! dtypes keep the composed versions, so every path computes the same maths. The backward
//! formulas are those of PyTorch's `linear`, `native_layer_norm_backward`, `threshold_backward`
//! and softmax attention's; the tests compare them with candle's autograd of the composed ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Whether the fused training ops apply: something to differentiate, on the CPU, in f32.
pub(crate) fn applies(xs: &Tensor, weight: Option<&Tensor>) -> bool {
    (xs.track_op() || weight.is_some_and(|w| w.track_op()))
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && weight.is_none_or(|w| w.dtype() == DType::F32)
}

/// The elements of the contiguous CPU tensor `(s, l)` (a custom op's input), as `T`; a
/// strided layout or another dtype is an error that names `op`. Candle hands custom ops the
/// whole storage and a layout, so every CPU kernel of the workspace (these, the trainer's
/// loss and optimizer) reads its inputs through this.
pub fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: non-contiguous input")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// [`cpu_slice`] for an f32 tensor updated in place (an in-place op's destination).
pub fn cpu_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: non-contiguous input")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        other => Err(candle_core::Error::Msg(format!(
            "{op}: expected f32, got {:?}",
            candle_core::backend::BackendStorage::dtype(&*other)
        ))),
    }
}

/// Rows of at least this many values go to the thread pool one at a time; smaller ones in
/// groups, so that each task is worth scheduling.
const ROWS_PER_TASK_MIN_VALUES: usize = 16 * 1024;

fn rows_per_task(width: usize) -> usize {
    ROWS_PER_TASK_MIN_VALUES.div_ceil(width.max(1)).max(1)
}

/// `xs @ weight^T + bias` for `xs [.., k]`, `weight [n, k]`, `bias [n]`.
pub(crate) fn linear(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    match bias {
        Some(b) => xs.apply_op3(&weight, &b.contiguous()?, Linear),
        None => xs.apply_op2(&weight, Linear),
    }
}

/// The row-major `[cols, rows]` transpose of the row-major `[rows, cols]` matrix `src`, in
/// tiles (a tile's source rows stay in cache while its output rows are written), blocks of
/// output rows in parallel.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut dst = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return dst;
    }
    dst.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(bi, block)| {
            let c0 = bi * TILE;
            let cn = block.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                let rn = TILE.min(rows - r0);
                for c in 0..cn {
                    let out = &mut block[c * rows + r0..c * rows + r0 + rn];
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = src[(r0 + i) * cols + c0 + c];
                    }
                }
            }
        });
    dst
}

/// `y = x w^T (+ b)`, with the backward of PyTorch's `linear`.
struct Linear;

impl Linear {
    fn forward(
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = x.1.shape().dims();
        let (n, k) = w.1.shape().dims2()?;
        let Some((&kx, lead)) = dims.split_last() else {
            candle_core::bail!("fused linear: a scalar input");
        };
        if kx != k {
            candle_core::bail!("fused linear: input width {kx}, weight {:?}", w.1.dims());
        }
        let m: usize = lead.iter().product();
        let xv = cpu_slice::<f32>(x.0, x.1, "fused linear")?;
        let wv = cpu_slice::<f32>(w.0, w.1, "fused linear")?;
        let mut out = match b {
            Some((bs, bl)) => {
                let bv = cpu_slice::<f32>(bs, bl, "fused linear")?;
                if bv.len() != n {
                    candle_core::bail!("fused linear: bias of {} for {n} outputs", bv.len());
                }
                bv.repeat(m)
            }
            None => vec![0f32; m * n],
        };
        let read_dst = b.is_some();
        if m > 0 && n > 0 {
            let threads = candle_core::utils::get_num_threads();
            let par = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // The right-hand side is `weight^T` (`k x n`). Read from the row-major weight its
            // columns are strided, and gemm runs such a product well below its usual speed
            // when `k` is the longer side (OPT's fc2, 3072 -> 768; figures in
            // `docs/PERFORMANCE.md`). There a row-major copy is made first, which costs a
            // fraction of what it saves; where `k <= n` the copy costs about what it saves.
            let copy = (k > n).then(|| transpose(wv, n, k));
            let (rhs, rhs_rs, rhs_cs) = match &copy {
                Some(wt) => (wt.as_slice(), n as isize, 1),
                None => (wv, 1, k as isize),
            };
            // SAFETY: `out` is `m x n` row-major (column stride 1, row stride n); `xv` is
            // `m x k` row-major; the right-hand side is `weight^T`, `k x n`: either the
            // row-major copy (element (r, c) at r * n + c) or read from the row-major `n x k`
            // weight (element (r, c) at c * k + r). All of them hold exactly those elements
            // (checked above: `xv` has m * k by the layout, `wv` n * k, the copy as many).
            // With a bias, `out` starts as the bias rows and gets `1 * out + 1 * x w^T`;
            // without, it is written, not read.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    read_dst,
                    xv.as_ptr(),
                    1,
                    k as isize,
                    rhs.as_ptr(),
                    rhs_cs,
                    rhs_rs,
                    1f32,
                    1f32,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
        let mut shape = lead.to_vec();
        shape.push(n);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    /// `(dx, dw, db)` for the incoming gradient `g` of the output.
    fn backward(
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
        with_bias: bool,
    ) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
        // Detached: products of tracked tensors are tracked, and a tracked gradient would keep
        // its whole computation (this layer's output gradient, say) alive in the GradStore.
        let (x, w, g) = (x.detach(), w.detach(), g.detach());
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let g2 = g.contiguous()?.reshape((m, n))?;
        let x2 = x.reshape((m, k))?;
        let dx = g2.matmul(&w)?.reshape(x.shape())?;
        let dw = g2.t()?.matmul(&x2)?;
        let db = if with_bias {
            Some(g2.apply_op1_no_bwd(&ColumnSum)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// The column sums of a contiguous `[m, n]` matrix (a bias's gradient), in parallel over
/// blocks of columns. candle's `sum(0)` reduces the strided dimension on one thread: 3% of a
/// real-size training step.
struct ColumnSum;

/// Columns per task of [`ColumnSum`].
const COLUMNS_PER_TASK: usize = 256;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "fused-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, n) = l.shape().dims2()?;
        let g = cpu_slice::<f32>(s, l, "fused column sum")?;
        let mut out = vec![0f32; n];
        if n > 0 {
            out.par_chunks_mut(COLUMNS_PER_TASK)
                .enumerate()
                .for_each(|(c, o)| {
                    let first = c * COLUMNS_PER_TASK;
                    for row in g.chunks_exact(n) {
                        for (o, v) in o.iter_mut().zip(&row[first..]) {
                            *o += v;
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::backward(x, w, g, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        Self::forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = Self::backward(x, w, g, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, with the
/// biased variance (as PyTorch).
pub(crate) fn layer_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    xs.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

struct LayerNorm {
    eps: f32,
}

/// A row's mean and `1 / sqrt(var + eps)`.
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let h = row.len() as f32;
    let mean = row.iter().sum::<f32>() / h;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let x = cpu_slice::<f32>(s1, l1, "fused layer norm")?;
        let w = cpu_slice::<f32>(s2, l2, "fused layer norm")?;
        let b = cpu_slice::<f32>(s3, l3, "fused layer norm")?;
        let h = w.len();
        if h == 0 || b.len() != h || l1.dims().last() != Some(&h) {
            candle_core::bail!(
                "fused layer norm: input {:?}, weight {:?}, bias {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        let per = rows_per_task(h) * h;
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(h).zip(x.chunks(h)) {
                    let (mean, rstd) = moments(x, self.eps);
                    for (((o, x), w), b) in o.iter_mut().zip(x).zip(w).zip(b) {
                        *o = (x - mean) * rstd * w + b;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let n = x.elem_count();
        // One output holding dx, then dw, then db.
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, h)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + h, h)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `[dx (all of x), dw (h), db (h)]` of a LayerNorm, given `(x, weight, grad)`:
/// with `xhat = (x - mean) * rstd` and `gw = grad * weight`, per row
/// `dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))`; `dw = sum(grad * xhat)` and
/// `db = sum(grad)` over rows.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
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
        let x = cpu_slice::<f32>(s1, l1, "fused layer norm backward")?;
        let w = cpu_slice::<f32>(s2, l2, "fused layer norm backward")?;
        let g = cpu_slice::<f32>(s3, l3, "fused layer norm backward")?;
        let h = w.len();
        if h == 0 || g.len() != x.len() || x.len() % h != 0 {
            candle_core::bail!(
                "fused layer norm backward: input {:?}, weight {:?}, grad {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let n = x.len();
        let mut out = vec![0f32; n + 2 * h];
        let (dx, rest) = out.split_at_mut(n);
        let per = rows_per_task(h) * h;
        // Each task writes its rows of dx and returns its partial dw and db.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(per)
            .zip(x.par_chunks(per).zip(g.par_chunks(per)))
            .map(|(dx, (x, g))| {
                let mut acc = vec![0f32; 2 * h];
                let (dw, db) = acc.split_at_mut(h);
                let mut xhat = vec![0f32; h];
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let (mean, rstd) = moments(x, self.eps);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for (j, (&xv, &gv)) in x.iter().zip(g).enumerate() {
                        let xh = (xv - mean) * rstd;
                        xhat[j] = xh;
                        let gw = gv * w[j];
                        s1 += gw;
                        s2 += gw * xh;
                        dw[j] += gv * xh;
                        db[j] += gv;
                    }
                    let (m1, m2) = (s1 / h as f32, s2 / h as f32);
                    for (j, d) in dx.iter_mut().enumerate() {
                        *d = rstd * (g[j] * w[j] - m1 - xhat[j] * m2);
                    }
                }
                acc
            })
            .collect();
        for p in &partials {
            for (r, v) in rest.iter_mut().zip(p) {
                *r += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * h)))
    }
}

/// `max(x, 0)`; backward passes the gradient where the output is positive (PyTorch's
/// `threshold_backward`).
pub(crate) fn relu(xs: &Tensor) -> candle_core::Result<Tensor> {
    xs.contiguous()?.apply_op1(Relu)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "fused-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(s, l, "fused relu")?;
        let mut out = vec![0f32; x.len()];
        let per = ROWS_PER_TASK_MIN_VALUES;
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(o, x)| {
                for (o, x) in o.iter_mut().zip(x) {
                    *o = x.max(0.0);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&g.contiguous()?, &ReluGrad)?))
    }
}

/// `grad * (out > 0)` from `(out, grad)`.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "fused-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = cpu_slice::<f32>(s1, l1, "fused relu backward")?;
        let g = cpu_slice::<f32>(s2, l2, "fused relu backward")?;
        if y.len() != g.len() {
            candle_core::bail!("fused relu backward: {:?} and {:?}", l1.dims(), l2.dims());
        }
        let mut out = vec![0f32; y.len()];
        let per = ROWS_PER_TASK_MIN_VALUES;
        out.par_chunks_mut(per)
            .zip(y.par_chunks(per).zip(g.par_chunks(per)))
            .for_each(|(o, (y, g))| {
                for ((o, y), g) in o.iter_mut().zip(y).zip(g) {
                    *o = if *y > 0.0 { *g } else { 0.0 };
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax attention, `softmax(scale * q k^T + mask) v` per head, for `q [b, s, heads * d]` and
/// `k`, `v [b, t, heads * d]`: the heads side by side, as the projections give them, and the
/// output the same way (`[b, s, heads * d]`, what the output projection takes). `mask` is
/// additive and broadcasts to `[b, 1, s, t]`; it is a constant (no gradient).
///
/// Composed, this is about twenty candle ops (head splits and merges with their copies, two
/// batched products, the mask, five for the softmax), each with its own backward and gradient
/// buffers; here it is one, whose backward recomputes the probabilities (cheap at caption
/// lengths) and returns dq, dk and dv.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, s, width) = q.dims3()?;
    let (bk, t, wk) = k.dims3()?;
    if bk != b || wk != width || v.dims() != k.dims() || heads == 0 || width % heads != 0 {
        candle_core::bail!(
            "fused attention: q {:?}, k {:?}, v {:?}, {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let mask = match mask {
        Some(m) => Some(std::sync::Arc::new(
            m.detach()
                .to_dtype(DType::F32)?
                .broadcast_as((b, 1, s, t))?
                .flatten_all()?
                .to_vec1::<f32>()?,
        )),
        None => None,
    };
    let op = Attention {
        heads,
        scale: scale as f32,
        mask,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Attention {
    heads: usize,
    scale: f32,
    /// `[b, 1, s, t]`, row-major.
    mask: Option<std::sync::Arc<Vec<f32>>>,
}

fn cpu_storage(s: &candle_core::Storage) -> candle_core::Result<&CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("fused attention backward: not on the CPU"),
    }
}

/// `sum a[i] * b[i]` in eight lanes (so that the compiler vectorises it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; 8];
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a * x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// One batch element's sizes and inputs, for the attention kernels.
struct AttnItem<'a> {
    t: usize,
    d: usize,
    width: usize,
    /// `[s, width]`, `[t, width]`, `[t, width]`.
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// `[s, t]`.
    mask: Option<&'a [f32]>,
}

impl AttnItem<'_> {
    /// Head `h`'s probabilities `[s, t]` into `p`.
    fn probs(&self, h: usize, scale: f32, p: &mut [f32]) {
        let (t, d, w) = (self.t, self.d, self.width);
        for (i, row) in p.chunks_mut(t).enumerate() {
            let qi = &self.q[i * w + h * d..][..d];
            for (j, r) in row.iter_mut().enumerate() {
                *r = dot(qi, &self.k[j * w + h * d..][..d]) * scale;
            }
            if let Some(m) = self.mask {
                for (r, m) in row.iter_mut().zip(&m[i * t..][..t]) {
                    *r += m;
                }
            }
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for r in row.iter_mut() {
                *r = (*r - max).exp();
                sum += *r;
            }
            for r in row.iter_mut() {
                *r /= sum;
            }
        }
    }
}

impl Attention {
    /// The per-batch-element inputs of contiguous `q`, `k`, `v` (and the mask).
    fn items<'a>(
        &'a self,
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        dims: (usize, usize, usize, usize),
    ) -> Vec<AttnItem<'a>> {
        let (b, s, t, width) = dims;
        let d = width / self.heads;
        (0..b)
            .map(|i| AttnItem {
                t,
                d,
                width,
                q: &q[i * s * width..][..s * width],
                k: &k[i * t * width..][..t * width],
                v: &v[i * t * width..][..t * width],
                mask: self.mask.as_ref().map(|m| &m[i * s * t..][..s * t]),
            })
            .collect()
    }

    fn dims(&self, lq: &Layout, lk: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, s, width) = lq.shape().dims3()?;
        let (_, t, _) = lk.shape().dims3()?;
        if let Some(m) = &self.mask {
            if m.len() != b * s * t {
                candle_core::bail!("fused attention: a mask of {} for {b}x{s}x{t}", m.len());
            }
        }
        Ok((b, s, t, width))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let q = cpu_slice::<f32>(s1, l1, "fused attention")?;
        let k = cpu_slice::<f32>(s2, l2, "fused attention")?;
        let v = cpu_slice::<f32>(s3, l3, "fused attention")?;
        let dims = self.dims(l1, l2)?;
        let (_, s, t, width) = dims;
        let items = self.items(q, k, v, dims);
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut((s * width).max(1))
            .zip(items.par_iter())
            .for_each(|(o, it)| {
                let mut p = vec![0f32; s * t];
                for h in 0..self.heads {
                    it.probs(h, self.scale, &mut p);
                    for (i, row) in p.chunks(t).enumerate() {
                        let oi = &mut o[i * width + h * it.d..][..it.d];
                        for (j, &pij) in row.iter().enumerate() {
                            axpy(oi, pij, &it.v[j * width + h * it.d..][..it.d]);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.detach().contiguous()?;
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (sg, lg) = g.storage_and_layout();
        let (cq, ck, cv, cg) = (
            cpu_storage(&sq)?,
            cpu_storage(&sk)?,
            cpu_storage(&sv)?,
            cpu_storage(&sg)?,
        );
        let qv = cpu_slice::<f32>(cq, lq, "fused attention backward")?;
        let kv = cpu_slice::<f32>(ck, lk, "fused attention backward")?;
        let vv = cpu_slice::<f32>(cv, lv, "fused attention backward")?;
        let gv = cpu_slice::<f32>(cg, lg, "fused attention backward")?;
        let dims = self.dims(lq, lk)?;
        let (_, s, t, width) = dims;
        if gv.len() != qv.len() {
            candle_core::bail!("fused attention backward: grad {:?}", lg.dims());
        }
        let items = self.items(qv, kv, vv, dims);
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        let (rows_q, rows_k) = ((s * width).max(1), (t * width).max(1));
        dq.par_chunks_mut(rows_q)
            .zip(dk.par_chunks_mut(rows_k).zip(dv.par_chunks_mut(rows_k)))
            .zip(items.par_iter().zip(gv.par_chunks(rows_q)))
            .for_each(|((dq, (dk, dv)), (it, g))| {
                let d = it.d;
                let mut p = vec![0f32; s * t];
                let mut ds = vec![0f32; t];
                for h in 0..self.heads {
                    it.probs(h, self.scale, &mut p);
                    for (i, prow) in p.chunks(t).enumerate() {
                        let gi = &g[i * width + h * d..][..d];
                        // dP = g v^T; dS = P * (dP - sum(P * dP)).
                        let mut along = 0f32;
                        for (j, (dsj, &pij)) in ds.iter_mut().zip(prow).enumerate() {
                            *dsj = dot(gi, &it.v[j * width + h * d..][..d]);
                            along += pij * *dsj;
                        }
                        for (dsj, &pij) in ds.iter_mut().zip(prow) {
                            *dsj = pij * (*dsj - along) * self.scale;
                        }
                        let qi = &it.q[i * width + h * d..][..d];
                        let dqi = &mut dq[i * width + h * d..][..d];
                        for (j, (&dsj, &pij)) in ds.iter().zip(prow).enumerate() {
                            let at = j * width + h * d;
                            // dq += dS k; dk += dS^T q; dv += P^T g.
                            axpy(dqi, dsj, &it.k[at..][..d]);
                            axpy(&mut dk[at..][..d], dsj, qi);
                            axpy(&mut dv[at..][..d], pij, gi);
                        }
                    }
                }
            });
        drop((sq, sk, sv, sg));
        let dq = Tensor::from_vec(dq, q.shape(), q.device())?;
        let dk = Tensor::from_vec(dk, k.shape(), k.device())?;
        let dv = Tensor::from_vec(dv, v.shape(), v.device())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The largest |a - b| over the largest |b| (or 1): a relative error for whole tensors.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_default();
        let b = b
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_default();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    fn var(shape: &[usize], seed: u64) -> candle_core::Result<Var> {
        // Deterministic values spread over [-2, 2), with some exact zeros for ReLU.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if i % 17 == 0 {
                    0.0
                } else {
                    (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
                }
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// A loss that weighs every output differently, so that gradients are not all alike.
    fn weighted_sum(y: &Tensor, seed: u64) -> candle_core::Result<Tensor> {
        let w = var(y.dims(), seed)?;
        (y * w.as_tensor())?.sum_all()
    }

    // Tolerances: both sides are f32 sums over at most a few hundred terms of values of order 1
    // (the composed side sums in a different order), so about 1e-6 relative per term; 1e-5 of
    // the largest value leaves room for that and fails on any wrong formula (errors of order 1).
    const TOL: f32 = 1e-5;

    #[test]
    fn linear_matches_autograd() -> candle_core::Result<()> {
        // 300 outputs: more than one block of the bias gradient's column sums. More inputs
        // than outputs: the weight is transposed first (70 x 40: across tiles, with partial
        // ones at both edges).
        for (bias, n, k) in [
            (true, 10, 24),
            (false, 10, 24),
            (true, 300, 24),
            (true, 40, 70),
        ] {
            let x = var(&[3, 5, k], 1)?;
            let w = var(&[n, k], 2)?;
            let b = var(&[n], 3)?;
            let y = linear(x.as_tensor(), w.as_tensor(), bias.then_some(b.as_tensor()))?;
            let r = x.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?;
            let r = if bias {
                r.broadcast_add(b.as_tensor())?
            } else {
                r
            };
            assert!(rel(&y, &r) < TOL, "forward {}", rel(&y, &r));
            let gy = weighted_sum(&y, 9)?.backward()?;
            let gr = weighted_sum(&r, 9)?.backward()?;
            let mut vars = vec![("x", &x), ("w", &w)];
            if bias {
                vars.push(("b", &b));
            }
            for (name, v) in vars {
                let (a, e) = (gy.get(v).expect("fused grad"), gr.get(v).expect("grad"));
                assert!(rel(a, e) < TOL, "d{name}: {}", rel(a, e));
            }
            if !bias {
                assert!(gy.get(&b).is_none());
            }
            // Gradients that carry a graph would keep the backward pass's tensors alive.
            assert!(!gy.get(&w).expect("dw").track_op());
            assert!(!gy.get(&x).expect("dx").track_op());
        }
        Ok(())
    }

    #[test]
    fn transpose_moves_every_element() {
        for (rows, cols) in [(1, 1), (3, 70), (70, 3), (33, 65), (64, 32)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
        assert!(transpose(&[], 0, 5).is_empty());
    }

    #[test]
    fn layer_norm_matches_autograd() -> candle_core::Result<()> {
        let x = var(&[4, 7, 32], 4)?;
        // Rows with an offset and a scale, as activations have.
        let x = Var::from_tensor(&((x.as_tensor() * 3.0)? + 5.0)?)?;
        let w = var(&[32], 5)?;
        let b = var(&[32], 6)?;
        let eps = 1e-5;
        let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps)?;
        let xs = x.as_tensor();
        let mean = (xs.sum_keepdim(D::Minus1)? / 32.0)?;
        let xc = xs.broadcast_sub(&mean)?;
        let v = (xc.sqr()?.sum_keepdim(D::Minus1)? / 32.0)?;
        let r = xc
            .broadcast_div(&(v + eps)?.sqrt()?)?
            .broadcast_mul(w.as_tensor())?
            .broadcast_add(b.as_tensor())?;
        assert!(rel(&y, &r) < TOL, "forward {}", rel(&y, &r));
        let gy = weighted_sum(&y, 8)?.backward()?;
        let gr = weighted_sum(&r, 8)?.backward()?;
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let (a, e) = (gy.get(v).expect("fused grad"), gr.get(v).expect("grad"));
            assert!(rel(a, e) < TOL, "d{name}: {}", rel(a, e));
            assert!(!a.track_op(), "d{name} carries a graph");
        }
        Ok(())
    }

    #[test]
    fn relu_matches_autograd() -> candle_core::Result<()> {
        let x = var(&[6, 50], 7)?;
        let y = relu(x.as_tensor())?;
        let r = x.as_tensor().relu()?;
        assert_eq!(rel(&y, &r), 0.0);
        let gy = weighted_sum(&y, 3)?.backward()?;
        let a = gy
            .get(&x)
            .expect("fused grad")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let g = var(y.dims(), 3)?
            .as_tensor()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let xv = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        // PyTorch passes the gradient where the output is positive: zero at x = 0 (candle's
        // own relu passes it there).
        for ((a, g), x) in a.iter().zip(&g).zip(&xv) {
            assert_eq!(*a, if *x > 0.0 { *g } else { 0.0 });
        }
        assert!(xv.contains(&0.0));
        Ok(())
    }
    #[test]
    fn attention_matches_autograd() -> candle_core::Result<()> {
        let (b, s, heads, d) = (3, 5, 4, 8);
        let q = var(&[b, s, heads * d], 11)?;
        let k = var(&[b, s, heads * d], 12)?;
        let v = var(&[b, s, heads * d], 13)?;
        // Causal, and the last position of batch element 1 padded, as attention_bias gives.
        let mut m = vec![0f32; b * s * s];
        for bi in 0..b {
            for i in 0..s {
                for j in 0..s {
                    if j > i || (bi == 1 && j == s - 1) {
                        m[(bi * s + i) * s + j] = f32::MIN;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, s, s), &Device::Cpu)?;
        let scale = (d as f64).powf(-0.5);
        for mask in [Some(&mask), None] {
            let y = attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                mask,
                heads,
                scale,
            )?;
            let split = |x: &Tensor| {
                x.reshape((b, s, heads, d))
                    .and_then(|x| x.transpose(1, 2))
                    .and_then(|x| x.contiguous())
            };
            let scores = (split(q.as_tensor())? * scale)?.matmul(&split(k.as_tensor())?.t()?)?;
            let scores = match mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            let r = candle_nn::ops::softmax(&scores, D::Minus1)?
                .matmul(&split(v.as_tensor())?)?
                .transpose(1, 2)?
                .reshape((b, s, heads * d))?;
            assert!(rel(&y, &r) < TOL, "forward {}", rel(&y, &r));
            let gy = weighted_sum(&y, 14)?.backward()?;
            let gr = weighted_sum(&r, 14)?.backward()?;
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, e) = (gy.get(x).expect("fused grad"), gr.get(x).expect("grad"));
                assert!(rel(a, e) < TOL, "d{name}: {}", rel(a, e));
                assert!(!a.track_op(), "d{name} carries a graph");
            }
        }
        Ok(())
    }
}
