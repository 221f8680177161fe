//! `moda._native`: the Python extension module behind the `moda` package.
//!
//! Every call goes to the Rust SDK (`moda_sdk::Moda`); this crate only converts Python values
//! (paths, bytes, PIL images, numpy arrays, generation keywords) into the SDK's types and the
//! results back into Python objects. ONNX Runtime runs with the GIL released, so Python
//! threads that share one `Model` run in parallel as far as its session pool allows.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};

use moda_sdk::model::MAX_BATCH;
use moda_sdk::runtime::RuntimeError;
use moda_sdk::{Constrain, Error, GenerationOptions, ImageInput, Moda, Norm, OpenOptions};
use numpy::ndarray::Array2;
use numpy::PyUntypedArrayMethods;
use numpy::{IntoPyArray, PyArrayMethods, PyReadonlyArray3, PyUntypedArray};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyMemoryView, PyString, PyTuple};

create_exception!(
    moda,
    ModaError,
    PyException,
    "Base class of every error MODA raises; its message is MODA's."
);
create_exception!(
    moda,
    ImageError,
    ModaError,
    "An image could not be read, decoded or preprocessed (the message names it)."
);
create_exception!(
    moda,
    BundleError,
    ModaError,
    "The bundle directory, its moda.json or one of its files is missing or wrong."
);
create_exception!(
    moda,
    RuntimeNotFoundError,
    ModaError,
    "The ONNX Runtime shared library could not be found or loaded (the message lists every \
     place tried)."
);
create_exception!(
    moda,
    OnnxRuntimeError,
    ModaError,
    "ONNX Runtime refused a graph or a session setting, or failed while running a graph."
);
create_exception!(
    moda,
    InvalidArgumentError,
    ModaError,
    "An argument is out of range (generation options, an empty batch, ...)."
);

/// The SDK's error as the matching Python exception, with the SDK's message.
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Image { .. } => ImageError::new_err(msg),
        Error::Bundle { .. } => BundleError::new_err(msg),
        Error::Runtime(RuntimeError::NotFound { .. }) => RuntimeNotFoundError::new_err(msg),
        Error::Runtime(_) | Error::Run { .. } => OnnxRuntimeError::new_err(msg),
        Error::InvalidArgument(_) => InvalidArgumentError::new_err(msg),
        // The tokenizer's errors and any kind a later SDK adds.
        _ => ModaError::new_err(msg),
    }
}

/// A path from `str`, `bytes` (as `os.fsencode` gives) or anything with `__fspath__`.
fn fspath(obj: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    let os = obj.py().import("os")?;
    let p = os.call_method1("fspath", (obj,))?;
    if p.is_instance_of::<PyString>() {
        return Ok(PathBuf::from(p.extract::<String>()?));
    }
    #[cfg(unix)]
    if let Ok(b) = p.cast::<PyBytes>() {
        use std::os::unix::ffi::OsStrExt;
        return Ok(PathBuf::from(std::ffi::OsStr::from_bytes(b.as_bytes())));
    }
    Err(PyTypeError::new_err("os.fspath did not return str"))
}

/// Bytes held for the length of a call: a Python `bytes` object or a numpy array read in
/// place, or a copy.
enum Buf<'py> {
    Bytes(Bound<'py, PyBytes>),
    Array(PyReadonlyArray3<'py, u8>),
    Owned(Vec<u8>),
}

impl Buf<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Bytes(b) => b.as_bytes(),
            // Only C-contiguous arrays become `Buf::Array` (see `image_src`).
            Buf::Array(a) => a.as_slice().unwrap_or(&[]),
            Buf::Owned(v) => v,
        }
    }
}

/// One image argument, converted and held while the SDK reads it.
enum Src<'py> {
    Path(PathBuf),
    Encoded {
        buf: Buf<'py>,
        name: String,
    },
    Rgb {
        buf: Buf<'py>,
        width: u32,
        height: u32,
    },
}

impl Src<'_> {
    fn input(&self) -> ImageInput<'_> {
        match self {
            Src::Path(p) => ImageInput::Path(p),
            Src::Encoded { buf, name } => ImageInput::Bytes {
                bytes: buf.as_slice(),
                name,
            },
            Src::Rgb { buf, width, height } => ImageInput::Rgb8 {
                data: buf.as_slice(),
                width: *width,
                height: *height,
            },
        }
    }

    /// An owned copy, for the thread that streams a description.
    fn to_owned_src(&self) -> OwnedSrc {
        match self {
            Src::Path(p) => OwnedSrc::Path(p.clone()),
            Src::Encoded { buf, name } => OwnedSrc::Encoded(buf.as_slice().to_vec(), name.clone()),
            Src::Rgb { buf, width, height } => {
                OwnedSrc::Rgb(buf.as_slice().to_vec(), *width, *height)
            }
        }
    }
}

