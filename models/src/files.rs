//! The file-system helpers of the workspace, one of each.
//!
//! Reading files whose names come from users or from files users hand us (image paths,
//! bundle manifests, tokenizers): only regular files are opened, and never more bytes than a
//! bound are read. A path can name a FIFO (opening it for reading blocks until a writer
//! appears), a device such as `/dev/zero` (reading it to the end never ends) or a directory.
//! [`open_regular`] opens without blocking and checks the file's type on the open handle (so
//! a file swapped for another between a check and the open cannot slip through), and
//! [`read_bounded`] and [`sha256_file`] stop at the bound even when the file grows while it
//! is read.
//!
//! Writing so that a crash never leaves a half-written output under its final name:
//! [`write_atomic`] for one file, [`replace_dir`] for a whole directory (with
//! [`resolve_replaced`] to find the previous copy when a crash interrupted it).
//! [`remove_stale`] removes the temporaries that processes killed while writing left behind.
//!
//! Comparing paths before writing: [`canonical_path`] and [`overlap`] (an output must not
//! replace one of its inputs).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

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

/// The size and SHA-256 digest of a file's contents ([`sha256_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    /// The number of bytes hashed: the whole file.
    pub len: u64,
    /// The SHA-256 digest.
    pub sha256: [u8; 32],
}

impl FileDigest {
    /// The digest as lowercase hex (64 characters), as manifests and cache entries store it.
    pub fn hex(&self) -> String {
        hex(&self.sha256)
    }
}

/// `bytes` as lowercase hex, two characters a byte.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The size and SHA-256 of the regular file `path` ([`open_regular`]: a FIFO or a device is
/// refused, never waited on), read in 1 MiB pieces. A file of more than `max_bytes` bytes,
/// or one that grows past it while it is read, is a `FileTooLarge` error; `u64::MAX` hashes
/// any regular file whole.
pub fn sha256_file(path: &Path, max_bytes: u64) -> io::Result<FileDigest> {
    let file = open_regular(path)?;
    let size = file.metadata()?.len();
    if size > max_bytes {
        return Err(too_large(size, max_bytes));
    }
    let mut reader = file.take(max_bytes.saturating_add(1));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n as u64;
        if len > max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("grew past the limit of {max_bytes} bytes while being read"),
            ));
        }
        h.update(&buf[..n]);
    }
    Ok(FileDigest {
        len,
        sha256: h.finalize().into(),
    })
}

/// `path`'s parent directory, `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.<name>.<suffix>` beside `path` (`name` its last component): where temporaries and
/// copies of `path` go, in the same directory so that renaming them over `path` is atomic,
/// and hidden.
pub fn sibling(path: &Path, suffix: &str) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file or directory", path.display()),
        )
    })?;
    let mut sibling = std::ffi::OsString::from(".");
    sibling.push(name);
    sibling.push(".");
    sibling.push(suffix);
    Ok(parent_dir(path).join(sibling))
}

/// Flushes the regular file `path` to disk (fsync).
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Flushes the directory `path` (its entries: files created, renamed or removed in it) to
/// disk. Directories can be opened and fsynced on Unix; elsewhere the sync is best effort and
/// only a directory that cannot be opened is an error.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    let _ = dir.sync_all();
    Ok(())
}

/// Flushes every regular file under `dir` and every directory in it, `dir` included
/// (symbolic links are not followed).
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            sync_tree(&entry.path())?;
        } else if ft.is_file() {
            sync_file(&entry.path())?;
        }
    }
    sync_dir(dir)
}

