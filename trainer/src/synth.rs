//! `trainer synth`: a synthetic product catalog in exactly the layout of the Kaggle
//! "fashion-images" data set (vikashrajluhaniwal), for the demo, the
//! tests and offline runs.
//!
//! The layout: `fashion.csv` with the columns of [`crate::data::KAGGLE_COLUMNS`], and images at
//! `<Category>/<Gender>/Images/images_with_product_ids/<Image>` for the four folders of the real
//! data (Apparel/Boys, Apparel/Girls, Footwear/Men, Footwear/Women). Attribute values are taken
//! from the real data's vocabulary.
//!
//! The pictures are drawn with `tiny-skia` (anti-aliased paths under an affine transform) and
//! encoded with the `image` crate's JPEG encoder. Every attribute of the caption has a visual
//! cue by construction (see [`SYNTH_LONG_ABOUT`] and `trainer/README.md`), so that accuracy on a
//! synthetic catalog measures learning. Everything random comes from ChaCha8 seeded by `--seed`:
//! the catalog (attributes, ids, titles) from one stream, each image from its own stream
//! (`set_stream(index + 1)`), so the same seed gives byte-identical files whatever the number of
//! threads.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, RgbImage};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tiny_skia::{
    Color, FillRule, GradientStop, LinearGradient, Mask, Paint, Path as SkPath, PathBuilder,
    Pixmap, Point, Rect, Shader, SpreadMode, Stroke, Transform,
};

use crate::data::{KAGGLE_COLUMNS, KAGGLE_CSV};
use crate::error::{Error, Result};

/// The long help of `trainer synth`: what is drawn, and which visual cue carries each attribute.
pub const SYNTH_LONG_ABOUT: &str = "\
Writes a synthetic product catalog in exactly the layout of the Kaggle \"fashion-images\" data \
set: DIR/fashion.csv (ProductId, Gender, Category, SubCategory, ProductType, Colour, Usage, \
ProductTitle, Image, ImageURL) and the photos at \
DIR/<Category>/<Gender>/Images/images_with_product_ids/<ProductId>.jpg, for Apparel/Boys, \
Apparel/Girls, Footwear/Men and Footwear/Women. The same --seed gives byte-identical files.

Each photo is a product silhouette on a light backdrop, with random position, scale, rotation, \
shading, pixel noise, image size (240-400 px, square) and JPEG quality (70-95). Every attribute \
of the caption has a visual cue by construction:

  Colour       the fill colour of the product (15 colours: Black, White, Blue, Navy Blue, Red,
               Green, Grey, Pink, Yellow, Brown, Purple, Orange, Beige, Maroon, Olive).
  ProductType  the silhouette: Tshirts, Shirts, Tops, Dresses, Skirts, Jeans, Trousers, Shorts
               (front view); Casual Shoes, Sports Shoes, Formal Shoes, Heels, Flats, Sandals
               (side view); Flip Flops (top view). A fill about as light as the backdrop
               (White) gets a bolder outline, so that the silhouette shows at 64 px.
  SubCategory  follows from ProductType (Topwear, Bottomwear, Dress; Shoes, Sandal, Flip Flops).
  Category     follows from ProductType (Apparel, Footwear).
  Gender       the backdrop: a cool, pale blue backdrop with a blue band along the bottom for
               Boys and Men; a warm, pale rose backdrop with a rose band for Girls and Women.
  Usage        the pattern on the product: Casual = plain; Formal = vertical pinstripes;
               Sports = two broad diagonal stripes; Ethnic = a grid of bold dots (about 40% of
               the product, so that its tint differs from pinstripes') and a contrasting trim
               along the outline.";

/// Arguments of `trainer synth`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Write a synthetic catalog in the Kaggle fashion-images layout",
    after_long_help = SYNTH_LONG_ABOUT
)]
pub struct SynthArgs {
    /// The catalog directory to create (written to DIR.tmp-* and renamed when complete).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of products (images).
    #[arg(long, default_value_t = 1500)]
    pub count: usize,
    /// Seed of every random choice; the same seed gives byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace --out if it exists and is not empty; only a catalog that `trainer synth` wrote
    /// is replaced.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl SynthArgs {
    /// Arguments for `count` products with `seed` into `out`, no `--force`, quiet.
    pub fn new(out: impl Into<PathBuf>, count: usize, seed: u64) -> Self {
        SynthArgs {
            out: out.into(),
            count,
            seed,
            force: false,
            quiet: true,
        }
    }
}

/// What [`synth`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthReport {
    /// The catalog directory.
    pub out: PathBuf,
    /// Number of products written.
    pub count: usize,
    /// Products per image folder, e.g. `"Apparel/Boys" -> 380`.
    pub per_folder: BTreeMap<String, usize>,
    /// Total bytes of the images.
    pub image_bytes: u64,
}

/// The largest `--count` accepted (a guard against typos that would fill the disk).
pub const MAX_COUNT: usize = 1_000_000;

/// One product type: its name as in the data set, its SubCategory and the usages it comes in.
#[derive(Debug)]
struct ProductType {
    name: &'static str,
    sub_category: &'static str,
    usages: &'static [&'static str],
    shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Tshirt,
    Shirt,
    Top,
    Dress,
    Skirt,
    Jeans,
    Trousers,
    Shorts,
    CasualShoe,
    SportsShoe,
    FormalShoe,
    Heel,
    Flat,
    Sandal,
    FlipFlop,
}

const fn pt(
    name: &'static str,
    sub_category: &'static str,
    usages: &'static [&'static str],
    shape: Shape,
) -> ProductType {
    ProductType {
        name,
        sub_category,
        usages,
        shape,
    }
}

const CASUAL: &[&str] = &["Casual"];
const CASUAL_SPORTS: &[&str] = &["Casual", "Sports"];
const CASUAL_FORMAL: &[&str] = &["Casual", "Formal"];
const CASUAL_ETHNIC: &[&str] = &["Casual", "Ethnic"];
const CASUAL_FORMAL_ETHNIC: &[&str] = &["Casual", "Formal", "Ethnic"];

