//! Reading files whose names come from users or from files users hand us (image paths,
//! bundle manifests, tokenizers): only regular files are opened, and never more bytes than a
//! bound are read.
//!
//! A path can name a FIFO (opening it for reading blocks until a writer appears), a device
//! such as `/dev/zero` (reading it to the end never ends) or a directory. [`open_regular`]
//! opens without blocking and checks the file's type on the open handle (so a file swapped
//! for another between a check and the open cannot slip through), and [`read_bounded`] stops
//! at the bound even when the file grows while it is read.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// The bound for small JSON and text files (configs, manifests, tokenizers): 256 MiB, far
/// above any real one (OPT's `tokenizer.json` is about 2 MB).
pub const TEXT_FILE_MAX_BYTES: u64 = 256 << 20;

/// What kind of file a non-regular file is, for messages.
fn kind_name(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// The error for a file that is not a regular file.
fn not_regular(ft: &std::fs::FileType) -> io::Error {
    let kind = kind_name(ft);
    let msg = if kind == "not a regular file" {
        kind.to_string()
    } else {
        format!("is {kind}, not a regular file")
    };
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Opens `path` for reading if it is a regular file (symbolic links are followed). Anything
/// else (a FIFO, a device, a directory, a socket) is an `InvalidInput` error that says what
/// it is; opening never blocks.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let mut options = File::options();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading blocks until a writer opens it; O_NONBLOCK returns at
        // once. It has no effect on regular files.
        options.custom_flags(libc::O_NONBLOCK);
    }
    #[cfg(not(unix))]
    {
        // No FIFOs to block on; still refuse what is not a regular file before opening.
        let ft = std::fs::metadata(path)?.file_type();
        if !ft.is_file() {
            return Err(not_regular(&ft));
        }
    }
    let file = options.open(path)?;
    let ft = file.metadata()?.file_type();
    if !ft.is_file() {
        return Err(not_regular(&ft));
    }
    Ok(file)
}

/// The whole of the regular file `path`, if it holds at most `max_bytes` bytes. A larger
/// file is a `FileTooLarge` error that gives its size and the bound; a file that grows past
/// the bound while it is read is refused the same way.
pub fn read_bounded(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > max_bytes {
        return Err(too_large(len, max_bytes));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("grew past the limit of {max_bytes} bytes while being read"),
        ));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, max_bytes: u64) -> io::Result<String> {
    let bytes = read_bounded(path, max_bytes)?;
    String::from_utf8(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Reads at most `max_bytes` from `reader` (standard input, a socket), refusing more.
pub fn read_reader_bounded(reader: impl Read, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large_stream(max_bytes));
    }
    Ok(bytes)
}

fn too_large(len: u64, max_bytes: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("is {len} bytes, more than the limit of {max_bytes} bytes"),
    )
}

fn too_large_stream(max_bytes: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("holds more than the limit of {max_bytes} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn regular_files_are_read_within_the_bound() {
        let d = TempDir::new();
        let p = d.0.join("a.txt");
        std::fs::write(&p, b"hello").expect("write");
        assert_eq!(read_bounded(&p, 5).expect("read"), b"hello");
        let e = read_bounded(&p, 4).expect_err("over the bound");
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert!(e.to_string().contains("5 bytes"), "{e}");
        assert_eq!(read_text_bounded(&p, 10).expect("text"), "hello");
        std::fs::write(&p, [0xffu8, 0xfe]).expect("write");
        let e = read_text_bounded(&p, 10).expect_err("not utf-8");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn directories_and_devices_are_refused() {
        let d = TempDir::new();
        let e = read_bounded(&d.0, 1 << 20).expect_err("a directory");
        assert!(e.to_string().contains("directory"), "{e}");
        #[cfg(unix)]
        {
            let e = read_bounded(Path::new("/dev/zero"), 1 << 20).expect_err("a device");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains("character device"), "{e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = TempDir::new();
        let p = d.0.join("pipe");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: `c` is a valid NUL-terminated path.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo");
        // No writer ever opens the FIFO: a blocking open would hang this test.
        let e = open_regular(&p).expect_err("a FIFO");
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    #[test]
    fn readers_are_bounded() {
        assert_eq!(read_reader_bounded(&b"abc"[..], 3).expect("read"), b"abc");
        let e = read_reader_bounded(std::io::repeat(0), 1000).expect_err("endless");
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
    }
}
