//! Finding and loading ONNX Runtime, once per process, and building sessions.
//!
//! The `ort` crate is built with `load-dynamic` (its default features would download a
//! prebuilt library at build time, which offline builds cannot do): the shared library is
//! opened at run time. [`runtime`] looks for it, in order, at
//!
//! 1. `ORT_DYLIB_PATH` (a file). When it is set, it is the only place tried: a wrong value is an
//!    error, not silently replaced by another library;
//! 2. next to the executable (and one directory up, for `cargo test` binaries in `deps/`);
//! 3. next to the shared library that holds this code, when it is one (`libmoda.so`, where
//!    `make install` puts ONNX Runtime beside it; found with `dladdr`, on Unix);
//! 4. the project's own install, `.ort/<version>/onnxruntime/capi/`, written by
//!    `scripts/setup.sh` (the workspace is found from where this crate was built, and from
//!    the current directory and its ancestors);
//! 5. a Python `onnxruntime` package (`python3 -c "import onnxruntime"`), only when the
//!    program asked for it with [`allow_python_search`] (the `moda-sdk` command line does) or
//!    `MODA_ORT_PYTHON=1` is set: a library inside a C or C++ host must not start a Python
//!    interpreter behind its back.
//!
//! If none loads, one error lists every place tried and how to fix it. The environment is
//! created once ([`std::sync::OnceLock`]); `ort` allows only one per process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

/// The ONNX Runtime version that `scripts/setup.sh` installs (keep the two in step).
pub const PINNED_ORT_VERSION: &str = "1.32.0";

/// The oldest ONNX Runtime the `ort` crate accepts (its API level, `api-31`).
pub const MIN_ORT_VERSION: &str = "1.31";

/// Errors of loading ONNX Runtime or building a session.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// No ONNX Runtime library could be loaded; `tried` lists each place and what happened.
    #[error(
        "cannot load the ONNX Runtime shared library (version {MIN_ORT_VERSION} or newer is \
         needed). Tried:\n{}\nTo fix: run `bash scripts/setup.sh` in the MODA repository (it \
         installs onnxruntime {PINNED_ORT_VERSION} into .ort/), or set ORT_DYLIB_PATH to a \
         libonnxruntime shared library, or `pip install onnxruntime=={PINNED_ORT_VERSION}`",
        .tried.iter().map(|t| format!("  - {t}")).collect::<Vec<_>>().join("\n")
    )]
    NotFound {
        /// One line per candidate: the path and why it was not used.
        tried: Vec<String>,
    },
    /// ONNX Runtime refused a model or a session setting.
    #[error("ONNX Runtime: {what}: {msg}")]
    Session {
        /// What was being done (e.g. the model file).
        what: String,
        /// ONNX Runtime's message.
        msg: String,
    },
}

/// The loaded ONNX Runtime: its environment and where it came from.
#[derive(Debug)]
pub struct Runtime {
    env: ort::environment::Environment,
    library: PathBuf,
}

impl Runtime {
    /// The shared library that was loaded.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// The environment, for [`Session::builder`].
    pub fn environment(&self) -> &ort::environment::Environment {
        &self.env
    }
}

static RUNTIME: OnceLock<Result<Runtime, RuntimeError>> = OnceLock::new();

/// Loads ONNX Runtime on first use (see the module documentation for where it looks) and
/// returns it; later calls return the same runtime, or the same error.
pub fn runtime() -> Result<&'static Runtime, RuntimeError> {
    RUNTIME.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// How a session is built.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Threads inside one operator; `None` lets ONNX Runtime choose (one per core).
    pub intra_threads: Option<usize>,
    /// Turn graph optimisations off (they are on, at the highest level, by default).
    pub disable_optimizations: bool,
    /// Where to save the optimised graph (to see which fusions ONNX Runtime applied).
    pub optimized_model_path: Option<PathBuf>,
    /// Keep the intra-op threads from spinning while they wait for work. Spinning cuts the
    /// latency of a graph run many times in a row (the decoder), but a session that spins
    /// after its run takes cores from the next session's run (the encoder before the
    /// decoder's prefill measured 2.5x slower prefills on 2 cores).
    pub no_spinning: bool,
    /// Record ONNX Runtime's per-operator profile of every run, written to a JSON file whose
    /// name starts with this prefix when the profile is ended (see `Moda::end_profiling`).
    pub profile_prefix: Option<PathBuf>,
}