const TSHIRTS: ProductType = pt("Tshirts", "Topwear", CASUAL_SPORTS, Shape::Tshirt);
const SHIRTS: ProductType = pt("Shirts", "Topwear", CASUAL_FORMAL, Shape::Shirt);
const TOPS: ProductType = pt("Tops", "Topwear", CASUAL_ETHNIC, Shape::Top);
const DRESSES: ProductType = pt("Dresses", "Dress", CASUAL_ETHNIC, Shape::Dress);
const SKIRTS: ProductType = pt("Skirts", "Bottomwear", CASUAL_ETHNIC, Shape::Skirt);
const JEANS: ProductType = pt("Jeans", "Bottomwear", CASUAL, Shape::Jeans);
const TROUSERS: ProductType = pt("Trousers", "Bottomwear", CASUAL_FORMAL, Shape::Trousers);
const SHORTS: ProductType = pt("Shorts", "Bottomwear", CASUAL_SPORTS, Shape::Shorts);
const CASUAL_SHOES: ProductType = pt("Casual Shoes", "Shoes", CASUAL, Shape::CasualShoe);
const SPORTS_SHOES: ProductType = pt("Sports Shoes", "Shoes", CASUAL_SPORTS, Shape::SportsShoe);
const FORMAL_SHOES: ProductType = pt("Formal Shoes", "Shoes", &["Formal"], Shape::FormalShoe);
const HEELS: ProductType = pt("Heels", "Shoes", CASUAL_FORMAL_ETHNIC, Shape::Heel);
const FLATS: ProductType = pt("Flats", "Shoes", CASUAL_ETHNIC, Shape::Flat);
const SANDALS: ProductType = pt("Sandals", "Sandal", CASUAL_ETHNIC, Shape::Sandal);
const FLIP_FLOPS: ProductType = pt("Flip Flops", "Flip Flops", CASUAL, Shape::FlipFlop);

/// The four image folders of the real data: (Category, Gender, product types).
const FOLDERS: [(&str, &str, &[ProductType]); 4] = [
    (
        "Apparel",
        "Boys",
        &[TSHIRTS, SHIRTS, JEANS, TROUSERS, SHORTS],
    ),
    (
        "Apparel",
        "Girls",
        &[TSHIRTS, TOPS, DRESSES, SKIRTS, JEANS, SHORTS],
    ),
    (
        "Footwear",
        "Men",
        &[
            CASUAL_SHOES,
            SPORTS_SHOES,
            FORMAL_SHOES,
            SANDALS,
            FLIP_FLOPS,
        ],
    ),
    (
        "Footwear",
        "Women",
        &[
            CASUAL_SHOES,
            SPORTS_SHOES,
            HEELS,
            FLATS,
            SANDALS,
            FLIP_FLOPS,
        ],
    ),
];

/// The Colour vocabulary with the fill colour drawn for each.
const COLOURS: [(&str, [u8; 3]); 15] = [
    ("Black", [28, 28, 30]),
    ("White", [250, 250, 248]),
    ("Blue", [40, 95, 205]),
    ("Navy Blue", [22, 32, 84]),
    ("Red", [205, 32, 38]),
    ("Green", [34, 145, 64]),
    ("Grey", [130, 130, 134]),
    ("Pink", [242, 132, 172]),
    ("Yellow", [246, 212, 44]),
    ("Brown", [118, 74, 40]),
    ("Purple", [112, 50, 152]),
    ("Orange", [242, 122, 30]),
    ("Beige", [222, 202, 160]),
    ("Maroon", [112, 20, 38]),
    ("Olive", [108, 114, 38]),
];

const BRANDS: [&str; 12] = [
    "Northwind",
    "Urban Loom",
    "Kidstreet",
    "Stride & Co",
    "Meadow",
    "Arcadia",
    "Bluefin",
    "Solace",
    "Pebble",
    "Marigold",
    "Trailhead",
    "Cobalt Row",
];

/// One product of the catalog: the CSV row.
#[derive(Debug, Clone)]
struct Product {
    id: u64,
    category: &'static str,
    gender: &'static str,
    ptype: &'static ProductType,
    colour: (&'static str, [u8; 3]),
    usage: &'static str,
    title: String,
}

impl Product {
    fn image_name(&self) -> String {
        format!("{}.jpg", self.id)
    }

    fn rel_dir(&self) -> PathBuf {
        Path::new(self.category)
            .join(self.gender)
            .join("Images")
            .join("images_with_product_ids")
    }

    fn row(&self) -> [String; 10] {
        [
            self.id.to_string(),
            self.gender.to_string(),
            self.category.to_string(),
            self.ptype.sub_category.to_string(),
            self.ptype.name.to_string(),
            self.colour.0.to_string(),
            self.usage.to_string(),
            self.title.clone(),
            self.image_name(),
            format!("{SYNTH_URL}{}", self.image_name()),
        ]
    }
}

/// Draws the catalog's attributes from the catalog stream of `seed`.
fn plan(count: usize, seed: u64) -> Vec<Product> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let base: u64 = 10_000 + rng.random_range(0..50_000u64);
    (0..count)
        .map(|i| {
            let (category, gender, types) = FOLDERS[rng.random_range(0..FOLDERS.len())];
            let ptype = &types[rng.random_range(0..types.len())];
            let colour = COLOURS[rng.random_range(0..COLOURS.len())];
            let usage = ptype.usages[rng.random_range(0..ptype.usages.len())];
            let brand = BRANDS[rng.random_range(0..BRANDS.len())];
            let title = format!("{brand} {gender} {} {}", colour.0, ptype.name);
            Product {
                id: base + i as u64,
                category,
                gender,
                ptype,
                colour,
                usage,
                title,
            }
        })
        .collect()
}

/// Writes a synthetic catalog (see [`SYNTH_LONG_ABOUT`]) into `args.out`, atomically: into a
/// sibling `DIR.tmp-<pid>-<n>` first, renamed to `DIR` when complete. An existing non-empty
/// `DIR` is refused unless `args.force`, and even then unless it is a catalog that `synth`
/// wrote (nothing but its CSV and image folders). The `DIR.tmp-*` of a process that is gone (killed
/// while writing) are removed, with a warning on stderr.
pub fn synth(args: &SynthArgs) -> Result<SynthReport> {
    if args.count == 0 || args.count > MAX_COUNT {
        return Err(Error::InvalidArgument(format!(
            "--count must be between 1 and {MAX_COUNT}, got {}",
            args.count
        )));
    }
    let out = args.out.clone();
    let out_exists = out.exists();
    if out_exists {
        if !out.is_dir() {
            return Err(Error::OutputExists { path: out });
        }
        let non_empty = std::fs::read_dir(&out)
            .map_err(|e| Error::io(&out, e))?
            .next()
            .is_some();
        if non_empty && !args.force {
            return Err(Error::OutputExists { path: out });
        }
        if non_empty {
            if let Err(what) = synthetic_catalog(&out) {
                return Err(Error::OutputNotReplaceable {
                    path: out,
                    msg: format!(
                        "--force replaces only a synthetic catalog that `trainer synth` wrote \
                         ({KAGGLE_CSV} and the Apparel/ and Footwear/ image folders), and this \
                         directory is not one: {what}; remove it yourself or choose another --out"
                    ),
                });
            }
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("--out {} has no name", out.display())))?
        .to_string_lossy()
        .to_string();
    for stale in moda_models::files::remove_stale(&parent, &format!("{name}.tmp-")) {
        eprintln!("warning: {stale}");
    }
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let tmp = parent.join(format!(
        "{name}.tmp-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write_catalog(&tmp, args);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out_exists {
        // Only reached when `out` is empty or `--force` was given.
        if let Err(e) = std::fs::remove_dir_all(&out) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io(&out, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, &out) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(&out, e));
    }
    Ok(SynthReport { out, ..report })
}

