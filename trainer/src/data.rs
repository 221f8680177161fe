//! Catalogs: the Kaggle "fashion-images" layout (`fashion.csv` and the image folders) with a
//! caption template, or a user's CSV with an image-path column and
//! a caption column; and the deterministic train/validation split.
//!
//! Rows whose image is missing or cannot be decoded, or whose caption would have a hole (an
//! empty value in a column the template uses), are skipped and counted in [`LoadReport`]; the
//! caller logs it. A CSV missing a required column is [`Error::MissingColumns`], listing the
//! expected columns; a catalog with no usable row is [`Error::EmptyCatalog`].
//!
//! The split follows the original recipe's `random_split(dataset, [0.8, 0.2])`: a seeded
//! shuffle of the rows (ChaCha8), the first `round(n * fraction)` to validation. It is recorded
//! by row ([`Split::validation_rows`]: the CSV row, its id and its image file) and rebuilt from
//! the rows ([`Split::from_rows`]), so that evaluation sees exactly the rows held out while
//! training. Ids are not unique in real catalogs (the Kaggle catalog repeats `ProductId`s), so a
//! split recorded by id alone would put every row of a repeated id into validation, training
//! rows included; [`Catalog::duplicate_ids`] lists the repeated ids for a warning.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use moda_models::preprocess::{load_image, ImageLimits};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The Kaggle layout's CSV file and columns (defined once, with the image folders, in
/// `moda_models::kaggle`).
pub use moda_models::kaggle::{COLUMNS as KAGGLE_COLUMNS, CSV_FILE as KAGGLE_CSV};

/// The attributes of a description that evaluation scores, in caption order.
pub const ATTRIBUTE_COLUMNS: [&str; 6] = [
    "Colour",
    "Usage",
    "ProductType",
    "Gender",
    "Category",
    "SubCategory",
];

/// The caption template (one definition and one parser, with the schema that reads
/// descriptions back, in `moda_models::schema`) and the original recipe's template.
pub use moda_models::schema::{CaptionTemplate, DEFAULT_TEMPLATE};

/// The folder of a Kaggle image, below the catalog directory.
pub use moda_models::kaggle::image_path as kaggle_image_path;

/// How thoroughly [`load_catalog`] checks each row's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageCheck {
    /// Only that the file exists.
    Exists,
    /// The file decodes (all of it), within [`ImageLimits`]. The default: a truncated JPEG is
    /// caught here, not in the middle of training.
    #[default]
    Decode,
}

/// Where a catalog comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogSource {
    /// The Kaggle layout: `dir/fashion.csv` and `dir/<Category>/<Gender>/Images/...`. The
    /// caption is the template filled from the row; the sample id is `ProductId`.
    Kaggle {
        /// The catalog directory (or its `fashion.csv`).
        dir: PathBuf,
        /// The caption template (default [`DEFAULT_TEMPLATE`]).
        template: CaptionTemplate,
    },
    /// A CSV with an image-path column and a caption column. Relative paths are resolved
    /// against `root`, by default the CSV's folder. The sample id is the image column's value.
    Csv {
        /// The CSV file.
        csv: PathBuf,
        /// The column with image paths.
        image_column: String,
        /// The column with captions.
        caption_column: String,
        /// The folder relative image paths start from (default: the CSV's folder).
        root: Option<PathBuf>,
    },
}

impl CatalogSource {
    /// What a command reads of this catalog, for keeping outputs apart from it: the Kaggle
    /// layout's folder (the CSV's folder when its `fashion.csv` is named); a CSV and the
    /// `--root` its images start from, when given.
    pub fn inputs(&self) -> Vec<(&'static str, PathBuf)> {
        match self {
            CatalogSource::Kaggle { dir, .. } => {
                let folder = if dir.is_file() {
                    match dir.parent() {
                        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                        _ => PathBuf::from("."),
                    }
                } else {
                    dir.clone()
                };
                vec![("catalog", folder)]
            }
            CatalogSource::Csv { csv, root, .. } => {
                let mut v = vec![("catalog CSV", csv.clone())];
                if let Some(r) = root {
                    v.push(("image root", r.clone()));
                }
                v
            }
        }
    }
}

