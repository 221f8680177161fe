//! Embeddings as a NumPy `.npy` file, where retrieval tools (`numpy.load`, FAISS, ...) read
//! them, with the image of each row in a JSON Lines file beside it.
//!
//! `EMB.npy` holds an `(n, d)` array of little-endian `float32` (`.npy` format version 1.0:
//! the magic `\x93NUMPY`, version bytes 1 0, a 2-byte little-endian header length, the header
//! dictionary `{'descr': '<f4', 'fortran_order': False, 'shape': (n, d), }` padded with spaces
//! and ended by a newline so that the data starts at a multiple of 64 bytes, then the rows).
//! `EMB.images.jsonl` (the `.npy` name with `.images.jsonl` in place of `.npy`) has one line
//! per row, in row order, `{"image": KEY, "row": i}` (with `"image_hex"` for a name that is
//! not UTF-8, as in the job records); after them, one `{"image", "error"}` line per image that
//! failed, in job order. Failed images have no row: the array holds only the embeddings.
//!
//! Nothing is written in place: rows stream to a temporary file beside `EMB.npy` (whose header
//! is reserved for the most rows the job can have and rewritten with the final count at the
//! end, padded to the same length), and both files are renamed into place when the job ends;
//! a job that stops early leaves no file behind (it is not resumable: a resumable job writes
//! JSON Lines).

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::catalog::Record;

/// The `.npy` magic string.
pub const MAGIC: &[u8] = b"\x93NUMPY";

/// Whether `path` names a `.npy` file (by its extension, in any letter case).
pub fn is_npy(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
}

/// The file of row images beside `npy`: `emb.npy` → `emb.images.jsonl`.
pub fn order_path(npy: &Path) -> PathBuf {
    let stem = npy.file_stem().unwrap_or_default();
    let mut name = stem.to_os_string();
    name.push(".images.jsonl");
    npy.with_file_name(name)
}

/// The whole `.npy` preamble (magic, version, header length, header) of a `rows` x `dim`
/// `float32` array, padded with spaces to `len` bytes when given (it must be at least the
/// unpadded length), else to the next multiple of 64.
pub fn header(rows: usize, dim: usize, len: Option<usize>) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    // magic (6) + version (2) + header length (2) + dict + newline, padded with spaces.
    let bare = MAGIC.len() + 4 + dict.len() + 1;
    let total = len.unwrap_or(bare.div_ceil(64) * 64).max(bare);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    let header_len = (total - MAGIC.len() - 4) as u16;
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// An `.npy` output being written (see the module documentation).
pub struct NpyOutput {
    path: PathBuf,
    order_path: PathBuf,
    tmp: PathBuf,
    order_tmp: PathBuf,
    data: BufWriter<File>,
    order: BufWriter<File>,
    /// The failures' lines, written after the rows'.
    failures: Vec<String>,
    dim: usize,
    rows: usize,
    max_rows: usize,
    header_len: usize,
    finished: bool,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl NpyOutput {
    /// Starts `path` (and its images file) for at most `max_rows` rows of `dim` numbers:
    /// creates the temporary files beside them. The final files are not touched until
    /// [`NpyOutput::finish`].
    pub fn create(path: &Path, dim: usize, max_rows: usize) -> std::io::Result<Self> {
        if let Ok(m) = std::fs::metadata(path) {
            if !m.is_file() {
                return Err(std::io::Error::other(format!(
                    "{}: not a regular file; a .npy output is written to a new file and \
                     renamed into place",
                    path.display()
                )));
            }
        }
        let order_path = order_path(path);
        // What an earlier job killed while writing (a second Ctrl-C, a crash) left here.
        for p in [path, order_path.as_path()] {
            for stale in remove_stale_temps(p) {
                eprintln!("moda-sdk: {stale}");
            }
        }
        let tmp = temp_beside(path);
        let order_tmp = temp_beside(&order_path);
        let data = File::create(&tmp).map_err(err(&tmp))?;
        let order = match File::create(&order_tmp) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(err(&order_tmp)(e));
            }
        };
        let reserved = header(max_rows, dim, None);
        let mut out = Self {
            path: path.to_path_buf(),
            order_path,
            tmp,
            order_tmp,
            data: BufWriter::new(data),
            order: BufWriter::new(order),
            failures: Vec::new(),
            dim,
            rows: 0,
            max_rows,
            header_len: reserved.len(),
            finished: false,
        };
        out.data.write_all(&reserved).map_err(err(&out.tmp))?;
        Ok(out)
    }

    /// The `.npy` file this writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file of row images this writes.
    pub fn images_path(&self) -> &Path {
        &self.order_path
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Adds an embedding record as the next row (and its image to the images file), or a
    /// failure to the failures listed after the rows. A description is an error.
    pub fn push(&mut self, record: &Record) -> std::io::Result<()> {
        match record {
            Record::Embedding {
                image,
                image_hex,
                embedding,
            }
            | Record::Description {
                image,
                image_hex,
                embedding: Some(embedding),
                ..
            } => self.push_row(image, image_hex.as_deref(), embedding),
            Record::Error { .. } => {
                self.failures.push(record.to_json());
                Ok(())
            }
            Record::Description {
                image,
                embedding: None,
                ..
            } => Err(std::io::Error::other(format!(
                "{image}: a description without an embedding (`describe` without --embed) \
                 cannot go into a .npy array"
            ))),
        }
    }

    /// One image's row, and its line in the images file.
    fn push_row(
        &mut self,
        image: &str,
        image_hex: Option<&str>,
        embedding: &[f32],
    ) -> std::io::Result<()> {
        if embedding.len() != self.dim {
            return Err(std::io::Error::other(format!(
                "{image}: an embedding of {} numbers, not {}",
                embedding.len(),
                self.dim
            )));
        }
        if self.rows == self.max_rows {
            return Err(std::io::Error::other(format!(
                "more than the {} rows reserved in {}",
                self.max_rows,
                self.path.display()
            )));
        }
        let mut bytes = Vec::with_capacity(4 * self.dim);
        for x in embedding {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        self.data.write_all(&bytes).map_err(err(&self.tmp))?;
        let mut line = serde_json::json!({ "image": image, "row": self.rows });
        if let Some(hex) = image_hex {
            line["image_hex"] = serde_json::json!(hex);
        }
        writeln!(self.order, "{line}").map_err(err(&self.order_tmp))?;
        self.rows += 1;
        Ok(())
    }

    /// Writes the final header and the failures, flushes both files to disk and renames them
    /// into place (the images file first, so that a `.npy` in place always has its images
    /// beside it).
    pub fn finish(mut self) -> std::io::Result<()> {
        let head = header(self.rows, self.dim, Some(self.header_len));
        debug_assert_eq!(head.len(), self.header_len);
        self.data.flush().map_err(err(&self.tmp))?;
        let file = self.data.get_mut();
        file.seek(SeekFrom::Start(0)).map_err(err(&self.tmp))?;
        file.write_all(&head).map_err(err(&self.tmp))?;
        file.sync_all().map_err(err(&self.tmp))?;
        for line in std::mem::take(&mut self.failures) {
            writeln!(self.order, "{line}").map_err(err(&self.order_tmp))?;
        }
        self.order.flush().map_err(err(&self.order_tmp))?;
        self.order
            .get_ref()
            .sync_all()
            .map_err(err(&self.order_tmp))?;
        std::fs::rename(&self.order_tmp, &self.order_path).map_err(err(&self.order_path))?;
        std::fs::rename(&self.tmp, &self.path).map_err(err(&self.path))?;
        self.finished = true;
        sync_dir(&self.path);
        Ok(())
    }
}

impl Drop for NpyOutput {
    /// An output dropped before [`NpyOutput::finish`] (an error, Ctrl-C) leaves nothing.
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
            let _ = std::fs::remove_file(&self.order_tmp);
        }
    }
}