/// An image argument copied out of Python objects, which another thread can own.
enum OwnedSrc {
    Path(PathBuf),
    Encoded(Vec<u8>, String),
    Rgb(Vec<u8>, u32, u32),
}

impl OwnedSrc {
    fn input(&self) -> ImageInput<'_> {
        match self {
            OwnedSrc::Path(p) => ImageInput::Path(p),
            OwnedSrc::Encoded(bytes, name) => ImageInput::Bytes { bytes, name },
            OwnedSrc::Rgb(data, width, height) => ImageInput::Rgb8 {
                data,
                width: *width,
                height: *height,
            },
        }
    }
}

fn dim(n: usize, what: &str) -> PyResult<u32> {
    u32::try_from(n).map_err(|_| ImageError::new_err(format!("{what} {n} is too large")))
}

/// A numpy array as RGB8 pixels: `uint8`, shape `(H, W, 3)`; read in place when it is
/// C-contiguous, copied otherwise.
fn array_src<'py>(arr: &Bound<'py, PyUntypedArray>, name: &str) -> PyResult<Src<'py>> {
    let shape = arr.shape().to_vec();
    let typed = arr.cast::<numpy::PyArray3<u8>>().ok();
    let Some(typed) = typed.filter(|_| shape.len() == 3 && shape[2] == 3) else {
        return Err(ImageError::new_err(format!(
            "{name}: a numpy image must be uint8 with shape (H, W, 3), got {} with shape {:?}",
            arr.dtype(),
            shape
        )));
    };
    let ro = typed.readonly();
    let (height, width) = (dim(shape[0], "height")?, dim(shape[1], "width")?);
    let buf = if ro.is_c_contiguous() {
        Buf::Array(ro)
    } else {
        Buf::Owned(ro.as_array().iter().copied().collect())
    };
    Ok(Src::Rgb { buf, width, height })
}

/// Whether `obj` is a `PIL.Image.Image`; PIL is looked up only if it is imported already (an
/// object cannot be a PIL image otherwise), so the package does not need Pillow.
fn is_pil_image(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = obj.py();
    let modules = py.import("sys")?.getattr("modules")?;
    let Ok(image_mod) = modules.get_item("PIL.Image") else {
        return Ok(false);
    };
    let class = image_mod.getattr("Image")?;
    obj.is_instance(&class)
}

/// A PIL image in mode RGB, as the SDK converts a decoded file (and as `transformers`'
/// `convert_to_rgb` does): `convert("RGB")`, except that an image with an alpha band or a
/// `transparency` entry is first alpha-composited onto opaque white.
fn pil_to_rgb<'py>(img: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let mode: String = img.getattr("mode")?.extract()?;
    if mode == "RGB" {
        return Ok(img.clone());
    }
    let has_alpha = mode.contains('A') || mode.contains('a');
    let transparency = img.getattr("info")?.contains("transparency")?;
    if !has_alpha && !transparency {
        return img.call_method1("convert", ("RGB",));
    }
    let image_mod = img.py().import("PIL.Image")?;
    let rgba = img.call_method1("convert", ("RGBA",))?;
    let white = image_mod.call_method1("new", ("RGBA", rgba.getattr("size")?, (255, 255, 255)))?;
    image_mod
        .call_method1("alpha_composite", (white, rgba))?
        .call_method1("convert", ("RGB",))
}

