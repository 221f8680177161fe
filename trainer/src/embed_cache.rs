//! The frozen encoder's image embeddings, computed once and kept on disk.
//!
//! The original recipe spent most of its 104 minutes recomputing FashionCLIP for every image in
//! every epoch. With the encoder frozen an embedding depends only on the
//! image bytes, the encoder weights and the preprocessing, so it is stored under a key made of
//! exactly those three, and reused across epochs and runs.
//!
//! # Key
//! - **Image**: SHA-256 of the file's bytes (not its path: a renamed or copied image hits, an
//!   edited one misses).
//! - **Encoder**: an [`EncoderFingerprint`]. [`EncoderFingerprint::from_dir`] hashes the
//!   *content* of `config.json` and of every weight file of the model directory (names, sizes
//!   and SHA-256 of the bytes). Sizes and modification times would be cheaper but miss a
//!   re-trained checkpoint written over the old one with the same size, and hit-or-miss on
//!   copies; hashing FashionCLIP's 600 MB takes a second or two once per run, which is cheap
//!   next to encoding thousands of images. Anything else that changes the output (a different
//!   dtype on the GPU) can be folded in with [`EncoderFingerprint::with_tag`].
//! - **Preprocessing**: the [`ImageProcessorConfig`](moda_models::preprocess::ImageProcessorConfig) as JSON.
//!
//! # Layout
//! `DIR/<namespace>/meta.json` describes one (encoder, preprocessing) pair, where `namespace`
//! is the first 32 hex digits of SHA-256 over the format version, the fingerprint and the
//! preprocessing JSON. Each embedding is one small safetensors file,
//! `DIR/<namespace>/<h[..2]>/<h>.safetensors` with `h` the image's SHA-256: a tensor
//! `embedding` (`f32`, `[projection_dim]`) and metadata `format`, `namespace`, `image_sha256`
//! and `data_sha256` (SHA-256 of the tensor bytes). One file per entry needs no index to keep
//! consistent, lets several processes share a cache, and makes every write atomic (a temporary
//! file renamed over the entry). An entry is trusted only if it parses, its metadata matches,
//! its shape is `[projection_dim]`, the data hash matches and every value is finite; anything
//! else is recomputed and rewritten.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use moda_models::files::{self, hex};
use moda_models::preprocess::{load_image, ImageLimits, ImageProcessor};
use moda_models::ClipVision;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The entry format; part of the namespace, so a new format never reads old entries.
pub const FORMAT: &str = "moda-embedding-v1";

/// The name of the tensor in each entry.
const TENSOR: &str = "embedding";

/// A frozen image encoder: `pixel_values [b, 3, h, w]` in, embeddings `[b, output_dim]` out.
/// Implemented by [`ClipVision`]; tests wrap it to count calls.
pub trait ImageEncoder {
    /// Encodes a batch of pixel values.
    fn encode(&self, pixel_values: &Tensor) -> Result<Tensor>;
    /// The embedding size.
    fn output_dim(&self) -> usize;
    /// The dtype the encoder takes its pixel values in (`F32` unless it runs in half
    /// precision).
    fn input_dtype(&self) -> DType {
        DType::F32
    }
}

impl ImageEncoder for ClipVision {
    fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.forward(pixel_values)?)
    }

    fn output_dim(&self) -> usize {
        self.config().projection_dim
    }
}

/// The identity of an encoder's weights (a hex string); see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EncoderFingerprint(String);

/// Files of a model directory that [`EncoderFingerprint::from_dir`] hashes besides
/// `config.json`: weights in any of the formats `moda_models::Weights` reads.
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".bin")
        || name.ends_with(".pth")
        || name.ends_with(".pt")
        || name == "model.safetensors.index.json"
}

/// The size and SHA-256 of a whole regular file (weights, images: no bound but the file's).
fn sha256_file(path: &Path) -> Result<files::FileDigest> {
    files::sha256_file(path, u64::MAX).map_err(|e| Error::io(path, e))
}