/// Removes the temporaries of `path` ([`temp_beside`]) that processes no longer running left
/// behind, and says which.
pub fn remove_stale_temps(path: &Path) -> Vec<moda_models::files::StaleTemporary> {
    let parent = path.parent().unwrap_or(Path::new(""));
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".tmp-");
    match prefix.to_str() {
        Some(prefix) => moda_models::files::remove_stale(parent, prefix),
        None => Vec::new(),
    }
}

/// A temporary name beside `path`, unique to this process: `.NAME.tmp-PID`.
pub fn temp_beside(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Flushes the directory of `path` so that a rename into it survives a crash (best effort:
/// not every system can open a directory for that).
pub fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_of_a_killed_job_are_removed_and_a_running_ones_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let npy = dir.path().join("emb.npy");
        let mut dead = std::process::Command::new("true").spawn().expect("spawn");
        let dead_pid = dead.id();
        dead.wait().expect("wait");
        let mut live = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn");
        let name = |p: &Path, pid: u32| {
            let t = temp_beside(p);
            let own = format!("{}", std::process::id());
            let n = t.file_name().and_then(|n| n.to_str()).expect("name");
            t.with_file_name(n.replace(&own, &pid.to_string()))
        };
        let stale = [name(&npy, dead_pid), name(&order_path(&npy), dead_pid)];
        let running = name(&npy, live.id());
        for p in stale.iter().chain([&running]) {
            std::fs::write(p, b"partial").expect("write");
        }
        let out = NpyOutput::create(&npy, 4, 2).expect("create");
        drop(out);
        for p in &stale {
            assert!(!p.exists(), "{} left", p.display());
        }
        assert!(running.exists(), "a running job's temporary was removed");
        let _ = live.kill();
        let _ = live.wait();
    }

    #[test]
    fn headers_are_numpy_1_0_and_aligned() {
        let h = header(3, 4, None);
        // 10 bytes of preamble and a 60-byte dictionary with its newline: 128 bytes.
        assert_eq!(h.len(), 128);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize, 128 - 10);
        let text = std::str::from_utf8(&h[10..]).expect("ok");
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"));
        assert!(text.ends_with(" \n"));
        // Reserved for a larger count, the final header keeps the length.
        let big = header(1_000_000, 512, None);
        let small = header(7, 512, Some(big.len()));
        assert_eq!(small.len(), big.len());
        assert!(std::str::from_utf8(&small[10..])
            .expect("ok")
            .contains("'shape': (7, 512), }"));
    }

    #[test]
    fn the_images_file_sits_beside() {
        assert_eq!(
            order_path(Path::new("out/emb.npy")),
            Path::new("out/emb.images.jsonl")
        );
        assert!(is_npy(Path::new("x.NPY")));
        assert!(!is_npy(Path::new("x.jsonl")));
    }
}