/// Converts one image argument: a path (`str` or `os.PathLike`), encoded `bytes` (or
/// `bytearray`, `memoryview`), a `PIL.Image.Image` (converted to RGB) or a numpy `uint8`
/// array of shape `(H, W, 3)`. `name` names in-memory images in error messages.
fn image_src<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Src<'py>> {
    if obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__")? {
        return Ok(Src::Path(fspath(obj)?));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Src::Encoded {
            buf: Buf::Bytes(b.clone()),
            name: name.to_string(),
        });
    }
    if obj.is_instance_of::<PyByteArray>() || obj.is_instance_of::<PyMemoryView>() {
        // One copy into an immutable `bytes`, which no other thread can change meanwhile.
        let bytes = obj
            .py()
            .import("builtins")?
            .getattr("bytes")?
            .call1((obj,))?
            .cast_into::<PyBytes>()?;
        return Ok(Src::Encoded {
            buf: Buf::Bytes(bytes),
            name: name.to_string(),
        });
    }
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        return array_src(arr, name);
    }
    if is_pil_image(obj)? {
        let rgb = pil_to_rgb(obj)?;
        let (width, height): (usize, usize) = rgb.getattr("size")?.extract()?;
        let data = rgb.call_method0("tobytes")?.cast_into::<PyBytes>()?;
        return Ok(Src::Rgb {
            buf: Buf::Bytes(data),
            width: dim(width, "width")?,
            height: dim(height, "height")?,
        });
    }
    Err(PyTypeError::new_err(format!(
        "expected an image: a path (str or os.PathLike), bytes, a PIL.Image.Image or a numpy \
         uint8 array of shape (H, W, 3), got {}",
        obj.get_type().name()?
    )))
}

/// The images of a batch call: a list or tuple of images, or a uint8 array of shape
/// `(N, H, W, 3)`.
fn batch_srcs<'py>(images: &Bound<'py, PyAny>) -> PyResult<Vec<Src<'py>>> {
    if let Ok(arr) = images.cast::<PyUntypedArray>() {
        if arr.ndim() == 4 {
            let n = arr.shape()[0];
            return (0..n)
                .map(|i| {
                    let item = arr.get_item(i)?;
                    array_src(item.cast::<PyUntypedArray>()?, &format!("image {i}"))
                })
                .collect();
        }
    }
    if !(images.is_instance_of::<PyList>() || images.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(format!(
            "expected a list or tuple of images (or a uint8 array of shape (N, H, W, 3)), got {}",
            images.get_type().name()?
        )));
    }
    images
        .try_iter()?
        .enumerate()
        .map(|(i, item)| image_src(&item?, &format!("image {i}")))
        .collect()
}

/// The generation keywords, named as in `transformers`' `generate`, and MODA's `constrain`.
const GENERATION_KEYWORDS: [&str; 13] = [
    "max_new_tokens",
    "min_new_tokens",
    "num_beams",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "stop_strings",
    "constrain",
];

/// The `constrain` keyword: `"auto"`, `"schema"` or `"none"`; anything else (`None`
/// included, which could be taken for `"none"`) is a `ValueError`.
fn constrain_arg(v: &Bound<'_, PyAny>) -> PyResult<Constrain> {
    match v.extract::<String>().ok().map(|s| s.parse::<Constrain>()) {
        Some(Ok(c)) => Ok(c),
        _ => Err(PyValueError::new_err(format!(
            "constrain must be \"auto\", \"schema\" or \"none\", not {}",
            v.repr()?
        ))),
    }
}

/// The `errors` keyword of the batch methods: `"raise"` (false) or `"return"` (true).
fn keep_errors(errors: &str) -> PyResult<bool> {
    match errors {
        "raise" => Ok(false),
        "return" => Ok(true),
        other => Err(PyValueError::new_err(format!(
            "errors must be \"raise\" or \"return\", not {other:?}"
        ))),
    }
}

/// Generation options from keyword arguments; unset keywords keep the SDK's defaults
/// (greedy search, the bundle's `max_new_tokens`). An unknown keyword is a `TypeError`, as a
/// Python function would raise.
fn generation_options(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<GenerationOptions> {
    let mut o = GenerationOptions::default();
    let Some(kwargs) = kwargs else {
        return Ok(o);
    };
    for (k, v) in kwargs.iter() {
        let key: String = k.extract()?;
        let bad = |e: PyErr| {
            PyTypeError::new_err(format!("generation keyword {key}: {}", e.value(v.py())))
        };
        match key.as_str() {
            "max_new_tokens" => o.max_new_tokens = v.extract().map_err(bad)?,
            "min_new_tokens" => o.min_new_tokens = v.extract().map_err(bad)?,
            "num_beams" => o.num_beams = v.extract().map_err(bad)?,
            "do_sample" => o.do_sample = v.extract().map_err(bad)?,
            "temperature" => o.temperature = v.extract().map_err(bad)?,
            "top_k" => o.top_k = v.extract().map_err(bad)?,
            "top_p" => o.top_p = v.extract().map_err(bad)?,
            "seed" => o.seed = v.extract().map_err(bad)?,
            "repetition_penalty" => o.repetition_penalty = v.extract().map_err(bad)?,
            "no_repeat_ngram_size" => o.no_repeat_ngram_size = v.extract().map_err(bad)?,
            "length_penalty" => o.length_penalty = v.extract().map_err(bad)?,
            // A string alone is one stop string (as transformers allows); None keeps the
            // bundle's, an empty list turns them off.
            "stop_strings" => {
                o.stop_strings = if v.is_none() {
                    None
                } else if let Ok(one) = v.extract::<String>() {
                    Some(vec![one])
                } else {
                    Some(v.extract().map_err(bad)?)
                }
            }
            "constrain" => o.constrain = constrain_arg(&v)?,
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "unexpected generation keyword {key:?}; MODA takes {}",
                    GENERATION_KEYWORDS.join(", ")
                )))
            }
        }
    }
    Ok(o)
}