/// Options of [`load_catalog`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// How each image is checked.
    pub check: ImageCheck,
    /// Decoding limits for the check.
    pub limits: ImageLimits,
}

/// One sample of a catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The 0-based index of the sample's data row in the CSV (the header is not a row; skipped
    /// rows count), which identifies the sample even when its id repeats.
    pub row: usize,
    /// The id: `ProductId` in the Kaggle layout, the image column's value in a user CSV. Not
    /// necessarily unique (see [`Catalog::duplicate_ids`]).
    pub id: String,
    /// The image file.
    pub image: PathBuf,
    /// The target description (without BOS/EOS).
    pub caption: String,
    /// Every column of the row (column -> value), e.g. for per-attribute evaluation.
    pub attributes: BTreeMap<String, String>,
}

impl AsRef<Path> for Sample {
    fn as_ref(&self) -> &Path {
        &self.image
    }
}

/// Why a row was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The image file does not exist.
    Missing,
    /// The image file cannot be read or decoded, or is not a regular file (a directory, a
    /// FIFO, a device).
    Unreadable,
    /// A column the caption needs is empty.
    Incomplete,
}

/// A skipped row, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// 1-based line of the row in the CSV (the header is line 1).
    pub line: u64,
    /// The image path (or, when incomplete, the image the row named).
    pub image: PathBuf,
    /// Why it was skipped.
    pub reason: SkipReason,
    /// Details (the decoder's message, the empty column).
    pub detail: String,
}

/// How many rows were read and skipped; the first few skipped rows for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Data rows in the CSV.
    pub rows: usize,
    /// Samples loaded.
    pub loaded: usize,
    /// Rows whose image does not exist.
    pub missing: usize,
    /// Rows whose image cannot be read or decoded, or is not a regular file.
    pub unreadable: usize,
    /// Rows with an empty value in a column the caption needs.
    pub incomplete: usize,
    /// The first [`LoadReport::EXAMPLES`] skipped rows, in CSV order.
    pub examples: Vec<Skipped>,
}

impl LoadReport {
    /// Counts the skipped rows by reason and keeps the first [`LoadReport::EXAMPLES`] of them,
    /// in CSV order, as examples.
    fn count_skipped(&mut self, mut skipped: Vec<Skipped>) {
        skipped.sort_by_key(|s| s.line);
        for s in &skipped {
            match s.reason {
                SkipReason::Missing => self.missing += 1,
                SkipReason::Unreadable => self.unreadable += 1,
                SkipReason::Incomplete => self.incomplete += 1,
            }
        }
        skipped.truncate(LoadReport::EXAMPLES);
        self.examples = skipped;
    }

    /// How many skipped rows [`LoadReport::examples`] keeps.
    pub const EXAMPLES: usize = 5;

    /// Rows skipped, all reasons together.
    pub fn skipped(&self) -> usize {
        self.missing + self.unreadable + self.incomplete
    }

    /// A one-line summary, e.g. `"2906 rows: 2900 loaded, 6 skipped (4 missing images, 2
    /// unreadable, 0 incomplete); first: 123.jpg (missing), ..."`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} rows: {} loaded, {} skipped ({} missing images, {} unreadable, {} incomplete)",
            self.rows,
            self.loaded,
            self.skipped(),
            self.missing,
            self.unreadable,
            self.incomplete
        );
        if !self.examples.is_empty() {
            let first: Vec<String> = self
                .examples
                .iter()
                .map(|e| {
                    let why = match e.reason {
                        SkipReason::Missing => "missing".to_string(),
                        SkipReason::Unreadable => format!("unreadable: {}", e.detail),
                        SkipReason::Incomplete => format!("empty {}", e.detail),
                    };
                    format!("line {} {} ({why})", e.line, e.image.display())
                })
                .collect();
            s.push_str("; first: ");
            s.push_str(&first.join("; "));
        }
        s
    }
}

