//! Where models come from: a local directory, or a Hugging Face hub id resolved through the
//! hub's local cache (and downloaded when online).
//!
//! Reference implementation: `huggingface_hub` (Python) — `snapshot_download` /
//! `hf_hub_download`, the cache layout `models--owner--name/{refs,snapshots,blobs}` and the
//! environment variables `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN`
//! (see `huggingface_hub/constants.py`). Downloads go through the `hf-hub` crate's blocking
//! (`ureq`) API, which writes the same cache layout.
//!
//! # Design
//! - A spec that names an existing path is a local directory, and is used as is (a local path
//!   wins over a hub id of the same spelling, as in `transformers`). It must be a directory, and
//!   must contain every required file; a missing file is [`Error::MissingFile`].
//! - Otherwise the spec must be a hub id, `name` or `owner/name`, optionally `@revision`
//!   (branch, tag or commit; default `main`).
//! - The cache is consulted first, without any network call: if the snapshot that
//!   `refs/<revision>` points to (or `snapshots/<revision>` for a commit hash) holds every
//!   required file, that snapshot directory is returned. So a fully cached model never touches
//!   the network, even when `HF_HUB_OFFLINE` is not set.
//! - Otherwise, unless offline, the missing files are downloaded into the cache with `hf-hub`
//!   (with its progress bar), trying each requirement's alternatives in order (an HTTP 404 means
//!   "this alternative does not exist in the repo, try the next"). Sharded checkpoints
//!   (`*.index.json`) bring the shards they list. If the repo moved to a new commit while
//!   some files were cached at an older one, the files are fetched again so that all of them
//!   sit together in the one snapshot directory that is returned.
//! - Failures are [`Error::Hub`] with a message naming the id, the cache path, the missing
//!   files, the reason the download failed and how to fix it.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The image encoder of MODA's original recipe (FashionCLIP), the default of the tools'
/// `--encoder`.
pub const DEFAULT_ENCODER: &str = "patrickjohncyh/fashion-clip";
/// The decoder of MODA's original recipe (OPT-125m: configuration, weights and tokenizer), the
/// default of the tools' `--decoder`.
pub const DEFAULT_DECODER: &str = "facebook/opt-125m";

/// One file requirement: a list of alternatives, each a set of files that must all be
/// present together (e.g. `tokenizer.json`, or `vocab.json` + `merges.txt`).
///
/// The first alternative that is present wins. A file whose name ends in `.index.json` is a
/// sharded-checkpoint index: the shards it lists in `weight_map` are required with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReq {
    what: String,
    alternatives: Vec<Vec<String>>,
    optional: bool,
}

