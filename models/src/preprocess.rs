//! Image preprocessing for the FashionCLIP vision tower: `pixel_values` identical to
//! `transformers`' `CLIPImageProcessorPil` (transformers 5.24, PIL backend, Pillow 13).
//!
//! Reference: `transformers/models/clip/image_processing_pil_clip.py` and the `PilBackend`
//! it uses (`image_processing_backends.py`, `image_transforms.py`), and Pillow's
//! `src/libImaging/Resample.c` (`ImagingResample`) and `AlphaComposite.c`.
//!
//! The steps, in the reference's order:
//!
//! 1. `do_convert_rgb` ([`to_rgb8`]): transformers' `convert_to_rgb`, i.e. PIL `convert("RGB")`,
//!    except that an image with an alpha band or a `transparency` entry is first alpha-composited
//!    onto opaque white (`Image.alpha_composite`, Pillow's integer formula).
//! 2. `do_resize` ([`resize_shortest_edge`]): shortest edge to `size.shortest_edge`, the long edge
//!    to `int(shortest_edge * long / short)` (truncated), with Pillow's resampler.
//! 3. `do_center_crop`: offsets `(size - crop) // 2` (floor); an image smaller than the crop is
//!    zero-padded, placed at `ceil((crop - size) / 2)`.
//! 4. `do_rescale`: `float32(float64(v) * rescale_factor)`.
//! 5. `do_normalize`: `(v - mean) / std` in `f32`; the output is CHW.
//!
//! ## Why a resampler of our own
//!
//! Pillow's `ImagingResample` (8 bits per channel) builds separable filters of support
//! `2 * max(1, in/out)` (antialiasing when downscaling), turns the coefficients into 22-bit
//! fixed point, rounds and clips to `u8` between its two passes, and, since Pillow 13, runs the
//! vertical pass first when the height shrinks by more than twice as many pixels as the width
//! (`horizontal_first` in `ImagingResampleInner`). No crate reproduces this. Measured against
//! Pillow 13 `Image.resize(size, BICUBIC)` on 6 RGB images (640x480 JPEG-like photo -> 299x224,
//! 23x37 -> 224x360, 1000x100 -> 2240x224, 517x333 -> 347x224, 257x1001 -> 224x872,
//! 7x5 -> 4x3):
//!
//! * `fast_image_resize` 6.1 (`Convolution(CatmullRom)`): 0.5 %-31 % of bytes differ, max
//!   difference 24 (upscaling is worst: 31 % of bytes, max 24 on 23x37 -> 224x360);
//!   its `Bilinear` against Pillow's: 0.2 %-26 % differ, max 1.
//! * `pic-scale` 0.7.12 (`CatmullRom` or `Bicubic`): 17 %-64 % of bytes differ, max 38.
//!
//! Those differences survive rescaling and normalization as errors of up to ~0.4 in
//! `pixel_values`. The resampler below follows `Resample.c` step by step and gives
//! byte-identical output on those images and on 300 random sizes (1..400 in and out, up and
//! down). It computes only the pixels that survive the center crop: each output pixel of either
//! pass depends only on its own coefficients, so this changes no value.
//!
//! ## JPEG decoding
//!
//! JPEG files (detected by content, `FF D8 FF`) are decoded with libjpeg-turbo, the decoder in
//! the `mozjpeg` crate (built from C source, without SIMD), with Pillow's settings and its
//! CMYK handling (see [`decode_image`]). On 31 test JPEGs (Pillow and mozjpeg encoders; 4:2:0,
//! 4:2:2, 4:4:0, 4:1:1, 4:4:4, progressive, restart markers, grayscale, CMYK, YCCK, RGB,
//! odd and large sizes, quality 50-95, corrupt entropy data) the decoded bytes equal Pillow
//! 13's (libjpeg-turbo 3.2) `Image.open(f).convert("RGB")`, and truncated files are refused
//! where Pillow refuses them. The `image` crate's decoder (zune-jpeg), used before, differed
//! in up to 28 % of the bytes (max 4; `pixel_values` up to 0.057 off on
//! `tests/fixtures/images/photo.jpg`). Arithmetic-coded JPEGs (rare) are not supported.
//! PNG, grayscale, 16-bit, palette and RGBA inputs (the `image` crate) match the reference bit
//! for bit.

use std::io::Cursor;
use std::path::{Path, PathBuf};

#[cfg(feature = "candle")]
use candle_core::{Device, Tensor};
use image::{DynamicImage, GenericImageView, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The file name of a Hugging Face image processor configuration.
pub const PREPROCESSOR_CONFIG_FILE: &str = "preprocessor_config.json";

/// PIL's resampling code for bilinear (`PILImageResampling.BILINEAR`).
pub const RESAMPLE_BILINEAR: u32 = 2;
/// PIL's resampling code for bicubic (`PILImageResampling.BICUBIC`), CLIP's default.
pub const RESAMPLE_BICUBIC: u32 = 3;

/// Refuse resized images (before cropping) larger than this many bytes in [`resize_shortest_edge`].
const MAX_RESIZED_BYTES: u64 = 1 << 30;

/// The `size` entry of `preprocessor_config.json`.
///
/// Accepts `{"shortest_edge": n}`, `{"height": h, "width": w}` or a bare integer (older
/// configs; a shortest edge, as `get_size_dict(size, default_to_square=False)` reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Size {
    /// Resize so that the shorter side has this length, keeping the aspect ratio.
    ShortestEdge {
        /// Length of the shorter side after resizing.
        shortest_edge: u32,
    },
    /// Resize to exactly this height and width.
    HeightWidth {
        /// Height after resizing.
        height: u32,
        /// Width after resizing.
        width: u32,
    },
    /// A bare integer: the shortest edge.
    Int(u32),
}

impl Size {
    /// The shortest edge, for the shortest-edge forms; `None` for height/width.
    pub fn shortest_edge(&self) -> Option<u32> {
        match *self {
            Size::ShortestEdge { shortest_edge } | Size::Int(shortest_edge) => Some(shortest_edge),
            Size::HeightWidth { .. } => None,
        }
    }
}

/// The `crop_size` entry of `preprocessor_config.json`: `{"height": h, "width": w}` or a bare
/// integer (a square).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum CropSize {
    /// Crop to this height and width.
    HeightWidth {
        /// Height of the crop.
        height: u32,
        /// Width of the crop.
        width: u32,
    },
    /// A square crop of this side.
    Int(u32),
}