/// A loaded catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// The CSV it was read from.
    pub csv: PathBuf,
    /// The usable samples, in CSV order.
    pub samples: Vec<Sample>,
    /// What was skipped.
    pub report: LoadReport,
}

impl Catalog {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there is no sample (never true for a catalog [`load_catalog`] returned).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The deterministic split of the samples (see [`Split::new`]).
    pub fn split(&self, validation_fraction: f64, seed: u64) -> Result<Split> {
        Split::new(self.samples.len(), validation_fraction, seed)
    }

    /// The ids that more than one sample has, each with its number of samples, in order of
    /// first appearance.
    pub fn duplicate_ids(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for s in &self.samples {
            *counts.entry(s.id.as_str()).or_default() += 1;
        }
        let count = |id: &str| counts.get(id).copied().unwrap_or(0);
        let mut seen = HashSet::new();
        self.samples
            .iter()
            .filter(|s| count(&s.id) > 1 && seen.insert(s.id.as_str()))
            .map(|s| (s.id.clone(), count(&s.id)))
            .collect()
    }

    /// A warning about repeated ids, naming the first few and their numbers of rows; `None`
    /// when every id is unique.
    pub fn duplicate_warning(&self) -> Option<String> {
        let dups = self.duplicate_ids();
        if dups.is_empty() {
            return None;
        }
        let rows: usize = dups.iter().map(|d| d.1).sum();
        let mut named: Vec<String> = dups
            .iter()
            .take(LoadReport::EXAMPLES)
            .map(|(id, n)| format!("{id:?} ({n} rows)"))
            .collect();
        if dups.len() > LoadReport::EXAMPLES {
            named.push(format!("and {} more", dups.len() - LoadReport::EXAMPLES));
        }
        Some(format!(
            "{}: {} id(s) appear on more than one row ({rows} rows in all): {}; the split is by \
             row, so rows that share an id may fall on both sides of it",
            self.csv.display(),
            dups.len(),
            named.join(", ")
        ))
    }
}

/// One row of a catalog as a checkpoint records it: the row, and its id and image file to
/// check that the catalog still has that row there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowKey {
    /// [`Sample::row`]: the 0-based index of the data row in the CSV.
    pub row: usize,
    /// [`Sample::id`].
    pub id: String,
    /// The file name of [`Sample::image`].
    pub image: String,
}

impl RowKey {
    /// The key of `sample`.
    pub fn of(sample: &Sample) -> Self {
        Self {
            row: sample.row,
            id: sample.id.clone(),
            image: image_name(&sample.image),
        }
    }
}

impl std::fmt::Display for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "data row {} (id {:?}, image {:?})",
            self.row + 1,
            self.id,
            self.image
        )
    }
}

fn image_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Command-line options that choose a catalog, for `trainer fit` and `trainer eval` to
/// `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// The catalog: a directory in the Kaggle fashion-images layout (fashion.csv and image
    /// folders), or, with --image-column and --caption-column, a CSV file.
    #[arg(long, value_name = "DIR|CSV")]
    pub data: PathBuf,
    /// Caption template for the Kaggle layout; `{Column}` is replaced by the row's value
    /// [fit: the recipe's, "{Colour} {Usage} {ProductType} for {Gender} - {Category}
    /// {SubCategory}"; eval: the one the checkpoint records, else the recipe's].
    #[arg(long, value_name = "TEMPLATE")]
    pub caption_template: Option<String>,
    /// For a CSV catalog: the column with image paths.
    #[arg(long, requires = "caption_column")]
    pub image_column: Option<String>,
    /// For a CSV catalog: the column with captions.
    #[arg(long, requires = "image_column")]
    pub caption_column: Option<String>,
    /// For a CSV catalog: the folder relative image paths start from (default: the CSV's).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