/// Where the time of a description went, in milliseconds. In a batch every image reports the
/// batch's times, except `tokens` and `decode_ms`, which are the image's own.
#[pyclass(frozen, get_all, module = "moda")]
struct Timings {
    /// Decoding and preprocessing the image(s).
    preprocess_ms: f64,
    /// The image encoder.
    encoder_ms: f64,
    /// The projector.
    projector_ms: f64,
    /// The decoder over the image prefix and the BOS.
    prefill_ms: f64,
    /// The decoder steps after the prefill.
    decode_ms: f64,
    /// The whole call.
    total_ms: f64,
    /// Tokens generated.
    tokens: usize,
    /// Decoder runs: the prefill and each step after it (a step that feeds several forced
    /// tokens counts once; under beam search, the batch's steps).
    decoder_runs: usize,
    /// Runs of the batch that computed the logits of the tokens the caption schema allowed
    /// only (constrained decoding).
    listed_runs: usize,
    /// Each decoder step after the prefill, in order (under beam search, the batch's).
    step_ms: Vec<f64>,
}

#[pymethods]
impl Timings {
    fn __repr__(&self) -> String {
        format!(
            "Timings(total_ms={:.3}, preprocess_ms={:.3}, encoder_ms={:.3}, projector_ms={:.3}, \
             prefill_ms={:.3}, decode_ms={:.3}, tokens={})",
            self.total_ms,
            self.preprocess_ms,
            self.encoder_ms,
            self.projector_ms,
            self.prefill_ms,
            self.decode_ms,
            self.tokens
        )
    }

    /// The timings as a plain dict (without `step_ms`).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("preprocess_ms", self.preprocess_ms)?;
        d.set_item("encoder_ms", self.encoder_ms)?;
        d.set_item("projector_ms", self.projector_ms)?;
        d.set_item("prefill_ms", self.prefill_ms)?;
        d.set_item("decode_ms", self.decode_ms)?;
        d.set_item("total_ms", self.total_ms)?;
        d.set_item("tokens", self.tokens)?;
        d.set_item("decoder_runs", self.decoder_runs)?;
        d.set_item("listed_runs", self.listed_runs)?;
        Ok(d)
    }
}

/// One field of a description read with the bundle's caption schema: its value, the
/// probability of the tokens that spell it, and the field's next most likely values.
#[pyclass(frozen, get_all, module = "moda")]
struct Attribute {
    /// The value, as the description writes it.
    value: String,
    /// The probability of the value's tokens given everything before them (`None` when they
    /// could not be told apart).
    confidence: Option<f32>,
    /// The field's next most likely values with their probabilities, most likely first, as
    /// `(value, confidence)` tuples; empty when none are known.
    alternatives: Vec<(String, f32)>,
}

#[pymethods]
impl Attribute {
    fn __repr__(&self) -> String {
        let confidence = self
            .confidence
            .map_or("None".to_string(), |c| c.to_string());
        let alternatives: Vec<String> = self
            .alternatives
            .iter()
            .map(|(v, c)| format!("({v:?}, {c})"))
            .collect();
        format!(
            "Attribute(value={:?}, confidence={confidence}, alternatives=[{}])",
            self.value,
            alternatives.join(", ")
        )
    }

    fn __str__(&self) -> String {
        self.value.clone()
    }