impl CropSize {
    /// `(height, width)` of the crop.
    pub fn height_width(&self) -> (u32, u32) {
        match *self {
            CropSize::HeightWidth { height, width } => (height, width),
            CropSize::Int(n) => (n, n),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_size() -> Size {
    Size::ShortestEdge { shortest_edge: 224 }
}
fn default_resample() -> u32 {
    RESAMPLE_BICUBIC
}
fn default_crop_size() -> CropSize {
    CropSize::HeightWidth {
        height: 224,
        width: 224,
    }
}
fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> [f32; 3] {
    // OPENAI_CLIP_MEAN
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn default_std() -> [f32; 3] {
    // OPENAI_CLIP_STD
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}

/// `preprocessor_config.json` with Hugging Face's key names. Missing keys take
/// `CLIPImageProcessor`'s defaults: shortest edge 224, bicubic, center crop 224x224, rescale by
/// 1/255, OpenAI CLIP mean and std, every `do_*` true. Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ImageProcessorConfig {
    /// Whether to resize.
    #[serde(default = "default_true")]
    pub do_resize: bool,
    /// The resize target.
    #[serde(default = "default_size")]
    pub size: Size,
    /// PIL resampling filter code (3 = bicubic, 2 = bilinear).
    #[serde(default = "default_resample")]
    pub resample: u32,
    /// Whether to center-crop.
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    /// The center-crop size.
    #[serde(default = "default_crop_size")]
    pub crop_size: CropSize,
    /// Whether to multiply by `rescale_factor`.
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    /// The rescale factor (1/255).
    #[serde(default = "default_rescale_factor")]
    pub rescale_factor: f64,
    /// Whether to normalize with `image_mean` and `image_std`.
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    /// Per-channel mean (RGB).
    #[serde(default = "default_mean")]
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation (RGB).
    #[serde(default = "default_std")]
    pub image_std: [f32; 3],
    /// Whether to convert inputs to RGB (compositing alpha onto white).
    #[serde(default = "default_true")]
    pub do_convert_rgb: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: default_size(),
            resample: default_resample(),
            do_center_crop: true,
            crop_size: default_crop_size(),
            do_rescale: true,
            rescale_factor: default_rescale_factor(),
            do_normalize: true,
            image_mean: default_mean(),
            image_std: default_std(),
            do_convert_rgb: true,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads a `preprocessor_config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_text_bounded(path, crate::files::TEXT_FILE_MAX_BYTES)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::MissingFile {
                        path: path.to_path_buf(),
                        what: "image preprocessor configuration".into(),
                    }
                } else {
                    Error::io(path, e)
                }
            })?;
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads `dir/preprocessor_config.json` if it exists, else returns the defaults.
    pub fn from_dir_or_default(dir: &Path) -> Result<Self> {
        let path = dir.join(PREPROCESSOR_CONFIG_FILE);
        if path.is_file() {
            Self::from_file(&path)
        } else {
            Ok(Self::default())
        }
    }

    /// `(height, width)` of the `pixel_values` this configuration produces: the crop size when
    /// center-cropping, else the fixed resize size. For the configurations that
    /// [`ImageProcessor::new`] refuses (output size depending on the input) this returns the size
    /// a square input would get.
    pub fn output_size(&self) -> (usize, usize) {
        if self.do_center_crop {
            let (h, w) = self.crop_size.height_width();
            return (h as usize, w as usize);
        }
        match self.size {
            Size::HeightWidth { height, width } => (height as usize, width as usize),
            Size::ShortestEdge { shortest_edge: s } | Size::Int(s) => (s as usize, s as usize),
        }
    }
}

/// Limits for decoding untrusted images. They are checked against the dimensions in the
/// header before decoding, and passed to the decoder as [`image::Limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted width in pixels.
    pub max_width: u32,
    /// Largest accepted height in pixels.
    pub max_height: u32,
    /// Largest allocation the decoder may make, in bytes.
    pub max_alloc: u64,
}

impl Default for ImageLimits {
    /// 16384x16384 pixels, 512 MiB.
    fn default() -> Self {
        ImageLimits {
            max_width: 16384,
            max_height: 16384,
            max_alloc: 512 << 20,
        }
    }
}

fn image_err(source_name: &str, msg: impl Into<String>) -> Error {
    Error::Image {
        source_name: source_name.to_string(),
        msg: msg.into(),
    }
}

/// Reads and decodes an image file; the format is detected from the content, not the
/// extension. Errors name the file. EXIF orientation is not applied (as `PIL.Image.open`).
/// Only a regular file is read (a FIFO or a device is an error, never a hang), and only if
/// it holds at most [`ImageLimits::max_alloc`] bytes: an encoded image is smaller than the
/// pixels it decodes to.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<DynamicImage> {
    let bytes =
        crate::files::read_bounded(path, limits.max_alloc).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, &path.display().to_string(), limits)
}

/// Decodes an in-memory image (format detected from the content); `source_name` names it in
/// errors.
///
/// JPEGs are decoded with libjpeg-turbo as Pillow 13 does: 1-component files give
/// [`DynamicImage::ImageLuma8`], 3-component files [`DynamicImage::ImageRgb8`], 4-component
/// (CMYK/YCCK) files RGB converted as Pillow's `convert("RGB")` (after its Adobe inversion).
/// A JPEG whose data ends before the last scanline is an error, as in Pillow.
pub fn decode_image(bytes: &[u8], source_name: &str, limits: &ImageLimits) -> Result<DynamicImage> {
    if bytes.starts_with(&JPEG_MAGIC) {
        return decode_jpeg(bytes, source_name, limits);
    }
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>> {
        let r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| image_err(source_name, format!("not an image: {e}")))?;
        if r.format().is_none() {
            return Err(image_err(source_name, "not an image (unrecognized format)"));
        }
        Ok(r)
    };
    let header = reader()?
        .into_decoder()
        .map_err(|e| image_err(source_name, format!("not a readable image: {e}")))?;
    let (w, h) = header.dimensions();
    let color = header.color_type();
    let decoded = header.total_bytes();
    drop(header);
    if w > limits.max_width || h > limits.max_height {
        return Err(image_err(
            source_name,
            format!(
                "too large: {w}x{h} exceeds the limit of {}x{}",
                limits.max_width, limits.max_height
            ),
        ));
    }
    // Everything this image makes us hold at once counts against one limit: the file's
    // bytes, the decoded pixels and, unless they are RGB8 already, the RGB8 copy that
    // preprocessing converts them to.
    let convert = if color == image::ColorType::Rgb8 {
        0
    } else {
        rgb8_bytes(w, h)
    };
    let other = (bytes.len() as u64).saturating_add(convert);
    let need = other.saturating_add(decoded);
    if need > limits.max_alloc {
        return Err(image_err(
            source_name,
            format!(
                "too large: {w}x{h} ({color:?}) needs about {need} bytes to decode and convert \
                 to RGB (max {} bytes)",
                limits.max_alloc
            ),
        ));
    }
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_width);
    decoder_limits.max_image_height = Some(limits.max_height);
    decoder_limits.max_alloc = Some(limits.max_alloc - other);
    let mut r = reader()?;
    r.limits(decoder_limits);
    r.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => image_err(
            source_name,
            format!(
                "too large: {w}x{h} exceeds the decoding limits ({l}; max {} bytes)",
                limits.max_alloc
            ),
        ),
        other => image_err(source_name, format!("cannot decode image: {other}")),
    })
}

/// Bytes of a `w`x`h` RGB8 image.
fn rgb8_bytes(w: u32, h: u32) -> u64 {
    u64::from(w) * u64::from(h) * 3
}

/// The first bytes of every JPEG file (SOI and the start of the next marker).
const JPEG_MAGIC: [u8; 3] = [0xFF, 0xD8, 0xFF];

/// A `BufRead` over the file's bytes that records whether libjpeg asked for data past the end
/// (the mozjpeg crate then feeds it a fake EOI marker, as libjpeg's own source managers do, and
/// the rest of the image decodes as gray).
struct EofFlagReader<'a> {
    data: &'a [u8],
    hit_eof: &'a std::cell::Cell<bool>,
}

impl std::io::Read for EofFlagReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::io::BufRead::fill_buf(self)?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

impl std::io::BufRead for EofFlagReader<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.data.is_empty() {
            self.hit_eof.set(true);
        }
        Ok(self.data)
    }
    fn consume(&mut self, amt: usize) {
        self.data = &self.data[amt.min(self.data.len())..];
    }
}

/// Pillow's `convert("RGB")` of a CMYK pixel (`cmyk2rgb` in `Convert.c`):
/// `nk = 255 - k; out = CLIP8(nk - MULDIV255(c, nk))`, `MULDIV255(a, b) = (t + (t >> 8)) >> 8`
/// with `t = a * b + 128`.
#[inline]
fn cmyk_to_rgb_pillow(p: [u8; 4]) -> [u8; 3] {
    let nk = 255 - i32::from(p[3]);
    let f = |c: u8| {
        let t = i32::from(c) * nk + 128;
        (nk - ((t + (t >> 8)) >> 8)).clamp(0, 255) as u8
    };
    [f(p[0]), f(p[1]), f(p[2])]
}