/// The start of every image URL that [`synth`] writes (`example.invalid` is reserved: no real
/// catalog uses it).
const SYNTH_URL: &str = "https://example.invalid/fashion-images/";

/// `Ok` when `dir` holds a catalog that [`synth`] wrote and nothing else: `fashion.csv` with
/// its columns and its image URLs, and the folders `<Category>/<Gender>/Images/
/// images_with_product_ids/` of `.jpg` files; else what is not. A real Kaggle catalog has the
/// same layout but other image URLs.
fn synthetic_catalog(dir: &Path) -> std::result::Result<(), String> {
    use std::io::{BufRead, Read};
    let list = |d: &Path| -> std::result::Result<Vec<(String, std::fs::FileType)>, String> {
        std::fs::read_dir(d)
            .and_then(|entries| {
                entries
                    .map(|e| {
                        let e = e?;
                        Ok((e.file_name().to_string_lossy().into_owned(), e.file_type()?))
                    })
                    .collect()
            })
            .map_err(|e| format!("cannot list {}: {e}", d.display()))
    };
    let mut has_csv = false;
    for (name, ft) in list(dir)? {
        let folder = FOLDERS.iter().any(|(category, _, _)| *category == name);
        if name == KAGGLE_CSV && ft.is_file() {
            has_csv = true;
        } else if !(folder && ft.is_dir()) {
            return Err(format!("it holds {name:?}"));
        }
    }
    if !has_csv {
        return Err(format!("it has no {KAGGLE_CSV}"));
    }
    // The header and the first row's image URL.
    let csv = dir.join(KAGGLE_CSV);
    let file = moda_models::files::open_regular(&csv).map_err(|e| format!("{KAGGLE_CSV}: {e}"))?;
    let mut lines = std::io::BufReader::new(file.take(1 << 16)).lines();
    let header = lines.next().and_then(|l| l.ok()).unwrap_or_default();
    let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
    if header.trim_end() != KAGGLE_COLUMNS.join(",") || !first.contains(SYNTH_URL) {
        return Err(format!(
            "its {KAGGLE_CSV} was not written by `trainer synth` (other columns or image URLs)"
        ));
    }
    for (category, gender, _) in FOLDERS {
        let images = dir
            .join(category)
            .join(gender)
            .join("Images")
            .join("images_with_product_ids");
        if !images.is_dir() {
            continue;
        }
        for (name, ft) in list(&images)? {
            if !(ft.is_file() && name.ends_with(".jpg")) {
                return Err(format!("{} holds {name:?}", images.display()));
            }
        }
    }
    // Nothing else in the category, gender and Images folders.
    for (category, _, _) in FOLDERS {
        let c = dir.join(category);
        if !c.is_dir() {
            continue;
        }
        for (gender, ft) in list(&c)? {
            let known = FOLDERS
                .iter()
                .any(|(cat, g, _)| *cat == category && *g == gender);
            if !(known && ft.is_dir()) {
                return Err(format!("{} holds {gender:?}", c.display()));
            }
            let g = c.join(&gender);
            for (sub, ft) in list(&g)? {
                if sub != "Images" || !ft.is_dir() {
                    return Err(format!("{} holds {sub:?}", g.display()));
                }
            }
            let i = g.join("Images");
            if i.is_dir() {
                for (sub, ft) in list(&i)? {
                    if sub != "images_with_product_ids" || !ft.is_dir() {
                        return Err(format!("{} holds {sub:?}", i.display()));
                    }
                }
            }
        }
    }
    Ok(())
}