    /// The attribute as a plain dict: `value`, `confidence`, `alternatives` (as in
    /// `moda-sdk describe --json`'s `attributes`).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("value", &self.value)?;
        d.set_item("confidence", self.confidence)?;
        d.set_item("alternatives", self.alternatives.clone())?;
        Ok(d)
    }
}

/// A generated description: the text, the attributes read from it with the bundle's caption
/// schema, the generated token ids (the final `</s>` included when one was generated), each
/// token's log-probability and where the time went.
#[pyclass(frozen, module = "moda")]
struct Description {
    /// The text, special tokens removed.
    #[pyo3(get)]
    text: String,
    /// Why generation ended: "end_of_text", "stop_string", "length" (the token limit cut the
    /// text) or "stopped".
    #[pyo3(get)]
    finish: &'static str,
    /// The generated tokens, the final `</s>` included when one was generated.
    #[pyo3(get)]
    token_ids: Vec<u32>,
    /// The log-probability of each generated token.
    #[pyo3(get)]
    logprobs: Vec<f32>,
    /// Where the time went.
    #[pyo3(get)]
    timings: Py<Timings>,
    /// Each field of the schema (in template order) and its attribute; `None` without a
    /// schema.
    attributes: Option<Vec<(String, Option<Py<Attribute>>)>>,
    /// The image embedding the encoder computed for this description, as the model gives it.
    embedding: Vec<f32>,
}

impl Description {
    /// `d` as a Python object; `fields` (the schema's, in template order) orders its
    /// attributes.
    fn from_sdk(py: Python<'_>, d: moda_sdk::Description, fields: &[String]) -> PyResult<Py<Self>> {
        let attributes = match d.attributes {
            None => None,
            Some(mut map) => {
                let mut out = Vec::with_capacity(map.len());
                let names: Vec<String> = fields
                    .iter()
                    .filter(|f| map.contains_key(*f))
                    .cloned()
                    .collect();
                // The template's order, then any field the schema does not list (none).
                let rest: Vec<String> = map
                    .keys()
                    .filter(|k| !fields.contains(k))
                    .cloned()
                    .collect();
                for name in names.into_iter().chain(rest) {
                    let a = match map.remove(&name).flatten() {
                        Some(a) => Some(Py::new(
                            py,
                            Attribute {
                                value: a.value,
                                confidence: a.confidence,
                                alternatives: a.alternatives,
                            },
                        )?),
                        None => None,
                    };
                    out.push((name, a));
                }
                Some(out)
            }
        };
        let t = d.timings;
        let timings = Py::new(
            py,
            Timings {
                preprocess_ms: t.preprocess_ms,
                encoder_ms: t.encoder_ms,
                projector_ms: t.projector_ms,
                prefill_ms: t.prefill_ms,
                decode_ms: t.decode_ms,
                total_ms: t.total_ms,
                tokens: t.tokens,
                decoder_runs: t.decoder_runs,
                listed_runs: t.listed_runs,
                step_ms: t.step_ms,
            },
        )?;
        Py::new(
            py,
            Description {
                text: d.text,
                finish: d.finish.as_str(),
                token_ids: d.token_ids,
                logprobs: d.logprobs,
                timings,
                attributes,
                embedding: d.embedding,
            },
        )
    }

    fn attributes_dict<'py>(
        &self,
        py: Python<'py>,
        as_dicts: bool,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(attributes) = &self.attributes else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        for (name, a) in attributes {
            match a {
                Some(a) if as_dicts => d.set_item(name, a.get().to_dict(py)?)?,
                Some(a) => d.set_item(name, a.clone_ref(py))?,
                None => d.set_item(name, py.None())?,
            }
        }
        Ok(Some(d))
    }
}

#[pymethods]
impl Description {
    fn __repr__(&self) -> String {
        format!(
            "Description(text={:?}, tokens={})",
            self.text,
            self.token_ids.len()
        )
    }

    fn __str__(&self) -> String {
        self.text.clone()
    }

