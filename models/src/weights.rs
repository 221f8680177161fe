//! Checkpoint reading: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`),
//! and PyTorch pickles (`pytorch_model.bin`, the original recipe's `.pth`).
//!
//! Safetensors files are memory-mapped (the `safetensors` crate validates the header and the
//! offsets). Each tensor is copied out of the map exactly once, when a model asks for it, and
//! the pages it came from are then released (`madvise(MADV_DONTNEED)`), so loading holds one copy
//! of the weights, not two. PyTorch pickles go through candle's pickle reader, which executes
//! nothing; what it would allocate is bounded first (`pth_check`: strings, copies of
//! memoised objects, nesting, each tensor's data against its storage), and its panics on
//! hostile input are caught and turned into errors.
//!
//! [`Weights`] also remembers which tensors were taken, so that a loader can list the tensors a
//! checkpoint has and the model did not use ([`Weights::unused`]), and keeps the first typed error
//! (wrong shape, missing tensor) so that messages name the file, the tensor and both shapes.

use std::collections::{BTreeMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// File names of a Hugging Face checkpoint, in the order they are looked for.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// The index of a sharded safetensors checkpoint.
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";
/// A PyTorch pickle checkpoint.
pub const PYTORCH_FILE: &str = "pytorch_model.bin";

/// Where a tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    /// Index into the file list.
    file: usize,
    shape: Vec<usize>,
    /// For safetensors: the dtype and the absolute byte range in the file.
    st: Option<(safetensors::Dtype, usize, usize)>,
}

enum Files {
    Safetensors(Vec<(PathBuf, memmap2::Mmap)>),
    Pth(
        PathBuf,
        Box<candle_core::pickle::PthTensors>,
        crate::pth_check::Archive,
    ),
}

struct Inner {
    /// The directory or file the weights were opened from, for messages.
    source: PathBuf,
    files: Files,
    entries: BTreeMap<String, Entry>,
    used: Mutex<HashSet<String>>,
    first_error: Mutex<Option<Error>>,
}