impl FileReq {
    /// A required single file, e.g. `FileReq::file("model config", "config.json")`.
    pub fn file(what: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            alternatives: vec![vec![name.into()]],
            optional: false,
        }
    }

    /// A required set of alternatives, tried in order; each alternative is a set of files that
    /// must all be present.
    pub fn any_of(what: impl Into<String>, alternatives: &[&[&str]]) -> Self {
        Self {
            what: what.into(),
            alternatives: alternatives
                .iter()
                .map(|alt| alt.iter().map(|s| (*s).to_string()).collect())
                .collect(),
            optional: false,
        }
    }

    /// The same requirement, but optional: used when present, no error when absent.
    #[must_use]
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// Model weights: `model.safetensors`, or `model.safetensors.index.json` with its shards,
    /// or `pytorch_model.bin`.
    pub fn weights() -> Self {
        Self::any_of(
            "model weights",
            &[
                &["model.safetensors"],
                &["model.safetensors.index.json"],
                &["pytorch_model.bin"],
            ],
        )
    }

    /// The model configuration, `config.json`.
    pub fn config() -> Self {
        Self::file("model configuration", "config.json")
    }

    /// The image preprocessing configuration, `preprocessor_config.json` (optional).
    pub fn preprocessor_config() -> Self {
        Self::file(
            "image preprocessor configuration",
            "preprocessor_config.json",
        )
        .optional()
    }

    /// The tokenizer: `tokenizer.json`, or `vocab.json` + `merges.txt`.
    pub fn tokenizer() -> Self {
        Self::any_of(
            "tokenizer",
            &[&["tokenizer.json"], &["vocab.json", "merges.txt"]],
        )
    }

    /// `special_tokens_map.json` (optional).
    pub fn special_tokens_map() -> Self {
        Self::file("tokenizer special tokens", "special_tokens_map.json").optional()
    }

    /// `tokenizer_config.json` (optional).
    pub fn tokenizer_config() -> Self {
        Self::file("tokenizer configuration", "tokenizer_config.json").optional()
    }

    /// Everything a tokenizer may need: [`FileReq::tokenizer`],
    /// [`FileReq::special_tokens_map`] and [`FileReq::tokenizer_config`].
    pub fn tokenizer_all() -> Vec<Self> {
        vec![
            Self::tokenizer(),
            Self::special_tokens_map(),
            Self::tokenizer_config(),
        ]
    }

    /// What the files are for (used in error messages).
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The alternatives, in order of preference.
    pub fn alternatives(&self) -> &[Vec<String>] {
        &self.alternatives
    }

    /// Whether the requirement is optional.
    pub fn is_optional(&self) -> bool {
        self.optional
    }

    /// The first alternative fully present in `dir`, as full paths, shards of an index
    /// included. `Ok(None)` when no alternative is complete; an error when an index file is
    /// present but unreadable or names an invalid shard.
    pub fn present_in(&self, dir: &Path) -> Result<Option<Vec<PathBuf>>> {
        for alt in &self.alternatives {
            if let Some(files) = alternative_files_present(dir, alt)? {
                return Ok(Some(files.into_iter().map(|f| dir.join(f)).collect()));
            }
        }
        Ok(None)
    }

    fn describe(&self) -> String {
        let alts: Vec<String> = self.alternatives.iter().map(|a| a.join(" + ")).collect();
        if alts.len() == 1 {
            format!("{} ({})", self.what, alts[0])
        } else {
            format!("{} (any of: {})", self.what, alts.join(", "))
        }
    }
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An existing local path (must be a directory to resolve).
    Local(PathBuf),
    /// A Hugging Face hub model repository.
    Hub {
        /// `owner/name` (or a legacy single `name`).
        repo_id: String,
        /// Branch, tag or commit hash (`main` when not given).
        revision: String,
    },
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Local(p) => write!(f, "{}", p.display()),
            ModelSource::Hub { repo_id, revision } if revision == DEFAULT_REVISION => {
                write!(f, "{repo_id}")
            }
            ModelSource::Hub { repo_id, revision } => write!(f, "{repo_id}@{revision}"),
        }
    }
}

const DEFAULT_REVISION: &str = "main";

impl ModelSource {
    /// Interprets `spec`: an existing path is [`ModelSource::Local`]; otherwise a hub id
    /// `[owner/]name[@revision]` is [`ModelSource::Hub`]; anything else is an [`Error::Hub`]
    /// saying it is neither.
    pub fn parse(spec: &str) -> Result<Self> {
        if spec.is_empty() {
            return Err(Error::Hub(format!(
                "empty model source: pass a local directory or a Hugging Face model id \
                 such as `{DEFAULT_DECODER}`"
            )));
        }
        let path = Path::new(spec);
        if path.exists() {
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (spec, None),
        };
        let id_ok = is_valid_repo_id(id);
        let rev_ok = revision.is_none_or(is_valid_revision);
        if id_ok && rev_ok {
            return Ok(ModelSource::Hub {
                repo_id: id.to_string(),
                revision: revision.unwrap_or(DEFAULT_REVISION).to_string(),
            });
        }
        let why = if id_ok {
            format!("`{}` is not a valid revision", revision.unwrap_or_default())
        } else {
            "it is not a valid hub id (`owner/name` or `owner/name@revision`, with letters, \
             digits, `-`, `_` and `.`)"
                .to_string()
        };
        Err(Error::Hub(format!(
            "`{spec}` is not an existing local path, and {why}; pass a local model directory \
             or a Hugging Face model id such as `{DEFAULT_DECODER}`"
        )))
    }

