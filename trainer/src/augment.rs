//! Image augmentation for runs that train the encoder: each training sample's preprocessed
//! pixels are flipped left-right with probability 1/2 and shifted by a random whole number of
//! pixels in each direction, the uncovered border repeating the nearest edge pixel (the
//! catalog photos' backdrop continues past the frame). Validation and evaluation see the
//! pixels unchanged.
//!
//! The draws come from a ChaCha8 generator seeded by the run's seed, the epoch and the
//! micro-batch, so a resumed run augments exactly as the uninterrupted one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What to draw per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    /// Flip left-right with probability 1/2.
    pub flip: bool,
    /// Shift by up to this many pixels in each direction (0: none).
    pub max_shift: usize,
}

/// The generator of one micro-batch's draws.
pub fn batch_rng(seed: u64, epoch: usize, micro_batch: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa0a0_5eed_0000_0000);
    rng.set_stream(((epoch as u64) << 32) | micro_batch as u64);
    rng
}

/// Augments `pixels`, `n` images of `channels x h x w` values each (NCHW, row-major), in
/// place; one flip and one shift drawn per image from `rng`.
pub fn augment_batch(
    pixels: &mut [f32],
    n: usize,
    channels: usize,
    h: usize,
    w: usize,
    aug: Augment,
    rng: &mut ChaCha8Rng,
) {
    let plane = h * w;
    let image = channels * plane;
    debug_assert_eq!(pixels.len(), n * image);
    let mut scratch = vec![0f32; plane];
    let m = aug.max_shift as i64;
    for img in pixels.chunks_exact_mut(image).take(n) {
        let flip = aug.flip && rng.random_bool(0.5);
        let (dy, dx) = if m > 0 {
            (rng.random_range(-m..=m), rng.random_range(-m..=m))
        } else {
            (0, 0)
        };
        if !flip && dx == 0 && dy == 0 {
            continue;
        }
        for ch in img.chunks_exact_mut(plane) {
            scratch.copy_from_slice(ch);
            for y in 0..h {
                // Output (y, x) takes source (y - dy, x - dx), clamped to the frame, after
                // the flip.
                let sy = (y as i64 - dy).clamp(0, h as i64 - 1) as usize;
                for x in 0..w {
                    let sx = (x as i64 - dx).clamp(0, w as i64 - 1) as usize;
                    let sx = if flip { w - 1 - sx } else { sx };
                    ch[y * w + x] = scratch[sy * w + sx];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        (0..n * c * h * w).map(|i| i as f32).collect()
    }

    #[test]
    fn off_is_identity() {
        let mut px = ramp(3, 3, 5, 4);
        let before = px.clone();
        let aug = Augment {
            flip: false,
            max_shift: 0,
        };
        augment_batch(&mut px, 3, 3, 5, 4, aug, &mut batch_rng(1, 0, 0));
        assert_eq!(px, before);
    }

    #[test]
    fn flip_only_mirrors_rows() {
        // With flips only, every image is either unchanged or each row reversed, and over 64
        // images both happen.
        let (n, c, h, w) = (64, 2, 3, 5);
        let mut px = ramp(n, c, h, w);
        let before = px.clone();
        let aug = Augment {
            flip: true,
            max_shift: 0,
        };
        augment_batch(&mut px, n, c, h, w, aug, &mut batch_rng(7, 2, 3));
        let (mut flipped, mut kept) = (0, 0);
        for (a, b) in px.chunks(c * h * w).zip(before.chunks(c * h * w)) {
            if a == b {
                kept += 1;
                continue;
            }
            for (ra, rb) in a.chunks(w).zip(b.chunks(w)) {
                let rev: Vec<f32> = rb.iter().rev().copied().collect();
                assert_eq!(ra, rev.as_slice());
            }
            flipped += 1;
        }
        assert!(flipped > 10 && kept > 10, "flipped {flipped}, kept {kept}");
    }

    #[test]
    fn shift_moves_content_and_repeats_the_edge() {
        // One image, one channel, 4x4: find the drawn shift from the result and check every
        // pixel against it.
        let (h, w) = (4usize, 4usize);
        let aug = Augment {
            flip: false,
            max_shift: 2,
        };
        let mut seen_shift = false;
        for mb in 0..20 {
            let mut px = ramp(1, 1, h, w);
            let src = px.clone();
            augment_batch(&mut px, 1, 1, h, w, aug, &mut batch_rng(3, 0, mb));
            let mut ok = false;
            for dy in -2i64..=2 {
                for dx in -2i64..=2 {
                    let want: Vec<f32> = (0..h * w)
                        .map(|i| {
                            let (y, x) = ((i / w) as i64, (i % w) as i64);
                            let sy = (y - dy).clamp(0, h as i64 - 1) as usize;
                            let sx = (x - dx).clamp(0, w as i64 - 1) as usize;
                            src[sy * w + sx]
                        })
                        .collect();
                    if want == px {
                        ok = true;
                        seen_shift |= dx != 0 || dy != 0;
                    }
                }
            }
            assert!(
                ok,
                "micro-batch {mb}: not a clamped shift within 2 px: {px:?}"
            );
        }
        assert!(seen_shift);
    }

    #[test]
    fn same_seed_same_draws() {
        let aug = Augment {
            flip: true,
            max_shift: 3,
        };
        let mut a = ramp(4, 3, 8, 8);
        let mut b = a.clone();
        augment_batch(&mut a, 4, 3, 8, 8, aug, &mut batch_rng(5, 9, 2));
        augment_batch(&mut b, 4, 3, 8, 8, aug, &mut batch_rng(5, 9, 2));
        assert_eq!(a, b);
        let mut c = ramp(4, 3, 8, 8);
        augment_batch(&mut c, 4, 3, 8, 8, aug, &mut batch_rng(5, 9, 3));
        assert_ne!(a, c);
    }
}
