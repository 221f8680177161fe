//! Image augmentation for runs that train the encoder: each training sample's preprocessed
//! pixels are flipped left-right with probability 1/2 and shifted by a random whole number of
//! pixels in each direction, the uncovered border repeating the nearest edge pixel (the
//! catalog photos' backdrop continues past the frame). When configured, a share of the
//! images ([`AFFINE_SHARE`]) is also rotated about the centre and scaled, resampled
//! bilinearly; the rest keep exact whole-pixel copies, so the fine patterns the model must
//! read (pinstripes about a pixel wide) are seen unblurred too. Validation and evaluation see
//! the pixels unchanged.
//!
//! The draws come from a ChaCha8 generator seeded by the run's seed, the epoch and the
//! micro-batch, so a resumed run augments exactly as the uninterrupted one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The share of the training images that get the rotation and scale, when configured.
pub const AFFINE_SHARE: f32 = 0.5;

/// What to draw per sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Flip left-right with probability 1/2.
    pub flip: bool,
    /// Shift by up to this many pixels in each direction (0: none).
    pub max_shift: usize,
    /// Rotate by up to this many degrees either way (0: none).
    pub max_rotate_deg: f32,
    /// Scale by a factor drawn between `1 - max_scale` and `1 + max_scale` (0: none).
    pub max_scale: f32,
    /// The probability that an image gets the rotation and scale (resampled bilinearly);
    /// the others keep whole-pixel shifts, which copy pixels exactly.
    pub affine_p: f32,
}

/// The generator of one micro-batch's draws.
pub fn batch_rng(seed: u64, epoch: usize, micro_batch: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa0a0_5eed_0000_0000);
    rng.set_stream(((epoch as u64) << 32) | micro_batch as u64);
    rng
}

/// One image's draws: its flip, shift and, for a share of the images, rotation and scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    flip: bool,
    dy: i64,
    dx: i64,
    /// The rotation in degrees and the scale, when this image is resampled.
    affine: Option<(f32, f32)>,
}

/// The draws of `n` images, in order, from `rng`: a micro-batch's draws are made in one
/// sequence, so that the images can then be transformed anywhere (on the threads of the
/// micro-batch's shards) with the same result.
pub fn draw(n: usize, aug: Augment, rng: &mut ChaCha8Rng) -> Vec<Draw> {
    let m = aug.max_shift as i64;
    (0..n)
        .map(|_| {
            let flip = aug.flip && rng.random_bool(0.5);
            let (dy, dx) = if m > 0 {
                (rng.random_range(-m..=m), rng.random_range(-m..=m))
            } else {
                (0, 0)
            };
            let affine = (aug.max_rotate_deg > 0.0 || aug.max_scale > 0.0)
                && aug.affine_p > 0.0
                && rng.random_bool(f64::from(aug.affine_p.min(1.0)));
            let affine = affine.then(|| {
                let deg = if aug.max_rotate_deg > 0.0 {
                    rng.random_range(-aug.max_rotate_deg..=aug.max_rotate_deg)
                } else {
                    0.0
                };
                let scale = if aug.max_scale > 0.0 {
                    rng.random_range(1.0 - aug.max_scale..=1.0 + aug.max_scale)
                } else {
                    1.0
                };
                (deg, scale)
            });
            Draw {
                flip,
                dy,
                dx,
                affine,
            }
        })
        .collect()
}