/// Writes `bytes` to `path` so that `path` holds either its old contents or all of `bytes`,
/// even if the process or the machine dies midway: a temporary file in the same directory,
/// `.<name>.tmp-<pid>-<n>` (unique to this process and call, so that concurrent writers of
/// the same path never share one), is written and fsynced, renamed over `path`, and the
/// directory is fsynced so that the rename lasts. On failure the temporary is removed and
/// `path` is untouched. The temporaries of killed processes are found by
/// [`remove_stale`]`(dir, ".<name>.tmp-")`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let tmp = sibling(
        path,
        &format!(
            "tmp-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ),
    )?;
    let written = (|| {
        // Truncating: a file of this name can only be a dead process's (a reused pid).
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(parent_dir(path))
}

/// Puts the complete directory `tmp` in the place of `dir`, so that a crash at any point
/// leaves either the previous `dir` or the new one findable, never a mixture:
///
/// 1. every file under `tmp` and `tmp` itself are fsynced;
/// 2. an existing `dir` is renamed to `.<name>.old` (a leftover `.<name>.old` is removed
///    first);
/// 3. `tmp` is renamed to `dir` (if that fails, the old `dir` is renamed back) and the parent
///    directory is fsynced;
/// 4. `.<name>.old` is removed.
///
/// `tmp` must be in the same directory as `dir` (a rename does not cross file systems); it is
/// left in place on failure, for the caller to remove. A crash between steps 2 and 3 leaves
/// no `dir` but a complete `.<name>.old`, which [`resolve_replaced`] finds.
pub fn replace_dir(tmp: &Path, dir: &Path) -> io::Result<()> {
    let at = |p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    sync_tree(tmp).map_err(|e| at(tmp, e))?;
    let old = sibling(dir, "old")?;
    let had_old = dir.symlink_metadata().is_ok();
    if had_old {
        match old.symlink_metadata() {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&old).map_err(|e| at(&old, e))?,
            Ok(_) => std::fs::remove_file(&old).map_err(|e| at(&old, e))?,
            Err(_) => {}
        }
        std::fs::rename(dir, &old).map_err(|e| at(dir, e))?;
    }
    if let Err(e) = std::fs::rename(tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        return Err(at(dir, e));
    }
    let parent = parent_dir(dir);
    sync_dir(parent).map_err(|e| at(parent, e))?;
    if had_old {
        let removed = match old.symlink_metadata() {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&old),
            Ok(_) => std::fs::remove_file(&old),
            Err(_) => Ok(()),
        };
        removed.map_err(|e| at(&old, e))?;
    }
    Ok(())
}

/// The directory to read `dir` from: `dir`, or its `.<name>.old` copy when `dir` does not
/// exist because a crash interrupted [`replace_dir`] between moving the previous `dir` aside
/// and renaming the new one into place.
pub fn resolve_replaced(dir: &Path) -> PathBuf {
    if dir.symlink_metadata().is_err() {
        if let Ok(old) = sibling(dir, "old") {
            if old.is_dir() {
                return old;
            }
        }
    }
    dir.to_path_buf()
}

/// A temporary file or directory left by a process that is gone (killed while writing),
/// found by [`remove_stale`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleTemporary {
    /// The file or directory.
    pub path: PathBuf,
    /// The process id in its name.
    pub pid: u32,
    /// Why it is stale: the process is not running, or (where that cannot be told) the entry
    /// has not been modified for [`STALE_AGE`].
    pub why: String,
    /// `None` once removed, else why it could not be.
    pub error: Option<String>,
}

impl std::fmt::Display for StaleTemporary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            None => write!(
                f,
                "removed {}, left behind by process {} ({})",
                self.path.display(),
                self.pid,
                self.why
            ),
            Some(e) => write!(
                f,
                "cannot remove {}, left behind by process {} ({}): {e}",
                self.path.display(),
                self.pid,
                self.why
            ),
        }
    }
}

/// Where a system cannot tell whether a process runs, a temporary entry counts as stale once
/// it has not been modified for this long.
pub const STALE_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Whether process `pid` runs: `Some` on Linux with `/proc` mounted (`/proc/<pid>` exists; a
/// process of another PID namespace is not seen), `None` where this cannot be told.
pub fn process_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    if cfg!(target_os = "linux") && proc.join("self").exists() {
        Some(proc.join(pid.to_string()).exists())
    } else {
        None
    }
}