impl EncoderFingerprint {
    /// Hashes `config.json` and every weight file (`*.safetensors`, `*.bin`, `*.pth`, `*.pt`,
    /// `model.safetensors.index.json`) of a model directory, by content, in name order.
    /// Symbolic links (the Hugging Face cache's snapshots) are followed.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::Model(moda_models::Error::MissingFile {
                path: config,
                what: "encoder configuration (for the embedding cache's fingerprint)".into(),
            }));
        }
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| is_weight_file(n) && dir.join(n).is_file())
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(Error::Model(moda_models::Error::MissingFile {
                path: dir.to_path_buf(),
                what: "encoder weights (for the embedding cache's fingerprint)".into(),
            }));
        }
        let mut h = Sha256::new();
        h.update(b"moda encoder fingerprint v1\n");
        for name in std::iter::once("config.json".to_string()).chain(names) {
            let digest = sha256_file(&dir.join(&name))?;
            h.update(name.as_bytes());
            h.update(b"\0");
            h.update(digest.len.to_le_bytes());
            h.update(digest.sha256);
        }
        Ok(Self(hex(&h.finalize())))
    }

    /// A fingerprint of in-memory parts (e.g. the serialized weights of a randomly
    /// initialised encoder), hashed in order.
    pub fn from_parts(parts: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        h.update(b"moda encoder fingerprint v1 (parts)\n");
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        Self(hex(&h.finalize()))
    }

    /// This fingerprint combined with a tag for anything else that changes the encoder's
    /// output (e.g. `"bf16"`).
    pub fn with_tag(&self, tag: &str) -> Self {
        let mut h = Sha256::new();
        h.update(self.0.as_bytes());
        h.update(b"\0tag\0");
        h.update(tag.as_bytes());
        Self(hex(&h.finalize()))
    }

    /// The hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What one [`EmbeddingCache::get_or_compute_with_stats`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Images requested.
    pub images: usize,
    /// Distinct images (by content).
    pub unique: usize,
    /// Distinct images found in the cache.
    pub hits: usize,
    /// Distinct images encoded.
    pub computed: usize,
    /// Entries found but not trusted (unparsable, wrong shape or metadata, hash mismatch,
    /// non-finite values), recomputed.
    pub corrupt: usize,
    /// Encoder calls (batches).
    pub batches: usize,
}

/// The on-disk embedding cache; see the module documentation.
#[derive(Debug, Clone)]
pub struct EmbeddingCache {
    dir: PathBuf,
    fingerprint: EncoderFingerprint,
    limits: ImageLimits,
}

/// The default cache directory: `$MODA_CACHE_DIR/embeddings`, else
/// `$XDG_CACHE_HOME/moda/embeddings`, else `~/.cache/moda/embeddings`, else
/// `.moda-cache/embeddings`.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("MODA_CACHE_DIR") {
        return d.join("embeddings");
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return d.join("moda").join("embeddings");
    }
    if let Some(d) = env("HOME") {
        return d.join(".cache").join("moda").join("embeddings");
    }
    PathBuf::from(".moda-cache").join("embeddings")
}

/// [`files::write_atomic`] with this crate's error.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    files::write_atomic(path, bytes).map_err(|e| Error::io(path, e))
}