    /// The attributes read from the text with the bundle's caption schema: a dict (a new one
    /// each time) from every field of the schema, in template order, to its `Attribute`, or
    /// to `None` where the text yields no value the schema knows; `None` for a bundle without
    /// a schema.
    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.attributes_dict(py, false)
    }

    /// The image's embedding, computed on the way to this description: a `float32` numpy
    /// array of `embedding_dim` values, L2-normalised when `normalize` is true; equal to
    /// `Model.embed`'s row for the image (batched as this description was), without running
    /// the encoder again.
    #[pyo3(signature = (normalize=false))]
    fn embedding<'py>(&self, py: Python<'py>, normalize: bool) -> Bound<'py, numpy::PyArray1<f32>> {
        let mut v = self.embedding.clone();
        Norm::unit_if(normalize).apply(&mut v);
        v.into_pyarray(py)
    }

    /// The description as a plain dict: `text`, `attributes` (each a dict, or `None`; the key
    /// only with a schema), `finish`, `token_ids`, `logprobs`, `timings_ms` (the keys of
    /// `moda-sdk describe --json`, without `image`).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("text", &self.text)?;
        if let Some(a) = self.attributes_dict(py, true)? {
            d.set_item("attributes", a)?;
        }
        d.set_item("finish", self.finish)?;
        d.set_item("token_ids", self.token_ids.clone())?;
        d.set_item("logprobs", self.logprobs.clone())?;
        d.set_item("timings_ms", self.timings.get().to_dict(py)?)?;
        Ok(d)
    }
}

/// A message from the thread that streams a description.
enum Piece {
    Text(String),
    /// Boxed: a description is ten times a text piece's size, and most messages are pieces.
    Done(Box<moda_sdk::Result<moda_sdk::Description>>),
}

/// The text pieces of a description as they are generated: iterate over it for one `str`
/// per generated token (`</s>` gives ""); the pieces add up to the description's text.
/// After the iteration ends, `result` holds the whole `Description`.
#[pyclass(frozen, module = "moda")]
struct TokenStream {
    rx: Mutex<Receiver<Piece>>,
    result: Mutex<Option<Py<Description>>>,
    /// The schema's fields, in template order (for the description's attributes).
    fields: Vec<String>,
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        // Waits for the next token with the GIL released.
        let msg = py.detach(|| {
            let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv().ok()
        });
        match msg {
            Some(Piece::Text(t)) => Ok(Some(t)),
            Some(Piece::Done(done)) => match *done {
                Ok(d) => {
                    let d = Description::from_sdk(py, d, &self.fields)?;
                    *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
                    Ok(None)
                }
                Err(e) => Err(to_py(e)),
            },
            // The sender is gone: the stream ended before (its result was delivered once,
            // or the generation thread failed).
            None => {
                if self
                    .result
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some()
                {
                    Ok(None)
                } else {
                    Err(ModaError::new_err(
                        "the description stream ended without a result",
                    ))
                }
            }
        }
    }

    /// The whole `Description` once the iteration has ended, else `None`.
    #[getter]
    fn result(&self, py: Python<'_>) -> Option<Py<Description>> {
        self.result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|d| d.clone_ref(py))
    }
}

/// An opened MODA bundle: describes and embeds product images with ONNX Runtime on the CPU.
///
/// `Model(bundle, threads=None, sessions=1, verify_checksums=False, embeddings_only=False)`:
/// `bundle` is the directory `exporter onnx` wrote; `threads` the threads ONNX Runtime uses
/// inside one graph run (default: the cores the process may use, at most 8, divided among the
/// sessions); `sessions` the most ONNX Runtime session sets (each a copy of the weights) that
/// calls from different Python threads use at once; `verify_checksums` checks every file's
/// SHA-256 against `moda.json`; `embeddings_only` builds only the image side (opens in about
/// half the time and memory; describing then raises `InvalidArgumentError`).
///
/// One `Model` may be used from many Python threads: ONNX Runtime runs with the GIL released.
#[pyclass(frozen, module = "moda")]
struct Model {
    moda: Arc<Moda>,
    sessions: usize,
    /// The caption schema's fields, in template order (none without a schema).
    fields: Vec<String>,
}

