//! How fast one decode step's int4 or int8 products can run on this CPU outside ONNX Runtime:
//! OPT-125m's 49 weight products at one row (q, k and v as one product of their stacked
//! weights, out, fc1 and fc2 of 12 layers, then a 50,272-row LM head), as the exporter writes
//! them, in `MatMulNBits`' layout (int4: codes packed two to a byte, low nibble first, zero
//! point 8, one f32 scale per block of 32 along K; int8: a code per byte, zero point 128,
//! blocks of 128), with a plain AVX-512 VNNI loop on 2
//! threads: the activations quantized to int8 per block (as `accuracy_level` 4 does), 64
//! weights per `vpdpbusd`, the blocks' scales applied per lane. The weights are random (77 MB
//! in int4, 140 MB in int8), so every step reads them from memory; the read bandwidth is
//! measured in the same run as `moda-sdk bench` does (2 threads summing 256 MiB, best of 12
//! passes), and the step is printed against the floor it gives, with the time per product
//! shape.
//!
//!   cargo run --release -p moda-sdk --example quant_products [STEPS] [--int8] [--cached]
//!
//! `--cached`: as many products of one 768 x 768 weight instead (which stays in the caches),
//! to tell the kernel's own speed from the memory's.
//!
//! Needs an x86-64 CPU with AVX-512 F, BW, VNNI and VBMI (AMD Zen 4 and later, Intel Ice Lake
//! and later); elsewhere it says so and exits with status 1. A measurement for the question
//! whether a kernel of our own would bring the quantized decoders' steps nearer their floor
//! than ONNX Runtime's `MatMulNBits`; no part of the SDK uses it.

