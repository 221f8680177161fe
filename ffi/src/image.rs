//! `moda_image`: an image to describe or embed (a file, encoded bytes, or RGB pixels).

use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_uchar, c_uint, c_void, CStr};
use std::path::Path;

use moda_sdk::ImageInput;

use crate::error::{boundary, Failure};

/// moda_image.kind: an image file, named by moda_image.path.
pub const MODA_IMAGE_FILE: c_int = 1;
/// moda_image.kind: an encoded image (JPEG, PNG, ...) in memory: moda_image.data and .size.
pub const MODA_IMAGE_BYTES: c_int = 2;
/// moda_image.kind: decoded pixels: moda_image.height rows of moda_image.width RGB triplets,
/// 8 bits each, no padding between rows (size = width * height * 3 bytes).
pub const MODA_IMAGE_RGB8: c_int = 3;

/// An image to describe or embed. Make one with moda_image_from_file(),
/// moda_image_from_bytes() or moda_image_from_rgb8() rather than by hand.
///
/// Ownership: the struct only points at the caller's memory, which libmoda never frees or
/// keeps: it must stay valid during the call that takes the image, and can be reused or
/// freed as soon as that call returns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moda_image {
    /// MODA_IMAGE_FILE, MODA_IMAGE_BYTES or MODA_IMAGE_RGB8 (any other value, 0 included, is
    /// MODA_ERR_INVALID_ARGUMENT).
    pub kind: c_int,
    /// MODA_IMAGE_FILE: the file's path, NUL-terminated (on POSIX the bytes are passed to the
    /// OS as they are; UTF-8 is best). Ignored for the other kinds.
    pub path: *const c_char,
    /// MODA_IMAGE_BYTES: the encoded file; MODA_IMAGE_RGB8: the pixels.
    pub data: *const c_uchar,
    /// Bytes at data.
    pub size: usize,
    /// MODA_IMAGE_RGB8: pixels per row.
    pub width: c_uint,
    /// MODA_IMAGE_RGB8: rows.
    pub height: c_uint,
    /// MODA_IMAGE_BYTES: what error messages call the image (NUL-terminated UTF-8); NULL
    /// calls it "image bytes".
    pub name: *const c_char,
}

impl moda_image {
    const EMPTY: moda_image = moda_image {
        kind: 0,
        path: std::ptr::null(),
        data: std::ptr::null(),
        size: 0,
        width: 0,
        height: 0,
        name: std::ptr::null(),
    };
}

/// An image file at path (JPEG, PNG, WebP, GIF, BMP or TIFF, recognised by its bytes).
///
/// Ownership: the result points at path, which must stay valid while the image is used.
/// Threads: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn moda_image_from_file(path: *const c_char) -> moda_image {
    boundary(moda_image::EMPTY, || moda_image {
        kind: MODA_IMAGE_FILE,
        path,
        ..moda_image::EMPTY
    })
}

/// An encoded image file held in memory: size bytes at data. name (may be NULL) is what
/// error messages call it.
///
/// Ownership: the result points at data and name, which must stay valid while the image is
/// used.
/// Threads: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn moda_image_from_bytes(
    data: *const c_void,
    size: usize,
    name: *const c_char,
) -> moda_image {
    boundary(moda_image::EMPTY, || moda_image {
        kind: MODA_IMAGE_BYTES,
        data: data.cast(),
        size,
        name,
        ..moda_image::EMPTY
    })
}

/// Decoded pixels: height rows of width RGB triplets (8 bits each, no row padding), that
/// is width * height * 3 bytes at pixels.
///
/// Ownership: the result points at pixels, which must stay valid while the image is used.
/// Threads: may be called from any thread at any time.
#[no_mangle]
pub extern "C" fn moda_image_from_rgb8(
    pixels: *const c_uchar,
    width: c_uint,
    height: c_uint,
) -> moda_image {
    boundary(moda_image::EMPTY, || moda_image {
        kind: MODA_IMAGE_RGB8,
        data: pixels,
        // An overflowing size is left 0, which the describe or embed call reports.
        size: (width as usize)
            .checked_mul(height as usize)
            .and_then(|n| n.checked_mul(3))
            .unwrap_or(0),
        width,
        height,
        ..moda_image::EMPTY
    })
}

/// A checked `moda_image`, borrowing the caller's memory.
#[derive(Debug)]
pub(crate) enum Image<'a> {
    File(&'a Path),
    Bytes {
        bytes: &'a [u8],
        name: Cow<'a, str>,
    },
    Rgb8 {
        data: &'a [u8],
        width: u32,
        height: u32,
    },
}

impl Image<'_> {
    /// Checks `img`'s pointers (not their targets' lifetimes, which are the caller's promise).
    ///
    /// # Safety
    /// The pointers in `img` are NULL or valid for the call (`path` and `name` NUL-terminated,
    /// `data` readable for `size` bytes).
    pub(crate) unsafe fn from_c<'a>(img: &moda_image, func: &str) -> Result<Image<'a>, Failure> {
        let bytes = |what: &str| -> Result<&'a [u8], Failure> {
            if img.size == 0 {
                return Ok(&[]);
            }
            if img.data.is_null() {
                return Err(Failure::invalid(format!(
                    "{func}: the image's data is NULL ({what}, size {})",
                    img.size
                )));
            }
            // SAFETY: the caller promises `size` readable bytes at `data`.
            Ok(unsafe { std::slice::from_raw_parts(img.data, img.size) })
        };
        match img.kind {
            MODA_IMAGE_FILE => {
                if img.path.is_null() {
                    return Err(Failure::invalid(format!(
                        "{func}: the image's path is NULL"
                    )));
                }
                // SAFETY: the caller promises a NUL-terminated string.
                let c = unsafe { CStr::from_ptr(img.path) };
                Ok(Image::File(path_of(c)?))
            }
            MODA_IMAGE_BYTES => {
                let name = if img.name.is_null() {
                    Cow::Borrowed("image bytes")
                } else {
                    // SAFETY: the caller promises a NUL-terminated string.
                    unsafe { CStr::from_ptr(img.name) }.to_string_lossy()
                };
                Ok(Image::Bytes {
                    bytes: bytes("encoded image")?,
                    name,
                })
            }
            MODA_IMAGE_RGB8 => Ok(Image::Rgb8 {
                data: bytes("RGB8 pixels")?,
                width: img.width,
                height: img.height,
            }),
            k => Err(Failure::invalid(format!(
                "{func}: unknown image kind {k} (use moda_image_from_file, \
                 moda_image_from_bytes or moda_image_from_rgb8)"
            ))),
        }
    }

    pub(crate) fn input(&self) -> ImageInput<'_> {
        match self {
            Image::File(p) => ImageInput::Path(p),
            Image::Bytes { bytes, name } => ImageInput::Bytes { bytes, name },
            Image::Rgb8 {
                data,
                width,
                height,
            } => ImageInput::Rgb8 {
                data,
                width: *width,
                height: *height,
            },
        }
    }
}

/// A C path string as a `Path`: its bytes on Unix, UTF-8 elsewhere.
pub(crate) fn path_of(c: &CStr) -> Result<&Path, Failure> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(Path::new(std::ffi::OsStr::from_bytes(c.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        c.to_str()
            .map(Path::new)
            .map_err(|_| Failure::invalid(format!("path {c:?} is not UTF-8")))
    }
}