/// Decodes a JPEG with libjpeg-turbo (the decoder in the `mozjpeg` crate, built from source),
/// as Pillow 13 does with its bundled libjpeg-turbo 3.2: `Image.open(f)` then
/// `convert("RGB")` gives the same bytes.
///
/// Pillow's settings are libjpeg's defaults (`JDCT_ISLOW`, fancy upsampling), with the output
/// color space chosen from the number of components in the frame header:
///
/// * 1 component: mode `L`, returned as [`DynamicImage::ImageLuma8`];
/// * 3 components: `JCS_RGB` (libjpeg converts YCbCr, or takes RGB as is per the Adobe /
///   JFIF markers), returned as [`DynamicImage::ImageRgb8`];
/// * 4 components: `JCS_CMYK` (libjpeg converts YCCK), always read as Adobe-inverted
///   (Pillow's raw mode `CMYK;I`), then Pillow's `cmyk2rgb`; returned as RGB;
/// * anything else, or not 8 bits per sample: an error, as in Pillow.
///
/// Like Pillow (without `LOAD_TRUNCATED_IMAGES`), data ending before the last scanline is an
/// error; a missing EOI marker after complete image data is not. libjpeg's warnings
/// (corrupt entropy data and the like) are ignored, as Pillow ignores them.
/// libjpeg reports fatal errors by unwinding (the mozjpeg crate's error manager); they are
/// caught here and returned as errors. This needs `panic = "unwind"` (the default).
fn decode_jpeg(bytes: &[u8], source_name: &str, limits: &ImageLimits) -> Result<DynamicImage> {
    let hit_eof = std::cell::Cell::new(false);
    let run =
        std::panic::AssertUnwindSafe(|| decode_jpeg_inner(bytes, &hit_eof, source_name, limits));
    match std::panic::catch_unwind(run) {
        Ok(r) => r,
        // libjpeg gave up after being fed the fake EOI marker.
        Err(_) if hit_eof.get() => Err(jpeg_truncated(source_name)),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg fatal error");
            Err(image_err(source_name, format!("cannot decode JPEG: {msg}")))
        }
    }
}

/// The most scans a JPEG may have. Real files have one (baseline) or fewer than 20
/// (progressive: libjpeg's and mozjpeg's scripts write 6 to 12). libjpeg decodes every scan
/// over the whole image, so a small file of thousands of near-empty scans over a large image
/// keeps it busy for minutes (10,000 scans over 8000x8000 in 1.1 MB: 49 s); 256 scans of
/// the largest accepted image take a few seconds.
pub const MAX_JPEG_SCANS: usize = 256;

/// The number of scans (SOS markers) in a JPEG, by a walk over its markers: a marker
/// segment's length is skipped, and inside a scan's entropy-coded data `FF 00` (a stuffed
/// byte), `FF FF` (fill) and `FF D0`-`FF D7` (restart markers) are not markers. The walk ends
/// at EOI, at a byte where a marker should start and does not, or at the end of the data.
fn jpeg_scan_count(bytes: &[u8]) -> usize {
    let mut scans = 0;
    // After SOI.
    let mut i = 2;
    loop {
        // A marker: 0xFF, any fill 0xFF bytes, then its code.
        if bytes.get(i) != Some(&0xFF) {
            return scans;
        }
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&code) = bytes.get(i) else {
            return scans;
        };
        i += 1;
        match code {
            // EOI.
            0xD9 => return scans,
            // Standalone markers: SOI, RST0-7, TEM.
            0xD8 | 0xD0..=0xD7 | 0x01 => continue,
            _ => {}
        }
        let Some(len) = bytes
            .get(i..i + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return scans;
        };
        if len < 2 {
            return scans;
        }
        i += len;
        if code == 0xDA {
            scans += 1;
            // The entropy-coded data, up to the next marker that is not a restart marker.
            loop {
                let Some(at) = bytes
                    .get(i..)
                    .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
                else {
                    return scans;
                };
                i += at;
                let mut j = i + 1;
                while bytes.get(j) == Some(&0xFF) {
                    j += 1;
                }
                match bytes.get(j) {
                    None => return scans,
                    Some(0x00) | Some(0xD0..=0xD7) => i = j + 1,
                    Some(_) => break,
                }
            }
        }
    }
}

fn jpeg_truncated(source_name: &str) -> Error {
    image_err(source_name, "cannot decode JPEG: the file is truncated")
}

fn decode_jpeg_inner(
    bytes: &[u8],
    hit_eof: &std::cell::Cell<bool>,
    source_name: &str,
    limits: &ImageLimits,
) -> Result<DynamicImage> {
    use mozjpeg::ColorSpace;

    // Before libjpeg sees the file: its time grows with the number of scans times the image
    // size, not with the file's size.
    let scans = jpeg_scan_count(bytes);
    if scans > MAX_JPEG_SCANS {
        return Err(image_err(
            source_name,
            format!(
                "cannot decode JPEG: it has {scans} scans, more than the limit of \
                 {MAX_JPEG_SCANS} (real JPEGs have fewer than 20; each scan is decoded over \
                 the whole image)"
            ),
        ));
    }
    let reader = EofFlagReader {
        data: bytes,
        hit_eof,
    };
    // Reads the header (up to the first SOS marker).
    let dec = mozjpeg::Decompress::builder()
        .from_reader(reader)
        .map_err(|e| image_err(source_name, format!("not a readable JPEG: {e}")))?;
    if hit_eof.get() {
        return Err(jpeg_truncated(source_name));
    }
    let (w, h) = dec.size();
    if w > limits.max_width as usize || h > limits.max_height as usize {
        return Err(image_err(
            source_name,
            format!(
                "too large: {w}x{h} exceeds the limit of {}x{}",
                limits.max_width, limits.max_height
            ),
        ));
    }
    let comps = dec.components();
    let (out_space, channels) = match comps.len() {
        1 => (ColorSpace::JCS_GRAYSCALE, 1),
        3 => (ColorSpace::JCS_RGB, 3),
        4 => (ColorSpace::JCS_CMYK, 4),
        n => {
            return Err(image_err(
                source_name,
                format!("cannot decode JPEG: cannot handle {n}-component images"),
            ))
        }
    };
    // The output buffer, plus the whole-image coefficient buffer libjpeg allocates for
    // progressive and multi-scan files (counted for every file: an upper bound).
    let coefs: u64 = comps
        .iter()
        .map(|c| u64::from(c.width_in_blocks) * u64::from(c.height_in_blocks) * 64 * 2)
        .sum();
    // As for the other formats, the file's bytes and the RGB8 copy count too (gray is
    // converted by preprocessing, CMYK here).
    let convert = if channels == 3 {
        0
    } else {
        rgb8_bytes(w as u32, h as u32)
    };
    let need = ((w as u64) * (h as u64) * channels)
        .saturating_add(coefs)
        .saturating_add(convert)
        .saturating_add(bytes.len() as u64);
    if need > limits.max_alloc {
        return Err(image_err(
            source_name,
            format!(
                "too large: {w}x{h} needs about {need} bytes to decode (max {} bytes)",
                limits.max_alloc
            ),
        ));
    }
    let mut started = dec
        .to_colorspace(out_space)
        .map_err(|e| image_err(source_name, format!("cannot decode JPEG: {e}")))?;
    let pixels: Vec<u8> = started
        .read_scanlines()
        .map_err(|e| image_err(source_name, format!("cannot decode JPEG: {e}")))?;
    // Progressive files are read whole by `to_colorspace`, the others by `read_scanlines`;
    // `finish` (reading up to EOI) is skipped: Pillow does not need the EOI marker either.
    if hit_eof.get() {
        return Err(jpeg_truncated(source_name));
    }
    drop(started);
    let (w32, h32) = (w as u32, h as u32);
    let bad_len = || image_err(source_name, "cannot decode JPEG: wrong decoded size");
    Ok(match channels {
        1 => DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(w32, h32, pixels).ok_or_else(bad_len)?,
        ),
        3 => DynamicImage::ImageRgb8(RgbImage::from_raw(w32, h32, pixels).ok_or_else(bad_len)?),
        _ => {
            // Pillow's "CMYK;I" unpacker inverts every byte; then `cmyk2rgb`.
            let rgb: Vec<u8> = pixels
                .chunks_exact(4)
                .flat_map(|p| cmyk_to_rgb_pillow([255 - p[0], 255 - p[1], 255 - p[2], 255 - p[3]]))
                .collect();
            DynamicImage::ImageRgb8(RgbImage::from_raw(w32, h32, rgb).ok_or_else(bad_len)?)
        }
    })
}