/// Removes the entries of `parent` named `<prefix><pid>` or `<prefix><pid>-<anything>` whose
/// process is gone: not running ([`process_alive`]), or, where that cannot be told, not
/// modified for [`STALE_AGE`]. Entries of this process and of running processes are kept.
/// Returns what was found stale, removed or not, for the caller to report.
pub fn remove_stale(parent: &Path, prefix: &str) -> Vec<StaleTemporary> {
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let digits = rest.split('-').next().unwrap_or("");
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let path = entry.path();
        let why = match process_alive(pid) {
            Some(true) => continue,
            Some(false) => "no longer running".to_string(),
            None => {
                let age = std::fs::symlink_metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                match age {
                    Some(age) if age >= STALE_AGE => {
                        format!("not modified for {} hours", age.as_secs() / 3600)
                    }
                    _ => continue,
                }
            }
        };
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        found.push(StaleTemporary {
            path,
            pid,
            why,
            error: removed.err().map(|e| e.to_string()),
        });
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// `path` made absolute, with symbolic links, `.` and `..` resolved, whether it exists or not:
/// its deepest existing ancestor canonicalized and the rest (which does not exist, so holds no
/// links) appended component by component. Where an output would go, to compare with inputs.
pub fn canonical_path(path: &Path) -> io::Result<PathBuf> {
    use std::path::Component;
    let mut rest = Vec::new();
    let mut cur = path;
    loop {
        let probe = if cur.as_os_str().is_empty() {
            Path::new(".")
        } else {
            cur
        };
        match std::fs::canonicalize(probe) {
            Ok(mut out) => {
                for c in rest.iter().rev() {
                    match c {
                        Component::Normal(name) => out.push(name),
                        Component::ParentDir => {
                            out.pop();
                        }
                        _ => {}
                    }
                }
                return Ok(out);
            }
            Err(e) => {
                let (Some(last), Some(parent)) = (cur.components().next_back(), cur.parent())
                else {
                    return Err(e);
                };
                rest.push(last);
                cur = parent;
            }
        }
    }
}

/// How the output path `out` and the input path `input` overlap, after [`canonical_path`]:
/// `Some("is")` (the same), `Some("is inside")` or `Some("contains")`; `None` when they are
/// apart (or one cannot be resolved). Writing or replacing `out` must not touch an input.
pub fn overlap(out: &Path, input: &Path) -> Option<&'static str> {
    let (o, i) = (canonical_path(out).ok()?, canonical_path(input).ok()?);
    if o == i {
        Some("is")
    } else if o.starts_with(&i) {
        Some("is inside")
    } else if i.starts_with(&o) {
        Some("contains")
    } else {
        None
    }
}