    /// Resolves to a directory that holds every required file, using the environment's hub
    /// settings ([`HubOptions::from_env`]).
    pub fn resolve(&self, files: &[FileReq]) -> Result<PathBuf> {
        self.resolve_with(files, &HubOptions::from_env())
    }

    /// Resolves to a directory that holds every required file, with explicit hub settings.
    pub fn resolve_with(&self, files: &[FileReq], opts: &HubOptions) -> Result<PathBuf> {
        match self {
            ModelSource::Local(dir) => resolve_local(dir, files),
            ModelSource::Hub { repo_id, revision } => resolve_hub(repo_id, revision, files, opts),
        }
    }
}

/// Resolves `spec` (a local directory, or a hub id `[owner/]name[@revision]`) to a directory
/// holding every required file of `files`, downloading into the Hugging Face cache when
/// needed and allowed. See the module documentation.
pub fn resolve_model(spec: &str, files: &[FileReq]) -> Result<PathBuf> {
    ModelSource::parse(spec)?.resolve(files)
}

/// Settings for the Hugging Face hub and its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache directory (the one holding `models--owner--name`).
    pub cache_dir: PathBuf,
    /// Never use the network.
    pub offline: bool,
    /// The hub endpoint (`https://huggingface.co` when `None`).
    pub endpoint: Option<String>,
    /// An access token for gated or private repositories.
    pub token: Option<String>,
    /// Show a progress bar while downloading.
    pub progress: bool,
}

impl HubOptions {
    /// Settings from the environment, as `huggingface_hub` reads them:
    /// cache = `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, where
    /// `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`;
    /// offline when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is `1`/`true`/`yes`/`on`;
    /// endpoint `HF_ENDPOINT`; token `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else
    /// `$HF_HOME/token`; progress bars off when `HF_HUB_DISABLE_PROGRESS_BARS` is true.
    pub fn from_env() -> Self {
        Self::from_env_fn(|k| std::env::var(k).ok())
    }

