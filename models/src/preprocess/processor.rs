//! [`ImageProcessor`]: a validated configuration turned into `pixel_values` (resize, center
//! crop, rescale, normalize), from decoded images, raw RGB8 buffers or files.

use std::path::{Path, PathBuf};

#[cfg(feature = "candle")]
use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};

use super::config::{
    ImageProcessorConfig, Size, PREPROCESSOR_CONFIG_FILE, RESAMPLE_BICUBIC, RESAMPLE_BILINEAR,
};
use super::decode::{image_err, load_image, to_rgb8, ImageLimits};
use super::resize::{pillow, shortest_edge_size, Window};
use crate::error::{Error, Result};

/// The `pixel_values` entry of the 8-bit value `v` in channel `c`: rescaled, then
/// normalized, as `CLIPImageProcessor` computes it (in f32 after the rescale).
fn pixel_value(cfg: &ImageProcessorConfig, v: u8, c: usize) -> f32 {
    let mut x = if cfg.do_rescale {
        (f64::from(v) * cfg.rescale_factor) as f32
    } else {
        f32::from(v)
    };
    if cfg.do_normalize {
        x = (x - cfg.image_mean[c]) / cfg.image_std[c];
    }
    x
}

/// The largest output side a preprocessing configuration may ask for (CLIP models take 224
/// to 448; `pixel_values` of this side are 3 x 4096^2 floats, 192 MiB).
pub const MAX_OUTPUT_SIDE: usize = 4096;

/// Preprocesses images into CLIP `pixel_values`.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    cfg: ImageProcessorConfig,
    filter: pillow::Filter,
}

impl ImageProcessor {
    /// Validates `cfg`: `resample` must be 3 (bicubic) or 2 (bilinear), sizes positive, and the
    /// output size fixed (a center crop, or a resize to height/width).
    pub fn new(cfg: ImageProcessorConfig) -> Result<Self> {
        let unsupported = |key: &str, value: String, supported: &str| Error::Unsupported {
            path: PathBuf::from(PREPROCESSOR_CONFIG_FILE),
            key: key.into(),
            value,
            supported: supported.into(),
        };
        let filter = match cfg.resample {
            RESAMPLE_BICUBIC => pillow::Filter::Bicubic,
            RESAMPLE_BILINEAR => pillow::Filter::Bilinear,
            r => {
                return Err(unsupported(
                    "resample",
                    r.to_string(),
                    "3 (bicubic), 2 (bilinear)",
                ))
            }
        };
        let size_ok = match cfg.size {
            Size::ShortestEdge { shortest_edge: s } | Size::Int(s) => s > 0,
            Size::HeightWidth { height, width } => height > 0 && width > 0,
        };
        if cfg.do_resize && !size_ok {
            return Err(unsupported(
                "size",
                format!("{:?}", cfg.size),
                "positive sizes",
            ));
        }
        let (ch, cw) = cfg.crop_size.height_width();
        if cfg.do_center_crop && (ch == 0 || cw == 0) {
            return Err(unsupported(
                "crop_size",
                format!("{:?}", cfg.crop_size),
                "positive sizes",
            ));
        }
        // Every number must give finite pixel values: a zero standard deviation divides by
        // zero, a NaN mean makes every pixel NaN.
        if cfg.do_rescale && !(cfg.rescale_factor.is_finite() && cfg.rescale_factor > 0.0) {
            return Err(unsupported(
                "rescale_factor",
                cfg.rescale_factor.to_string(),
                "a finite number > 0",
            ));
        }
        if cfg.do_normalize {
            if !cfg.image_mean.iter().all(|m| m.is_finite()) {
                return Err(unsupported(
                    "image_mean",
                    format!("{:?}", cfg.image_mean),
                    "finite numbers",
                ));
            }
            if !cfg.image_std.iter().all(|s| s.is_finite() && *s != 0.0) {
                return Err(unsupported(
                    "image_std",
                    format!("{:?}", cfg.image_std),
                    "finite, non-zero numbers",
                ));
            }
        }
        // The output is affine in the 8-bit value, so its extremes are those of 0 and 255:
        // both must be finite (a standard deviation of 1e-45 passes the checks above and
        // still divides a pixel into infinity).
        for c in 0..3 {
            for v in [0u8, 255] {
                let x = pixel_value(&cfg, v, c);
                if !x.is_finite() {
                    return Err(unsupported(
                        "image_std",
                        format!(
                            "{:?} with image_mean {:?} (channel {c}, value {v} gives {x})",
                            cfg.image_std, cfg.image_mean
                        ),
                        "values that give finite pixel values",
                    ));
                }
            }
        }
        let fixed =
            cfg.do_center_crop || (cfg.do_resize && matches!(cfg.size, Size::HeightWidth { .. }));
        if !fixed {
            return Err(unsupported(
                "do_center_crop",
                "false".into(),
                "true, or false with do_resize and size {height, width} (a fixed output size)",
            ));
        }
        let (oh, ow) = cfg.output_size();
        if oh > MAX_OUTPUT_SIDE || ow > MAX_OUTPUT_SIDE {
            return Err(unsupported(
                "crop_size",
                format!("{oh}x{ow}"),
                &format!("at most {MAX_OUTPUT_SIDE}x{MAX_OUTPUT_SIDE}"),
            ));
        }
        Ok(ImageProcessor { cfg, filter })
    }