impl Model {
    fn describe_srcs(
        &self,
        py: Python<'_>,
        srcs: &[Src<'_>],
        options: &GenerationOptions,
    ) -> PyResult<Vec<moda_sdk::Result<moda_sdk::Description>>> {
        let mut out = Vec::with_capacity(srcs.len());
        for chunk in srcs.chunks(MAX_BATCH) {
            let inputs: Vec<ImageInput<'_>> = chunk.iter().map(Src::input).collect();
            let results = py
                .detach(|| self.moda.describe_batch(&inputs, options))
                .map_err(to_py)?;
            out.extend(results);
        }
        Ok(out)
    }
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (bundle, threads=None, sessions=1, verify_checksums=false, embeddings_only=false))]
    fn new(
        py: Python<'_>,
        bundle: &Bound<'_, PyAny>,
        threads: Option<usize>,
        sessions: usize,
        verify_checksums: bool,
        embeddings_only: bool,
    ) -> PyResult<Self> {
        let dir = fspath(bundle)?;
        if threads == Some(0) {
            return Err(PyValueError::new_err(
                "threads must be at least 1 (or None)",
            ));
        }
        if sessions == 0 {
            return Err(PyValueError::new_err("sessions must be at least 1"));
        }
        let options = OpenOptions::default()
            .with_intra_threads(threads)
            .with_sessions(sessions)
            .with_verify_checksums(verify_checksums)
            .with_embeddings_only(embeddings_only);
        let moda = py.detach(|| Moda::open(&dir, &options)).map_err(to_py)?;
        Ok(Model {
            fields: moda.attribute_names(),
            moda: Arc::new(moda),
            sessions,
        })
    }

    /// Describes one image; returns a `Description`. Generation keywords as in
    /// `transformers`' `generate` (greedy search by default), and `constrain`: `"auto"` (the
    /// default) constrains the description to the bundle's caption schema when it has one (it
    /// then always fits the template, with values the catalog knows), `"schema"` requires
    /// that, `"none"` lets the model write free text (the only way to get a value the catalog
    /// never had); anything else is a `ValueError`.
    #[pyo3(signature = (image, **generation))]
    fn describe(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        generation: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<Description>> {
        let options = generation_options(generation)?;
        let src = image_src(image, "image bytes")?;
        let input = src.input();
        let d = py
            .detach(|| self.moda.describe(&input, &options))
            .map_err(to_py)?;
        Description::from_sdk(py, d, &self.fields)
    }

    /// Describes many images in batches through the encoder and the decoder; returns one
    /// `Description` per image, in order. With `errors="raise"` (the default) the first
    /// image that fails raises its error; with `errors="return"` its place in the list holds
    /// the exception instead and the other images go on. Generation keywords and `constrain`
    /// as in `describe`.
    #[pyo3(signature = (images, *, errors="raise", **generation))]
    fn describe_batch<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        errors: &str,
        generation: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let keep_errors = keep_errors(errors)?;
        let options = generation_options(generation)?;
        let srcs = batch_srcs(images)?;
        let results = self.describe_srcs(py, &srcs, &options)?;
        let list = PyList::empty(py);
        for r in results {
            match r {
                Ok(d) => list.append(Description::from_sdk(py, d, &self.fields)?)?,
                Err(e) if keep_errors => list.append(to_py(e).into_value(py))?,
                Err(e) => return Err(to_py(e)),
            }
        }
        Ok(list)
    }

    /// Streams the description of one image: returns an iterator over text pieces, one per
    /// generated token, produced while the model generates (the generation runs on its own
    /// thread; with beam search the tokens are known only at the end). The iterator's
    /// `result` is the whole `Description` once it is exhausted. Dropping the iterator early
    /// stops the generation. Generation keywords and `constrain` as in `describe`.
    #[pyo3(signature = (image, **generation))]
    fn stream(
        &self,
        image: &Bound<'_, PyAny>,
        generation: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TokenStream> {
        let options = generation_options(generation)?;
        let src = image_src(image, "image bytes")?.to_owned_src();
        let moda = Arc::clone(&self.moda);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("moda-stream".into())
            .spawn(move || {
                let input = src.input();
                let result = moda.describe_with(&input, &options, &mut |ev| {
                    // A closed receiver (the iterator was dropped) stops the generation.
                    tx.send(Piece::Text(ev.text.to_string())).is_ok()
                });
                let _ = tx.send(Piece::Done(Box::new(result)));
            })
            .map_err(|e| ModaError::new_err(format!("cannot start the stream thread: {e}")))?;
        Ok(TokenStream {
            rx: Mutex::new(rx),
            result: Mutex::new(None),
            fields: self.fields.clone(),
        })
    }

    /// Image embeddings as a `float32` numpy array of shape `(n, d)` (`d` is
    /// `embedding_dim`), L2-normalised when `normalize` is true. `images` is a list or tuple
    /// of images, a uint8 array of shape `(N, H, W, 3)`, or one image (then `n` is 1). With
    /// `errors="raise"` (the default) the first image that fails raises its error; with
    /// `errors="return"` the result is `(array, errors)`: a failed image's row is NaN and its
    /// place in the list `errors` holds the exception (`None` for the others), and the other
    /// images go on.
    #[pyo3(signature = (images, normalize=false, *, errors="raise"))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        normalize: bool,
        errors: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let keep_errors = keep_errors(errors)?;
        let is_batch = images.is_instance_of::<PyList>()
            || images.is_instance_of::<PyTuple>()
            || images.cast::<PyUntypedArray>().is_ok_and(|a| a.ndim() == 4);
        let srcs = if is_batch {
            batch_srcs(images)?
        } else {
            vec![image_src(images, "image bytes")?]
        };
        let d = self.moda.manifest().model.projection_dim;
        let mut flat = Vec::with_capacity(srcs.len() * d);
        let failures = PyList::empty(py);
        for chunk in srcs.chunks(MAX_BATCH) {
            let inputs: Vec<ImageInput<'_>> = chunk.iter().map(Src::input).collect();
            let results = py
                .detach(|| self.moda.embed_batch(&inputs, Norm::unit_if(normalize)))
                .map_err(to_py)?;
            for r in results {
                match r {
                    Ok(row) => {
                        flat.extend(row);
                        failures.append(py.None())?;
                    }
                    Err(e) if keep_errors => {
                        flat.extend(std::iter::repeat_n(f32::NAN, d));
                        failures.append(to_py(e).into_value(py))?;
                    }
                    Err(e) => return Err(to_py(e)),
                }
            }
        }
        let n = srcs.len();
        let arr = Array2::from_shape_vec((n, d), flat)
            .map_err(|e| ModaError::new_err(format!("embedding shape: {e}")))?
            .into_pyarray(py)
            .into_any();
        if keep_errors {
            Ok(PyTuple::new(py, [arr, failures.into_any()])?.into_any())
        } else {
            Ok(arr)
        }
    }

    /// The bundle directory.
    #[getter]
    fn bundle(&self) -> String {
        self.moda.dir().display().to_string()
    }

    /// Threads ONNX Runtime uses inside one graph run.
    #[getter]
    fn threads(&self) -> usize {
        self.moda.intra_threads()
    }

    /// Most ONNX Runtime session sets used at once.
    #[getter]
    fn sessions(&self) -> usize {
        self.sessions
    }

    /// Length of an image embedding (`projection_dim`).
    #[getter]
    fn embedding_dim(&self) -> usize {
        self.moda.manifest().model.projection_dim
    }

    /// The fields of the bundle's caption schema in template order (the keys of every
    /// description's `attributes`), `None` for a bundle without a schema.
    #[getter]
    fn attribute_names(&self) -> Option<Vec<String>> {
        self.moda
            .manifest()
            .schema
            .is_some()
            .then(|| self.moda.attribute_names())
    }

    /// The bundle's default `max_new_tokens`.
    #[getter]
    fn max_new_tokens(&self) -> usize {
        self.moda.manifest().generation.max_new_tokens
    }

    fn __repr__(&self) -> String {
        format!(
            "moda.Model({:?}, threads={}, sessions={})",
            self.moda.dir().display().to_string(),
            self.moda.intra_threads(),
            self.sessions
        )
    }
}