    /// [`HubOptions::from_env`] with an arbitrary variable lookup (for tests and embedding).
    pub fn from_env_fn(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let home = get("HOME")
            .or_else(|| get("USERPROFILE"))
            .map(PathBuf::from);
        let expand = |v: String| -> PathBuf {
            match (v.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => h.join(rest),
                _ if v == "~" => home.clone().unwrap_or_else(|| PathBuf::from(&v)),
                _ => PathBuf::from(v),
            }
        };
        let hf_home = get("HF_HOME").map(expand).unwrap_or_else(|| {
            let cache = get("XDG_CACHE_HOME")
                .map(expand)
                .or_else(|| home.as_ref().map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = get("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v))
            || get("TRANSFORMERS_OFFLINE").is_some_and(|v| is_true(&v));
        let token = get("HF_TOKEN").or_else(|| {
            let path = get("HF_TOKEN_PATH")
                .map(expand)
                .unwrap_or_else(|| hf_home.join("token"));
            crate::files::read_text_bounded(&path, crate::files::TEXT_FILE_MAX_BYTES)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let progress = !get("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_true(&v));
        Self {
            cache_dir,
            offline,
            endpoint: get("HF_ENDPOINT"),
            token,
            progress,
        }
    }

    /// The cache directory of one model repository (`models--owner--name`).
    pub fn repo_cache_dir(&self, repo_id: &str) -> PathBuf {
        self.cache_dir
            .join(format!("models--{}", repo_id.replace('/', "--")))
    }
}

fn is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// `huggingface_hub.utils.validate_repo_id`, restricted to ASCII: `name` or `owner/name`,
/// each part of `[A-Za-z0-9_.-]`, starting and ending with a letter, digit or `_`, no `--`
/// or `..`, at most 96 characters.
fn is_valid_repo_id(id: &str) -> bool {
    if id.is_empty() || id.len() > 96 || id.contains("--") || id.contains("..") {
        return false;
    }
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return false;
    }
    parts.iter().all(|p| {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        !p.is_empty()
            && p.chars().all(|c| word(c) || c == '-' || c == '.')
            && p.starts_with(word)
            && p.ends_with(word)
    })
}

/// A branch, tag or commit: `[A-Za-z0-9_.-/]`, no `..`, no empty path segment.
fn is_valid_revision(rev: &str) -> bool {
    !rev.is_empty()
        && rev.len() <= 256
        && !rev.contains("..")
        && rev.split('/').all(|s| !s.is_empty())
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// A file name from an index (user data): a relative path of plain segments.
fn is_safe_relative_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && name
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '+' | '='))
}

/// The shards listed in the `weight_map` of a sharded-checkpoint index, sorted and unique.
fn index_shards(index_path: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = crate::files::read_text_bounded(index_path, crate::files::TEXT_FILE_MAX_BYTES)
        .map_err(|e| Error::io(index_path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index_path.to_path_buf(),
        source,
    })?;
    let shards: BTreeSet<String> = index.weight_map.into_values().collect();
    if shards.is_empty() {
        return Err(Error::BadWeights {
            path: index_path.to_path_buf(),
            msg: "the index's weight_map is empty".to_string(),
        });
    }
    for s in &shards {
        if !is_safe_relative_name(s) {
            return Err(Error::BadWeights {
                path: index_path.to_path_buf(),
                msg: format!("invalid shard file name {s:?} in weight_map"),
            });
        }
    }
    Ok(shards.into_iter().collect())
}

fn is_index(name: &str) -> bool {
    name.ends_with(".index.json")
}

/// The files of one alternative present in `dir` (shards included), or `None` if any is
/// missing.
fn alternative_files_present(dir: &Path, alt: &[String]) -> Result<Option<Vec<String>>> {
    let mut out = Vec::new();
    for name in alt {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        out.push(name.clone());
        if is_index(name) {
            for shard in index_shards(&path)? {
                if !dir.join(&shard).is_file() {
                    return Ok(None);
                }
                out.push(shard);
            }
        }
    }
    Ok(Some(out))
}

fn resolve_local(dir: &Path, files: &[FileReq]) -> Result<PathBuf> {
    if !dir.is_dir() {
        let kind = if dir.is_file() {
            "a file"
        } else {
            "not a directory"
        };
        return Err(Error::Hub(format!(
            "{} is {kind}; a model directory (holding config.json, weights, ...) is required",
            dir.display()
        )));
    }
    for req in files {
        if req.present_in(dir)?.is_some() || req.optional {
            continue;
        }
        // Name the most useful missing file: the first of the first alternative that is
        // partly present (e.g. a shard), else the first alternative's first file.
        let mut missing = None;
        for alt in &req.alternatives {
            for name in alt {
                let path = dir.join(name);
                if !path.is_file() {
                    continue;
                }
                if is_index(name) {
                    if let Some(shard) = index_shards(&path)?
                        .into_iter()
                        .find(|s| !dir.join(s).is_file())
                    {
                        missing = Some((dir.join(shard), format!("shard listed in {name}")));
                    }
                } else if let Some(other) = alt.iter().find(|n| !dir.join(n).is_file()) {
                    missing = Some((dir.join(other), format!("needed with {name}")));
                }
                break;
            }
            if missing.is_some() {
                break;
            }
        }
        let (path, detail) = missing.unwrap_or_else(|| {
            let first = req
                .alternatives
                .first()
                .and_then(|a| a.first())
                .map_or_else(|| dir.to_path_buf(), |n| dir.join(n));
            (first, String::new())
        });
        let what = if detail.is_empty() {
            req.describe()
        } else {
            format!("{}; {detail}", req.describe())
        };
        return Err(Error::MissingFile { path, what });
    }
    Ok(dir.to_path_buf())
}

/// The snapshot directory the cache has for `revision`, if any.
fn cached_snapshot(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let ref_path = repo_dir.join("refs").join(revision);
    let commit = crate::files::read_text_bounded(&ref_path, crate::files::TEXT_FILE_MAX_BYTES)
        .ok()
        .map(|c| c.trim().to_string())
        .filter(|c| is_valid_revision(c));
    let commit = match commit {
        Some(c) => c,
        None if is_commit_hash(revision) => revision.to_string(),
        None => return None,
    };
    let snap = repo_dir.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

/// The requirements not satisfied by `snapshot` (all of them when there is no snapshot),
/// optional ones included.
fn unsatisfied<'a>(snapshot: Option<&Path>, files: &'a [FileReq]) -> Result<Vec<&'a FileReq>> {
    let mut out = Vec::new();
    for req in files {
        let ok = match snapshot {
            Some(dir) => req.present_in(dir)?.is_some(),
            None => false,
        };
        if !ok {
            out.push(req);
        }
    }
    Ok(out)
}

fn hub_error(
    repo_id: &str,
    revision: &str,
    opts: &HubOptions,
    missing: &[&FileReq],
    reason: &str,
) -> Error {
    let spec = if revision == DEFAULT_REVISION {
        repo_id.to_string()
    } else {
        format!("{repo_id}@{revision}")
    };
    let missing: Vec<String> = missing.iter().map(|r| r.describe()).collect();
    let rev_flag = if revision == DEFAULT_REVISION {
        String::new()
    } else {
        format!(" --revision {revision}")
    };
    Error::Hub(format!(
        "model `{spec}`: not a local directory, and not (completely) in the Hugging Face \
         cache at {} (missing: {}); it could not be downloaded: {reason}. Download it with \
         `hf download {repo_id}{rev_flag}` on a machine with internet (and copy \
         the cache here, or point HF_HUB_CACHE / HF_HOME at it), or pass a local directory path",
        opts.repo_cache_dir(repo_id).display(),
        missing.join("; "),
    ))
}

fn resolve_hub(
    repo_id: &str,
    revision: &str,
    files: &[FileReq],
    opts: &HubOptions,
) -> Result<PathBuf> {
    let repo_dir = opts.repo_cache_dir(repo_id);
    let snapshot = cached_snapshot(&repo_dir, revision);
    let missing = unsatisfied(snapshot.as_deref(), files)?;
    let missing_required: Vec<&FileReq> = missing.iter().copied().filter(|r| !r.optional).collect();

    if missing.is_empty() {
        if let Some(s) = snapshot {
            return Ok(s);
        }
    }
    if opts.offline {
        if missing_required.is_empty() {
            if let Some(s) = snapshot {
                // Optional files absent from the cache: fine offline.
                return Ok(s);
            }
        }
        let shown = if missing_required.is_empty() {
            missing.clone()
        } else {
            missing_required
        };
        return Err(hub_error(
            repo_id,
            revision,
            opts,
            &shown,
            "offline mode (HF_HUB_OFFLINE is set)",
        ));
    }
    download(repo_id, revision, files, opts)
}

/// Downloads what the cache lacks, then returns the snapshot holding everything.
fn download(
    repo_id: &str,
    revision: &str,
    files: &[FileReq],
    opts: &HubOptions,
) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;

    let fail = |missing: &[&FileReq], reason: &str| {
        let required: Vec<&FileReq> = missing.iter().copied().filter(|r| !r.optional).collect();
        let shown = if required.is_empty() {
            missing
        } else {
            &required[..]
        };
        hub_error(repo_id, revision, opts, shown, reason)
    };

    let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(opts.cache_dir.clone()))
        .with_progress(opts.progress)
        .with_token(opts.token.clone());
    if let Some(endpoint) = &opts.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let all: Vec<&FileReq> = files.iter().collect();
    let api = builder
        .build()
        .map_err(|e| fail(&all, &format!("cannot set up the HTTP client: {e}")))?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        repo_id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let repo_dir = opts.repo_cache_dir(repo_id);

    // Optional requirements found absent upstream (404 for every alternative).
    let mut absent_optional: BTreeSet<usize> = BTreeSet::new();
    // A download can move refs/<revision> to a newer commit than the cached files'; repeat
    // until every file sits in the snapshot the ref points to.
    for _pass in 0..3 {
        let snapshot = cached_snapshot(&repo_dir, revision);
        let mut pending = Vec::new();
        for (i, req) in files.iter().enumerate() {
            let ok = match &snapshot {
                Some(dir) => req.present_in(dir)?.is_some(),
                None => false,
            };
            if !ok && !absent_optional.contains(&i) {
                pending.push((i, req));
            }
        }
        if pending.is_empty() {
            if let Some(s) = snapshot {
                return Ok(s);
            }
        }
        for (i, req) in pending {
            match fetch_requirement(&repo, req, snapshot.as_deref()) {
                Ok(true) => {}
                Ok(false) if req.optional => {
                    absent_optional.insert(i);
                }
                Ok(false) => {
                    return Err(fail(
                        &[req],
                        &format!(
                            "none of these files exists in the repository at revision \
                             `{revision}`"
                        ),
                    ))
                }
                Err(reason) => return Err(fail(&[req], &reason)),
            }
        }
    }
    let snapshot = cached_snapshot(&repo_dir, revision);
    let mut still = Vec::new();
    for (i, req) in files.iter().enumerate() {
        let ok = match &snapshot {
            Some(dir) => req.present_in(dir)?.is_some(),
            None => false,
        };
        if !ok && !absent_optional.contains(&i) {
            still.push(req);
        }
    }
    match snapshot {
        Some(s) if still.is_empty() => Ok(s),
        _ => Err(fail(
            &still,
            "the repository kept changing while downloading; try again",
        )),
    }
}

/// Fetches the first available alternative of `req`. `Ok(false)`: no alternative exists
/// upstream (every one hit a 404). `Err`: a network or cache error, as text.
fn fetch_requirement(
    repo: &hf_hub::api::sync::ApiRepo,
    req: &FileReq,
    snapshot: Option<&Path>,
) -> std::result::Result<bool, String> {
    'alts: for alt in &req.alternatives {
        for name in alt {
            let in_snapshot = snapshot.map(|s| s.join(name)).filter(|p| p.is_file());
            let path = match in_snapshot {
                Some(p) => p,
                None => match repo.download(name) {
                    Ok(p) => p,
                    Err(e) if is_not_found(&e) => continue 'alts,
                    Err(e) => return Err(format!("downloading {name}: {e}")),
                },
            };
            if is_index(name) {
                let shards = index_shards(&path).map_err(|e| e.to_string())?;
                let dir = path.parent().map(Path::to_path_buf);
                for shard in shards {
                    if dir.as_ref().is_some_and(|d| d.join(&shard).is_file()) {
                        continue;
                    }
                    repo.download(&shard)
                        .map_err(|e| format!("downloading {shard} (listed in {name}): {e}"))?;
                }
            }
        }
        return Ok(true);
    }
    Ok(false)
}