/// Pillow's `Image.alpha_composite` of `(c, alpha)` over opaque white, for one channel
/// (`AlphaComposite.c`, 7-bit precision; with an opaque destination `coef1 = alpha * 128`).
#[inline]
fn composite_on_white(c: u8, alpha: u8) -> u8 {
    if alpha == 0 {
        return 255;
    }
    let (c, a) = (u32::from(c), u32::from(alpha));
    let tmp = c * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
    // SHIFTFORDIV255(x) = ((x >> 8) + x) >> 8, then >> PRECISION_BITS; the result is <= 255.
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}

/// The RGB image `CLIPImageProcessorPil` works on (`do_convert_rgb`), given what the `image`
/// crate decoded.
///
/// This is PIL `convert("RGB")` of the same file, except that images with transparency are
/// first composited onto white as transformers' `convert_to_rgb` does:
///
/// * gray: replicated (16-bit gray, Pillow mode `I;16`: values above 255 clip to 255);
/// * 16-bit RGB / RGBA / gray+alpha: the high byte (Pillow's `;16B` raw modes);
/// * RGBA, gray+alpha (and palette or RGB/gray with a `tRNS` chunk, which the decoder expands
///   to alpha): Pillow's `alpha_composite` over opaque white, then the alpha dropped;
/// * floating-point images (not readable by Pillow): the `image` crate's own conversion.
pub fn to_rgb8(img: &DynamicImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let from_fn =
        |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    let composite = |p: [u8; 4]| {
        [
            composite_on_white(p[0], p[3]),
            composite_on_white(p[1], p[3]),
            composite_on_white(p[2], p[3]),
        ]
    };
    match img {
        DynamicImage::ImageRgb8(im) => im.clone(),
        DynamicImage::ImageLuma8(im) => from_fn(&|x, y| [im.get_pixel(x, y)[0]; 3]),
        DynamicImage::ImageLumaA8(im) => from_fn(&|x, y| {
            let p = im.get_pixel(x, y).0;
            composite([p[0], p[0], p[0], p[1]])
        }),
        DynamicImage::ImageRgba8(im) => from_fn(&|x, y| composite(im.get_pixel(x, y).0)),
        DynamicImage::ImageLuma16(im) => from_fn(&|x, y| [im.get_pixel(x, y)[0].min(255) as u8; 3]),
        DynamicImage::ImageLumaA16(im) => from_fn(&|x, y| {
            let p = im.get_pixel(x, y).0;
            let (l, a) = ((p[0] >> 8) as u8, (p[1] >> 8) as u8);
            composite([l, l, l, a])
        }),
        DynamicImage::ImageRgb16(im) => from_fn(&|x, y| {
            let p = im.get_pixel(x, y).0;
            [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]
        }),
        DynamicImage::ImageRgba16(im) => from_fn(&|x, y| {
            let p = im.get_pixel(x, y).0;
            composite([
                (p[0] >> 8) as u8,
                (p[1] >> 8) as u8,
                (p[2] >> 8) as u8,
                (p[3] >> 8) as u8,
            ])
        }),
        DynamicImage::ImageRgb32F(_) => img.to_rgb8(),
        _ => {
            let rgba = img.to_rgba8();
            from_fn(&|x, y| composite(rgba.get_pixel(x, y).0))
        }
    }
}

/// `(height, width)` after resizing an `h`x`w` image to shortest edge `s`, with
/// `get_resize_output_image_size(..., default_to_square=False)`'s rule:
/// the long side becomes `int(s * long / short)` (true division, truncated).
fn shortest_edge_size(h: u32, w: u32, s: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    // Integers below 2^53 are exact in f64, and IEEE division rounds as Python's int / int.
    let new_long = (f64::from(s) * f64::from(long) / f64::from(short)) as u32;
    if w <= h {
        (new_long, s)
    } else {
        (s, new_long)
    }
}

/// Resizes to shortest edge `shortest_edge` as `CLIPImageProcessorPil` does: the output size
/// rule of `get_resize_output_image_size` and Pillow's bicubic resampling, byte for byte.
/// Refuses empty images, `shortest_edge == 0` and outputs over 1 GiB.
pub fn resize_shortest_edge(img: &RgbImage, shortest_edge: u32) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || shortest_edge == 0 {
        return Err(Error::Input(format!(
            "cannot resize a {w}x{h} image to shortest edge {shortest_edge}"
        )));
    }
    let (oh, ow) = shortest_edge_size(h, w, shortest_edge);
    if u64::from(oh) * u64::from(ow) * 3 > MAX_RESIZED_BYTES {
        return Err(Error::Input(format!(
            "resizing {w}x{h} to shortest edge {shortest_edge} gives {ow}x{oh}, over {MAX_RESIZED_BYTES} bytes"
        )));
    }
    let window = Window {
        x0: 0,
        y0: 0,
        w: ow as usize,
        h: oh as usize,
    };
    let out = pillow::resample(
        img.as_raw(),
        w as usize,
        h as usize,
        ow as usize,
        oh as usize,
        window,
        pillow::Filter::Bicubic,
    );
    RgbImage::from_raw(ow, oh, out)
        .ok_or_else(|| Error::Input("internal error: resized buffer has the wrong size".into()))
}

/// A rectangle of output pixels: columns `x0..x0 + w`, rows `y0..y0 + h`.
#[derive(Debug, Clone, Copy)]
struct Window {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
}

/// Pillow's `ImagingResample` for 8-bit RGB (`src/libImaging/Resample.c`, Pillow 13).
mod pillow {
    use super::Window;