/// ONNX Runtime's session setting for the folder that a graph loaded from bytes finds its
/// external data files in.
const EXTERNAL_DATA_FOLDER_KEY: &str = "session.model_external_initializers_file_folder_path";
/// A folder that cannot exist: every path below a device file fails to resolve.
const NO_EXTERNAL_DATA_FOLDER: &str = "/dev/null/no-external-data";

/// Where a session's graph comes from.
enum GraphSource<'a> {
    /// A file, which ONNX Runtime reads itself (and whose external data, if any, it finds
    /// beside it).
    File(&'a Path),
    /// Bytes already read and checked; `name` says what they are in messages. A graph loaded
    /// this way cannot reach external data files (ONNX Runtime has no folder to resolve them
    /// against) other than `data`, the one external data file given (its name as the graph's
    /// tensors name it, and its bytes, also checked), so everything it runs is in checked
    /// bytes.
    Memory {
        name: &'a Path,
        bytes: &'a [u8],
        data: Option<(&'a str, Arc<[u8]>)>,
    },
}

/// Builds a session for the model file `path`.
pub fn session_from_file(path: &Path, options: &SessionOptions) -> Result<Session, RuntimeError> {
    build_session(GraphSource::File(path), options)
}

/// Builds a session from a graph's bytes (`name` is the file they came from, for messages) and
/// those of its external data file, if it has one (`data`: the file name its tensors give,
/// and the file's bytes): what runs is exactly those bytes, which the caller may have checked.
pub fn session_from_bytes(
    name: &Path,
    bytes: &[u8],
    data: Option<(&str, Arc<[u8]>)>,
    options: &SessionOptions,
) -> Result<Session, RuntimeError> {
    build_session(GraphSource::Memory { name, bytes, data }, options)
}

fn build_session(
    source: GraphSource<'_>,
    options: &SessionOptions,
) -> Result<Session, RuntimeError> {
    let rt = runtime()?;
    let what = match source {
        GraphSource::File(path) => format!("loading {}", path.display()),
        GraphSource::Memory { name, .. } => {
            format!("loading {} (its checked bytes)", name.display())
        }
    };
    let err = |e: &dyn std::fmt::Display| RuntimeError::Session {
        what: what.clone(),
        msg: e.to_string(),
    };
    let mut builder = Session::builder(rt.environment()).map_err(|e| err(&e))?;
    let level = if options.disable_optimizations {
        GraphOptimizationLevel::Disable
    } else {
        GraphOptimizationLevel::All
    };
    builder = builder
        .with_optimization_level(level)
        .map_err(|e| err(&e))?;
    if let Some(n) = options.intra_threads {
        builder = builder.with_intra_threads(n).map_err(|e| err(&e))?;
    }
    if options.no_spinning {
        builder = builder.with_intra_op_spinning(false).map_err(|e| err(&e))?;
    }
    if let Some(p) = &options.optimized_model_path {
        builder = builder.with_optimized_model_path(p).map_err(|e| err(&e))?;
    }
    if let Some(p) = &options.profile_prefix {
        builder = builder.with_profiling(p).map_err(|e| err(&e))?;
    }
    match source {
        GraphSource::File(path) => builder.commit_from_file(path),
        GraphSource::Memory { bytes, data, .. } => {
            // ONNX Runtime resolves the external data of a graph loaded from bytes against
            // the current directory, or the folder this setting names: name one that can
            // never exist (a path through a device file), so that no file is read. The one
            // data file given is found in memory by its name.
            builder = builder
                .with_config_entry(EXTERNAL_DATA_FOLDER_KEY, NO_EXTERNAL_DATA_FOLDER)
                .map_err(|e| err(&e))?;
            if let Some((file, buffer)) = data {
                builder = builder
                    .with_external_initializer_file_in_memory(file, buffer)
                    .map_err(|e| err(&e))?;
            }
            builder.commit_from_memory(bytes)
        }
    }
    .map_err(|e| err(&e))
}

/// The file name of the shared library on this platform.
fn library_names() -> &'static [&'static str] {
    if cfg!(target_os = "windows") {
        &["onnxruntime.dll"]
    } else if cfg!(target_os = "macos") {
        &["libonnxruntime.dylib"]
    } else {
        &["libonnxruntime.so"]
    }
}

/// `libonnxruntime.so` or a versioned `libonnxruntime.so.1.32.0` (as the wheel ships it) in
/// `dir`, the pinned version first.
fn library_in(dir: &Path) -> Option<PathBuf> {
    for name in library_names() {
        let p = dir.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    let pinned = if cfg!(target_os = "macos") {
        dir.join(format!("libonnxruntime.{PINNED_ORT_VERSION}.dylib"))
    } else {
        dir.join(format!("libonnxruntime.so.{PINNED_ORT_VERSION}"))
    };
    if pinned.is_file() {
        return Some(pinned);
    }
    let mut versioned: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().to_string());
            n.is_some_and(|n| {
                (n.starts_with("libonnxruntime.so.") || n.starts_with("libonnxruntime.1"))
                    && !n.contains("providers")
            })
        })
        .collect();
    versioned.sort();
    versioned.pop()
}