fn is_not_found(e: &hf_hub::api::sync::ApiError) -> bool {
    use hf_hub::api::sync::ApiError;
    match e {
        // `ureq::Error::Status(404, _)` displays as "<url>: status code 404"; `ureq` is not a
        // direct dependency, so recognise it by its message.
        ApiError::RequestError(_) => e.to_string().ends_with("status code 404"),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use crate::testutil::TempDir;

    fn touch(p: &Path, content: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn offline(cache: &Path) -> HubOptions {
        HubOptions {
            cache_dir: cache.to_path_buf(),
            offline: true,
            endpoint: None,
            token: None,
            progress: false,
        }
    }

    /// Lays out `models--owner--name` like huggingface_hub: blobs, a snapshot of symlinks,
    /// and refs/main.
    fn fake_cache(cache: &Path, repo_id: &str, sha: &str, files: &[(&str, &str)]) -> PathBuf {
        let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
        touch(&repo.join("refs/main"), sha);
        let snap = repo.join("snapshots").join(sha);
        std::fs::create_dir_all(&snap).unwrap();
        for (i, (name, content)) in files.iter().enumerate() {
            let blob = repo.join("blobs").join(format!("blob{i}"));
            touch(&blob, content);
            let link = snap.join(name);
            #[cfg(unix)]
            std::os::unix::fs::symlink(&blob, &link).unwrap();
            #[cfg(not(unix))]
            std::fs::copy(&blob, &link).unwrap();
        }
        snap
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn parse_specs() {
        assert_eq!(
            ModelSource::parse(DEFAULT_DECODER).unwrap(),
            ModelSource::Hub {
                repo_id: DEFAULT_DECODER.into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSource::parse(&format!("{DEFAULT_ENCODER}@refs/pr/3")).unwrap(),
            ModelSource::Hub {
                repo_id: DEFAULT_ENCODER.into(),
                revision: "refs/pr/3".into()
            }
        );
        assert!(matches!(
            ModelSource::parse("gpt2").unwrap(),
            ModelSource::Hub { .. }
        ));
        for bad in [
            "",
            "./no/such/dir",
            "/no/such/dir",
            "a/b/c",
            "owner/-name",
            "owner/na--me",
            "x@",
            "x@../../etc",
            "o w/n",
        ] {
            let err = ModelSource::parse(bad).unwrap_err();
            assert!(matches!(err, Error::Hub(_)), "{bad}: {err}");
        }
        let msg = ModelSource::parse("./no/such/dir").unwrap_err().to_string();
        assert!(msg.contains("./no/such/dir") && msg.contains("not an existing local path"));
    }

    #[test]
    fn local_dir() {
        let t = TempDir::new();
        touch(&t.0.join("config.json"), "{}");
        touch(&t.0.join("vocab.json"), "{}");
        touch(&t.0.join("merges.txt"), "");
        let spec = t.0.to_str().unwrap();
        let reqs = [
            FileReq::config(),
            FileReq::tokenizer(),
            FileReq::preprocessor_config(),
        ];
        assert_eq!(resolve_model(spec, &reqs).unwrap(), t.0);

        // Missing required weights -> MissingFile naming the first alternative.
        let err = resolve_model(spec, &[FileReq::weights()]).unwrap_err();
        match &err {
            Error::MissingFile { path, what } => {
                assert_eq!(path, &t.0.join("model.safetensors"));
                assert!(what.contains("pytorch_model.bin"), "{what}");
            }
            other => panic!("{other}"),
        }

        // A file where a directory is required.
        let f = t.0.join("config.json");
        let err = resolve_model(f.to_str().unwrap(), &reqs).unwrap_err();
        assert!(err.to_string().contains("is a file"), "{err}");
    }

    #[test]
    fn local_sharded_index() {
        let t = TempDir::new();
        touch(
            &t.0.join("model.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
        );
        touch(&t.0.join("model-00001-of-00002.safetensors"), "x");
        let src = ModelSource::Local(t.0.clone());
        let err = src
            .resolve_with(&[FileReq::weights()], &offline(&t.0))
            .unwrap_err();
        match &err {
            Error::MissingFile { path, .. } => {
                assert_eq!(path, &t.0.join("model-00002-of-00002.safetensors"))
            }
            other => panic!("{other}"),
        }
        touch(&t.0.join("model-00002-of-00002.safetensors"), "x");
        assert_eq!(
            src.resolve_with(&[FileReq::weights()], &offline(&t.0))
                .unwrap(),
            t.0
        );
        let found = FileReq::weights().present_in(&t.0).unwrap().unwrap();
        assert_eq!(found.len(), 3);

        // A malicious shard name is refused.
        touch(
            &t.0.join("model.safetensors.index.json"),
            r#"{"weight_map":{"a":"../../etc/passwd"}}"#,
        );
        let err = src
            .resolve_with(&[FileReq::weights()], &offline(&t.0))
            .unwrap_err();
        assert!(matches!(err, Error::BadWeights { .. }), "{err}");
        // Bad JSON names the file.
        touch(&t.0.join("model.safetensors.index.json"), "{nope");
        let err = src
            .resolve_with(&[FileReq::weights()], &offline(&t.0))
            .unwrap_err();
        assert!(
            err.to_string().contains("model.safetensors.index.json"),
            "{err}"
        );
    }

    #[test]
    fn cached_offline_resolves() {
        let t = TempDir::new();
        let snap = fake_cache(
            &t.0,
            DEFAULT_DECODER,
            SHA,
            &[
                ("config.json", "{}"),
                ("pytorch_model.bin", "x"),
                ("vocab.json", "{}"),
                ("merges.txt", ""),
                ("special_tokens_map.json", "{}"),
            ],
        );
        let src = ModelSource::parse(DEFAULT_DECODER).unwrap();
        let mut reqs = vec![FileReq::config(), FileReq::weights()];
        reqs.extend(FileReq::tokenizer_all());
        // tokenizer_config.json (optional) is absent: still fine offline.
        assert_eq!(src.resolve_with(&reqs, &offline(&t.0)).unwrap(), snap);

        // By commit hash, without a ref.
        let by_sha = ModelSource::parse(&format!("{DEFAULT_DECODER}@{SHA}")).unwrap();
        assert_eq!(by_sha.resolve_with(&reqs, &offline(&t.0)).unwrap(), snap);
    }

    #[test]
    fn cached_offline_missing_file_is_clear() {
        let t = TempDir::new();
        fake_cache(&t.0, DEFAULT_ENCODER, SHA, &[("config.json", "{}")]);
        let src = ModelSource::parse(DEFAULT_ENCODER).unwrap();
        let err = src
            .resolve_with(&[FileReq::config(), FileReq::weights()], &offline(&t.0))
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Hub(_)));
        for needle in [
            DEFAULT_ENCODER,
            "not a local directory",
            &format!("models--{}", DEFAULT_ENCODER.replace('/', "--")),
            "model.safetensors",
            "HF_HUB_OFFLINE",
            &format!("`hf download {DEFAULT_ENCODER}`"),
            "local directory path",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
        assert!(!msg.contains("huggingface-cli"), "{msg}");
        assert!(!msg.contains("model configuration"), "{msg}");

        // Not cached at all.
        let err = ModelSource::parse("someone/else@v1")
            .unwrap()
            .resolve_with(&[FileReq::config()], &offline(&t.0))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("someone/else@v1")
                && msg.contains("`hf download someone/else --revision v1`"),
            "{msg}"
        );
    }

    #[test]
    fn env_settings() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let o = HubOptions::from_env_fn(env(&[("HOME", "/h"), ("HF_TOKEN", "tok")]));
        assert_eq!(o.cache_dir, PathBuf::from("/h/.cache/huggingface/hub"));
        assert!(!o.offline && o.progress);
        assert_eq!(o.token.as_deref(), Some("tok"));
        let o = HubOptions::from_env_fn(env(&[
            ("HOME", "/h"),
            ("HF_HOME", "~/hf"),
            ("HF_HUB_OFFLINE", "True"),
        ]));
        assert_eq!(o.cache_dir, PathBuf::from("/h/hf/hub"));
        assert!(o.offline);
        let o = HubOptions::from_env_fn(env(&[
            ("HF_HOME", "/x"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_HUB_OFFLINE", "0"),
            ("HF_ENDPOINT", "http://mirror"),
        ]));
        assert_eq!(o.cache_dir, PathBuf::from("/c"));
        assert!(!o.offline);
        assert_eq!(o.endpoint.as_deref(), Some("http://mirror"));
        let o = HubOptions::from_env_fn(env(&[("XDG_CACHE_HOME", "/xdg")]));
        assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    }

    /// Online path without network: an unreachable endpoint gives the clear error, quickly.
    #[test]
    fn unreachable_endpoint_is_clear() {
        let t = TempDir::new();
        let opts = HubOptions {
            cache_dir: t.0.clone(),
            offline: false,
            // Port 9 on localhost: connection refused, no traffic leaves the machine.
            endpoint: Some("http://127.0.0.1:9".to_string()),
            token: None,
            progress: false,
        };
        let err = ModelSource::parse(DEFAULT_DECODER)
            .unwrap()
            .resolve_with(&[FileReq::config()], &opts)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("could not be downloaded") && msg.contains("config.json"),
            "{msg}"
        );
    }
}
