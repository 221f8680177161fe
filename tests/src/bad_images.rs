//! The bad image files every runtime test feeds in: an empty file, text named `.jpg`, a
//! truncated JPEG and PNG, a PNG whose header claims 100000x100000 pixels, and a missing file.
//! Plain `std`, so that `sdk/tests/cli.rs` (which cannot depend on `moda-tests`) includes this
//! file with `#[path]` too.

use std::path::{Path, PathBuf};

/// Writes the cases into `dir` from a valid JPEG and PNG and returns `(path, what)` for each;
/// the last path does not exist.
pub fn write_bad_images(dir: &Path, jpg: &[u8], png: &[u8]) -> Vec<(PathBuf, &'static str)> {
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write a bad image");
        p
    };
    vec![
        (write("empty.jpg", b""), "empty"),
        (write("text.jpg", b"this is not an image\n"), "text"),
        (write("trunc.jpg", &jpg[..jpg.len() / 2]), "truncated JPEG"),
        (write("trunc.png", &png[..png.len() / 2]), "truncated PNG"),
        (write("bomb.png", &png_bomb(png)), "100000x100000 PNG"),
        (dir.join("missing.jpg"), "missing file"),
    ]
}

/// `png` with its IHDR claiming 100000 x 100000 pixels, the CRC fixed so the header is valid.
pub fn png_bomb(png: &[u8]) -> Vec<u8> {
    let mut bomb = png[..33].to_vec();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    bomb.extend_from_slice(&png[33..]);
    bomb
}

/// CRC-32 (IEEE), as PNG chunks use.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}