/// The `moda._native` extension module.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // In a Python environment the `onnxruntime` wheel is the natural place of ONNX Runtime:
    // let the SDK look there after its usual places, asking this very interpreter (the
    // `python3` on PATH may belong to another environment).
    let py = m.py();
    match py
        .import("sys")
        .and_then(|sys| sys.getattr("executable"))
        .and_then(|exe| exe.extract::<std::path::PathBuf>())
    {
        Ok(exe) if !exe.as_os_str().is_empty() => moda_sdk::runtime::allow_python_search_with(&exe),
        _ => moda_sdk::runtime::allow_python_search(),
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_BATCH", MAX_BATCH)?;
    m.add_class::<Model>()?;
    m.add_class::<Attribute>()?;
    m.add_class::<Description>()?;
    m.add_class::<Timings>()?;
    m.add_class::<TokenStream>()?;
    m.add("ModaError", py.get_type::<ModaError>())?;
    m.add("ImageError", py.get_type::<ImageError>())?;
    m.add("BundleError", py.get_type::<BundleError>())?;
    m.add(
        "RuntimeNotFoundError",
        py.get_type::<RuntimeNotFoundError>(),
    )?;
    m.add("OnnxRuntimeError", py.get_type::<OnnxRuntimeError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    Ok(())
}
