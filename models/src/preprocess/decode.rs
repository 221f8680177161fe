//! Decoding untrusted image files into the RGB image the processor works on: formats detected
//! by content, dimensions and allocations bounded by [`ImageLimits`] before decoding, and
//! Pillow's conversions to RGB ([`to_rgb8`]).
//!
//! # JPEG decoding
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
use std::path::Path;

use image::{DynamicImage, GenericImageView, ImageDecoder, ImageReader, RgbImage};

use crate::error::{Error, Result};

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

pub(super) fn image_err(source_name: &str, msg: impl Into<String>) -> Error {
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
/// keeps it busy for most of a minute or more (`docs/PERFORMANCE.md` has a measurement);
/// 256 scans of the largest accepted image take a few seconds.
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rgb(w: u32, h: u32, data: &[u8]) -> RgbImage {
        RgbImage::from_raw(w, h, data.to_vec()).unwrap()
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

    /// A PNG signature and IHDR claiming 100000x100000 RGB pixels, then an empty IDAT and IEND.
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
        let d = crate::testutil::TempDir::new();
        let p = d.0.join("bomb.jpg");
        std::fs::write(&p, &bomb).unwrap();
        let e = load_image(&p, &l).unwrap_err().to_string();
        assert!(e.contains("bomb.jpg") && e.contains("scans"), "{e}");
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
        let t = crate::testutil::TempDir::new();
        let d = &t.0;
        let img = rgb(2, 1, &[1, 2, 3, 4, 5, 6]);
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        let p = d.join("photo.jpg"); // wrong extension on purpose
        std::fs::write(&p, &bytes).unwrap();
        let back = load_image(&p, &ImageLimits::default()).unwrap();
        assert_eq!(to_rgb8(&back), img);
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
}