/// What kind of file system entry `path` is, for messages: `None` when it does not exist,
/// else "a directory", "a regular file", "a character device", ... (links followed).
pub fn file_kind(path: &Path) -> Option<&'static str> {
    let ft = std::fs::metadata(path).ok()?.file_type();
    Some(if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else {
        match kind_name(&ft) {
            "not a regular file" => "not a regular file nor a directory",
            kind => kind,
        }
    })
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

    #[test]
    fn paths_are_compared_resolved() {
        let d = TempDir::new();
        let run = d.0.join("run");
        std::fs::create_dir_all(run.join("best/encoder")).expect("mkdir");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&run, d.0.join("link")).expect("symlink");
        let real = canonical_path(&run).expect("canonical");
        // Not existing yet, with `.` and `..` on the way.
        assert_eq!(
            canonical_path(&d.0.join("run/new/../best/./x/y")).expect("canonical"),
            real.join("best/x/y")
        );
        assert_eq!(overlap(&run, &run.join("best")), Some("contains"));
        assert_eq!(
            overlap(&run.join("best/encoder"), &run.join("best")),
            Some("is inside")
        );
        assert_eq!(
            overlap(&run.join("best/../best"), &run.join("best")),
            Some("is")
        );
        assert_eq!(overlap(&d.0.join("bundle"), &run.join("best")), None);
        assert_eq!(
            overlap(&d.0.join("run2"), &run),
            None,
            "a shared prefix is not inside"
        );
        #[cfg(unix)]
        assert_eq!(
            overlap(&d.0.join("link"), &run.join("best")),
            Some("contains")
        );
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporaries() {
        let d = TempDir::new();
        let p = d.0.join("a.json");
        write_atomic(&p, b"first").expect("write");
        write_atomic(&p, b"second").expect("overwrite");
        assert_eq!(std::fs::read(&p).expect("read"), b"second");
        let names: Vec<_> = std::fs::read_dir(&d.0)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["a.json"], "no temporary left behind");
        // A failed write (no such directory) leaves nothing.
        let e = write_atomic(&d.0.join("missing/a.json"), b"x").expect_err("no directory");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // Renaming over a directory fails; the temporary is removed and the directory kept.
        std::fs::create_dir(d.0.join("sub")).expect("mkdir");
        write_atomic(&d.0.join("sub"), b"x").expect_err("a directory");
        assert!(d.0.join("sub").is_dir());
        assert_eq!(std::fs::read_dir(&d.0).expect("list").count(), 2);
    }

    #[test]
    fn file_digests_are_bounded() {
        let d = TempDir::new();
        let p = d.0.join("a");
        std::fs::write(&p, b"abc").expect("write");
        let digest = sha256_file(&p, 3).expect("hash");
        assert_eq!(digest.len, 3);
        assert_eq!(
            digest.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_file(&p, u64::MAX).expect("hash"), digest);
        let e = sha256_file(&p, 2).expect_err("over the bound");
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert!(sha256_file(&d.0, 10).is_err(), "a directory");
        assert_eq!(hex(&[0, 0xab, 0x7f]), "00ab7f");
    }

    #[test]
    fn directories_are_replaced_whole() {
        let d = TempDir::new();
        let dir = d.0.join("out");
        let fill = |name: &str, text: &str| {
            let tmp = d.0.join(name);
            std::fs::create_dir_all(tmp.join("sub")).expect("mkdir");
            std::fs::write(tmp.join("sub/f"), text).expect("write");
            tmp
        };
        // Into an empty place, then over a previous copy.
        replace_dir(&fill(".out.tmp-1", "one"), &dir).expect("first");
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/f")).expect("read"),
            "one"
        );
        replace_dir(&fill(".out.tmp-2", "two"), &dir).expect("second");
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/f")).expect("read"),
            "two"
        );
        let names: Vec<_> = std::fs::read_dir(&d.0)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["out"], "no temporary nor old copy left behind");
        assert_eq!(resolve_replaced(&dir), dir);
        // A crash between the two renames leaves only `.out.old`, which is found.
        std::fs::rename(&dir, d.0.join(".out.old")).expect("rename");
        assert_eq!(resolve_replaced(&dir), d.0.join(".out.old"));
        // A failed rename (the temporary is gone) puts the previous copy back.
        replace_dir(&fill(".out.tmp-3", "three"), &dir).expect("over a crash");
        let e = replace_dir(&d.0.join(".out.tmp-missing"), &dir).expect_err("no temporary");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/f")).expect("read"),
            "three"
        );
    }

    #[test]
    fn stale_temporaries_of_gone_processes_are_removed() {
        let d = TempDir::new();
        let mut gone = std::process::Command::new("true").spawn().expect("spawn");
        let dead = gone.id();
        gone.wait().expect("wait");
        let own = std::process::id();
        for name in [
            format!(".a.tmp-{dead}-0"),
            format!(".a.tmp-{own}-0"),
            ".a.tmp-x".to_string(),
        ] {
            std::fs::write(d.0.join(name), b"x").expect("write");
        }
        std::fs::create_dir(d.0.join(format!(".a.tmp-{dead}"))).expect("mkdir");
        let found = remove_stale(&d.0, ".a.tmp-");
        if process_alive(dead).is_none() {
            return; // No /proc: only entries older than STALE_AGE would go.
        }
        let paths: Vec<_> = found.iter().map(|s| s.path.clone()).collect();
        assert_eq!(
            paths,
            [
                d.0.join(format!(".a.tmp-{dead}")),
                d.0.join(format!(".a.tmp-{dead}-0"))
            ]
        );
        assert!(found.iter().all(|s| s.error.is_none() && s.pid == dead));
        assert!(d.0.join(format!(".a.tmp-{own}-0")).exists());
        assert!(d.0.join(".a.tmp-x").exists());
    }

    #[test]
    fn file_kinds_are_named() {
        let d = TempDir::new();
        assert_eq!(file_kind(&d.0), Some("a directory"));
        assert_eq!(file_kind(&d.0.join("none")), None);
        std::fs::write(d.0.join("f"), b"").expect("write");
        assert_eq!(file_kind(&d.0.join("f")), Some("a regular file"));
        #[cfg(unix)]
        assert_eq!(
            file_kind(Path::new("/dev/null")),
            Some("a character device")
        );
    }
}