    /// The configuration.
    pub fn config(&self) -> &ImageProcessorConfig {
        &self.cfg
    }

    /// `pixel_values` of one image: CHW `f32`, `3 * H * W` values with `(H, W)` =
    /// [`ImageProcessorConfig::output_size`].
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Vec<f32>> {
        let rgb: std::borrow::Cow<'_, RgbImage> = match img {
            // Already what the resampler reads: no copy.
            DynamicImage::ImageRgb8(im) => std::borrow::Cow::Borrowed(im),
            _ if self.cfg.do_convert_rgb => std::borrow::Cow::Owned(to_rgb8(img)),
            DynamicImage::ImageRgb16(_) => std::borrow::Cow::Owned(to_rgb8(img)),
            other => {
                return Err(Error::Input(format!(
                    "do_convert_rgb is false but the image is {:?}, not RGB",
                    other.color()
                )))
            }
        };
        self.preprocess_rgb8(rgb.as_raw(), rgb.width(), rgb.height())
    }

    /// [`ImageProcessor::preprocess`] of decoded pixels: `height` rows of `width` RGB
    /// triplets, 8 bits each, no padding, read in place (no copy of the image is made).
    pub fn preprocess_rgb8(&self, raw: &[u8], width: u32, height: u32) -> Result<Vec<f32>> {
        let (w, h) = (width as usize, height as usize);
        if w == 0 || h == 0 {
            return Err(Error::Input(format!("empty image ({w}x{h})")));
        }
        let need = (width as u64) * (height as u64) * 3;
        if raw.len() as u64 != need {
            return Err(Error::Input(format!(
                "buffer holds {} bytes; {w}x{h} RGB8 needs {need}",
                raw.len()
            )));
        }
        // Size after resizing.
        let (rh, rw) = if self.cfg.do_resize {
            match self.cfg.size {
                Size::ShortestEdge { shortest_edge: s } | Size::Int(s) => {
                    let (a, b) = shortest_edge_size(h as u32, w as u32, s);
                    (a as usize, b as usize)
                }
                Size::HeightWidth { height, width } => (height as usize, width as usize),
            }
        } else {
            (h, w)
        };
        if rh == 0 || rw == 0 {
            return Err(Error::Input(format!(
                "resizing {w}x{h} gives an empty image"
            )));
        }
        let (out_h, out_w) = self.cfg.output_size();
        // Crop window per axis: output index i reads resized index i + off (may be negative).
        let axis = |size: usize, crop: usize| -> (i64, usize, usize) {
            if !self.cfg.do_center_crop {
                return (0, 0, size);
            }
            let off = if size >= crop {
                ((size - crop) / 2) as i64
            } else {
                -(((crop - size) as i64 + 1) / 2)
            };
            let lo = off.max(0) as usize;
            let hi = ((off + crop as i64).min(size as i64)) as usize;
            (off, lo, hi)
        };
        let (off_y, y_lo, y_hi) = axis(rh, out_h);
        let (off_x, x_lo, x_hi) = axis(rw, out_w);
        let win = Window {
            x0: x_lo,
            y0: y_lo,
            w: x_hi - x_lo,
            h: y_hi - y_lo,
        };
        let pixels = if self.cfg.do_resize {
            pillow::resample(raw, w, h, rw, rh, win, self.filter)
        } else {
            (y_lo..y_hi)
                .flat_map(|y| raw[(y * w + x_lo) * 3..(y * w + x_hi) * 3].iter().copied())
                .collect()
        };
        let plane = out_h * out_w;
        let mut out = vec![0f32; 3 * plane];
        let value = |v: u8, c: usize| pixel_value(&self.cfg, v, c);
        // Padding (outside the window) is 0 before rescaling and normalization.
        let pad = [value(0, 0), value(0, 1), value(0, 2)];
        for (c, p) in pad.iter().enumerate() {
            out[c * plane..(c + 1) * plane].fill(*p);
        }
        for y in 0..win.h {
            let oy = (y_lo as i64 + y as i64 - off_y) as usize;
            for x in 0..win.w {
                let ox = (x_lo as i64 + x as i64 - off_x) as usize;
                let p = &pixels[(y * win.w + x) * 3..(y * win.w + x) * 3 + 3];
                for c in 0..3 {
                    out[c * plane + oy * out_w + ox] = value(p[c], c);
                }
            }
        }
        Ok(out)
    }

    /// `pixel_values` of a batch: an `f32` tensor `[B, 3, H, W]` on `device`.
    #[cfg(feature = "candle")]
    pub fn preprocess_batch(&self, imgs: &[DynamicImage], device: &Device) -> Result<Tensor> {
        if imgs.is_empty() {
            return Err(Error::Input("empty image batch".into()));
        }
        let (h, w) = self.cfg.output_size();
        let mut all = Vec::with_capacity(imgs.len() * 3 * h * w);
        for img in imgs {
            all.extend(self.preprocess(img)?);
        }
        Ok(Tensor::from_vec(all, (imgs.len(), 3, h, w), device)?)
    }

    /// Loads an image file (see [`load_image`]) and preprocesses it.
    pub fn preprocess_path(&self, path: &Path, limits: &ImageLimits) -> Result<Vec<f32>> {
        let img = load_image(path, limits)?;
        self.preprocess(&img).map_err(|e| match e {
            Error::Input(msg) => image_err(&path.display().to_string(), msg),
            other => other,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::preprocess::CropSize;

    fn rgb(w: u32, h: u32, data: &[u8]) -> RgbImage {
        RgbImage::from_raw(w, h, data.to_vec()).unwrap()
    }

    #[test]
    fn processor_validation() {
        let cfg = ImageProcessorConfig {
            resample: 1,
            ..Default::default()
        };
        let e = ImageProcessor::new(cfg).unwrap_err();
        assert!(
            matches!(e, Error::Unsupported { .. }) && e.to_string().contains("bicubic"),
            "{e}"
        );
        let cfg = ImageProcessorConfig {
            do_center_crop: false,
            ..Default::default()
        };
        assert!(ImageProcessor::new(cfg).is_err());
        let p = ImageProcessor::new(ImageProcessorConfig::default()).unwrap();
        assert_eq!(p.config().resample, RESAMPLE_BICUBIC);
    }

    #[test]
    fn preprocessing_numbers_must_give_finite_pixels() {
        for (key, value) in [
            ("image_std", serde_json::json!([0.0, 1.0, 1.0])),
            ("image_std", serde_json::json!([1e-45, 1.0, 1.0])),
            ("image_mean", serde_json::json!([1.0, 1.0, 1e39])),
            ("rescale_factor", serde_json::json!(0.0)),
            ("crop_size", serde_json::json!(100_000)),
        ] {
            let mut cfg = serde_json::to_value(ImageProcessorConfig::default()).unwrap();
            cfg[key] = value;
            // 1e39 does not fit an f32: a parse error is as good as a refusal.
            let Ok(cfg) = serde_json::from_value::<ImageProcessorConfig>(cfg) else {
                continue;
            };
            let e = ImageProcessor::new(cfg).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn preprocess_shapes_and_padding() {
        let p = ImageProcessor::new(ImageProcessorConfig::default()).unwrap();
        let img = DynamicImage::ImageRgb8(rgb(3, 2, &[255; 18]));
        let v = p.preprocess(&img).unwrap();
        assert_eq!(v.len(), 3 * 224 * 224);
        // White stays white everywhere: (1 - mean) / std.
        let white0 = (1.0f32 - 0.481_454_66) / 0.268_629_54;
        assert!((v[0] - white0).abs() < 1e-6 && (v[224 * 224 - 1] - white0).abs() < 1e-6);

        // No resize, 3x2 image into a 4x4 crop: zero padding placed at ceil((crop - size) / 2).
        let cfg = ImageProcessorConfig {
            do_resize: false,
            crop_size: CropSize::Int(4),
            do_normalize: false,
            ..Default::default()
        };
        let p = ImageProcessor::new(cfg).unwrap();
        let v = p.preprocess(&img).unwrap();
        let r: Vec<f32> = v[..16].to_vec();
        let one = (255.0f64 / 255.0) as f32;
        #[rustfmt::skip]
        let expected = [0.0, 0.0, 0.0, 0.0,
                        0.0, one, one, one,
                        0.0, one, one, one,
                        0.0, 0.0, 0.0, 0.0];
        assert_eq!(r, expected);

        #[cfg(feature = "candle")]
        {
            let t = ImageProcessor::new(ImageProcessorConfig::default())
                .unwrap()
                .preprocess_batch(&[img.clone(), img], &Device::Cpu)
                .unwrap();
            assert_eq!(t.dims(), &[2, 3, 224, 224]);
        }
    }
}