/// Runs `f` on every item, on up to `available_parallelism` threads; results in order.
pub(crate) fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| {
                let f = &f;
                s.spawn(move || c.iter().map(f).collect::<Vec<R>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}

impl EmbeddingCache {
    /// Opens (creating it if needed) a cache directory for the encoder with `fingerprint`.
    pub fn open(dir: impl Into<PathBuf>, fingerprint: EncoderFingerprint) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self {
            dir,
            fingerprint,
            limits: ImageLimits::default(),
        })
    }

    /// Uses these decoding limits for images (default [`ImageLimits::default`]).
    pub fn with_limits(mut self, limits: ImageLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The encoder fingerprint.
    pub fn fingerprint(&self) -> &EncoderFingerprint {
        &self.fingerprint
    }

    /// The namespace (a hex string) of this encoder with `processor`'s preprocessing.
    pub fn namespace(&self, processor: &ImageProcessor) -> Result<String> {
        let pre = serde_json::to_string(processor.config()).map_err(|e| Error::Cache {
            path: self.dir.clone(),
            msg: format!("cannot serialize the preprocessing config: {e}"),
        })?;
        let mut h = Sha256::new();
        h.update(FORMAT.as_bytes());
        h.update(b"\0");
        h.update(self.fingerprint.as_str().as_bytes());
        h.update(b"\0");
        h.update(pre.as_bytes());
        Ok(hex(&h.finalize())[..32].to_string())
    }

    /// The folder of this encoder with `processor`'s preprocessing.
    pub fn namespace_dir(&self, processor: &ImageProcessor) -> Result<PathBuf> {
        Ok(self.dir.join(self.namespace(processor)?))
    }

    fn entry_path(ns_dir: &Path, image_hash: &str) -> PathBuf {
        ns_dir
            .join(&image_hash[..2])
            .join(format!("{image_hash}.safetensors"))
    }

    /// Embeddings `[images.len(), output_dim]` (`f32`, on `device`) in the order of `images`:
    /// read from the cache where present and valid, else encoded in batches of `batch_size`
    /// and stored. `progress` advances by one per image encoded (its length is set to the
    /// number to encode); pass [`ProgressBar::hidden`] for none.
    ///
    /// A [`crate::data::Sample`] is `AsRef<Path>`, so `&catalog.samples` can be passed as is.
    /// An image that cannot be read or decoded is an error naming it (the catalog loader has
    /// already skipped those it found).
    pub fn get_or_compute<P, E>(
        &self,
        images: &[P],
        encoder: &E,
        processor: &ImageProcessor,
        device: &Device,
        batch_size: usize,
        progress: &ProgressBar,
    ) -> Result<Tensor>
    where
        P: AsRef<Path> + Sync,
        E: ImageEncoder + ?Sized,
    {
        self.get_or_compute_with_stats(images, encoder, processor, device, batch_size, progress)
            .map(|(t, _)| t)
    }

    /// [`EmbeddingCache::get_or_compute`], also returning what it did.
    pub fn get_or_compute_with_stats<P, E>(
        &self,
        images: &[P],
        encoder: &E,
        processor: &ImageProcessor,
        device: &Device,
        batch_size: usize,
        progress: &ProgressBar,
    ) -> Result<(Tensor, CacheStats)>
    where
        P: AsRef<Path> + Sync,
        E: ImageEncoder + ?Sized,
    {
        if images.is_empty() {
            return Err(Error::InvalidArgument(
                "no images to embed (empty list)".into(),
            ));
        }
        if batch_size == 0 {
            return Err(Error::InvalidArgument("batch size must be positive".into()));
        }
        let dim = encoder.output_dim();
        let ns = self.namespace(processor)?;
        let ns_dir = self.dir.join(&ns);
        std::fs::create_dir_all(&ns_dir).map_err(|e| Error::io(&ns_dir, e))?;
        self.write_meta(&ns_dir, processor, dim)?;

        // 1. Hash every image's bytes.
        let hashes: Vec<Result<String>> =
            par_map(images, |p| sha256_file(p.as_ref()).map(|d| d.hex()));
        let hashes = hashes.into_iter().collect::<Result<Vec<String>>>()?;

        // 2. Distinct images: look each up once.
        let mut unique: Vec<(String, usize)> = Vec::new(); // (hash, first index)
        let mut slot_of: HashMap<&str, usize> = HashMap::new();
        let mut slots = Vec::with_capacity(images.len());
        for (i, h) in hashes.iter().enumerate() {
            let slot = *slot_of.entry(h.as_str()).or_insert_with(|| {
                unique.push((h.clone(), i));
                unique.len() - 1
            });
            slots.push(slot);
        }
        let mut stats = CacheStats {
            images: images.len(),
            unique: unique.len(),
            ..CacheStats::default()
        };
        let looked_up: Vec<Lookup> = par_map(&unique, |(h, _)| {
            read_entry(&Self::entry_path(&ns_dir, h), &ns, h, dim)
        });
        let mut vectors: Vec<Option<Vec<f32>>> = Vec::with_capacity(unique.len());
        let mut todo: Vec<usize> = Vec::new(); // indices into `unique`
        for (u, l) in looked_up.into_iter().enumerate() {
            match l {
                Lookup::Hit(v) => {
                    stats.hits += 1;
                    vectors.push(Some(v));
                }
                Lookup::Absent => {
                    todo.push(u);
                    vectors.push(None);
                }
                Lookup::Corrupt => {
                    stats.corrupt += 1;
                    todo.push(u);
                    vectors.push(None);
                }
            }
        }

        // 3. Encode the rest in batches, storing each entry as it is computed.
        progress.set_length(todo.len() as u64);
        let (out_h, out_w) = processor.config().output_size();
        for batch in todo.chunks(batch_size) {
            let pixels: Vec<Result<Vec<f32>>> = par_map(batch, |&u| {
                let path = images[unique[u].1].as_ref();
                let img = load_image(path, &self.limits)?;
                processor.preprocess(&img).map_err(|e| match e {
                    moda_models::Error::Input(msg) => Error::Image {
                        path: path.to_path_buf(),
                        msg,
                    },
                    other => Error::Model(other),
                })
            });
            let mut flat = Vec::with_capacity(batch.len() * 3 * out_h * out_w);
            for p in pixels {
                flat.extend(p?);
            }
            let pixel_values = Tensor::from_vec(flat, (batch.len(), 3, out_h, out_w), device)?
                .to_dtype(encoder.input_dtype())?;
            let out = encoder.encode(&pixel_values)?;
            stats.batches += 1;
            if out.dims() != [batch.len(), dim] {
                return Err(Error::Cache {
                    path: self.dir.clone(),
                    msg: format!(
                        "the encoder returned shape {:?} for a batch of {}, expected [{}, {dim}]",
                        out.dims(),
                        batch.len(),
                        batch.len()
                    ),
                });
            }
            let rows: Vec<Vec<f32>> = out
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .to_vec2()?;
            for (&u, row) in batch.iter().zip(rows) {
                let h = &unique[u].0;
                write_entry(&Self::entry_path(&ns_dir, h), &ns, h, &row)?;
                vectors[u] = Some(row);
                stats.computed += 1;
            }
            progress.inc(batch.len() as u64);
        }

        // 4. Assemble in the order asked.
        let mut all = Vec::with_capacity(images.len() * dim);
        for &slot in &slots {
            match vectors.get(slot).and_then(|v| v.as_ref()) {
                Some(v) => all.extend_from_slice(v),
                None => {
                    return Err(Error::Cache {
                        path: self.dir.clone(),
                        msg: "internal error: an embedding was neither found nor computed".into(),
                    })
                }
            }
        }
        let t = Tensor::from_vec(all, (images.len(), dim), device)?;
        Ok((t, stats))
    }

    fn write_meta(&self, ns_dir: &Path, processor: &ImageProcessor, dim: usize) -> Result<()> {
        let path = ns_dir.join("meta.json");
        if path.is_file() {
            return Ok(());
        }
        let meta = serde_json::json!({
            "format": FORMAT,
            "encoder_fingerprint": self.fingerprint.as_str(),
            "preprocessor": processor.config(),
            "projection_dim": dim,
        });
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Cache {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        write_atomic(&path, &text)
    }
}

enum Lookup {
    Hit(Vec<f32>),
    Absent,
    Corrupt,
}

fn read_entry(path: &Path, ns: &str, image_hash: &str, dim: usize) -> Lookup {
    // An entry is a small header and `dim` floats; anything far larger, or not a regular
    // file, is not one of ours.
    let bound = 4 * dim as u64 + (1 << 16);
    let bytes = match moda_models::files::read_bounded(path, bound) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Absent,
        Err(_) => return Lookup::Corrupt,
    };
    match parse_entry(&bytes, ns, image_hash, dim) {
        Some(v) => Lookup::Hit(v),
        None => Lookup::Corrupt,
    }
}