impl DataArgs {
    /// The source these options name.
    pub fn source(&self) -> Result<CatalogSource> {
        match (&self.image_column, &self.caption_column) {
            (Some(image_column), Some(caption_column)) => Ok(CatalogSource::Csv {
                csv: self.data.clone(),
                image_column: image_column.clone(),
                caption_column: caption_column.clone(),
                root: self.root.clone(),
            }),
            (None, None) => Ok(CatalogSource::Kaggle {
                dir: self.data.clone(),
                template: CaptionTemplate::parse(
                    self.caption_template.as_deref().unwrap_or(DEFAULT_TEMPLATE),
                )?,
            }),
            _ => Err(Error::InvalidArgument(
                "--image-column and --caption-column go together".into(),
            )),
        }
    }
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    let msg = match e.position() {
        Some(pos) => format!("line {}: {e}", pos.line()),
        None => e.to_string(),
    };
    Error::Csv {
        path: path.to_path_buf(),
        msg,
    }
}

/// A row before its image is checked.
struct Candidate {
    line: u64,
    sample: Sample,
}

/// Loads a catalog; see the module documentation. In steps: find the CSV
/// (`catalog_paths`), check its columns (`required_columns`), build each row's sample
/// (`build_row`), check the images on all cores (`check_images`), count what was skipped.
pub fn load_catalog(source: &CatalogSource, opts: &LoadOptions) -> Result<Catalog> {
    let (csv_path, base) = catalog_paths(source)?;
    let file = moda_models::files::open_regular(&csv_path).map_err(|e| Error::io(&csv_path, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::Headers)
        .from_reader(file);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| csv_error(&csv_path, e))?
        .iter()
        .map(str::to_string)
        .collect();
    let required = required_columns(source, &headers, &csv_path)?;
    let missing: Vec<String> = required
        .iter()
        .filter(|c| !headers.contains(c))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Error::MissingColumns {
            path: csv_path,
            missing,
            expected: required,
            found: headers,
        });
    }

    let mut report = LoadReport::default();
    let mut candidates = Vec::new();
    let mut skipped: Vec<Skipped> = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(&csv_path, e))?;
        let row = report.rows;
        report.rows += 1;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        match build_row(source, &base, &headers, &record) {
            Ok((image, id, caption)) => candidates.push(Candidate {
                line,
                sample: Sample {
                    row,
                    id,
                    image,
                    caption,
                    attributes: headers
                        .iter()
                        .zip(record.iter())
                        .map(|(h, v)| (h.clone(), v.trim().to_string()))
                        .collect(),
                },
            }),
            Err((image, column)) => skipped.push(Skipped {
                line,
                image,
                reason: SkipReason::Incomplete,
                detail: column,
            }),
        }
    }

    // Image checks, on all cores; results are kept in CSV order.
    let checks = check_images(&candidates, opts);
    let mut samples = Vec::with_capacity(candidates.len());
    for (c, check) in candidates.into_iter().zip(checks) {
        match check {
            None => samples.push(c.sample),
            Some((reason, detail)) => skipped.push(Skipped {
                line: c.line,
                image: c.sample.image,
                reason,
                detail,
            }),
        }
    }
    report.count_skipped(skipped);
    report.loaded = samples.len();
    if samples.is_empty() {
        return Err(Error::EmptyCatalog {
            path: csv_path,
            rows: report.rows,
            skipped: report.skipped(),
            missing: report.missing,
            unreadable: report.unreadable,
            incomplete: report.incomplete,
        });
    }
    Ok(Catalog {
        csv: csv_path,
        samples,
        report,
    })
}

/// The catalog's CSV and the directory its image paths start from; an error when the CSV
/// does not exist.
fn catalog_paths(source: &CatalogSource) -> Result<(PathBuf, PathBuf)> {
    let parent_of = |p: &Path| {
        p.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let (csv_path, base, what) = match source {
        CatalogSource::Kaggle { dir, .. } => {
            let csv = if dir.is_file() {
                dir.clone()
            } else {
                dir.join(KAGGLE_CSV)
            };
            let base = parent_of(&csv);
            let what = format!("{KAGGLE_CSV} (a catalog in the Kaggle fashion-images layout)");
            (csv, base, what)
        }
        CatalogSource::Csv { csv, root, .. } => {
            let base = root.clone().unwrap_or_else(|| parent_of(csv));
            (csv.clone(), base, "catalog CSV".to_string())
        }
    };
    if !csv_path.exists() {
        return Err(Error::io(
            &csv_path,
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("missing {what}")),
        ));
    }
    Ok((csv_path, base))
}