/// Transforms `pixels`, `draws.len()` images of `channels x h x w` values each (NCHW,
/// row-major), in place, image `i` by `draws[i]`.
pub fn apply(pixels: &mut [f32], channels: usize, h: usize, w: usize, draws: &[Draw]) {
    let plane = h * w;
    let image = channels * plane;
    debug_assert_eq!(pixels.len(), draws.len() * image);
    let mut scratch = vec![0f32; plane];
    for (img, d) in pixels.chunks_exact_mut(image).zip(draws) {
        let (flip, dy, dx) = (d.flip, d.dy, d.dx);
        if let Some((deg, scale)) = d.affine {
            let map = Affine::new(h, w, flip, dx as f32, dy as f32, deg.to_radians(), scale);
            for ch in img.chunks_exact_mut(plane) {
                scratch.copy_from_slice(ch);
                map.resample(&scratch, ch);
            }
            continue;
        }
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

/// The inverse map of one image's flip, shift, rotation about the centre and scale: for
/// each output pixel, where in the source to read it.
struct Affine {
    h: usize,
    w: usize,
    flip: bool,
    dx: f32,
    dy: f32,
    /// The inverse rotation and scale, as a 2x2 matrix (row-major).
    m: [f32; 4],
}

impl Affine {
    fn new(h: usize, w: usize, flip: bool, dx: f32, dy: f32, radians: f32, scale: f32) -> Self {
        let (sin, cos) = radians.sin_cos();
        let k = 1.0 / scale;
        Self {
            h,
            w,
            flip,
            dx,
            dy,
            m: [cos * k, sin * k, -sin * k, cos * k],
        }
    }

    /// Writes `dst` from `src` (one `h x w` plane): output (y, x) reads the source at the
    /// inverse-mapped point, bilinearly, coordinates clamped to the frame (the edge repeats).
    fn resample(&self, src: &[f32], dst: &mut [f32]) {
        let (h, w) = (self.h, self.w);
        let (cx, cy) = (w as f32 * 0.5, h as f32 * 0.5);
        let (wmax, hmax) = ((w - 1) as f32, (h - 1) as f32);
        for y in 0..h {
            let v = y as f32 + 0.5 - cy - self.dy;
            for x in 0..w {
                let u = x as f32 + 0.5 - cx - self.dx;
                // Source point in pixel-centre coordinates, then flipped left-right.
                let mut sx = self.m[0] * u + self.m[1] * v + cx - 0.5;
                let sy = (self.m[2] * u + self.m[3] * v + cy - 0.5).clamp(0.0, hmax);
                if self.flip {
                    sx = wmax - sx;
                }
                let sx = sx.clamp(0.0, wmax);
                let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
                let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
                let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
                let bottom = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
                dst[y * w + x] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Augments `pixels`, `n` images of `channels x h x w` values each, in place, with draws
    /// from `rng`: [`draw`], then [`apply`], as training does.
    fn augment_batch(
        pixels: &mut [f32],
        n: usize,
        channels: usize,
        h: usize,
        w: usize,
        aug: Augment,
        rng: &mut ChaCha8Rng,
    ) {
        apply(pixels, channels, h, w, &draw(n, aug, rng));
    }

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
            max_rotate_deg: 0.0,
            max_scale: 0.0,
            affine_p: 0.0,
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
            max_rotate_deg: 0.0,
            max_scale: 0.0,
            affine_p: 0.0,
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
            max_rotate_deg: 0.0,
            max_scale: 0.0,
            affine_p: 0.0,
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
            max_rotate_deg: 0.0,
            max_scale: 0.0,
            affine_p: 0.0,
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

    #[test]
    fn affine_identity_copies_and_quarter_turn_rotates() {
        let (h, w) = (6usize, 6usize);
        let src = ramp(1, 1, h, w);
        let mut out = vec![0f32; h * w];
        Affine::new(h, w, false, 0.0, 0.0, 0.0, 1.0).resample(&src, &mut out);
        assert_eq!(out, src);
        // Flipped, the identity map mirrors each row.
        Affine::new(h, w, true, 0.0, 0.0, 0.0, 1.0).resample(&src, &mut out);
        for (ro, rs) in out.chunks(w).zip(src.chunks(w)) {
            let rev: Vec<f32> = rs.iter().rev().copied().collect();
            assert_eq!(ro, rev.as_slice());
        }
        // A whole-pixel shift matches the exact path's (clamped) shift.
        Affine::new(h, w, false, 2.0, -1.0, 0.0, 1.0).resample(&src, &mut out);
        for y in 0..h {
            for x in 0..w {
                let sy = (y as i64 + 1).clamp(0, h as i64 - 1) as usize;
                let sx = (x as i64 - 2).clamp(0, w as i64 - 1) as usize;
                assert_eq!(out[y * w + x], src[sy * w + sx], "({y}, {x})");
            }
        }
        // A quarter turn about the centre of a square: output (y, x) reads source
        // (x, w - 1 - y) or its mirror, depending on the sense; both are exact pixels.
        Affine::new(h, w, false, 0.0, 0.0, std::f32::consts::FRAC_PI_2, 1.0)
            .resample(&src, &mut out);
        for y in 0..h {
            for x in 0..w {
                let want = src[(w - 1 - x) * w + y];
                assert!((out[y * w + x] - want).abs() < 1e-4, "({y}, {x})");
            }
        }
    }

    #[test]
    fn affine_scale_magnifies_about_the_centre() {
        // Scale 2 on a horizontal ramp: values change half as fast across the row, and
        // the centre stays put.
        let (h, w) = (1usize, 8usize);
        let src: Vec<f32> = (0..w).map(|x| x as f32).collect();
        let mut out = vec![0f32; w];
        Affine::new(h, w, false, 0.0, 0.0, 0.0, 2.0).resample(&src, &mut out);
        for x in 1..w - 2 {
            assert!((out[x + 1] - out[x] - 0.5).abs() < 1e-5, "{out:?}");
        }
        assert!(
            (out[3] + out[4] - (src[3] + src[4])).abs() < 1e-5,
            "{out:?}"
        );
    }

    #[test]
    fn rotated_share_is_drawn_and_stays_within_the_source_values() {
        // Rotation and scale on every image: each changes, and bilinear reads keep every value
        // within the source image's range. With no share, the same draws leave them as the
        // exact path would.
        let (n, c, h, w) = (8, 3, 8, 8);
        let aug = Augment {
            flip: false,
            max_shift: 0,
            max_rotate_deg: 20.0,
            max_scale: 0.2,
            affine_p: 1.0,
        };
        let mut px = ramp(n, c, h, w);
        let before = px.clone();
        augment_batch(&mut px, n, c, h, w, aug, &mut batch_rng(11, 0, 0));
        for (a, b) in px.chunks(c * h * w).zip(before.chunks(c * h * w)) {
            assert_ne!(a, b);
            for (pa, pb) in a.chunks(h * w).zip(b.chunks(h * w)) {
                let (lo, hi) = (pb[0], pb[h * w - 1]);
                assert!(pa.iter().all(|&v| v >= lo - 1e-3 && v <= hi + 1e-3));
            }
        }
        let mut kept = ramp(n, c, h, w);
        let none = Augment {
            affine_p: 0.0,
            ..aug
        };
        augment_batch(&mut kept, n, c, h, w, none, &mut batch_rng(11, 0, 0));
        assert_eq!(kept, before);
    }

    #[test]
    fn draws_applied_in_parts_equal_the_whole_batch() {
        // A micro-batch's shards transform their own images with their slices of the draws:
        // the same pixels as the whole batch transformed at once, for every mix of flips,
        // shifts and resampled images.
        let (n, c, h, w) = (9, 3, 8, 8);
        let aug = Augment {
            flip: true,
            max_shift: 3,
            max_rotate_deg: 15.0,
            max_scale: 0.1,
            affine_p: 0.5,
        };
        let mut whole = ramp(n, c, h, w);
        augment_batch(&mut whole, n, c, h, w, aug, &mut batch_rng(4, 1, 2));
        let draws = draw(n, aug, &mut batch_rng(4, 1, 2));
        assert!(
            draws.iter().any(|d| d.affine.is_some()) && draws.iter().any(|d| d.affine.is_none())
        );
        let image = c * h * w;
        for split in [1, 4, 5, 8] {
            let mut parts = ramp(n, c, h, w);
            let (a, b) = parts.split_at_mut(split * image);
            apply(a, c, h, w, &draws[..split]);
            apply(b, c, h, w, &draws[split..]);
            assert_eq!(parts, whole, "split after image {split}");
        }
    }
}