    /// The separable filters Pillow uses for `BILINEAR` and `BICUBIC`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Filter {
        /// Triangle filter, support 1.
        Bilinear,
        /// Keys cubic with a = -0.5, support 2.
        Bicubic,
    }

    impl Filter {
        fn support(self) -> f64 {
            match self {
                Filter::Bilinear => 1.0,
                Filter::Bicubic => 2.0,
            }
        }

        /// `bilinear_filter` / `bicubic_filter`.
        fn eval(self, x: f64) -> f64 {
            let x = x.abs();
            match self {
                Filter::Bilinear => {
                    if x < 1.0 {
                        1.0 - x
                    } else {
                        0.0
                    }
                }
                Filter::Bicubic => {
                    const A: f64 = -0.5;
                    if x < 1.0 {
                        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                    } else if x < 2.0 {
                        (((x - 5.0) * x + 8.0) * x - 4.0) * A
                    } else {
                        0.0
                    }
                }
            }
        }
    }

    /// 8 bits for the result, 2 for overflow of negative lobes: 22 fractional bits.
    const PRECISION_BITS: u32 = 32 - 8 - 2;

    /// Fixed-point coefficients for output indices `first..first + count` of one axis.
    struct Coeffs {
        /// Coefficients per output index (the stride; `ksize` in Pillow).
        ksize: usize,
        /// `(xmin, n)`: the first input index and the number of taps.
        bounds: Vec<(usize, usize)>,
        /// `count * ksize` coefficients, 22-bit fixed point.
        k: Vec<i32>,
    }

    /// `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for some output indices.
    fn precompute(
        in_size: usize,
        out_size: usize,
        first: usize,
        count: usize,
        filter: Filter,
    ) -> Coeffs {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(count);
        let mut k = vec![0i32; count * ksize];
        let mut w = vec![0f64; ksize];
        for (i, xx) in (first..first + count).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates towards zero, as `as i64` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                let v = filter.eval(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
                *wx = v;
                ww += v;
            }
            let row = &mut k[i * ksize..i * ksize + n];
            for (kx, &wx) in row.iter_mut().zip(&w) {
                let v = if ww != 0.0 { wx / ww } else { wx };
                let f = v * f64::from(1u32 << PRECISION_BITS);
                *kx = if v < 0.0 {
                    (f - 0.5) as i32
                } else {
                    (f + 0.5) as i32
                };
            }
            bounds.push((xmin, n));
        }
        Coeffs { ksize, bounds, k }
    }

    /// `clip8`: drop the fraction and clamp to 0..=255.
    #[inline]
    fn clip8(ss: i32) -> u8 {
        (ss >> PRECISION_BITS).clamp(0, 255) as u8
    }

    /// Horizontal pass over rows `y0..y0 + rows` of `src` (`w` pixels wide).
    fn horizontal(src: &[u8], w: usize, y0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
        let ow = c.bounds.len();
        let half = 1i32 << (PRECISION_BITS - 1);
        let mut out = vec![0u8; ow * rows * 3];
        for (y, orow) in out.chunks_exact_mut(ow * 3).enumerate() {
            let row = &src[(y0 + y) * w * 3..(y0 + y + 1) * w * 3];
            for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
                let (xmin, n) = c.bounds[xx];
                let kk = &c.k[xx * c.ksize..xx * c.ksize + n];
                let mut s = [half; 3];
                for (p, &k) in row[xmin * 3..(xmin + n) * 3].chunks_exact(3).zip(kk) {
                    s[0] += i32::from(p[0]) * k;
                    s[1] += i32::from(p[1]) * k;
                    s[2] += i32::from(p[2]) * k;
                }
                o[0] = clip8(s[0]);
                o[1] = clip8(s[1]);
                o[2] = clip8(s[2]);
            }
        }
        out
    }

    /// Vertical pass of `src` (`w` pixels wide, its row 0 being input row `y_shift`).
    fn vertical(src: &[u8], w: usize, y_shift: usize, c: &Coeffs) -> Vec<u8> {
        let oh = c.bounds.len();
        let stride = w * 3;
        let half = 1i32 << (PRECISION_BITS - 1);
        let mut out = vec![0u8; stride * oh];
        let mut acc = vec![0i32; stride];
        for (yy, orow) in out.chunks_exact_mut(stride).enumerate() {
            let (ymin, n) = c.bounds[yy];
            let kk = &c.k[yy * c.ksize..yy * c.ksize + n];
            acc.fill(half);
            for (i, &k) in kk.iter().enumerate() {
                let r = ymin - y_shift + i;
                for (a, &p) in acc.iter_mut().zip(&src[r * stride..(r + 1) * stride]) {
                    *a += i32::from(p) * k;
                }
            }
            for (o, &a) in orow.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
        out
    }

    /// Resizes packed RGB `src` (`w`x`h`) to `ow`x`oh` and returns the pixels of `win`
    /// (which must lie inside `ow`x`oh`), exactly as Pillow's `Image.resize` would produce them.
    pub(super) fn resample(
        src: &[u8],
        w: usize,
        h: usize,
        ow: usize,
        oh: usize,
        win: Window,
        filter: Filter,
    ) -> Vec<u8> {
        if win.w == 0 || win.h == 0 {
            return Vec::new();
        }
        let need_h = ow != w;
        let need_v = oh != h;
        // Pillow 13: vertical first if the height shrinks by more than twice the width's shrink.
        let (wi, hi, owi, ohi) = (w as i64, h as i64, ow as i64, oh as i64);
        let horizontal_first = !((hi - ohi) > 0 && (hi - ohi) > (wi - owi) * 2);
        let crop_cols = |img: &[u8], iw: usize| -> Vec<u8> {
            img.chunks_exact(iw * 3)
                .flat_map(|r| r[win.x0 * 3..(win.x0 + win.w) * 3].iter().copied())
                .collect()
        };
        let crop_rows = |img: &[u8], iw: usize, y0: usize| -> Vec<u8> {
            img[y0 * iw * 3..(y0 + win.h) * iw * 3].to_vec()
        };
        let cv = need_v.then(|| precompute(h, oh, win.y0, win.h, filter));
        let ch = need_h.then(|| precompute(w, ow, win.x0, win.w, filter));
        match (ch, cv) {
            (None, None) => crop_cols(&crop_rows(src, w, win.y0), w),
            (Some(ch), None) => horizontal(src, w, win.y0, win.h, &ch),
            (None, Some(cv)) => crop_cols(&vertical(src, w, 0, &cv), w),
            (Some(ch), Some(cv)) => {
                if horizontal_first {
                    // Only the input rows the vertical pass reads (ybox_first..ybox_last).
                    let first = cv.bounds[0].0;
                    let last = cv.bounds.iter().map(|&(a, n)| a + n).max().unwrap_or(first);
                    let tmp = horizontal(src, w, first, last - first, &ch);
                    vertical(&tmp, win.w, first, &cv)
                } else {
                    let tmp = vertical(src, w, 0, &cv);
                    horizontal(&tmp, w, 0, win.h, &ch)
                }
            }
        }
    }
}

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

    fn rgb(w: u32, h: u32, data: &[u8]) -> RgbImage {
        RgbImage::from_raw(w, h, data.to_vec()).unwrap()
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moda-preprocess-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn config_defaults_and_variants() {
        let c: ImageProcessorConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, ImageProcessorConfig::default());
        assert_eq!(c.output_size(), (224, 224));

        let c: ImageProcessorConfig = serde_json::from_str(
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 320},
                "image_processor_type": "CLIPImageProcessor", "resample": 3}"#,
        )
        .unwrap();
        assert_eq!(c.size, Size::ShortestEdge { shortest_edge: 336 });
        assert_eq!(c.output_size(), (336, 320));

        let c: ImageProcessorConfig =
            serde_json::from_str(r#"{"size": 224, "crop_size": 200}"#).unwrap();
        assert_eq!(c.size.shortest_edge(), Some(224));
        assert_eq!(c.output_size(), (200, 200));

        let c: ImageProcessorConfig = serde_json::from_str(
            r#"{"size": {"height": 64, "width": 48}, "do_center_crop": false}"#,
        )
        .unwrap();
        assert_eq!(c.output_size(), (64, 48));
        assert!(ImageProcessor::new(c).is_ok());
    }

    #[test]
    fn config_files() {
        let d = tmp_dir("cfg");
        // Missing file -> defaults.
        let c = ImageProcessorConfig::from_dir_or_default(&d).unwrap();
        assert_eq!(c, ImageProcessorConfig::default());
        // Missing file named explicitly -> MissingFile naming it.
        let e = ImageProcessorConfig::from_file(&d.join("nope.json")).unwrap_err();
        assert!(matches!(e, Error::MissingFile { .. }) && e.to_string().contains("nope.json"));
        // Malformed JSON -> error naming the file.
        let p = d.join(PREPROCESSOR_CONFIG_FILE);
        std::fs::write(&p, "{\"size\": ").unwrap();
        let e = ImageProcessorConfig::from_dir_or_default(&d).unwrap_err();
        assert!(matches!(e, Error::Json { .. }), "{e}");
        assert!(e.to_string().contains(PREPROCESSOR_CONFIG_FILE), "{e}");
        // Well-formed.
        std::fs::write(&p, r#"{"crop_size": 32, "image_mean": [0.5, 0.5, 0.5]}"#).unwrap();
        let c = ImageProcessorConfig::from_dir_or_default(&d).unwrap();
        assert_eq!(c.output_size(), (32, 32));
        assert_eq!(c.image_mean, [0.5; 3]);
        std::fs::remove_dir_all(&d).unwrap();
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

    /// A 54-byte BMP header claiming `side`x`side` pixels, 24 bits, no pixel data.
    fn huge_bmp(side: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"BM");
        b.extend_from_slice(&54u32.to_le_bytes()); // file size (a lie)
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
        b.extend_from_slice(&40u32.to_le_bytes()); // BITMAPINFOHEADER
        b.extend_from_slice(&side.to_le_bytes());
        b.extend_from_slice(&side.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&24u16.to_le_bytes());
        b.extend_from_slice(&[0u8; 24]);
        b
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    /// A PNG signature and IHDR claiming 100000x100000 RGB pixels, then an empty IDAT and IEND.
    /// A real 16-bit gray PNG of `w`x`h` (a ramp).
    fn gray16_png(w: u32, h: u32) -> Vec<u8> {
        let img = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(w, h, |x, y| {
            image::Luma([((x * 31 + y * 17) % 65536) as u16])
        });
        let mut out = Vec::new();
        image::DynamicImage::ImageLuma16(img)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn the_rgb_conversion_and_the_file_count_against_the_allocation_limit() {
        // 500x500 16-bit gray: 500 kB decoded, 750 kB more as RGB8. A 1 MiB limit holds the
        // decoded pixels alone, not the two together.
        let png = gray16_png(500, 500);
        let limits = ImageLimits {
            max_alloc: 1 << 20,
            ..ImageLimits::default()
        };
        let e = decode_image(&png, "gray16.png", &limits).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("convert to RGB") && msg.contains("gray16.png"),
            "{msg}"
        );
        let limits = ImageLimits {
            max_alloc: 2 << 20,
            ..ImageLimits::default()
        };
        let img = decode_image(&png, "gray16.png", &limits).unwrap();
        assert_eq!(img.dimensions(), (500, 500));
    }

    #[test]
    fn image_files_must_be_regular_and_within_the_limit() {
        #[cfg(unix)]
        {
            let e = load_image(Path::new("/dev/zero"), &ImageLimits::default()).unwrap_err();
            assert!(e.to_string().contains("character device"), "{e}");
        }
        let d = crate::testutil::TempDir::new();
        let p = d.0.join("big.png");
        std::fs::write(&p, gray16_png(64, 64)).unwrap();
        let limits = ImageLimits {
            max_alloc: 100,
            ..ImageLimits::default()
        };
        let e = load_image(&p, &limits).unwrap_err();
        assert!(e.to_string().contains("more than the limit"), "{e}");
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

    fn huge_png() -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            b.extend_from_slice(&body);
            b.extend_from_slice(&crc32(&body).to_be_bytes());
        };
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", &[]);
        chunk(b"IEND", &[]);
        b
    }

    #[test]
    fn limits_refuse_huge_header() {
        let e = decode_image(&huge_png(), "huge.png", &ImageLimits::default()).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("huge.png") && s.contains("too large") && s.contains("100000x100000"),
            "{s}"
        );
        let e = decode_image(&huge_bmp(20_000), "huge.bmp", &ImageLimits::default()).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("huge.bmp") && s.contains("too large: 20000x20000"),
            "{s}"
        );
        // Within the dimension limits but over the allocation limit.
        let limits = ImageLimits {
            max_width: 30_000,
            max_height: 30_000,
            max_alloc: 1 << 20,
        };
        let e = decode_image(&huge_bmp(20_000), "huge.bmp", &limits).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn non_image_bytes() {
        let e = decode_image(
            b"hello, this is not an image",
            "notes.txt",
            &ImageLimits::default(),
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("notes.txt") && s.contains("not an image"), "{s}");
        let e = load_image(Path::new("/nonexistent/x.png"), &ImageLimits::default()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.png"));
    }

    /// Decodes hex (test data).
    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Tiny JPEGs written by Pillow 13 (`Image.save(buf, "JPEG", quality=.., optimize=True)` on
    // random pixels, numpy `default_rng(7)`); the expected pixels are Pillow's
    // `Image.open(buf).convert("RGB").tobytes()` (and `.tobytes()` in mode L), libjpeg-turbo 3.2.
    /// 5x3 RGB, 4:2:0, quality 90.
    const JPEG_RGB_5X3: &str = "ffd8ffe000104a46494600010100000100010000ffdb0043000302020302020303030304030304050805050404050a070706080c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ffdb00430103040405040509050509140d0b0d1414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414ffc00011080003000503012200021101031101ffc4001500010100000000000000000000000000000003ffc4001e10000202020203000000000000000000000102030400110512060731ffc4001501010100000000000000000000000000000608ffc4001f1100020104020300000000000000000000010203000405210611336171ffda000c03010002110311003f0097aa3ca3958659ae477648ecdbe3e2333ae876e976fc6835f0054455006800a318c63cc4e32c6f6c629ee60477236cca093d68764824eb5f2a94e3b8cb1971c8f24084969365413e46f55fffd9";
    const JPEG_RGB_5X3_PIXELS: [u8; 45] = [
        138, 90, 138, 190, 168, 215, 92, 123, 169, 45, 78, 93, 205, 192, 150, 188, 133, 164, 114,
        85, 116, 111, 129, 167, 53, 67, 93, 198, 157, 151, 144, 77, 69, 86, 40, 42, 183, 178, 201,
        73, 50, 96, 197, 102, 168,
    ];
    /// 4x2 grayscale (one component), quality 90.
    const JPEG_GRAY_4X2: &str = "ffd8ffe000104a46494600010100000100010000ffdb0043000302020302020303030304030304050805050404050a070706080c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ffc0000b080002000401011100ffc40014000100000000000000000000000000000008ffc4001f1000020102070000000000000000000000010206000304081136415161ffda0008010100003f0037665372c617858f615547403ddd00f2bfffd9";
    const JPEG_GRAY_4X2_PIXELS: [u8; 8] = [77, 162, 163, 35, 92, 153, 150, 37];
    /// 2x2 CMYK (Adobe marker, inverted), quality 95, from `convert("CMYK")` of RGB pixels.
    const JPEG_CMYK_2X2: &str = "ffd8ffee000e41646f626500640000000000ffdb0043000201010101010201010102020202020403020202020504040304060506060605060606070908060709070606080b08090a0a0a0a0a06080b0c0b0a0c090a0a0affc000140800020002044311004d11005911004b1100ffc400160001010100000000000000000000000000090607ffc400221000010402020105000000000000000000010203040506070008091121254161ffda000e0443004d0059004b00003f003d3bf1e427bf3acbbd5ba75b6b6ef0edfc7b1dc7b6ce4759414147b2ed6242ac84c59c86988d1d86a425b6596db425086d00252948480000397facad6d226b6c7a2c5b290d34d51c4436db6f292942432800000fa0007d733aeebe2f8cabb97b6d4ac760927675f924c447bfc8bff9c7f39fffd9";
    const JPEG_CMYK_2X2_PIXELS: [u8; 12] = [139, 74, 227, 240, 167, 67, 228, 95, 251, 11, 153, 94];

    #[test]
    fn jpeg_matches_pillow() {
        let l = ImageLimits::default();
        let img = decode_image(&unhex(JPEG_RGB_5X3), "rgb.jpg", &l).unwrap();
        let DynamicImage::ImageRgb8(rgb) = img else {
            panic!("expected RGB8, got {:?}", img.color())
        };
        assert_eq!(rgb.dimensions(), (5, 3));
        assert_eq!(rgb.as_raw().as_slice(), JPEG_RGB_5X3_PIXELS);

        let img = decode_image(&unhex(JPEG_GRAY_4X2), "gray.jpg", &l).unwrap();
        let DynamicImage::ImageLuma8(g) = &img else {
            panic!("expected Luma8, got {:?}", img.color())
        };
        assert_eq!(g.dimensions(), (4, 2));
        assert_eq!(g.as_raw().as_slice(), JPEG_GRAY_4X2_PIXELS);
        let rgb: Vec<u8> = JPEG_GRAY_4X2_PIXELS.iter().flat_map(|&v| [v; 3]).collect();
        assert_eq!(to_rgb8(&img).into_raw(), rgb);

        let img = decode_image(&unhex(JPEG_CMYK_2X2), "cmyk.jpg", &l).unwrap();
        assert_eq!(to_rgb8(&img).as_raw().as_slice(), JPEG_CMYK_2X2_PIXELS);
    }

    #[test]
    fn cmyk_conversion_matches_pillow() {
        // Pillow 13: Image.frombytes("CMYK", ...).convert("RGB") (checked exhaustively over
        // all (c, k) pairs against the formula).
        assert_eq!(cmyk_to_rgb_pillow([0, 0, 0, 0]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb_pillow([255, 255, 255, 255]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb_pillow([128, 0, 255, 64]), [95, 191, 0]);
    }

    #[test]
    fn jpeg_errors_not_panics() {
        let l = ImageLimits::default();
        let good = unhex(JPEG_RGB_5X3);
        // Truncated anywhere (even just the EOI marker missing, as for Pillow without
        // LOAD_TRUNCATED_IMAGES): an error naming the file.
        for n in [3, 20, 200, good.len() / 2, good.len() - 10, good.len() - 2] {
            let e = decode_image(&good[..n], "cut.jpg", &l).unwrap_err();
            let s = e.to_string();
            assert!(s.starts_with("cut.jpg: "), "{n}: {s}");
        }
        let e = decode_image(&good[..good.len() - 10], "cut.jpg", &l).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        // Garbage after SOI.
        let mut garbage = vec![0xFF, 0xD8, 0xFF];
        garbage.extend((0..=255u8).cycle().take(1000));
        let e = decode_image(&garbage, "garbage.jpg", &l).unwrap_err();
        assert!(e.to_string().starts_with("garbage.jpg: "), "{e}");
        // A fatal libjpeg error (bad SOF: 2 components) is caught too.
        let mut bad = good.clone();
        let sof = bad.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        bad[sof + 9] = 0; // 0 components
        let e = decode_image(&bad, "bad.jpg", &l).unwrap_err();
        assert!(
            e.to_string().starts_with("bad.jpg: cannot decode JPEG"),
            "{e}"
        );
        // Trailing bytes after EOI are fine (as in Pillow).
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"trailing data");
        let img = decode_image(&trailing, "t.jpg", &l).unwrap();
        assert_eq!(to_rgb8(&img).as_raw().as_slice(), JPEG_RGB_5X3_PIXELS);
    }

    #[test]
    fn jpeg_scans_are_counted_by_a_marker_walk() {
        let bytes = [
            &[0xFF, 0xD8][..],
            // An APP1 segment whose payload holds the bytes of SOS and EOI markers.
            &[0xFF, 0xE1, 0x00, 0x08, 0xFF, 0xDA, 0xFF, 0xDA, 0xFF, 0xD9],
            // A scan: its header, then entropy-coded data with a stuffed byte, restart
            // markers and fill bytes.
            &[0xFF, 0xDA, 0x00, 0x04, 0x01, 0x02],
            &[
                0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56, 0xFF, 0xFF, 0xD3, 0x78,
            ],
            // A DHT segment between scans, then a second scan.
            &[0xFF, 0xC4, 0x00, 0x03, 0xDA],
            &[0xFF, 0xFF, 0xDA, 0x00, 0x02, 0x9A, 0xFF, 0x00],
            // EOI, then trailing bytes that look like a scan.
            &[0xFF, 0xD9, 0xFF, 0xDA, 0x00, 0x02],
        ]
        .concat();
        assert_eq!(jpeg_scan_count(&bytes), 2);
        // Cut anywhere: no panic, never more.
        for n in 0..bytes.len() {
            assert!(jpeg_scan_count(&bytes[..n]) <= 2);
        }
        assert_eq!(jpeg_scan_count(&unhex(JPEG_RGB_5X3)), 1);
    }

    /// A progressive JPEG written by mozjpeg, `w` x `h`, with some texture.
    fn progressive_jpeg(w: usize, h: usize) -> Vec<u8> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_size(w, h);
        c.set_quality(85.0);
        c.set_progressive_mode();
        let mut started = c.start_compress(Vec::new()).unwrap();
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        started.write_scanlines(&pixels).unwrap();
        started.finish().unwrap()
    }

    #[test]
    fn jpeg_with_too_many_scans_is_refused_before_decoding() {
        let l = ImageLimits::default();
        let jpeg = progressive_jpeg(64, 48);
        let scans = jpeg_scan_count(&jpeg);
        assert!((2..20).contains(&scans), "{scans} scans");
        decode_image(&jpeg, "p.jpg", &l).unwrap();
        // The file with its last scan repeated `extra` times.
        let eoi = jpeg.len() - 2;
        assert_eq!(jpeg[eoi..], [0xFF, 0xD9]);
        let last = jpeg.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
        let with = |extra: usize| {
            let mut v = jpeg[..eoi].to_vec();
            for _ in 0..extra {
                v.extend_from_slice(&jpeg[last..eoi]);
            }
            v.extend_from_slice(&[0xFF, 0xD9]);
            v
        };
        // Up to the limit: decoded (libjpeg warns about the repeated scans and goes on).
        let many = with(MAX_JPEG_SCANS - scans);
        assert_eq!(jpeg_scan_count(&many), MAX_JPEG_SCANS);
        decode_image(&many, "many.jpg", &l).unwrap();
        // Past it: refused before libjpeg runs, with the count.
        let bomb = with(10_000);
        let started = std::time::Instant::now();
        let e = decode_image(&bomb, "bomb.jpg", &l).unwrap_err().to_string();
        assert!(
            e.starts_with("bomb.jpg: cannot decode JPEG")
                && e.contains(&format!("{} scans", 10_000 + scans))
                && e.contains(&MAX_JPEG_SCANS.to_string()),
            "{e}"
        );
        assert!(
            started.elapsed().as_secs_f64() < 1.0,
            "{:?}",
            started.elapsed()
        );
        // The same from a file, through `load_image`.
        let d = tmp_dir("scans");
        let p = d.join("bomb.jpg");
        std::fs::write(&p, &bomb).unwrap();
        let e = load_image(&p, &l).unwrap_err().to_string();
        assert!(e.contains("bomb.jpg") && e.contains("scans"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn jpeg_limits_checked_on_header() {
        // A valid header claiming 60000x60000; the data is that of the 5x3 image.
        let mut big = unhex(JPEG_RGB_5X3);
        let sof = big.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        big[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
        let e = decode_image(&big, "big.jpg", &ImageLimits::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("big.jpg: too large: 60000x60000 exceeds the limit"),
            "{e}"
        );
        let limits = ImageLimits {
            max_width: 65535,
            max_height: 65535,
            max_alloc: 1 << 20,
        };
        let e = decode_image(&big, "big.jpg", &limits).unwrap_err();
        assert!(
            e.to_string().contains("too large: 60000x60000 needs"),
            "{e}"
        );
    }

    #[test]
    fn png_roundtrip_from_content_not_extension() {
        let d = tmp_dir("png");
        let img = rgb(2, 1, &[1, 2, 3, 4, 5, 6]);
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        let p = d.join("photo.jpg"); // wrong extension on purpose
        std::fs::write(&p, &bytes).unwrap();
        let back = load_image(&p, &ImageLimits::default()).unwrap();
        assert_eq!(to_rgb8(&back), img);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn output_size_rule() {
        // int(s * long / short), truncated; the shorter side gets exactly s.
        assert_eq!(shortest_edge_size(480, 640, 224), (224, 298));
        assert_eq!(shortest_edge_size(1001, 257, 224), (872, 224));
        assert_eq!(shortest_edge_size(224, 224, 224), (224, 224));
        assert_eq!(shortest_edge_size(100, 1000, 224), (224, 2240));
    }

    // Expected values below come from Pillow 13.0.0:
    //   a = np.random.default_rng(42).integers(0, 256, (h, w, 3), dtype=np.uint8)  (drawn in order)
    //   np.asarray(Image.fromarray(a).resize((ow, oh), Image.BICUBIC)).flatten()
    #[test]
    fn pillow_exact_downscale_7x5() {
        let src = [
            136, 38, 217, 22, 205, 251, 33, 198, 193, 255, 145, 167, 97, 86, 90, 112, 36, 22, 218,
            110, 194, 18, 205, 219, 141, 136, 0, 22, 14, 182, 134, 178, 235, 129, 147, 51, 181, 1,
            28, 24, 140, 83, 199, 134, 237, 98, 194, 249, 113, 68, 90, 188, 47, 13, 218, 194, 64,
            151, 172, 183, 163, 130, 59, 201, 19, 209, 98, 131, 22, 14, 204, 32, 110, 189, 249,
            214, 41, 126, 76, 115, 41, 16, 23, 128, 139, 158, 236, 94, 175, 146, 187, 46, 102, 120,
            64, 237, 6, 206, 20, 200, 49, 88, 212, 164, 182,
        ];
        let expected = [
            71, 141, 185, 88, 144, 189, 147, 107, 94, 137, 75, 86, 135, 143, 185, 97, 105, 103,
            186, 134, 95, 113, 115, 93, 136, 123, 160, 108, 126, 123, 110, 119, 118, 136, 92, 113,
        ];
        let out = resize_shortest_edge(&rgb(7, 5, &src), 3).unwrap();
        assert_eq!(out.dimensions(), (4, 3));
        assert_eq!(out.as_raw().as_slice(), &expected);
    }

    #[test]
    fn pillow_exact_upscale_3x2() {
        let src = [
            77, 129, 160, 210, 35, 62, 161, 139, 202, 151, 131, 113, 58, 81, 81, 115, 30, 81,
        ];
        let expected = [
            54, 138, 174, 85, 118, 154, 161, 65, 96, 225, 30, 60, 209, 77, 121, 173, 137, 199, 160,
            161, 228, 70, 138, 166, 93, 120, 147, 151, 71, 96, 200, 38, 63, 189, 74, 115, 163, 122,
            181, 154, 141, 206, 112, 137, 143, 116, 123, 130, 125, 88, 96, 134, 58, 72, 137, 65,
            98, 138, 81, 135, 138, 87, 148, 154, 136, 119, 139, 126, 113, 99, 104, 95, 68, 78, 80,
            85, 56, 81, 113, 40, 88, 122, 33, 90, 170, 136, 111, 147, 128, 106, 89, 110, 95, 43,
            86, 83, 65, 53, 75, 103, 25, 70, 116, 13, 68,
        ];
        let out = resize_shortest_edge(&rgb(3, 2, &src), 5).unwrap();
        assert_eq!(out.dimensions(), (7, 5));
        assert_eq!(out.as_raw().as_slice(), &expected);
    }

    /// 4x12 -> 2x6: the height shrinks by more than twice the width's shrink, so Pillow 13 runs
    /// the vertical pass first.
    #[test]
    fn pillow_exact_vertical_first_4x12() {
        let src = [
            34, 56, 150, 23, 195, 68, 249, 141, 175, 191, 76, 227, 227, 83, 86, 16, 110, 250, 184,
            219, 240, 162, 223, 211, 44, 185, 217, 70, 16, 194, 180, 161, 245, 115, 76, 42, 195, 9,
            18, 194, 31, 121, 85, 179, 190, 54, 194, 90, 137, 52, 99, 17, 109, 170, 127, 248, 60,
            147, 24, 114, 247, 149, 163, 228, 176, 25, 140, 173, 15, 36, 68, 199, 16, 197, 136,
            194, 164, 215, 211, 49, 23, 242, 40, 93, 23, 7, 123, 119, 57, 68, 111, 127, 61, 185,
            54, 11, 160, 250, 235, 139, 34, 132, 127, 39, 43, 226, 77, 190, 211, 75, 220, 174, 212,
            200, 42, 236, 142, 187, 168, 190, 11, 75, 220, 93, 195, 183, 174, 247, 34, 125, 45,
            105, 105, 74, 105, 83, 34, 49, 209, 231, 129, 114, 214, 94,
        ];
        let expected = [
            82, 120, 155, 178, 159, 207, 122, 72, 153, 112, 149, 150, 162, 132, 102, 117, 129, 97,
            110, 115, 124, 184, 66, 60, 142, 134, 180, 143, 126, 126, 94, 116, 141, 146, 190, 100,
        ];
        let out = resize_shortest_edge(&rgb(4, 12, &src), 2).unwrap();
        assert_eq!(out.dimensions(), (2, 6));
        assert_eq!(out.as_raw().as_slice(), &expected);
    }

    #[test]
    fn windowed_resample_matches_full() {
        // Computing only the crop window must give the same bytes as resizing then cropping.
        let (w, h) = (37usize, 23usize);
        let src: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
        for (ow, oh) in [(20, 11), (61, 40), (10, 3), (37, 50)] {
            let full = Window {
                x0: 0,
                y0: 0,
                w: ow,
                h: oh,
            };
            let all = pillow::resample(&src, w, h, ow, oh, full, pillow::Filter::Bicubic);
            let win = Window {
                x0: 2,
                y0: 1,
                w: ow - 5,
                h: oh - 2,
            };
            let part = pillow::resample(&src, w, h, ow, oh, win, pillow::Filter::Bicubic);
            for y in 0..win.h {
                let a = &all
                    [((y + win.y0) * ow + win.x0) * 3..((y + win.y0) * ow + win.x0 + win.w) * 3];
                assert_eq!(
                    a,
                    &part[y * win.w * 3..(y + 1) * win.w * 3],
                    "{ow}x{oh} row {y}"
                );
            }
        }
    }

    #[test]
    fn composite_matches_pillow() {
        // Pillow 13: Image.alpha_composite(white RGBA, RGBA(c, c, c, a)).convert("RGB"),
        // checked exhaustively over all (c, a) in Python; a few values here.
        assert_eq!(composite_on_white(17, 0), 255);
        assert_eq!(composite_on_white(17, 255), 17);
        assert_eq!(composite_on_white(0, 128), 127);
        assert_eq!(composite_on_white(200, 1), 255);
        for c in 0..=255u8 {
            assert_eq!(composite_on_white(c, 255), c);
        }
    }

    #[test]
    fn to_rgb8_modes() {
        let l16 =
            image::ImageBuffer::<image::Luma<u16>, _>::from_raw(4, 1, vec![0u16, 255, 256, 65535])
                .unwrap();
        let out = to_rgb8(&DynamicImage::ImageLuma16(l16));
        assert_eq!(
            out.as_raw(),
            &[0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 255]
        );
        let rgb16 =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![0x12ff, 0xff00, 0x00ff])
                .unwrap();
        assert_eq!(
            to_rgb8(&DynamicImage::ImageRgb16(rgb16)).as_raw(),
            &[0x12, 0xff, 0x00]
        );
        let rgba = image::RgbaImage::from_raw(2, 1, vec![10, 20, 30, 0, 10, 20, 30, 255]).unwrap();
        assert_eq!(
            to_rgb8(&DynamicImage::ImageRgba8(rgba)).as_raw(),
            &[255, 255, 255, 10, 20, 30]
        );
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