/// An opened checkpoint: one or several files, tensors read on demand.
///
/// Cheap to clone (shared). Use [`Weights::var_builder`] to build a model from it.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("source", &self.inner.source)
            .field("tensors", &self.inner.entries.len())
            .finish()
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadWeights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "the reader panicked".to_string()
    }
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// A tensor's entry in a safetensors header.
#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Which tensor of the safetensors file `bytes` does not fit its data, and how: its offsets
/// run backwards or past the end of the data, hold other than its dtype and shape need, or
/// overlap another tensor's; or which bytes belong to no tensor. `None` when the header
/// cannot be parsed or shows none of these (the `safetensors` crate's message then stands).
fn offsets_problem(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = bytes.get(8..n.checked_add(8)?)?;
    let data_len = bytes.len() - 8 - n;
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut tensors = Vec::with_capacity(map.len());
    for (name, value) in map {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(value).ok()?;
        tensors.push((name, entry));
    }
    // Each tensor on its own (in name order: the first bad one is always the same).
    for (name, t) in &tensors {
        let (start, end) = t.data_offsets;
        if end < start {
            return Some(format!(
                "tensor `{name}`: its data_offsets [{start}, {end}] end before they start"
            ));
        }
        if end > data_len {
            return Some(format!(
                "tensor `{name}`: its data_offsets [{start}, {end}] reach past the end of the \
                 data ({data_len} bytes)"
            ));
        }
        let need = t
            .shape
            .iter()
            .try_fold(t.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
            .map(|bits| bits.div_ceil(8));
        match need {
            None => {
                return Some(format!(
                    "tensor `{name}`: its shape {:?} has more elements than can be addressed",
                    t.shape
                ))
            }
            Some(need) if need != end - start => {
                return Some(format!(
                    "tensor `{name}` of dtype {:?} and shape {:?} needs {need} bytes, its \
                     data_offsets [{start}, {end}] hold {}",
                    t.dtype,
                    t.shape,
                    end - start
                ))
            }
            Some(_) => {}
        }
    }
    // Together: the tensors must tile the data, without overlaps or holes.
    tensors.sort_by(|a, b| (a.1.data_offsets, &a.0).cmp(&(b.1.data_offsets, &b.0)));
    let mut covered = 0usize;
    let mut prev: Option<&(String, HeaderEntry)> = None;
    for t in &tensors {
        let (start, end) = t.1.data_offsets;
        if start < covered {
            if let Some((other, o)) = prev {
                let (os, oe) = o.data_offsets;
                return Some(format!(
                    "tensor `{}`: its data_offsets [{start}, {end}] overlap those of tensor \
                     `{other}` [{os}, {oe}]",
                    t.0
                ));
            }
        }
        if start > covered {
            return Some(format!(
                "bytes {covered}..{start} of the data belong to no tensor (the next is `{}`)",
                t.0
            ));
        }
        covered = end;
        prev = Some(t);
    }
    (covered != data_len).then(|| {
        format!(
            "bytes {covered}..{data_len} of the data, after the last tensor, belong to no tensor"
        )
    })
}

/// Refuses a PyTorch zip checkpoint that records a byte order other than little-endian in
/// its `<archive>/byteorder` entry (PyTorch writes it since 1.13; files without it are
/// little-endian). candle's reader takes every tensor's bytes as little-endian, so a
/// big-endian file would load as garbage values.
fn check_byte_order(path: &Path) -> Result<()> {
    use std::io::Read;
    let file = crate::files::open_regular(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(path, format!("not a readable PyTorch checkpoint ({e})")))?;
    let names: Vec<Vec<u8>> = zip
        .file_names_raw()
        .filter(|n| {
            let mut parts = n.split(|&b| b == b'/');
            matches!(
                (parts.next(), parts.next(), parts.next()),
                (Some(b"byteorder"), None, _) | (Some(_), Some(b"byteorder"), None)
            )
        })
        .map(<[u8]>::to_vec)
        .collect();
    for raw in names {
        let name = String::from_utf8_lossy(&raw).into_owned();
        let entry = zip
            .by_name_raw(&raw)
            .map_err(|e| bad(path, format!("cannot read its entry `{name}` ({e})")))?;
        let mut value = Vec::new();
        entry
            .take(64)
            .read_to_end(&mut value)
            .map_err(|e| bad(path, format!("cannot read its entry `{name}` ({e})")))?;
        let value = String::from_utf8_lossy(&value);
        match value.trim() {
            "little" => {}
            "big" => {
                return Err(bad(
                    path,
                    format!(
                        "its tensors are stored big-endian (`{name}` says \"big\"), and only \
                         little-endian PyTorch checkpoints can be read; load it with PyTorch \
                         and save it again on a little-endian machine"
                    ),
                ))
            }
            other => {
                return Err(bad(
                    path,
                    format!(
                        "unknown byte order {other:?} in its entry `{name}` (expected \
                         \"little\")"
                    ),
                ))
            }
        }
    }
    Ok(())
}

impl Weights {
    /// Opens the checkpoint in a Hugging Face model directory: `model.safetensors`, else
    /// `model.safetensors.index.json` and its shards, else `pytorch_model.bin`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let st = dir.join(SAFETENSORS_FILE);
        if st.is_file() {
            return Self::from_safetensors(&[st], dir);
        }
        let index = dir.join(SAFETENSORS_INDEX_FILE);
        if index.is_file() {
            return Self::from_index(&index);
        }
        let bin = dir.join(PYTORCH_FILE);
        if bin.is_file() {
            return Self::from_pth(&bin);
        }
        Err(Error::MissingFile {
            path: dir.to_path_buf(),
            what: format!(
                "model weights: none of {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE}, {PYTORCH_FILE}"
            ),
        })
    }

    /// Opens one weight file, by its content: safetensors, a safetensors index, or a PyTorch
    /// zip pickle (`.bin`, `.pth`, `.pt`).
    pub fn from_file(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::from_dir(path);
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.ends_with(".index.json") {
            return Self::from_index(path);
        }
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = crate::files::open_regular(path).map_err(|e| Error::io(path, e))?;
            let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
            if n < 4 {
                return Err(bad(path, "file too short to be a checkpoint"));
            }
        }
        if &magic == b"PK\x03\x04" {
            Self::from_pth(path)
        } else {
            let dir = path.parent().unwrap_or(Path::new("."));
            Self::from_safetensors(&[path.to_path_buf()], dir)
        }
    }

    fn from_index(index: &Path) -> Result<Self> {
        let text = crate::files::read_text_bounded(index, crate::files::TEXT_FILE_MAX_BYTES)
            .map_err(|e| Error::io(index, e))?;
        let idx: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index.to_path_buf(),
            source: e,
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<String> = idx.weight_map.values().cloned().collect();
        shards.sort();
        shards.dedup();
        let mut paths = Vec::with_capacity(shards.len());
        for s in &shards {
            // Shards must sit beside the index: no path components.
            if s.contains('/') || s.contains('\\') || s == ".." {
                return Err(bad(
                    index,
                    format!("shard name `{s}` is not a plain file name"),
                ));
            }
            let p = dir.join(s);
            if !p.is_file() {
                return Err(Error::MissingFile {
                    path: p,
                    what: format!("shard listed in {}", index.display()),
                });
            }
            paths.push(p);
        }
        let w = Self::from_safetensors(&paths, index)?;
        for (name, file) in &idx.weight_map {
            let Some(e) = w.inner.entries.get(name) else {
                return Err(bad(
                    index,
                    format!("tensor `{name}` is listed in the index but not in {file}"),
                ));
            };
            if let Files::Safetensors(files) = &w.inner.files {
                let actual = files[e.file].0.file_name().map(|n| n.to_string_lossy());
                if actual.as_deref() != Some(file.as_str()) {
                    return Err(bad(
                        index,
                        format!("tensor `{name}` is listed in {file} but found elsewhere"),
                    ));
                }
            }
        }
        Ok(w)
    }

    fn from_safetensors(paths: &[PathBuf], source: &Path) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = crate::files::open_regular(p).map_err(|e| Error::io(p, e))?;
            // SAFETY: the map is read-only; a file changed underneath us by another process
            // could change tensor values, which is the documented caveat of memory-mapping
            // weights, as in candle and safetensors themselves.
            let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(p, e))?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                    // The crate's offset errors name whichever tensor follows a gap, often a
                    // sound neighbour of the bad one: say which tensor is at fault when the
                    // header tells.
                    let msg = match offsets_problem(&mmap) {
                        Some(why) => format!("not a valid safetensors file: {why}"),
                        None => format!("not a valid safetensors file ({e})"),
                    };
                    bad(p, msg)
                })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                if entries.contains_key(&name) {
                    return Err(bad(p, format!("tensor `{name}` appears in two shards")));
                }
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        shape: info.shape.clone(),
                        st: Some((info.dtype, base + start, base + end)),
                    },
                );
            }
            files.push((p.clone(), mmap));
        }
        Ok(Self::new(source, Files::Safetensors(files), entries))
    }

    fn from_pth(path: &Path) -> Result<Self> {
        check_byte_order(path)?;
        let archive = crate::pth_check::scan(path)
            .map_err(|e| bad(path, format!("not a readable PyTorch checkpoint: {e}")))?;
        let open = |key: Option<&str>| {
            catch_unwind(AssertUnwindSafe(|| {
                candle_core::pickle::PthTensors::new(path, key)
            }))
            .map_err(|p| {
                bad(
                    path,
                    format!("malformed PyTorch file: {}", panic_message(p.as_ref())),
                )
            })?
            .map_err(|e| bad(path, format!("not a readable PyTorch checkpoint ({e})")))
        };
        let mut pth = open(None)?;
        // Some trainers nest the state dict: {"state_dict": {...}} or {"model": {...}}.
        for key in ["state_dict", "model"] {
            if !pth.tensor_infos().is_empty() {
                break;
            }
            if let Ok(p) = open(Some(key)) {
                pth = p;
            }
        }
        if pth.tensor_infos().is_empty() {
            return Err(bad(path, "no tensors found in the PyTorch checkpoint"));
        }
        let entries = pth
            .tensor_infos()
            .iter()
            .map(|(name, info)| {
                (
                    name.clone(),
                    Entry {
                        file: 0,
                        shape: info.layout.shape().dims().to_vec(),
                        st: None,
                    },
                )
            })
            .collect();
        Ok(Self::new(
            path,
            Files::Pth(path.to_path_buf(), Box::new(pth), archive),
            entries,
        ))
    }

    fn new(source: &Path, files: Files, entries: BTreeMap<String, Entry>) -> Self {
        Self {
            inner: Arc::new(Inner {
                source: source.to_path_buf(),
                files,
                entries,
                used: Mutex::new(HashSet::new()),
                first_error: Mutex::new(None),
            }),
        }
    }

    /// The directory or file these weights were opened from.
    pub fn source(&self) -> &Path {
        &self.inner.source
    }

    /// All tensor names in the checkpoint, sorted.
    pub fn names(&self) -> Vec<String> {
        self.inner.entries.keys().cloned().collect()
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.inner.entries.contains_key(name)
    }

    /// The shape of a tensor as stored, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner.entries.get(name).map(|e| e.shape.clone())
    }

    /// The file a tensor is stored in (for messages).
    pub fn file_of(&self, name: &str) -> PathBuf {
        match (&self.inner.files, self.inner.entries.get(name)) {
            (Files::Safetensors(files), Some(e)) => files[e.file].0.clone(),
            (Files::Pth(p, ..), _) => p.clone(),
            _ => self.inner.source.clone(),
        }
    }

    /// A candle `VarBuilder` over these weights, converting to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Tensor names that no model has taken yet, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self
            .inner
            .used
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default();
        self.inner
            .entries
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// Turns a candle error from building a model on these weights into the typed error that
    /// caused it (wrong shape, missing tensor, unreadable data) when one was recorded.
    pub fn explain(&self, err: candle_core::Error) -> Error {
        match self.inner.first_error.lock() {
            Ok(mut slot) => slot.take().unwrap_or(Error::Candle(err)),
            Err(_) => Error::Candle(err),
        }
    }

    fn record(&self, e: Error) -> candle_core::Error {
        let msg = e.to_string();
        if let Ok(mut slot) = self.inner.first_error.lock() {
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        candle_core::Error::Msg(msg)
    }

    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(entry) = self.inner.entries.get(name) else {
            return Err(self.record(Error::MissingTensor {
                path: self.inner.source.clone(),
                name: name.to_string(),
            }));
        };
        let tensor = match &self.inner.files {
            Files::Safetensors(files) => {
                let (path, mmap) = &files[entry.file];
                let (st_dtype, start, end) = entry.st.ok_or_else(|| {
                    self.record(bad(path, format!("tensor `{name}` has no data range")))
                })?;
                let data = mmap.get(start..end).ok_or_else(|| {
                    self.record(bad(path, format!("tensor `{name}` lies past the end")))
                })?;
                let view =
                    safetensors::tensor::TensorView::new(st_dtype, entry.shape.clone(), data)
                        .map_err(|e| self.record(bad(path, format!("tensor `{name}`: {e}"))))?;
                let t = candle_core::safetensors::Load::load(&view, dev).map_err(|e| {
                    self.record(bad(path, format!("tensor `{name}` cannot be read: {e}")))
                })?;
                // The bytes are copied into `t`: release the mapped pages (re-read from the
                // file if ever touched again), so that peak memory holds one copy.
                // SAFETY: the map is a read-only private file mapping and no slice of it
                // outlives this function; after MADV_DONTNEED its pages read the file again.
                #[cfg(unix)]
                unsafe {
                    let _ = mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    );
                }
                t
            }
            Files::Pth(path, pth, archive) => {
                // candle allocates the tensor from its shape before reading its data.
                if let Some(info) = pth.tensor_infos().get(name) {
                    archive
                        .check_tensor(
                            name,
                            &info.path,
                            info.layout.dims(),
                            info.dtype.size_in_bytes(),
                            info.layout.start_offset(),
                        )
                        .map_err(|e| self.record(bad(path, e)))?;
                }
                let got = catch_unwind(AssertUnwindSafe(|| pth.get(name)))
                    .map_err(|p| {
                        self.record(bad(
                            path,
                            format!(
                                "tensor `{name}`: malformed data: {}",
                                panic_message(p.as_ref())
                            ),
                        ))
                    })?
                    .map_err(|e| self.record(bad(path, format!("tensor `{name}`: {e}"))))?;
                match got {
                    Some(t) => t.to_device(dev)?,
                    None => {
                        return Err(self.record(Error::MissingTensor {
                            path: path.clone(),
                            name: name.to_string(),
                        }))
                    }
                }
            }
        };
        if let Ok(mut u) = self.inner.used.lock() {
            u.insert(name.to_string());
        }
        tensor.to_dtype(dtype)
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(e) = self.inner.entries.get(name) {
            if e.shape != s.dims() {
                return Err(self.record(Error::TensorShape {
                    path: self.file_of(name),
                    name: name.to_string(),
                    expected: s.dims().to_vec(),
                    got: e.shape.clone(),
                }));
            }
        }
        self.read(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn weights_and_configs_are_read_only_from_regular_files() {
        // A device as a checkpoint was read (or mapped) as if it were one.
        let e = Weights::from_file(Path::new("/dev/zero")).expect_err("a device");
        assert!(e.to_string().contains("character device"), "{e}");
        let e = crate::nn::read_json::<serde_json::Value>(Path::new("/dev/zero"))
            .expect_err("a device");
        assert!(e.to_string().contains("character device"), "{e}");
        // A FIFO: refused without waiting for a writer.
        let d = crate::testutil::TempDir::new();
        let p = d.0.join("model.safetensors");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let e = Weights::from_file(&p).expect_err("a FIFO");
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    /// A safetensors file of three f32 tensors `a`, `b`, `c` of 4 values each, with `b` at
    /// `b_offsets` and `data_len` bytes of data.
    fn safetensors_with(dir: &Path, b_offsets: (usize, usize), data_len: usize) -> PathBuf {
        let header = format!(
            "{{\"a\":{{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}},\
             \"b\":{{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[{},{}]}},\
             \"c\":{{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[32,48]}}}}",
            b_offsets.0, b_offsets.1
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        let p = dir.join("model.safetensors");
        std::fs::write(&p, bytes).expect("write");
        p
    }

    #[test]
    fn safetensors_offset_errors_name_the_tensor_at_fault() {
        let d = crate::testutil::TempDir::new();
        // Sound: loads.
        let p = safetensors_with(&d.0, (16, 32), 48);
        Weights::from_file(&p).expect("a valid file");
        // `b` past the end of the data: the `safetensors` crate blamed `c`, the tensor after
        // the hole `b` left.
        for (b, data_len, says) in [
            (
                (48, 64),
                48,
                "tensor `b`: its data_offsets [48, 64] reach past the end",
            ),
            (
                (16, 24),
                48,
                "tensor `b` of dtype F32 and shape [4] needs 16 bytes",
            ),
            (
                (24, 16),
                48,
                "tensor `b`: its data_offsets [24, 16] end before",
            ),
            (
                (0, 16),
                48,
                "tensor `b`: its data_offsets [0, 16] overlap those of tensor `a`",
            ),
            ((32, 48), 48, "bytes 16..32 of the data belong to no tensor"),
            ((16, 32), 64, "bytes 48..64 of the data"),
        ] {
            let p = safetensors_with(&d.0, b, data_len);
            let e = Weights::from_file(&p).expect_err("bad offsets").to_string();
            assert!(e.contains(says), "{b:?}: {e}");
            assert!(!e.contains("`c`"), "{b:?}: {e}");
        }
    }

    /// A PyTorch zip of stored entries.
    fn zip_with(path: &Path, entries: &[(&str, &[u8])]) {
        use std::io::Write;
        let f = std::fs::File::create(path).expect("create");
        let mut w = zip::ZipWriter::new(f);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            w.start_file(*name, opts).expect("entry");
            w.write_all(data).expect("data");
        }
        w.finish().expect("finish");
    }

    #[test]
    fn big_endian_pth_is_refused() {
        let d = crate::testutil::TempDir::new();
        let p = d.0.join("model.pth");
        // Read as little-endian, its tensors were garbage.
        zip_with(
            &p,
            &[
                ("model/data.pkl", b"\x80\x02}q\x00."),
                ("model/byteorder", b"big"),
            ],
        );
        let e = Weights::from_file(&p).expect_err("big-endian").to_string();
        assert!(
            e.contains("model.pth") && e.contains("big-endian") && e.contains("model/byteorder"),
            "{e}"
        );
        zip_with(
            &p,
            &[
                ("model/data.pkl", b"\x80\x02}q\x00."),
                ("model/byteorder", b"middle"),
            ],
        );
        let e = Weights::from_file(&p).expect_err("unknown").to_string();
        assert!(e.contains("unknown byte order \"middle\""), "{e}");
        // "little" passes this check (the empty pickle then has no tensors).
        zip_with(
            &p,
            &[
                ("model/data.pkl", b"\x80\x02}q\x00."),
                ("model/byteorder", b"little"),
            ],
        );
        let e = Weights::from_file(&p).expect_err("no tensors").to_string();
        assert!(
            !e.contains("byte order") && !e.contains("big-endian"),
            "{e}"
        );
    }
}