/// The columns `source` needs, in the order an error lists them. For the Kaggle layout, a
/// template column that is neither a Kaggle column nor in the file is a template error (a
/// typo), not a malformed file.
fn required_columns(
    source: &CatalogSource,
    headers: &[String],
    csv_path: &Path,
) -> Result<Vec<String>> {
    match source {
        CatalogSource::Kaggle { template, .. } => {
            let mut req: Vec<String> = ["ProductId", "Gender", "Category", "Image"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            for c in template.columns() {
                if !req.iter().any(|r| r == c) {
                    req.push(c.to_string());
                }
            }
            for c in template.columns() {
                if !headers.iter().any(|h| h == c) && !KAGGLE_COLUMNS.contains(&c) {
                    return Err(Error::TemplateColumn {
                        template: template.as_str().to_string(),
                        column: c.to_string(),
                        path: csv_path.to_path_buf(),
                        available: headers.to_vec(),
                    });
                }
            }
            // Report in the file's canonical column order.
            req.sort_by_key(|c| {
                KAGGLE_COLUMNS
                    .iter()
                    .position(|k| k == c)
                    .unwrap_or(KAGGLE_COLUMNS.len())
            });
            Ok(req)
        }
        CatalogSource::Csv {
            image_column,
            caption_column,
            ..
        } => Ok(vec![image_column.clone(), caption_column.clone()]),
    }
}

/// A row's image path, id and caption; or its image path and the first column it lacks.
fn build_row(
    source: &CatalogSource,
    base: &Path,
    headers: &[String],
    record: &csv::StringRecord,
) -> std::result::Result<(PathBuf, String, String), (PathBuf, String)> {
    let get = |c: &str| {
        headers
            .iter()
            .position(|h| h == c)
            .and_then(|i| record.get(i))
    };
    match source {
        CatalogSource::Kaggle { template, .. } => {
            let field = |c: &str| get(c).map(str::trim).unwrap_or("");
            let image = field("Image");
            let path = kaggle_image_path(base, field("Category"), field("Gender"), image);
            let empty = ["ProductId", "Category", "Gender", "Image"]
                .into_iter()
                .find(|c| field(c).is_empty());
            match empty {
                Some(c) => Err((path, c.to_string())),
                None => template
                    .render(get)
                    .map(|caption| (path.clone(), field("ProductId").to_string(), caption))
                    .map_err(|c| (path, c)),
            }
        }
        CatalogSource::Csv {
            image_column,
            caption_column,
            ..
        } => {
            let image = get(image_column).map(str::trim).unwrap_or("");
            let caption = get(caption_column).map(str::trim).unwrap_or("");
            let path = base.join(image);
            if image.is_empty() {
                Err((path, image_column.clone()))
            } else if caption.is_empty() {
                Err((path, caption_column.clone()))
            } else {
                Ok((path, image.to_string(), caption.to_string()))
            }
        }
    }
}

/// `None` when the image is fine, else why not; one entry per candidate, in order.
fn check_images(candidates: &[Candidate], opts: &LoadOptions) -> Vec<Option<(SkipReason, String)>> {
    let check = |c: &Candidate| -> Option<(SkipReason, String)> {
        let path = &c.sample.image;
        // Missing is what does not exist; a directory, a FIFO or a device is there, and is no
        // image (a FIFO is never opened: that would wait for a writer).
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some((SkipReason::Missing, String::new()))
            }
            Err(e) => return Some((SkipReason::Unreadable, e.to_string())),
            Ok(m) if !m.is_file() => {
                let kind = moda_models::files::file_kind(path).unwrap_or("not a regular file");
                return Some((
                    SkipReason::Unreadable,
                    format!("is {kind}, not an image file"),
                ));
            }
            Ok(_) => {}
        }
        match opts.check {
            ImageCheck::Exists => None,
            ImageCheck::Decode => match load_image(path, &opts.limits) {
                Ok(_) => None,
                Err(e) => Some((SkipReason::Unreadable, e.to_string())),
            },
        }
    };
    crate::embed_cache::par_map(candidates, check)
}