fn write_catalog(dir: &Path, args: &SynthArgs) -> Result<SynthReport> {
    let products = plan(args.count, args.seed);
    let mut per_folder = BTreeMap::new();
    for p in &products {
        *per_folder
            .entry(format!("{}/{}", p.category, p.gender))
            .or_insert(0usize) += 1;
        let d = dir.join(p.rel_dir());
        if !d.is_dir() {
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
    }

    let bar = if args.quiet || args.count < 100 {
        ProgressBar::hidden()
    } else {
        let b =
            ProgressBar::with_draw_target(Some(args.count as u64), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("synth {bar:40} {pos}/{len} images [{elapsed} < {eta}]")
        {
            b.set_style(style);
        }
        b
    };

    // Each image depends only on (seed, index): render on all cores, any order.
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let bytes = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = products.get(i) else { break };
                let path = dir.join(p.rel_dir()).join(p.image_name());
                let written = render_jpeg(p, args.seed, i as u64, &path).and_then(|jpeg| {
                    std::fs::write(&path, &jpeg)
                        .map(|_| jpeg.len())
                        .map_err(|e| Error::io(&path, e))
                });
                match written {
                    Ok(n) => {
                        bytes.fetch_add(n, Ordering::Relaxed);
                        bar.inc(1);
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    if failed.load(Ordering::Relaxed) {
        let e = first_error.lock().ok().and_then(|mut e| e.take());
        return Err(e.unwrap_or_else(|| Error::Image {
            path: dir.to_path_buf(),
            msg: "an image could not be written".into(),
        }));
    }

    let csv_path = dir.join(KAGGLE_CSV);
    let mut w = csv::Writer::from_path(&csv_path).map_err(|e| csv_err(&csv_path, e))?;
    w.write_record(KAGGLE_COLUMNS)
        .map_err(|e| csv_err(&csv_path, e))?;
    for p in &products {
        w.write_record(p.row()).map_err(|e| csv_err(&csv_path, e))?;
    }
    w.flush().map_err(|e| Error::io(&csv_path, e))?;

    Ok(SynthReport {
        out: dir.to_path_buf(),
        count: products.len(),
        per_folder,
        image_bytes: bytes.load(Ordering::Relaxed) as u64,
    })
}

fn csv_err(path: &Path, e: csv::Error) -> Error {
    Error::Csv {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Drawing. Silhouettes are drawn in a canonical 100x100 box (x right, y down, apparel front
// views, footwear side views with the toe to the right), then placed by one affine transform.

/// What a part of a silhouette is painted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The product's Colour, shaded, with the Usage pattern.
    Body,
    /// A neutral sole or heel (its colour is fixed per ProductType).
    Sole([u8; 3]),
}

struct Part {
    path: SkPath,
    role: Role,
}

/// A silhouette: filled parts, then detail strokes (seams, laces, buttons) in a shade of the fill.
struct Silhouette {
    parts: Vec<Part>,
    details: Vec<(SkPath, f32)>,
}

/// A polygon (with optional quadratic corners) in canonical coordinates.
enum Seg {
    L(f32, f32),
    Q(f32, f32, f32, f32),
    C(f32, f32, f32, f32, f32, f32),
}
use Seg::{C, L, Q};

fn poly(start: (f32, f32), segs: &[Seg]) -> Option<SkPath> {
    let mut pb = PathBuilder::new();
    pb.move_to(start.0, start.1);
    for s in segs {
        match *s {
            L(x, y) => pb.line_to(x, y),
            Q(x1, y1, x, y) => pb.quad_to(x1, y1, x, y),
            C(x1, y1, x2, y2, x, y) => pb.cubic_to(x1, y1, x2, y2, x, y),
        }
    }
    pb.close();
    pb.finish()
}

fn line(points: &[(f32, f32)]) -> Option<SkPath> {
    let mut pb = PathBuilder::new();
    let (first, rest) = points.split_first()?;
    pb.move_to(first.0, first.1);
    for p in rest {
        pb.line_to(p.0, p.1);
    }
    pb.finish()
}

fn curve(a: (f32, f32), c: (f32, f32), b: (f32, f32)) -> Option<SkPath> {
    let mut pb = PathBuilder::new();
    pb.move_to(a.0, a.1);
    pb.quad_to(c.0, c.1, b.0, b.1);
    pb.finish()
}

fn rect(x: f32, y: f32, w: f32, h: f32) -> Option<SkPath> {
    Rect::from_xywh(x, y, w, h).map(PathBuilder::from_rect)
}

fn circle(x: f32, y: f32, r: f32) -> Option<SkPath> {
    PathBuilder::from_circle(x, y, r)
}

/// Detail strokes before their paths are checked: (path, width).
type Details = Vec<(Option<SkPath>, f32)>;

fn silhouette(shape: Shape) -> Option<Silhouette> {
    let body = |p: Option<SkPath>| -> Option<Part> {
        Some(Part {
            path: p?,
            role: Role::Body,
        })
    };
    let sole = |p: Option<SkPath>, c: [u8; 3]| -> Option<Part> {
        Some(Part {
            path: p?,
            role: Role::Sole(c),
        })
    };
    let (parts, details): (Vec<Option<Part>>, Details) = match shape {
        Shape::Tshirt => (
            vec![body(poly(
                (40.0, 15.0),
                &[
                    Q(50.0, 25.0, 60.0, 15.0),
                    L(72.0, 18.0),
                    L(91.0, 34.0),
                    L(82.0, 45.0),
                    L(70.0, 37.0),
                    L(70.0, 88.0),
                    L(30.0, 88.0),
                    L(30.0, 37.0),
                    L(18.0, 45.0),
                    L(9.0, 34.0),
                    L(28.0, 18.0),
                ],
            ))],
            vec![(curve((40.0, 15.0), (50.0, 27.0), (60.0, 15.0)), 1.2)],
        ),
        Shape::Shirt => (
            vec![body(poly(
                (40.0, 13.0),
                &[
                    L(50.0, 26.0),
                    L(60.0, 13.0),
                    L(72.0, 16.0),
                    L(89.0, 80.0),
                    L(80.0, 83.0),
                    L(69.0, 38.0),
                    L(69.0, 91.0),
                    L(31.0, 91.0),
                    L(31.0, 38.0),
                    L(20.0, 83.0),
                    L(11.0, 80.0),
                    L(28.0, 16.0),
                ],
            ))],
            vec![
                (line(&[(50.0, 26.0), (50.0, 91.0)]), 1.0),
                (line(&[(40.0, 13.0), (44.0, 25.0), (50.0, 26.0)]), 1.0),
                (line(&[(60.0, 13.0), (56.0, 25.0), (50.0, 26.0)]), 1.0),
                (circle(52.5, 40.0, 1.1), 0.8),
                (circle(52.5, 55.0, 1.1), 0.8),
                (circle(52.5, 70.0, 1.1), 0.8),
                (line(&[(18.0, 74.0), (26.0, 76.5)]), 1.0),
                (line(&[(82.0, 74.0), (74.0, 76.5)]), 1.0),
            ],
        ),
        Shape::Top => (
            vec![body(poly(
                (36.0, 10.0),
                &[
                    L(41.0, 10.0),
                    Q(50.0, 34.0, 59.0, 10.0),
                    L(64.0, 10.0),
                    Q(64.0, 30.0, 70.0, 36.0),
                    L(75.0, 88.0),
                    L(25.0, 88.0),
                    L(30.0, 36.0),
                    Q(36.0, 30.0, 36.0, 10.0),
                ],
            ))],
            vec![(line(&[(26.0, 82.0), (74.0, 82.0)]), 0.8)],
        ),
        Shape::Dress => (
            vec![body(poly(
                (38.0, 6.0),
                &[
                    L(42.0, 6.0),
                    Q(50.0, 22.0, 58.0, 6.0),
                    L(62.0, 6.0),
                    Q(62.0, 22.0, 66.0, 28.0),
                    L(63.0, 44.0),
                    L(84.0, 95.0),
                    L(16.0, 95.0),
                    L(37.0, 44.0),
                    L(34.0, 28.0),
                    Q(38.0, 22.0, 38.0, 6.0),
                ],
            ))],
            vec![(line(&[(37.0, 44.0), (63.0, 44.0)]), 1.2)],
        ),
        Shape::Skirt => (
            vec![body(poly(
                (33.0, 18.0),
                &[
                    L(67.0, 18.0),
                    L(67.0, 26.0),
                    L(86.0, 84.0),
                    Q(50.0, 90.0, 14.0, 84.0),
                    L(33.0, 26.0),
                ],
            ))],
            vec![
                (line(&[(33.0, 26.0), (67.0, 26.0)]), 1.0),
                (line(&[(42.0, 27.0), (36.0, 86.0)]), 0.6),
                (line(&[(58.0, 27.0), (64.0, 86.0)]), 0.6),
            ],
        ),
        Shape::Jeans => (
            vec![body(poly(
                (32.0, 8.0),
                &[
                    L(68.0, 8.0),
                    L(70.0, 50.0),
                    L(64.0, 95.0),
                    L(53.0, 95.0),
                    L(50.0, 36.0),
                    L(47.0, 95.0),
                    L(36.0, 95.0),
                    L(30.0, 50.0),
                ],
            ))],
            vec![
                (line(&[(32.0, 14.0), (68.0, 14.0)]), 1.0),
                (curve((34.0, 15.0), (38.0, 25.0), (45.0, 15.0)), 1.0),
                (curve((66.0, 15.0), (62.0, 25.0), (55.0, 15.0)), 1.0),
                (line(&[(50.0, 14.0), (50.0, 32.0)]), 1.0),
            ],
        ),
        Shape::Trousers => (
            vec![body(poly(
                (27.0, 8.0),
                &[
                    L(73.0, 8.0),
                    L(76.0, 95.0),
                    L(54.0, 95.0),
                    L(50.0, 32.0),
                    L(46.0, 95.0),
                    L(24.0, 95.0),
                ],
            ))],
            vec![
                (line(&[(27.0, 13.0), (73.0, 13.0)]), 1.0),
                (line(&[(36.0, 16.0), (35.0, 95.0)]), 0.8),
                (line(&[(64.0, 16.0), (65.0, 95.0)]), 0.8),
                (line(&[(33.0, 8.0), (33.0, 14.0)]), 1.4),
                (line(&[(67.0, 8.0), (67.0, 14.0)]), 1.4),
            ],
        ),
        Shape::Shorts => (
            vec![body(poly(
                (27.0, 26.0),
                &[
                    L(73.0, 26.0),
                    L(80.0, 70.0),
                    L(54.0, 72.0),
                    L(50.0, 50.0),
                    L(46.0, 72.0),
                    L(20.0, 70.0),
                ],
            ))],
            vec![
                (line(&[(27.5, 32.0), (72.5, 32.0)]), 1.0),
                (line(&[(21.0, 65.0), (46.5, 67.0)]), 0.8),
                (line(&[(79.0, 65.0), (53.5, 67.0)]), 0.8),
            ],
        ),
        Shape::CasualShoe => (
            vec![
                body(poly(
                    (14.0, 64.0),
                    &[
                        L(14.0, 44.0),
                        Q(20.0, 37.0, 30.0, 40.0),
                        L(44.0, 45.0),
                        Q(62.0, 47.0, 74.0, 51.0),
                        Q(88.0, 55.0, 88.0, 64.0),
                    ],
                )),
                sole(rect(12.0, 64.0, 78.0, 6.0), [226, 220, 208]),
            ],
            vec![
                (line(&[(46.0, 45.0), (49.0, 52.0)]), 1.0),
                (line(&[(51.0, 46.0), (54.0, 53.0)]), 1.0),
                (line(&[(56.0, 47.0), (59.0, 54.0)]), 1.0),
                (curve((30.0, 40.0), (32.0, 50.0), (46.0, 45.0)), 0.8),
            ],
        ),
        Shape::SportsShoe => (
            vec![
                body(poly(
                    (14.0, 60.0),
                    &[
                        L(16.0, 30.0),
                        Q(24.0, 25.0, 32.0, 30.0),
                        L(46.0, 41.0),
                        Q(64.0, 43.0, 78.0, 49.0),
                        Q(91.0, 54.0, 90.0, 60.0),
                    ],
                )),
                sole(
                    poly(
                        (12.0, 60.0),
                        &[
                            L(92.0, 60.0),
                            Q(94.0, 70.0, 86.0, 74.0),
                            L(16.0, 74.0),
                            Q(10.0, 70.0, 12.0, 60.0),
                        ],
                    ),
                    [240, 240, 240],
                ),
            ],
            vec![
                (line(&[(40.0, 38.0), (44.0, 46.0)]), 1.0),
                (line(&[(46.0, 41.0), (50.0, 48.0)]), 1.0),
                (line(&[(52.0, 42.0), (56.0, 49.0)]), 1.0),
                (line(&[(20.0, 69.0), (86.0, 69.0)]), 0.8),
            ],
        ),
        Shape::FormalShoe => (
            vec![
                body(poly(
                    (12.0, 62.0),
                    &[
                        L(12.0, 47.0),
                        Q(16.0, 42.0, 26.0, 44.0),
                        L(40.0, 49.0),
                        Q(62.0, 48.0, 80.0, 54.0),
                        Q(96.0, 58.0, 93.0, 62.0),
                    ],
                )),
                sole(rect(11.0, 62.0, 83.0, 3.0), [44, 32, 26]),
                sole(rect(11.0, 62.0, 13.0, 7.0), [44, 32, 26]),
            ],
            vec![
                (curve((72.0, 52.0), (76.0, 57.0), (74.0, 62.0)), 0.8),
                (curve((26.0, 44.0), (34.0, 52.0), (40.0, 49.0)), 0.8),
            ],
        ),
        Shape::Heel => (
            vec![
                // A closed pump: a full upper above the sloping sole line, so that the
                // Usage pattern has room to show.
                body(poly(
                    (14.0, 28.0),
                    &[
                        L(24.0, 28.0),
                        Q(32.0, 36.0, 46.0, 40.0),
                        L(62.0, 44.0),
                        Q(86.0, 49.0, 92.0, 65.0),
                        L(89.0, 71.0),
                        Q(62.0, 64.0, 44.0, 59.0),
                        Q(28.0, 54.0, 15.0, 50.0),
                    ],
                )),
                sole(
                    poly((15.0, 48.0), &[L(23.0, 51.0), L(21.0, 82.0), L(18.0, 82.0)]),
                    [36, 34, 36],
                ),
            ],
            vec![(curve((44.0, 42.0), (54.0, 50.0), (62.0, 46.0)), 0.8)],
        ),
        Shape::Flat => (
            vec![
                body(poly(
                    (14.0, 65.0),
                    &[
                        L(14.0, 55.0),
                        Q(16.0, 50.0, 22.0, 52.0),
                        Q(40.0, 59.0, 56.0, 54.0),
                        Q(78.0, 51.0, 88.0, 60.0),
                        Q(92.0, 64.0, 88.0, 65.0),
                    ],
                )),
                sole(rect(13.0, 65.0, 78.0, 3.0), [60, 52, 50]),
            ],
            vec![
                (circle(60.0, 54.5, 2.0), 1.0),
                (line(&[(55.0, 52.0), (65.0, 57.0)]), 1.0),
                (line(&[(55.0, 57.0), (65.0, 52.0)]), 1.0),
            ],
        ),
        Shape::Sandal => (
            vec![
                sole(
                    poly(
                        (12.0, 66.0),
                        &[
                            L(90.0, 66.0),
                            Q(94.0, 70.0, 88.0, 73.0),
                            L(15.0, 73.0),
                            Q(10.0, 70.0, 12.0, 66.0),
                        ],
                    ),
                    [184, 150, 108],
                ),
                body(poly(
                    (56.0, 66.0),
                    &[
                        Q(68.0, 42.0, 82.0, 66.0),
                        L(75.0, 66.0),
                        Q(68.0, 54.0, 63.0, 66.0),
                    ],
                )),
                body(poly(
                    (38.0, 66.0),
                    &[
                        Q(46.0, 44.0, 56.0, 62.0),
                        L(51.0, 64.0),
                        Q(45.0, 54.0, 44.0, 66.0),
                    ],
                )),
                body(poly(
                    (16.0, 66.0),
                    &[L(18.0, 38.0), L(25.0, 38.0), L(25.0, 66.0)],
                )),
                body(poly(
                    (18.0, 44.0),
                    &[L(44.0, 56.0), L(42.0, 60.0), L(18.0, 50.0)],
                )),
            ],
            vec![(circle(21.5, 47.0, 1.5), 0.8)],
        ),
        Shape::FlipFlop => (
            vec![body(poly(
                (50.0, 10.0),
                &[
                    C(72.0, 10.0, 70.0, 48.0, 63.0, 60.0),
                    C(58.0, 70.0, 72.0, 95.0, 50.0, 95.0),
                    C(28.0, 95.0, 42.0, 70.0, 37.0, 60.0),
                    C(30.0, 48.0, 28.0, 10.0, 50.0, 10.0),
                ],
            ))],
            vec![
                (line(&[(50.0, 26.0), (36.0, 56.0)]), 4.0),
                (line(&[(50.0, 26.0), (64.0, 56.0)]), 4.0),
                (circle(50.0, 26.0, 2.0), 2.0),
            ],
        ),
    };
    let parts = parts.into_iter().collect::<Option<Vec<_>>>()?;
    let details = details
        .into_iter()
        .map(|(p, w)| p.map(|p| (p, w)))
        .collect::<Option<Vec<_>>>()?;
    Some(Silhouette { parts, details })
}

fn mix(a: [u8; 3], b: [u8; 3], t: f32) -> [u8; 3] {
    let f = |x: u8, y: u8| (f32::from(x) * (1.0 - t) + f32::from(y) * t).round() as u8;
    [f(a[0], b[0]), f(a[1], b[1]), f(a[2], b[2])]
}

fn luminance(c: [u8; 3]) -> f32 {
    (0.299 * f32::from(c[0]) + 0.587 * f32::from(c[1]) + 0.114 * f32::from(c[2])) / 255.0
}

fn color(c: [u8; 3], alpha: u8) -> Color {
    Color::from_rgba8(c[0], c[1], c[2], alpha)
}

fn solid(c: [u8; 3], alpha: u8) -> Paint<'static> {
    let mut p = Paint::default();
    p.set_color(color(c, alpha));
    p.anti_alias = true;
    p
}

fn stroke(width: f32) -> Stroke {
    Stroke {
        width,
        line_cap: tiny_skia::LineCap::Round,
        line_join: tiny_skia::LineJoin::Round,
        ..Stroke::default()
    }
}

/// Renders one product to JPEG bytes; `path` only names errors.
fn render_jpeg(p: &Product, seed: u64, index: u64, path: &Path) -> Result<Vec<u8>> {
    let err = |msg: &str| Error::Image {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index + 1);

    let side: u32 = rng.random_range(240..=400);
    let s = side as f32;
    let male = matches!(p.gender, "Boys" | "Men");
    let jitter = |rng: &mut ChaCha8Rng, c: [u8; 3], a: i16| -> [u8; 3] {
        c.map(|v| (i16::from(v) + rng.random_range(-a..=a)).clamp(0, 255) as u8)
    };
    let (backdrop, band) = if male {
        ([234, 240, 248], [168, 196, 232])
    } else {
        ([248, 236, 240], [236, 178, 200])
    };
    let backdrop = jitter(&mut rng, backdrop, 4);
    let band = jitter(&mut rng, band, 6);

    let mut pm = Pixmap::new(side, side).ok_or_else(|| err("cannot allocate the canvas"))?;
    pm.fill(color(backdrop, 255));
    let band_h = s * rng.random_range(0.11..0.14);
    if let Some(r) = Rect::from_xywh(0.0, s - band_h, s, band_h) {
        pm.fill_rect(r, &solid(band, 255), Transform::identity(), None);
    }

    // Placement: the product fills most of the square above the band.
    // Side views of shoes are wide and low: draw them a little larger, and heels (a thin
    // sloping band) larger still, so that their Usage pattern stays legible at 64 px.
    let shape_scale = match p.ptype.shape {
        Shape::Heel => 1.25,
        Shape::CasualShoe | Shape::SportsShoe | Shape::FormalShoe | Shape::Flat | Shape::Sandal => {
            1.12
        }
        _ => 1.0,
    };
    let scale = s * 0.0078 * shape_scale * rng.random_range(0.82..1.0);
    let angle: f32 = rng.random_range(-9.0..9.0);
    let cx = s * 0.5 + s * rng.random_range(-0.04..0.04);
    let cy = (s - band_h) * 0.5 + s * rng.random_range(-0.03..0.03);
    let ts = Transform::from_translate(cx, cy)
        .pre_rotate(angle)
        .pre_scale(scale, scale)
        .pre_translate(-50.0, -50.0);

    let sil = silhouette(p.ptype.shape).ok_or_else(|| err("cannot build the silhouette"))?;
    let fill = jitter(&mut rng, p.colour.1, 5);

    // Soft drop shadow: the silhouette offset down-right, a few times with low alpha.
    let shadow_dx = rng.random_range(0.8..2.5);
    let shadow_dy = rng.random_range(1.0..3.0);
    for k in 1..=3 {
        let f = k as f32 / 3.0;
        let t = ts.post_translate(shadow_dx * f * scale, shadow_dy * f * scale);
        for part in &sil.parts {
            pm.fill_path(
                &part.path,
                &solid([0, 0, 0], 18),
                FillRule::Winding,
                t,
                None,
            );
        }
    }

    // Body: a linear gradient of the fill colour (lighting), in a random direction.
    let light = mix(fill, [255, 255, 255], rng.random_range(0.06..0.18));
    let dark = mix(fill, [0, 0, 0], rng.random_range(0.06..0.18));
    let theta: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (theta.cos() * 50.0, theta.sin() * 50.0);
    let shader = LinearGradient::new(
        Point::from_xy(50.0 - dx, 50.0 - dy),
        Point::from_xy(50.0 + dx, 50.0 + dy),
        vec![
            GradientStop::new(0.0, color(light, 255)),
            GradientStop::new(0.5, color(fill, 255)),
            GradientStop::new(1.0, color(dark, 255)),
        ],
        SpreadMode::Pad,
        Transform::identity(),
    )
    .unwrap_or(Shader::SolidColor(color(fill, 255)));
    let body_paint = Paint {
        shader,
        anti_alias: true,
        ..Paint::default()
    };
    let mut body_mask = Mask::new(side, side).ok_or_else(|| err("cannot allocate the mask"))?;
    let mut bounds: Option<Rect> = None;
    for part in &sil.parts {
        match part.role {
            Role::Body => {
                pm.fill_path(&part.path, &body_paint, FillRule::Winding, ts, None);
                body_mask.fill_path(&part.path, FillRule::Winding, true, ts);
                let b = part.path.bounds();
                bounds = Some(match bounds {
                    None => b,
                    Some(a) => Rect::from_ltrb(
                        a.left().min(b.left()),
                        a.top().min(b.top()),
                        a.right().max(b.right()),
                        a.bottom().max(b.bottom()),
                    )
                    .unwrap_or(a),
                });
            }
            Role::Sole(c) => {
                let c = jitter(&mut rng, c, 4);
                pm.fill_path(&part.path, &solid(c, 255), FillRule::Winding, ts, None);
            }
        }
    }
    let bounds = bounds.ok_or_else(|| err("silhouette without a body"))?;

    // Usage: a pattern inside the body, in a contrasting shade of the fill.
    let contrast = if luminance(fill) > 0.55 {
        mix(fill, [0, 0, 0], 0.55)
    } else {
        mix(fill, [255, 255, 255], 0.6)
    };
    let pattern = solid(contrast, 235);
    let (l, t, w, h) = (bounds.left(), bounds.top(), bounds.width(), bounds.height());
    match p.usage {
        "Formal" => {
            // Vertical pinstripes, about 7 across the product and 2 units wide, so that they stay
            // lines (not a tint) at the tiny preset's 64 px.
            let step = (w / 7.0).max(5.0);
            let mut x = l + step * rng.random_range(0.2..0.8);
            while x < l + w {
                if let Some(path) = line(&[(x, t - 1.0), (x, t + h + 1.0)]) {
                    pm.stroke_path(&path, &pattern, &stroke(2.0), ts, Some(&body_mask));
                }
                x += step;
            }
        }
        "Sports" => {
            // Two broad diagonal stripes across the middle.
            let d = w.max(h);
            for k in [-0.12f32, 0.12] {
                let y = t + h * (0.5 + k);
                if let Some(path) = line(&[(l - 5.0, y + d * 0.25), (l + w + 5.0, y - d * 0.25)]) {
                    pm.stroke_path(
                        &path,
                        &pattern,
                        &stroke(h * 0.085 + 1.5),
                        ts,
                        Some(&body_mask),
                    );
                }
            }
        }
        "Ethnic" => {
            // A grid of bold dots and a contrasting trim along the outline. The dots cover
            // about 40% of the body (radius 0.36 of their spacing), twice the share Formal's
            // pinstripes do: at 64 px a stripe and a dot are a pixel or two, and with equal
            // shares the two patterns gave a product the same tint, told apart only by their
            // fine shapes; on heels, the one type that comes in both, the tiny preset read
            // them at chance. Dots of 5 units and more across, about 3 px at 64 px.
            let step = (w.min(h) / 5.0).clamp(7.0, 14.0);
            let r = step * 0.36;
            let mut y = t + step * 0.5;
            let mut row = 0;
            while y < t + h {
                let mut x = l + step * if row % 2 == 0 { 0.5 } else { 1.0 };
                while x < l + w {
                    if let Some(c) = circle(x, y, r) {
                        pm.fill_path(&c, &pattern, FillRule::Winding, ts, Some(&body_mask));
                    }
                    x += step;
                }
                y += step;
                row += 1;
            }
            for part in sil.parts.iter().filter(|p| p.role == Role::Body) {
                pm.stroke_path(&part.path, &pattern, &stroke(3.6), ts, Some(&body_mask));
            }
        }
        _ => {} // Casual: plain.
    }

    // Details and outline, in a darker (or, on dark fills, lighter) shade.
    let detail = if luminance(fill) > 0.3 {
        mix(fill, [0, 0, 0], 0.45)
    } else {
        mix(fill, [255, 255, 255], 0.35)
    };
    for (path, width) in &sil.details {
        pm.stroke_path(path, &solid(detail, 220), &stroke(*width), ts, None);
    }
    // The outline: a hairline, except on a fill about as light as the backdrop (White): its
    // silhouette, the ProductType cue, would otherwise be a few grey levels off the backdrop
    // and vanish at the tiny preset's 64 px; 2.4 units is about one pixel there, as the edge
    // a white product shows in a catalog photo.
    let faint = fill
        .iter()
        .zip(backdrop)
        .all(|(&f, b)| (i16::from(f) - i16::from(b)).abs() < 48);
    let (outline_width, outline_alpha) = if faint { (2.4, 230) } else { (0.7, 200) };
    let outline = solid(mix(fill, [40, 40, 40], 0.7), outline_alpha);
    for part in &sil.parts {
        pm.stroke_path(&part.path, &outline, &stroke(outline_width), ts, None);
    }

    // Pixel noise, then JPEG at a random quality. The canvas is opaque, so its premultiplied
    // RGBA is plain RGBA.
    let noise: u8 = rng.random_range(2..=6);
    let quality: u8 = rng.random_range(70..=95);
    // One random byte per channel, drawn in bulk (fast even in unoptimized builds), mapped to
    // -noise..=noise.
    let mut random = vec![0u8; (side * side * 3) as usize];
    rng.fill_bytes(&mut random);
    let span = u16::from(noise) * 2 + 1;
    let data = pm.data();
    let mut rgb = vec![0u8; random.len()];
    for i in 0..rgb.len() {
        let v = i16::from(data[i / 3 * 4 + i % 3]);
        let n = ((u16::from(random[i]) * span) >> 8) as i16 - i16::from(noise);
        rgb[i] = (v + n).clamp(0, 255) as u8;
    }
    let img = RgbImage::from_raw(side, side, rgb).ok_or_else(|| err("bad canvas size"))?;
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(Cursor::new(&mut bytes), quality)
        .encode(img.as_raw(), side, side, ExtendedColorType::Rgb8)
        .map_err(|e| err(&format!("cannot encode JPEG: {e}")))?;
    Ok(bytes)
}

/// Every (Category, Gender, SubCategory, ProductType, Usage) combination `synth` can write,
/// for tests and documentation.
pub fn vocabulary() -> Vec<[&'static str; 5]> {
    let mut v = Vec::new();
    for (category, gender, types) in FOLDERS {
        for t in types {
            for u in t.usages {
                v.push([category, gender, t.sub_category, t.name, u]);
            }
        }
    }
    v
}

/// The Colour vocabulary of `synth`.
pub fn colours() -> Vec<&'static str> {
    COLOURS.iter().map(|c| c.0).collect()
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Args as _;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moda-synth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn every_shape_builds() {
        for (_, _, types) in FOLDERS {
            for t in types {
                let s = silhouette(t.shape).unwrap();
                assert!(s.parts.iter().any(|p| p.role == Role::Body), "{}", t.name);
            }
        }
    }

    #[test]
    fn plan_is_deterministic_and_consistent() {
        let a = plan(200, 7);
        let b = plan(200, 7);
        let c = plan(200, 8);
        assert_eq!(
            a.iter().map(|p| p.row()).collect::<Vec<_>>(),
            b.iter().map(|p| p.row()).collect::<Vec<_>>()
        );
        assert_ne!(
            a.iter().map(|p| p.row()).collect::<Vec<_>>(),
            c.iter().map(|p| p.row()).collect::<Vec<_>>()
        );
        let vocab = vocabulary();
        for p in &a {
            let key = [
                p.category,
                p.gender,
                p.ptype.sub_category,
                p.ptype.name,
                p.usage,
            ];
            assert!(vocab.contains(&key), "{key:?}");
        }
        // All four folders occur.
        let folders: std::collections::BTreeSet<_> = a.iter().map(|p| p.rel_dir()).collect();
        assert_eq!(folders.len(), 4);
    }

    #[test]
    fn render_is_deterministic_and_sized() {
        let products = plan(6, 3);
        for (i, p) in products.iter().enumerate() {
            let a = render_jpeg(p, 3, i as u64, Path::new("x.jpg")).unwrap();
            let b = render_jpeg(p, 3, i as u64, Path::new("x.jpg")).unwrap();
            assert_eq!(a, b);
            let img = image::load_from_memory(&a).unwrap();
            assert!((240..=400).contains(&img.width()) && img.width() == img.height());
        }
    }

    #[test]
    fn refuses_non_empty_out_without_force() {
        let d = tmp("exists");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("keep.txt"), "x").unwrap();
        let e = synth(&SynthArgs::new(&d, 3, 0)).unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }), "{e}");
        assert!(d.join("keep.txt").exists());
        // An empty directory is written into.
        std::fs::remove_file(d.join("keep.txt")).unwrap();
        let r = synth(&SynthArgs::new(&d, 3, 0)).unwrap();
        assert_eq!(r.count, 3);
        // --force replaces a catalog that synth wrote.
        let mut args = SynthArgs::new(&d, 4, 1);
        args.force = true;
        let r = synth(&args).unwrap();
        assert_eq!(r.count, 4);
        assert!(d.join(KAGGLE_CSV).is_file());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// `--force` replaced any directory: a home directory, a real Kaggle catalog, a catalog
    /// with a training run inside. It replaces only what `synth` wrote.
    #[test]
    fn force_replaces_only_a_synthetic_catalog() {
        let d = tmp("force");
        let mut args = SynthArgs::new(&d, 6, 2);
        args.force = true;
        let refused = |what: &str| {
            let e = synth(&args).unwrap_err();
            assert!(
                matches!(e, Error::OutputNotReplaceable { .. }),
                "{what}: {e}"
            );
            let msg = e.to_string();
            assert!(msg.contains("only a synthetic catalog"), "{what}: {msg}");
            msg
        };
        // A directory of unrelated files.
        std::fs::create_dir_all(d.join("docs")).unwrap();
        std::fs::write(d.join("docs/thesis.tex"), "years of work").unwrap();
        let msg = refused("unrelated");
        assert!(msg.contains("\"docs\""), "{msg}");
        assert!(d.join("docs/thesis.tex").is_file());
        std::fs::remove_dir_all(&d).unwrap();
        // A synthetic catalog with something added: a file at the top, in a folder, a run.
        synth(&SynthArgs::new(&d, 6, 2)).unwrap();
        let images = d.join("Apparel/Boys/Images/images_with_product_ids");
        let images = if images.is_dir() {
            images
        } else {
            d.join("Apparel/Girls/Images/images_with_product_ids")
        };
        for extra in [
            d.join("run/best/config.json"),
            d.join("notes.txt"),
            images.join("notes.txt"),
            d.join("Footwear/Kids/x.jpg"),
        ] {
            std::fs::create_dir_all(extra.parent().unwrap()).unwrap();
            std::fs::write(&extra, "mine").unwrap();
            refused(&extra.display().to_string());
            assert!(extra.is_file());
            std::fs::remove_file(&extra).unwrap();
            let mut dir = extra.parent().unwrap().to_path_buf();
            while dir != d && std::fs::remove_dir(&dir).is_ok() {
                dir = dir.parent().unwrap().to_path_buf();
            }
        }
        // The Kaggle layout with real image URLs: not written by synth.
        let csv = d.join(KAGGLE_CSV);
        let text = std::fs::read_to_string(&csv).unwrap();
        std::fs::write(
            &csv,
            text.replace(SYNTH_URL, "http://assets.myntassets.com/"),
        )
        .unwrap();
        let msg = refused("kaggle");
        assert!(msg.contains("image URLs"), "{msg}");
        std::fs::write(&csv, text).unwrap();
        // As written by synth: replaced.
        let r = synth(&args).unwrap();
        assert_eq!(r.count, 6);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn zero_count_is_refused() {
        let e = synth(&SynthArgs::new(tmp("zero"), 0, 0)).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }

    #[test]
    fn long_help_documents_the_cues() {
        let mut cmd = SynthArgs::augment_args(clap::Command::new("synth"));
        let help = cmd.render_long_help().to_string();
        for word in [
            "Colour",
            "ProductType",
            "Gender",
            "Usage",
            "pinstripes",
            "--seed",
        ] {
            assert!(help.contains(word), "{word} missing from:\n{help}");
        }
    }
}
