//! The matrix products of a real-size training step (OPT-125m, batch 32 x 21 positions), timed
//! with gemm (the library candle's CPU products and the fused training ops use) for each
//! layout of the right-hand operand: where the fused linear layer's choices come from.
//!
//! For `y = x w^T` with the weight `w [n, k]` row-major, `w^T` is read with its columns
//! strided ("strided"); a row-major copy of `w^T` ("row-major") is the alternative, whose
//! cost (making the copy) shows in the whole step (`trainer/examples/bench_step.rs`). The
//! backward's products (`g w` and `g^T x`) read their right-hand side row-major already.
//!
//! `cargo run --release -p moda-models --example gemm_layouts -- [reps]`; `scripts/bench_matmul.py`
//! times the same products in PyTorch.

use std::time::Instant;

/// Rows of the step's activations: batch 32, one image position and 20 tokens.
const ROWS: usize = 32 * 21;

/// The best of `reps` runs of `f`, in ms.
fn best_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// `dst [m, n] = lhs [m, k] (row-major) * rhs`, with `rhs`'s element (r, c) at
/// `r * rhs_rs + c * rhs_cs`.
fn product(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    (m, n, k): (usize, usize, usize),
    rhs_rs: isize,
    rhs_cs: isize,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == k * n);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three slices hold exactly the m x n, m x k and k x n elements that the
    // strides address (checked above; `rhs`'s strides are those of a k x n or n x k layout).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!(
        "threads: {}, rows: {ROWS}, best of {reps}",
        rayon::current_num_threads()
    );
    println!(
        "{:>24} {:>14} {:>14} {:>10}",
        "y = x w^T, w [n, k]", "strided ms", "row-major ms", "GFLOP/s"
    );
    // q/k/v/out, fc1, fc2, the LM head.
    for (n, k) in [(768usize, 768usize), (3072, 768), (768, 3072), (50272, 768)] {
        let x: Vec<f32> = (0..ROWS * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut y = vec![0f32; ROWS * n];
        let shape = (ROWS, n, k);
        let strided = best_ms(reps, || product(&mut y, &x, &w, shape, 1, k as isize));
        let mut wt = vec![0f32; n * k];
        for (r, row) in w.chunks_exact(k).enumerate() {
            for (c, v) in row.iter().enumerate() {
                wt[c * n + r] = *v;
            }
        }
        let row_major = best_ms(reps, || product(&mut y, &x, &wt, shape, n as isize, 1));
        // The faster layout's rate: 2 flops per multiply-add.
        let gflops = 2.0 * (ROWS * n * k) as f64 / strided.min(row_major) / 1e6;
        println!(
            "{:>24} {strided:>14.2} {row_major:>14.2} {gflops:>10.0}",
            format!("n {n}, k {k}")
        );
    }
}