/// The embedding in an entry's bytes, if every check passes.
fn parse_entry(bytes: &[u8], ns: &str, image_hash: &str, dim: usize) -> Option<Vec<f32>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let info = meta.metadata().as_ref()?;
    let get = |k: &str| info.get(k).map(String::as_str);
    if get("format") != Some(FORMAT)
        || get("namespace") != Some(ns)
        || get("image_sha256") != Some(image_hash)
    {
        return None;
    }
    let st = safetensors::SafeTensors::deserialize(bytes).ok()?;
    let view = st.tensor(TENSOR).ok()?;
    if view.dtype() != safetensors::Dtype::F32 || view.shape() != [dim] {
        return None;
    }
    let data = view.data();
    if get("data_sha256") != Some(hex(&Sha256::digest(data)).as_str()) {
        return None;
    }
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if values.len() != dim || !values.iter().all(|v| v.is_finite()) {
        return None;
    }
    Some(values)
}

fn write_entry(path: &Path, ns: &str, image_hash: &str, values: &[f32]) -> Result<()> {
    let err = |msg: String| Error::Cache {
        path: path.to_path_buf(),
        msg,
    };
    if !values.iter().all(|v| v.is_finite()) {
        return Err(err(
            "the encoder produced a non-finite embedding (NaN or infinity)".into(),
        ));
    }
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("namespace", ns.to_string()),
        ("image_sha256", image_hash.to_string()),
        ("data_sha256", hex(&Sha256::digest(&data))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![values.len()], &data)
            .map_err(|e| err(e.to_string()))?;
    let bytes =
        safetensors::serialize([(TENSOR, view)], Some(meta)).map_err(|e| err(e.to_string()))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    write_atomic(path, &bytes)
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn entry_roundtrip_and_corruption() {
        let d = std::env::temp_dir().join(format!("moda-embed-entry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let p = d.join("ab").join("abcd.safetensors");
        let v = vec![1.0f32, -2.5, 3.25];
        write_entry(&p, "ns", "abcd", &v).unwrap();
        assert!(matches!(read_entry(&p, "ns", "abcd", 3), Lookup::Hit(x) if x == v));
        // Wrong namespace, hash or size: not trusted.
        assert!(matches!(
            read_entry(&p, "other", "abcd", 3),
            Lookup::Corrupt
        ));
        assert!(matches!(read_entry(&p, "ns", "abce", 3), Lookup::Corrupt));
        assert!(matches!(read_entry(&p, "ns", "abcd", 4), Lookup::Corrupt));
        // A flipped data byte: the data hash catches it.
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(read_entry(&p, "ns", "abcd", 3), Lookup::Corrupt));
        // Truncated.
        std::fs::write(&p, &bytes[..10]).unwrap();
        assert!(matches!(read_entry(&p, "ns", "abcd", 3), Lookup::Corrupt));
        assert!(matches!(
            read_entry(&d.join("none"), "ns", "abcd", 3),
            Lookup::Absent
        ));
        // Non-finite values are refused at write time.
        assert!(write_entry(&p, "ns", "abcd", &[f32::NAN]).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fingerprints() {
        let a = EncoderFingerprint::from_parts(&[b"x", b"y"]);
        assert_eq!(a, EncoderFingerprint::from_parts(&[b"x", b"y"]));
        assert_ne!(a, EncoderFingerprint::from_parts(&[b"xy"]));
        assert_ne!(a, a.with_tag("bf16"));
        assert_eq!(a.as_str().len(), 64);
        let d = std::env::temp_dir().join(format!("moda-embed-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        assert!(EncoderFingerprint::from_dir(&d).is_err());
        std::fs::write(d.join("config.json"), "{}").unwrap();
        assert!(EncoderFingerprint::from_dir(&d).is_err()); // no weights
        std::fs::write(d.join("model.safetensors"), "w1").unwrap();
        let f1 = EncoderFingerprint::from_dir(&d).unwrap();
        std::fs::write(d.join("preprocessor_config.json"), "{}").unwrap();
        assert_eq!(f1, EncoderFingerprint::from_dir(&d).unwrap());
        std::fs::write(d.join("model.safetensors"), "w2").unwrap();
        assert_ne!(f1, EncoderFingerprint::from_dir(&d).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