/// A train/validation split: indices into [`Catalog::samples`], each list ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Training samples.
    pub train: Vec<usize>,
    /// Validation samples.
    pub validation: Vec<usize>,
}

impl Split {
    /// The original recipe's random split of `n` samples: a ChaCha8 shuffle seeded by `seed`,
    /// the first `round(n * validation_fraction)` to validation (at least one, and at least one
    /// left for training, when `n >= 2`). `validation_fraction` must lie in `[0, 1)`.
    pub fn new(n: usize, validation_fraction: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&validation_fraction) {
            return Err(Error::InvalidArgument(format!(
                "the validation fraction must be in [0, 1), got {validation_fraction}"
            )));
        }
        if n == 0 {
            return Err(Error::InvalidArgument("cannot split zero samples".into()));
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut n_val = (n as f64 * validation_fraction).round() as usize;
        if validation_fraction > 0.0 && n >= 2 {
            n_val = n_val.clamp(1, n - 1);
        }
        let n_val = n_val.min(n.saturating_sub(1));
        let mut validation = order[..n_val].to_vec();
        let mut train = order[n_val..].to_vec();
        validation.sort_unstable();
        train.sort_unstable();
        Ok(Self { train, validation })
    }

    /// The rows of the validation samples, in index order: what a checkpoint records (see
    /// [`Split::from_rows`]).
    pub fn validation_rows(&self, catalog: &Catalog) -> Vec<RowKey> {
        self.validation
            .iter()
            .filter_map(|&i| catalog.samples.get(i).map(RowKey::of))
            .collect()
    }

    /// The ids of the validation samples, in index order (an id repeats when several rows have
    /// it; see [`Split::validation_rows`] for what identifies a row).
    pub fn validation_ids(&self, catalog: &Catalog) -> Vec<String> {
        self.validation
            .iter()
            .filter_map(|&i| catalog.samples.get(i).map(|s| s.id.clone()))
            .collect()
    }

    /// The image paths of the validation samples, in index order.
    pub fn validation_paths(&self, catalog: &Catalog) -> Vec<PathBuf> {
        self.validation
            .iter()
            .filter_map(|&i| catalog.samples.get(i).map(|s| s.image.clone()))
            .collect()
    }

    /// Rebuilds exactly the split whose validation rows were recorded: those samples are
    /// validation, the others training. Returns the split and, for the caller to report, the
    /// recorded rows that the catalog does not have (the row is gone, skipped, or now holds
    /// another id or image).
    pub fn from_rows(catalog: &Catalog, rows: &[RowKey]) -> (Self, Vec<String>) {
        let by_row: HashMap<usize, usize> = catalog
            .samples
            .iter()
            .enumerate()
            .map(|(i, s)| (s.row, i))
            .collect();
        let mut wanted = HashSet::new();
        let mut problems = Vec::new();
        for key in rows {
            match by_row.get(&key.row).map(|&i| (i, &catalog.samples[i])) {
                Some((i, s)) if s.id == key.id && image_name(&s.image) == key.image => {
                    wanted.insert(i);
                }
                Some((_, s)) => problems.push(format!(
                    "{key} now has id {:?} and image {:?}",
                    s.id,
                    image_name(&s.image)
                )),
                None => problems.push(format!("{key} is not in the catalog (or was skipped)")),
            }
        }
        let (validation, train) = (0..catalog.samples.len()).partition(|i| wanted.contains(i));
        (Self { train, validation }, problems)
    }