fn main() {
    let mut steps = 200;
    let mut cached = false;
    let mut bits = 4;
    for arg in std::env::args().skip(1) {
        match (arg.as_str(), arg.parse::<usize>()) {
            ("--cached", _) => cached = true,
            ("--int8", _) => bits = 8,
            (_, Ok(n)) if n > 0 => steps = n,
            _ => {
                eprintln!("quant_products: expected [STEPS] [--int8] [--cached], got {arg:?}");
                std::process::exit(2);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        let ok = ["avx512f", "avx512bw", "avx512vnni", "avx512vbmi"];
        let have = [
            std::arch::is_x86_feature_detected!("avx512f"),
            std::arch::is_x86_feature_detected!("avx512bw"),
            std::arch::is_x86_feature_detected!("avx512vnni"),
            std::arch::is_x86_feature_detected!("avx512vbmi"),
        ];
        if have.iter().all(|&h| h) {
            // SAFETY: the CPU has every feature the kernels are compiled for.
            unsafe { x86::run(steps, cached, bits) };
            return;
        }
        eprintln!("quant_products: this CPU lacks one of {ok:?}");
    }
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("quant_products: needs an x86-64 CPU with AVX-512 VNNI and VBMI");
    std::process::exit(1);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Instant;

    /// Weights per `vpdpbusd`.
    const CHUNK: usize = 64;
    const THREADS: usize = 2;

    /// One `[n, k]` weight in `MatMulNBits`' layout.
    struct Weight {
        n: usize,
        k: usize,
        /// 4 or 8.
        bits: u32,
        packed: Vec<u8>,
        /// `n * k / block` scales, row after row.
        scales: Vec<f32>,
    }

    /// Weights per block (one scale each): the exporter's, 32 for int4 and 128 for int8.
    fn block(bits: u32) -> usize {
        if bits == 4 {
            32
        } else {
            128
        }
    }

    impl Weight {
        /// Random codes and scales. The kernels take whole groups of 4 rows per thread and
        /// whole blocks of 128 along K: OPT-125m's shapes are such.
        fn random(n: usize, k: usize, bits: u32, seed: u64) -> Self {
            assert!(
                n.is_multiple_of(4 * THREADS) && k.is_multiple_of(128),
                "shape {n} x {k}"
            );
            let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let packed = (0..n * k * bits as usize / 8)
                .map(|_| next() as u8)
                .collect();
            let scales = (0..n * k / block(bits))
                .map(|_| (next() % 1000) as f32 * 1e-5 + 1e-3)
                .collect();
            Weight {
                n,
                k,
                bits,
                packed,
                scales,
            }
        }

        fn bytes(&self) -> usize {
            self.packed.len() + self.scales.len() * 4
        }

        /// Row `r` of the product with `a`, in f32 from the unpacked weights.
        fn reference_row(&self, a: &[f32], r: usize) -> f32 {
            let mut y = 0f32;
            let b = block(self.bits);
            for (kk, &x) in a.iter().enumerate().take(self.k) {
                let code = if self.bits == 8 {
                    self.packed[r * self.k + kk] as i32 - 128
                } else {
                    let byte = self.packed[r * self.k / 2 + kk / 2];
                    (if kk % 2 == 0 { byte & 15 } else { byte >> 4 }) as i32 - 8
                };
                y += code as f32 * self.scales[r * self.k / b + kk / b] * x;
            }
            y
        }
    }

    /// The activations quantized per block and laid out per chunk as the kernel reads the
    /// weights. int4: int32 lane `l` covers four codes of block `(l / 4) % 2`, the low nibbles
    /// of the chunk's 32 bytes (even positions) in lanes 0-7, the high ones (odd positions) in
    /// 8-15; int8: the chunk's 64 codes in order.
    struct Activations {
        codes: Vec<__m512i>,
        /// Minus the weights' zero point times the sum of each lane's four codes, folded into
        /// the sum's start.
        zero: Vec<__m512i>,
        /// Each lane's activation scale.
        scales: Vec<__m512>,
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
    unsafe fn quantize4(a: &[f32]) -> Activations {
        // SAFETY: the caller checked that the CPU has the features this is compiled for;
        // every pointer read or written stays within its vector.
        unsafe {
            let chunks = a.len() / CHUNK;
            let mut order = [0u8; CHUNK];
            for (j, o) in order.iter_mut().enumerate() {
                let (half, pos) = (j / 32, j % 32);
                *o = ((pos / 16) * 32 + 2 * (pos % 16) + half) as u8;
            }
            let order = _mm512_loadu_si512(order.as_ptr().cast());
            let mut out = Activations {
                codes: Vec::with_capacity(chunks),
                zero: Vec::with_capacity(chunks),
                scales: Vec::with_capacity(chunks),
            };
            for chunk in a.chunks_exact(CHUNK) {
                let p = chunk.as_ptr();
                let x = [0, 16, 32, 48].map(|o| _mm512_loadu_ps(p.add(o)));
                let scale = |lo: __m512, hi: __m512| {
                    let m =
                        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
                    if m > 0.0 {
                        m / 127.0
                    } else {
                        1.0
                    }
                };
                let s = [scale(x[0], x[1]), scale(x[2], x[3])];
                let code = |i: usize| {
                    let v = _mm512_mul_ps(x[i], _mm512_set1_ps(1.0 / s[i / 2]));
                    _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v))
                };
                let mut q = _mm512_castsi128_si512(code(0));
                q = _mm512_inserti32x4::<1>(q, code(1));
                q = _mm512_inserti32x4::<2>(q, code(2));
                q = _mm512_inserti32x4::<3>(q, code(3));
                let q = _mm512_permutexvar_epi8(order, q);
                let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), q);
                out.codes.push(q);
                out.zero.push(_mm512_sub_epi32(
                    _mm512_setzero_si512(),
                    _mm512_slli_epi32::<3>(sums),
                ));
                out.scales.push(_mm512_mask_blend_ps(
                    0xF0F0,
                    _mm512_set1_ps(s[0]),
                    _mm512_set1_ps(s[1]),
                ));
            }
            out
        }
    }

    /// The activations for int8 weights in blocks of 128: codes in order, one scale per block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
    unsafe fn quantize8(a: &[f32]) -> Activations {
        // SAFETY: the caller checked that the CPU has the features this is compiled for;
        // every pointer read stays within `a`.
        unsafe {
            let mut out = Activations {
                codes: Vec::with_capacity(a.len() / CHUNK),
                zero: Vec::with_capacity(a.len() / CHUNK),
                scales: Vec::with_capacity(a.len() / CHUNK),
            };
            for blk in a.chunks_exact(128) {
                let p = blk.as_ptr();
                let x: [__m512; 8] = std::array::from_fn(|i| _mm512_loadu_ps(p.add(16 * i)));
                let m = x.iter().fold(_mm512_setzero_ps(), |m, v| {
                    _mm512_max_ps(m, _mm512_abs_ps(*v))
                });
                let m = _mm512_reduce_max_ps(m);
                let s = if m > 0.0 { m / 127.0 } else { 1.0 };
                let inv = _mm512_set1_ps(1.0 / s);
                let code =
                    |i: usize| _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x[i], inv)));
                for half in 0..2 {
                    let mut q = _mm512_castsi128_si512(code(4 * half));
                    q = _mm512_inserti32x4::<1>(q, code(4 * half + 1));
                    q = _mm512_inserti32x4::<2>(q, code(4 * half + 2));
                    q = _mm512_inserti32x4::<3>(q, code(4 * half + 3));
                    let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), q);
                    out.codes.push(q);
                    out.zero.push(_mm512_sub_epi32(
                        _mm512_setzero_si512(),
                        _mm512_slli_epi32::<7>(sums),
                    ));
                    out.scales.push(_mm512_set1_ps(s));
                }
            }
            out
        }
    }

    /// The activations as `w`'s kernel reads them.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VNNI and VBMI.
    unsafe fn quantize(w: &Weight, a: &[f32]) -> Activations {
        // SAFETY: as the caller promised.
        unsafe {
            if w.bits == 8 {
                quantize8(a)
            } else {
                quantize4(a)
            }
        }
    }

    /// Rows `rows` of `w · a` into `y`, four at a time: int8 codes are read as they are, int4
    /// codes unpacked low nibbles then high (the order `quantize4` lays the activations in).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VNNI and VBMI; `y` must hold `rows.end` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
    unsafe fn product(w: &Weight, a: &Activations, rows: std::ops::Range<usize>, y: *mut f32) {
        // SAFETY: as the caller promised; every pointer read or written stays within its
        // vector.
        unsafe {
            let int8 = w.bits == 8;
            let row_bytes = w.k * w.bits as usize / 8;
            let blocks = w.k / block(w.bits);
            let low = _mm256_set1_epi8(0x0F);
            let pair = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
            let mut r = rows.start;
            while r + 4 <= rows.end {
                let mut acc = [_mm512_setzero_ps(); 4];
                for (c, ((codes, zero), ascale)) in
                    a.codes.iter().zip(&a.zero).zip(&a.scales).enumerate()
                {
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let row = r + i;
                        let at = w.packed.as_ptr().add(row * row_bytes);
                        let scales = w.scales.as_ptr().add(row * blocks);
                        let (codes_w, s) = if int8 {
                            let codes_w = _mm512_loadu_si512(at.add(CHUNK * c).cast());
                            // One block of 128 spans two chunks.
                            (codes_w, _mm512_set1_ps(*scales.add(c / 2)))
                        } else {
                            let p = _mm256_loadu_si256(at.add(32 * c).cast());
                            let lo = _mm256_and_si256(p, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(p), low);
                            let codes_w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                            // The chunk's two blocks of 32, to the lanes that hold them.
                            let two = scales.add(2 * c).cast::<f64>().read_unaligned();
                            let s =
                                _mm512_permutexvar_ps(pair, _mm512_castpd_ps(_mm512_set1_pd(two)));
                            (codes_w, s)
                        };
                        let dot = _mm512_dpbusd_epi32(*zero, codes_w, *codes);
                        *acc = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(dot),
                            _mm512_mul_ps(s, *ascale),
                            *acc,
                        );
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    *y.add(r + i) = _mm512_reduce_add_ps(*acc);
                }
                r += 4;
            }
        }
    }

    /// A spinning barrier for the two threads (as ONNX Runtime's pool spins between ops).
    struct Barrier {
        arrived: AtomicUsize,
        generation: AtomicUsize,
    }

    impl Barrier {
        fn wait(&self) {
            let g = self.generation.load(Ordering::Acquire);
            if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == THREADS {
                self.arrived.store(0, Ordering::Release);
                self.generation.fetch_add(1, Ordering::Release);
            } else {
                while self.generation.load(Ordering::Acquire) == g {
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// Read bandwidth in bytes/s: 2 threads summing 256 MiB, best of 12 passes.
    fn bandwidth() -> f64 {
        let buf = vec![1f32; 64 << 20];
        let mut best = 0f64;
        for _ in 0..12 {
            let t = Instant::now();
            let sum: f32 = std::thread::scope(|sc| {
                let parts: Vec<_> = buf
                    .chunks(buf.len() / THREADS)
                    .map(|part| {
                        sc.spawn(move || {
                            let mut acc = [0f32; 16];
                            for v in part.chunks_exact(16) {
                                for (a, x) in acc.iter_mut().zip(v) {
                                    *a += x;
                                }
                            }
                            acc.iter().sum::<f32>()
                        })
                    })
                    .collect();
                parts.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
            });
            std::hint::black_box(sum);
            best = best.max((buf.len() * 4) as f64 / t.elapsed().as_secs_f64());
        }
        best
    }

    /// Rows `[start, end)` of an `n`-row product that thread `t` takes (multiples of 4).
    fn share(n: usize, t: usize) -> std::ops::Range<usize> {
        let per = (n / THREADS).div_ceil(4) * 4;
        (t * per).min(n)..((t + 1) * per).min(n)
    }

    /// The benchmark. Safety: the CPU must have AVX-512 F, BW, VNNI and VBMI.
    pub unsafe fn run(steps: usize, cached: bool, bits: u32) {
        // A step's products (rows, inputs, seed), as the exporter writes the decoder: per
        // layer q, k and v joined, out, fc1 and fc2; then the LM head.
        let mut shapes = Vec::new();
        for layer in 0..12u64 {
            shapes.push((3 * 768, 768, 10 * layer));
            shapes.push((768, 768, 10 * layer + 4));
            shapes.push((3072, 768, 10 * layer + 5));
            shapes.push((768, 3072, 10 * layer + 6));
        }
        shapes.push((50272, 768, 999));
        // The weights, and the step's products as indices into them.
        let (weights, order): (Vec<Weight>, Vec<usize>) = if cached {
            (
                vec![Weight::random(768, 768, bits, 4)],
                vec![0; shapes.len()],
            )
        } else {
            let w = shapes
                .iter()
                .map(|&(n, k, seed)| Weight::random(n, k, bits, seed));
            (w.collect(), (0..shapes.len()).collect())
        };
        let a: Vec<f32> = (0..3072)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();

        // The kernel against the unpacked weights. The activations' int8 rounding (half a step
        // of max|a| / 127 per element) bounds the difference: about 0.4% of a row's largest
        // term sum, so 1% of the largest |y| is the bound.
        for w in [&weights[0], &weights[weights.len().min(4) - 1]] {
            let mut y = vec![0f32; w.n];
            // SAFETY: the caller checked the CPU's features; `y` holds all `w.n` rows.
            unsafe {
                let qa = quantize(w, &a[..w.k]);
                product(w, &qa, 0..w.n, y.as_mut_ptr());
            }
            let reference: Vec<f32> = (0..w.n).map(|r| w.reference_row(&a, r)).collect();
            let largest = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = reference
                .iter()
                .zip(&y)
                .fold(0f32, |m, (r, v)| m.max((r - v).abs()));
            println!(
                "{}x{}: largest |y| {largest:.4}, largest difference {err:.5}",
                w.n, w.k
            );
            if err > 0.01 * largest {
                eprintln!("quant_products: the kernel disagrees with the reference");
                std::process::exit(1);
            }
        }

        let bw = bandwidth();
        let bytes: usize = order.iter().map(|&i| weights[i].bytes()).sum();
        let largest_n = weights.iter().map(|w| w.n).max().unwrap_or(0);
        let mut y = vec![0f32; largest_n];
        let y_addr = y.as_mut_ptr() as usize;
        let barrier = Barrier {
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        };
        let per_weight: Vec<AtomicU64> = order.iter().map(|_| AtomicU64::new(0)).collect();
        let work = |t: usize| -> Vec<f64> {
            let mut times = Vec::with_capacity(steps);
            for _ in 0..steps {
                let step = Instant::now();
                for (&i, ns) in order.iter().zip(&per_weight) {
                    let w = &weights[i];
                    let one = Instant::now();
                    // SAFETY: `run` checked the CPU's features; the threads write disjoint rows.
                    unsafe {
                        let qa = quantize(w, &a[..w.k]);
                        product(w, &qa, share(w.n, t), y_addr as *mut f32);
                    }
                    barrier.wait();
                    if t == 0 {
                        ns.fetch_add(one.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                }
                times.push(step.elapsed().as_secs_f64());
            }
            times
        };
        let mut times = std::thread::scope(|sc| {
            let other = sc.spawn(|| work(1));
            let times = work(0);
            let _ = other.join();
            times
        });
        std::hint::black_box(&y);
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let floor = bytes as f64 / bw;
        println!(
            "{} products, {:.1} MB; bandwidth {:.1} GB/s, floor {:.3} ms; step median {:.3} ms \
             (fastest {:.3}) over {steps} steps: {:.2}x the floor",
            order.len(),
            bytes as f64 / 1e6,
            bw / 1e9,
            floor * 1e3,
            median * 1e3,
            times[0] * 1e3,
            median / floor
        );
        let mut shapes: Vec<(usize, usize, usize, f64, usize)> = Vec::new();
        for (&i, ns) in order.iter().zip(&per_weight) {
            let w = &weights[i];
            let secs = ns.load(Ordering::Relaxed) as f64 / 1e9 / steps as f64;
            match shapes.iter_mut().find(|s| (s.0, s.1) == (w.n, w.k)) {
                Some(s) => {
                    s.2 += 1;
                    s.3 += secs;
                }
                None => shapes.push((w.n, w.k, 1, secs, w.bytes())),
            }
        }
        for (n, k, count, secs, bytes) in shapes {
            let each = secs / count as f64;
            println!(
                "  {n} x {k}: {count} products, {:.1} us each, {:.1} GB/s of their bytes",
                each * 1e6,
                bytes as f64 / each / 1e9
            );
        }
    }
}