/// Candidate directories of the project-local install (`.ort/<version>/onnxruntime/capi`).
fn project_installs() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    // This crate's source is `<workspace>/sdk`.
    if let Some(ws) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        roots.push(ws.to_path_buf());
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    let mut dirs = Vec::new();
    for root in roots {
        let ort = root.join(".ort");
        if !ort.is_dir() {
            continue;
        }
        let pinned = ort
            .join(PINNED_ORT_VERSION)
            .join("onnxruntime")
            .join("capi");
        if !dirs.contains(&pinned) {
            dirs.push(pinned);
        }
        if let Ok(entries) = std::fs::read_dir(&ort) {
            let mut others: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path().join("onnxruntime").join("capi")))
                .filter(|p| p.is_dir() && !dirs.contains(p))
                .collect();
            others.sort();
            dirs.extend(others.into_iter().rev());
        }
    }
    dirs
}

/// The directory of the file that holds this code, found with `dladdr`: libmoda's own
/// directory when the SDK is linked into `libmoda.so` (the executable's when it is linked
/// into the executable, which the search has already tried).
#[cfg(unix)]
fn own_library_dir() -> Option<PathBuf> {
    use std::ffi::{c_char, c_int, c_void, CStr, OsStr};
    use std::os::unix::ffi::OsStrExt;

    /// `Dl_info` of glibc, musl and macOS.
    #[repr(C)]
    struct DlInfo {
        dli_fname: *const c_char,
        dli_fbase: *mut c_void,
        dli_sname: *const c_char,
        dli_saddr: *mut c_void,
    }
    extern "C" {
        fn dladdr(addr: *const c_void, info: *mut DlInfo) -> c_int;
    }
    let mut info = DlInfo {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let addr = own_library_dir as fn() -> Option<PathBuf> as *const c_void;
    // SAFETY: dladdr only reads the address and fills `info`.
    let found = unsafe { dladdr(addr, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr sets dli_fname to a NUL-terminated path that lives as long as the object.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    let file = Path::new(OsStr::from_bytes(name.to_bytes()));
    let file = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
    file.parent().map(Path::to_path_buf)
}

#[cfg(not(unix))]
fn own_library_dir() -> Option<PathBuf> {
    None
}

static PYTHON_SEARCH: AtomicBool = AtomicBool::new(false);
static PYTHON_INTERPRETER: OnceLock<PathBuf> = OnceLock::new();

/// Lets [`runtime`] also look for ONNX Runtime in a Python `onnxruntime` package (it runs
/// `python3` once to find it). Off by default; call it before the first model opens.
pub fn allow_python_search() {
    PYTHON_SEARCH.store(true, Ordering::Relaxed);
}

/// [`allow_python_search`] with the interpreter to ask, instead of the `python3` on `PATH`:
/// a Python extension passes its own (`sys.executable`), so that the package is found in the
/// environment the program runs in. The first interpreter given stays.
pub fn allow_python_search_with(interpreter: &Path) {
    let _ = PYTHON_INTERPRETER.set(interpreter.to_path_buf());
    allow_python_search();
}

/// Whether the Python package is searched: [`allow_python_search`] or `MODA_ORT_PYTHON=1`.
fn python_search_allowed() -> bool {
    PYTHON_SEARCH.load(Ordering::Relaxed)
        || std::env::var_os("MODA_ORT_PYTHON").is_some_and(|v| v == "1")
}

/// The `capi` directory of an installed Python `onnxruntime` package, if any.
fn python_install() -> Result<PathBuf, String> {
    let python = PYTHON_INTERPRETER
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("python3"));
    let out = Command::new(&python)
        .args([
            "-c",
            "import os, onnxruntime; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!("{} has no onnxruntime package", python.display()));
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(dir).join("capi"))
}

/// ONNX Runtime's own log messages go through this: one plain line on standard error,
/// `moda: onnxruntime LEVEL: MESSAGE`, for warnings by default. ONNX Runtime also logs every
/// error that it returns; MODA reports those itself, with what it was doing, so by default
/// they are not printed twice. `MODA_ORT_LOG` (`off`, `error`, `warning`, `info`, `verbose`)
/// sets the least severe level printed, errors included once it is set.
///
/// One warning is left out unless `MODA_ORT_LOG` is set: that the decoder's optional input
/// [`crate::manifest::HEAD_IDS`] is an initializer among the graph's inputs. It is, on
/// purpose (that is how an ONNX input gets a default), once per decoder session.
fn ort_logger() -> (ort::logging::LoggerFunction, ort::logging::LogLevel) {
    use ort::logging::LogLevel;
    let setting = std::env::var("MODA_ORT_LOG").ok();
    let (threshold, errors) = match setting.as_deref().map(str::trim) {
        Some("off") => (LogLevel::Fatal, false),
        Some("fatal") => (LogLevel::Fatal, true),
        Some("error") => (LogLevel::Error, true),
        Some("info") => (LogLevel::Info, true),
        Some("verbose") => (LogLevel::Verbose, true),
        Some("warning") => (LogLevel::Warning, true),
        _ => (LogLevel::Warning, false),
    };
    let silent = setting.as_deref() == Some("off");
    let quiet_default_input = setting.is_none();
    let default_input = format!(
        "Initializer {} appears in graph inputs",
        crate::manifest::HEAD_IDS
    );
    let logger = move |level: LogLevel, _category: &str, _id: &str, _at: &str, msg: &str| {
        if silent || level < threshold || (!errors && level >= LogLevel::Error) {
            return;
        }
        if quiet_default_input && level == LogLevel::Warning && msg.starts_with(&default_input) {
            return;
        }
        let name = match level {
            LogLevel::Verbose => "verbose",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
            LogLevel::Fatal => "fatal error",
        };
        // Called from ONNX Runtime's C++ code: never panic here (a closed standard error
        // makes `eprintln!` panic; a failed write is dropped).
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "moda: onnxruntime {name}: {msg}");
    };
    (std::sync::Arc::new(logger), threshold)
}

fn try_load(path: &Path) -> Result<Runtime, String> {
    let builder = ort::init_from(path).map_err(|e| e.to_string())?;
    let (logger, threshold) = ort_logger();
    let env = builder
        .with_name("moda")
        .with_telemetry(false)
        .with_logger(logger)
        .build()
        .map_err(|e| e.to_string())?;
    // ONNX Runtime formats only the messages at or above this level.
    env.set_log_level(threshold);
    Ok(Runtime {
        env,
        library: path.to_path_buf(),
    })
}

fn load() -> Result<Runtime, RuntimeError> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        let why = if p.is_file() {
            match try_load(&p) {
                Ok(rt) => return Ok(rt),
                Err(e) => e,
            }
        } else {
            "no such file".to_string()
        };
        tried.push(format!(
            "ORT_DYLIB_PATH={}: {why} (unset it to search the other places)",
            p.display()
        ));
        return Err(RuntimeError::NotFound { tried });
    }
    let mut dirs: Vec<(String, PathBuf)> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(("next to the executable".to_string(), dir.to_path_buf()));
            if let Some(up) = dir.parent() {
                dirs.push(("next to the executable".to_string(), up.to_path_buf()));
            }
        }
    }
    if let Some(dir) = own_library_dir() {
        if !dirs.iter().any(|(_, d)| *d == dir) {
            dirs.push((
                "next to the library holding the SDK (libmoda)".to_string(),
                dir,
            ));
        }
    }
    for d in project_installs() {
        dirs.push(("the project's install (scripts/setup.sh)".to_string(), d));
    }
    for (what, dir) in dirs {
        match library_in(&dir) {
            Some(lib) => match try_load(&lib) {
                Ok(rt) => return Ok(rt),
                Err(e) => tried.push(format!("{what}: {}: {e}", lib.display())),
            },
            None => tried.push(format!("{what}: {}: no library there", dir.display())),
        }
    }
    if !python_search_allowed() {
        tried.push(
            "Python onnxruntime: not searched (set MODA_ORT_PYTHON=1 to let MODA run python3 \
             to find it)"
                .to_string(),
        );
        return Err(RuntimeError::NotFound { tried });
    }
    match python_install() {
        Ok(dir) => match library_in(&dir) {
            Some(lib) => match try_load(&lib) {
                Ok(rt) => return Ok(rt),
                Err(e) => tried.push(format!("Python onnxruntime: {}: {e}", lib.display())),
            },
            None => tried.push(format!(
                "Python onnxruntime: {}: no library there",
                dir.display()
            )),
        },
        Err(e) => tried.push(format!("Python onnxruntime: {e}")),
    }
    Err(RuntimeError::NotFound { tried })
}