    /// Rebuilds a split from recorded validation ids (what older checkpoints record): samples
    /// whose id is listed are validation, the others training, so every row of a listed id
    /// that repeats is validation. Returns the split and the recorded ids that the catalog no
    /// longer has (for the caller to report).
    pub fn from_ids(catalog: &Catalog, validation_ids: &[String]) -> (Self, Vec<String>) {
        let wanted: HashSet<&str> = validation_ids.iter().map(String::as_str).collect();
        let mut found = HashSet::new();
        let (mut train, mut validation) = (Vec::new(), Vec::new());
        for (i, s) in catalog.samples.iter().enumerate() {
            if wanted.contains(s.id.as_str()) {
                validation.push(i);
                found.insert(s.id.as_str());
            } else {
                train.push(i);
            }
        }
        let absent = validation_ids
            .iter()
            .filter(|id| !found.contains(id.as_str()))
            .cloned()
            .collect();
        (Self { train, validation }, absent)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_and_renders() {
        let t = CaptionTemplate::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(t, CaptionTemplate::default());
        assert_eq!(t.columns(), ATTRIBUTE_COLUMNS.to_vec());
        let row: BTreeMap<&str, &str> = [
            ("Colour", "Blue"),
            ("Usage", "Casual"),
            ("ProductType", "Jeans"),
            ("Gender", "Boys"),
            ("Category", "Apparel"),
            ("SubCategory", "Bottomwear"),
        ]
        .into_iter()
        .collect();
        let get = |c: &str| row.get(c).copied();
        assert_eq!(
            t.render(get).unwrap(),
            "Blue Casual Jeans for Boys - Apparel Bottomwear"
        );
        let t = CaptionTemplate::parse("{{{Colour}}} {ProductType}!").unwrap();
        assert_eq!(t.render(get).unwrap(), "{Blue} Jeans!");
        assert_eq!(t.columns(), vec!["Colour", "ProductType"]);
        let t = CaptionTemplate::parse("{Colour} {Pattern}").unwrap();
        assert_eq!(t.render(get).unwrap_err(), "Pattern");
    }

    #[test]
    fn bad_templates() {
        for bad in ["{Colour", "{} x", "x } y", "no placeholder", "{a{b}}"] {
            let e = Error::from(CaptionTemplate::parse(bad).unwrap_err());
            assert!(matches!(e, Error::Template { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let a = Split::new(100, 0.2, 42).unwrap();
        assert_eq!(a, Split::new(100, 0.2, 42).unwrap());
        assert_ne!(a, Split::new(100, 0.2, 43).unwrap());
        assert_eq!(a.validation.len(), 20);
        assert_eq!(a.train.len(), 80);
        let mut all: Vec<usize> = a.train.iter().chain(&a.validation).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        // Small catalogs keep one sample on each side.
        let s = Split::new(2, 0.2, 0).unwrap();
        assert_eq!((s.train.len(), s.validation.len()), (1, 1));
        let s = Split::new(1, 0.2, 0).unwrap();
        assert_eq!((s.train.len(), s.validation.len()), (1, 0));
        let s = Split::new(10, 0.0, 0).unwrap();
        assert_eq!(s.validation.len(), 0);
        assert!(Split::new(10, 1.0, 0).is_err());
        assert!(Split::new(10, -0.1, 0).is_err());
        assert!(Split::new(0, 0.2, 0).is_err());
    }

    #[test]
    fn data_args_pick_the_source() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            data: DataArgs,
        }
        let cli = Cli::try_parse_from(["t", "--data", "d"]).unwrap();
        assert!(matches!(
            cli.data.source().unwrap(),
            CatalogSource::Kaggle { .. }
        ));
        let cli = Cli::try_parse_from([
            "t",
            "--data",
            "c.csv",
            "--image-column",
            "path",
            "--caption-column",
            "text",
        ])
        .unwrap();
        assert!(matches!(
            cli.data.source().unwrap(),
            CatalogSource::Csv { .. }
        ));
        assert!(Cli::try_parse_from(["t", "--data", "c.csv", "--image-column", "p"]).is_err());
        let cli =
            Cli::try_parse_from(["t", "--data", "d", "--caption-template", "{Colour"]).unwrap();
        assert!(cli.data.source().is_err());
    }
}
