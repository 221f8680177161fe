//! The trainer's data side: `trainer synth` (determinism, the Kaggle layout), the catalog
//! loader (Kaggle layout, user CSV, bad input), the split, and the embedding cache against
//! direct encoding with the tiny fixture encoder `clip_gelu`.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use moda_models::preprocess::{ImageProcessor, ImageProcessorConfig, RESAMPLE_BILINEAR};
use moda_models::ClipVision;
use moda_tests::{fixture, max_abs_diff, TempDir};
use trainer::data::{
    load_catalog, CaptionTemplate, CatalogSource, ImageCheck, LoadOptions, SkipReason, Split,
    ATTRIBUTE_COLUMNS, KAGGLE_COLUMNS, KAGGLE_CSV,
};
use trainer::embed_cache::{EmbeddingCache, EncoderFingerprint, ImageEncoder};
use trainer::synth::{synth, SynthArgs};
use trainer::Error;

const FOLDERS: [&str; 4] = [
    "Apparel/Boys",
    "Apparel/Girls",
    "Footwear/Men",
    "Footwear/Women",
];

fn make_catalog(dir: &Path, count: usize, seed: u64) {
    synth(&SynthArgs::new(dir, count, seed)).expect("synth");
}

/// Every file under `dir`, relative path -> bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("prefix").to_path_buf();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn kaggle(dir: &Path) -> CatalogSource {
    CatalogSource::Kaggle {
        dir: dir.to_path_buf(),
        template: CaptionTemplate::default(),
    }
}

fn rows(csv_path: &Path) -> Vec<BTreeMap<String, String>> {
    let mut r = csv::Reader::from_path(csv_path).expect("csv");
    let headers: Vec<String> = r
        .headers()
        .expect("headers")
        .iter()
        .map(String::from)
        .collect();
    r.records()
        .map(|rec| {
            let rec = rec.expect("record");
            headers
                .iter()
                .cloned()
                .zip(rec.iter().map(String::from))
                .collect()
        })
        .collect()
}

fn image_path(dir: &Path, row: &BTreeMap<String, String>) -> PathBuf {
    dir.join(&row["Category"])
        .join(&row["Gender"])
        .join("Images")
        .join("images_with_product_ids")
        .join(&row["Image"])
}

#[test]
fn synth_is_deterministic_per_seed() {
    let t = TempDir::new("synth-det");
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    make_catalog(&a, 16, 11);
    make_catalog(&b, 16, 11);
    make_catalog(&c, 16, 12);
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(fa.len(), 17, "16 images and fashion.csv");
    assert!(fa == fb, "the same seed must give byte-identical files");
    assert_ne!(fa[Path::new(KAGGLE_CSV)], fc[Path::new(KAGGLE_CSV)]);
    let images_a: Vec<&Vec<u8>> = fa.values().collect();
    let images_c: Vec<&Vec<u8>> = fc.values().collect();
    assert_ne!(
        images_a, images_c,
        "a different seed must give different images"
    );
    // No temporary directory is left behind.
    let names: Vec<String> = std::fs::read_dir(t.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

#[test]
fn synth_writes_the_kaggle_layout() {
    let t = TempDir::new("synth-layout");
    let dir = t.path().join("catalog");
    make_catalog(&dir, 60, 3);
    let text = std::fs::read_to_string(dir.join(KAGGLE_CSV)).expect("csv");
    let header = text.lines().next().expect("header");
    assert_eq!(
        header,
        "ProductId,Gender,Category,SubCategory,ProductType,Colour,Usage,ProductTitle,Image,ImageURL"
    );
    assert_eq!(header.split(',').collect::<Vec<_>>(), KAGGLE_COLUMNS);
    let rows = rows(&dir.join(KAGGLE_CSV));
    assert_eq!(rows.len(), 60);
    let mut top: Vec<String> = std::fs::read_dir(&dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    top.sort();
    assert_eq!(top, ["Apparel", "Footwear", KAGGLE_CSV]);
    let mut ids = std::collections::BTreeSet::new();
    let mut folders_seen = std::collections::BTreeSet::new();
    for row in &rows {
        let folder = format!("{}/{}", row["Category"], row["Gender"]);
        assert!(FOLDERS.contains(&folder.as_str()), "{folder}");
        folders_seen.insert(folder);
        assert_eq!(row["Image"], format!("{}.jpg", row["ProductId"]));
        assert!(ids.insert(row["ProductId"].clone()), "duplicate id");
        let img = image::open(image_path(&dir, row)).expect("image decodes");
        assert!((240..=400).contains(&img.width()), "{}", img.width());
        let sub = match row["ProductType"].as_str() {
            "Tshirts" | "Shirts" | "Tops" => "Topwear",
            "Jeans" | "Trousers" | "Shorts" | "Skirts" => "Bottomwear",
            "Dresses" => "Dress",
            "Casual Shoes" | "Sports Shoes" | "Formal Shoes" | "Heels" | "Flats" => "Shoes",
            "Sandals" => "Sandal",
            "Flip Flops" => "Flip Flops",
            other => panic!("unexpected ProductType {other}"),
        };
        assert_eq!(row["SubCategory"], sub);
        for col in KAGGLE_COLUMNS {
            assert!(!row[col].is_empty(), "empty {col}");
        }
    }
    assert_eq!(folders_seen.len(), 4);
    // Exactly one image per row, nothing else.
    assert_eq!(files(&dir).len(), 61);
}

#[test]
fn loads_a_synthetic_catalog_and_splits_it() {
    let t = TempDir::new("load-synth");
    let dir = t.path().join("catalog");
    make_catalog(&dir, 40, 9);
    let cat = load_catalog(&kaggle(&dir), &LoadOptions::default()).expect("load");
    assert_eq!(cat.len(), 40);
    assert_eq!(cat.report.rows, 40);
    assert_eq!(cat.report.skipped(), 0);
    let rows = rows(&dir.join(KAGGLE_CSV));
    for (s, row) in cat.samples.iter().zip(&rows) {
        let want = format!(
            "{} {} {} for {} - {} {}",
            row["Colour"],
            row["Usage"],
            row["ProductType"],
            row["Gender"],
            row["Category"],
            row["SubCategory"]
        );
        assert_eq!(s.caption, want);
        assert_eq!(s.id, row["ProductId"]);
        assert_eq!(s.image, image_path(&dir, row));
        for col in ATTRIBUTE_COLUMNS {
            assert_eq!(s.attributes[col], row[col]);
        }
    }
    // The loader also accepts the CSV itself.
    let again = load_catalog(&kaggle(&dir.join(KAGGLE_CSV)), &LoadOptions::default()).expect("csv");
    assert_eq!(again.samples, cat.samples);

    let split = cat.split(0.2, 42).expect("split");
    assert_eq!((split.train.len(), split.validation.len()), (32, 8));
    assert_eq!(split, cat.split(0.2, 42).expect("split"));
    let ids = split.validation_ids(&cat);
    assert_eq!(ids.len(), 8);
    assert_eq!(split.validation_paths(&cat).len(), 8);
    let (rebuilt, absent) = Split::from_ids(&cat, &ids);
    assert_eq!(rebuilt, split);
    assert!(absent.is_empty());
    let (_, absent) = Split::from_ids(&cat, &["no-such-id".to_string()]);
    assert_eq!(absent, ["no-such-id"]);

    // A custom template.
    let source = CatalogSource::Kaggle {
        dir: dir.clone(),
        template: CaptionTemplate::parse("{Colour} {ProductType}").expect("template"),
    };
    let cat2 = load_catalog(&source, &LoadOptions::default()).expect("load");
    assert_eq!(
        cat2.samples[0].caption,
        format!("{} {}", rows[0]["Colour"], rows[0]["ProductType"])
    );
}

#[test]
fn unknown_template_column_lists_the_columns() {
    let t = TempDir::new("template");
    let dir = t.path().join("catalog");
    make_catalog(&dir, 4, 1);
    let source = CatalogSource::Kaggle {
        dir,
        template: CaptionTemplate::parse("{Colour} {Pattern}").expect("template"),
    };
    let err = load_catalog(&source, &LoadOptions::default()).expect_err("must fail");
    assert!(matches!(err, Error::TemplateColumn { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("Pattern"), "{msg}");
    for col in KAGGLE_COLUMNS {
        assert!(msg.contains(col), "{col} not listed: {msg}");
    }
}

#[test]
fn csv_missing_a_column_names_the_file_and_lists_the_columns() {
    let t = TempDir::new("missing-col");
    let dir = t.path().join("catalog");
    make_catalog(&dir, 4, 2);
    // Drop the Usage column.
    let csv_path = dir.join(KAGGLE_CSV);
    let rows = rows(&csv_path);
    let cols: Vec<&str> = KAGGLE_COLUMNS
        .iter()
        .copied()
        .filter(|c| *c != "Usage")
        .collect();
    let mut w = csv::Writer::from_path(&csv_path).expect("writer");
    w.write_record(&cols).expect("header");
    for r in &rows {
        w.write_record(cols.iter().map(|c| r[*c].as_str()))
            .expect("row");
    }
    w.flush().expect("flush");
    drop(w);
    let err = load_catalog(&kaggle(&dir), &LoadOptions::default()).expect_err("must fail");
    match &err {
        Error::MissingColumns {
            path,
            missing,
            expected,
            ..
        } => {
            assert_eq!(path, &csv_path);
            assert_eq!(missing, &["Usage"]);
            for c in [
                "ProductId",
                "Gender",
                "Category",
                "Image",
                "Colour",
                "Usage",
            ] {
                assert!(expected.iter().any(|e| e == c), "{c} not in {expected:?}");
            }
        }
        other => panic!("expected MissingColumns, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(KAGGLE_CSV) && msg.contains("Usage") && msg.contains("expected columns"),
        "{msg}"
    );

    // A user CSV without its caption column.
    let user = t.path().join("mine.csv");
    std::fs::write(&user, "path,label\na.jpg,x\n").expect("write");
    let err = load_catalog(
        &CatalogSource::Csv {
            csv: user,
            image_column: "path".into(),
            caption_column: "text".into(),
            root: None,
        },
        &LoadOptions::default(),
    )
    .expect_err("must fail");
    let msg = err.to_string();
    assert!(
        matches!(err, Error::MissingColumns { .. })
            && msg.contains("mine.csv")
            && msg.contains("text")
            && msg.contains("path, text"),
        "{msg}"
    );
}

#[test]
fn missing_and_corrupt_images_are_skipped_and_counted() {
    let t = TempDir::new("skip");
    let dir = t.path().join("catalog");
    make_catalog(&dir, 12, 4);
    let rows = rows(&dir.join(KAGGLE_CSV));
    std::fs::remove_file(image_path(&dir, &rows[1])).expect("rm");
    std::fs::remove_file(image_path(&dir, &rows[5])).expect("rm");
    std::fs::write(image_path(&dir, &rows[3]), b"this is not a jpeg").expect("write");
    std::fs::write(image_path(&dir, &rows[7]), b"").expect("write");
    let cat = load_catalog(&kaggle(&dir), &LoadOptions::default()).expect("load");
    let r = &cat.report;
    assert_eq!((r.rows, r.loaded, r.missing, r.unreadable), (12, 8, 2, 2));
    assert_eq!(cat.len(), 8);
    let reasons: Vec<(u64, SkipReason)> = r.examples.iter().map(|e| (e.line, e.reason)).collect();
    assert_eq!(
        reasons,
        [
            (3, SkipReason::Missing),
            (5, SkipReason::Unreadable),
            (7, SkipReason::Missing),
            (9, SkipReason::Unreadable)
        ]
    );
    let summary = r.summary();
    assert!(
        summary.contains(&rows[1]["Image"]) && summary.contains("4 skipped"),
        "{summary}"
    );
    assert!(cat.samples.iter().all(|s| s.image.is_file()));

    // With only an existence check the corrupt files pass.
    let opts = LoadOptions {
        check: ImageCheck::Exists,
        ..Default::default()
    };
    let cat = load_catalog(&kaggle(&dir), &opts).expect("load");
    assert_eq!((cat.len(), cat.report.missing), (10, 2));
}

#[test]
fn empty_catalogs_are_a_clear_error() {
    let t = TempDir::new("empty");
    let dir = t.path().join("catalog");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(KAGGLE_CSV), KAGGLE_COLUMNS.join(",") + "\n").expect("write");
    let err = load_catalog(&kaggle(&dir), &LoadOptions::default()).expect_err("must fail");
    assert!(
        matches!(err, Error::EmptyCatalog { rows: 0, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("empty catalog"), "{err}");

    // Rows, but every image missing.
    let dir2 = t.path().join("catalog2");
    make_catalog(&dir2, 3, 0);
    std::fs::remove_dir_all(dir2.join("Apparel")).ok();
    std::fs::remove_dir_all(dir2.join("Footwear")).ok();
    let err = load_catalog(&kaggle(&dir2), &LoadOptions::default()).expect_err("must fail");
    assert!(
        matches!(
            err,
            Error::EmptyCatalog {
                rows: 3,
                missing: 3,
                ..
            }
        ),
        "{err:?}"
    );

    // No fashion.csv at all.
    let err = load_catalog(&kaggle(&t.path().join("nowhere")), &LoadOptions::default())
        .expect_err("must fail");
    assert!(err.to_string().contains(KAGGLE_CSV), "{err}");
}

#[test]
fn user_csv_with_image_and_caption_columns() {
    let t = TempDir::new("user-csv");
    let dir = t.path().join("catalog");
    make_catalog(&dir, 5, 8);
    let rows = rows(&dir.join(KAGGLE_CSV));
    // Paths relative to the CSV's folder (the catalog) ...
    let csv_path = dir.join("mine.csv");
    let mut w = csv::Writer::from_path(&csv_path).expect("writer");
    w.write_record(["file", "description", "extra"])
        .expect("header");
    for r in &rows {
        let rel = image_path(Path::new(""), r);
        w.write_record([
            rel.to_string_lossy().as_ref(),
            &format!("a {} thing", r["Colour"]),
            "x",
        ])
        .expect("row");
    }
    w.write_record(["missing.jpg", "gone", "x"]).expect("row");
    w.flush().expect("flush");
    drop(w);
    let source = CatalogSource::Csv {
        csv: csv_path.clone(),
        image_column: "file".into(),
        caption_column: "description".into(),
        root: None,
    };
    let cat = load_catalog(&source, &LoadOptions::default()).expect("load");
    assert_eq!((cat.len(), cat.report.missing), (5, 1));
    assert_eq!(
        cat.samples[0].caption,
        format!("a {} thing", rows[0]["Colour"])
    );
    assert_eq!(cat.samples[0].image, image_path(&dir, &rows[0]));
    assert_eq!(cat.samples[0].attributes["extra"], "x");
    // ... or to --root.
    let moved = t.path().join("elsewhere.csv");
    std::fs::copy(&csv_path, &moved).expect("copy");
    let source = CatalogSource::Csv {
        csv: moved,
        image_column: "file".into(),
        caption_column: "description".into(),
        root: Some(dir.clone()),
    };
    assert_eq!(
        load_catalog(&source, &LoadOptions::default())
            .expect("load")
            .len(),
        5
    );
}

/// The fixture encoder, counting its calls.
struct Counting<'a> {
    inner: &'a ClipVision,
    calls: Cell<usize>,
    images: Cell<usize>,
}

impl ImageEncoder for Counting<'_> {
    fn encode(&self, pixel_values: &Tensor) -> trainer::Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.images
            .set(self.images.get() + pixel_values.dim(0).expect("dim"));
        self.inner.encode(pixel_values)
    }
    fn output_dim(&self) -> usize {
        self.inner.output_dim()
    }
}

fn encoder() -> (ClipVision, ImageProcessor, EncoderFingerprint) {
    let dir = fixture("clip_gelu");
    let model = ClipVision::from_dir(&dir, DType::F32, &Device::Cpu).expect("encoder");
    let cfg = ImageProcessorConfig::from_dir_or_default(&dir).expect("preprocessor");
    let processor = ImageProcessor::new(cfg).expect("processor");
    let fp = EncoderFingerprint::from_dir(&dir).expect("fingerprint");
    (model, processor, fp)
}

#[test]
fn embedding_cache_reuses_invalidates_and_matches_direct_encoding() {
    let t = TempDir::new("cache");
    let dir = t.path().join("catalog");
    make_catalog(&dir, 10, 5);
    let cat = load_catalog(&kaggle(&dir), &LoadOptions::default()).expect("load");
    let (model, processor, fp) = encoder();
    let enc = Counting {
        inner: &model,
        calls: Cell::new(0),
        images: Cell::new(0),
    };
    let cache = EmbeddingCache::open(t.path().join("cache"), fp.clone()).expect("open");
    let hidden = ProgressBar::hidden();
    let dev = Device::Cpu;

    // First call: everything encoded, in batches of 4.
    let (first, stats) = cache
        .get_or_compute_with_stats(&cat.samples, &enc, &processor, &dev, 4, &hidden)
        .expect("compute");
    assert_eq!(first.dims(), &[10, 24]);
    assert_eq!((stats.computed, stats.hits, stats.batches), (10, 0, 3));
    assert_eq!((enc.calls.get(), enc.images.get()), (3, 10));

    // Equal to encoding directly.
    let imgs: Vec<_> = cat
        .samples
        .iter()
        .map(|s| moda_models::preprocess::load_image(&s.image, &Default::default()).expect("image"))
        .collect();
    let direct = model
        .forward(&processor.preprocess_batch(&imgs, &dev).expect("pixels"))
        .expect("forward");
    let d = max_abs_diff(&first, &direct);
    assert!(d <= 1e-5, "cache vs direct: max abs diff {d}");

    // Second call (a new handle on the same directory): nothing encoded, identical values.
    let cache2 = EmbeddingCache::open(t.path().join("cache"), fp.clone()).expect("open");
    let (second, stats) = cache2
        .get_or_compute_with_stats(&cat.samples, &enc, &processor, &dev, 4, &hidden)
        .expect("reuse");
    assert_eq!((stats.computed, stats.hits, stats.batches), (0, 10, 0));
    assert_eq!(enc.calls.get(), 3, "the encoder must not run again");
    assert_eq!(max_abs_diff(&first, &second), 0.0);

    // Another order and a duplicate: still nothing encoded, rows follow the request.
    let picks = [
        cat.samples[3].image.clone(),
        cat.samples[0].image.clone(),
        cat.samples[3].image.clone(),
    ];
    let (sub, stats) = cache
        .get_or_compute_with_stats(&picks, &enc, &processor, &dev, 4, &hidden)
        .expect("subset");
    assert_eq!((stats.images, stats.unique, stats.computed), (3, 2, 0));
    let want = Tensor::cat(
        &[
            first.narrow(0, 3, 1).expect("row"),
            first.narrow(0, 0, 1).expect("row"),
            first.narrow(0, 3, 1).expect("row"),
        ],
        0,
    )
    .expect("cat");
    assert_eq!(max_abs_diff(&sub, &want), 0.0);

    // Changed preprocessing: a different namespace, everything encoded again.
    let bilinear = ImageProcessor::new(ImageProcessorConfig {
        resample: RESAMPLE_BILINEAR,
        ..processor.config().clone()
    })
    .expect("processor");
    assert_ne!(
        cache.namespace(&bilinear).expect("ns"),
        cache.namespace(&processor).expect("ns")
    );
    let (other, stats) = cache
        .get_or_compute_with_stats(&cat.samples, &enc, &bilinear, &dev, 8, &hidden)
        .expect("bilinear");
    assert_eq!((stats.computed, stats.hits, stats.batches), (10, 0, 2));
    assert!(max_abs_diff(&other, &first) > 0.0);
    // ... and the original preprocessing still hits.
    let (_, stats) = cache
        .get_or_compute_with_stats(&cat.samples, &enc, &processor, &dev, 8, &hidden)
        .expect("reuse");
    assert_eq!(stats.computed, 0);

    // Another encoder fingerprint: a different namespace, everything encoded again.
    let other_fp = EmbeddingCache::open(t.path().join("cache"), fp.with_tag("bf16")).expect("open");
    let (_, stats) = other_fp
        .get_or_compute_with_stats(&cat.samples, &enc, &processor, &dev, 16, &hidden)
        .expect("other encoder");
    assert_eq!(stats.computed, 10);

    // A corrupt entry is not trusted: recomputed, and the values are right again.
    let ns_dir = cache.namespace_dir(&processor).expect("ns dir");
    let entries: Vec<PathBuf> = files(&ns_dir)
        .into_keys()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| ns_dir.join(p))
        .collect();
    assert_eq!(entries.len(), 10);
    let mut bytes = std::fs::read(&entries[0]).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&entries[0], &bytes).expect("write");
    std::fs::write(&entries[1], b"garbage").expect("write");
    let (fixed, stats) = cache
        .get_or_compute_with_stats(&cat.samples, &enc, &processor, &dev, 4, &hidden)
        .expect("recompute");
    assert_eq!((stats.corrupt, stats.computed, stats.hits), (2, 2, 8));
    assert!(max_abs_diff(&fixed, &first) <= 1e-5);
    let (_, stats) = cache
        .get_or_compute_with_stats(&cat.samples, &enc, &processor, &dev, 4, &hidden)
        .expect("reuse");
    assert_eq!((stats.corrupt, stats.computed), (0, 0));
    // The public API without stats returns the same tensor.
    let plain = cache
        .get_or_compute(&cat.samples, &model, &processor, &dev, 4, &hidden)
        .expect("plain");
    assert!(max_abs_diff(&plain, &first) <= 1e-5);
}

#[test]
fn embedding_cache_errors_name_the_image() {
    let t = TempDir::new("cache-bad");
    let (model, processor, fp) = encoder();
    let cache = EmbeddingCache::open(t.path().join("cache"), fp).expect("open");
    let bad = t.path().join("bad.jpg");
    std::fs::write(&bad, b"not an image").expect("write");
    let err = cache
        .get_or_compute(
            &[&bad],
            &model,
            &processor,
            &Device::Cpu,
            4,
            &ProgressBar::hidden(),
        )
        .expect_err("must fail");
    assert!(err.to_string().contains("bad.jpg"), "{err}");
    let err = cache
        .get_or_compute(
            &[t.path().join("absent.jpg")],
            &model,
            &processor,
            &Device::Cpu,
            4,
            &ProgressBar::hidden(),
        )
        .expect_err("must fail");
    assert!(err.to_string().contains("absent.jpg"), "{err}");
    let none: [PathBuf; 0] = [];
    assert!(cache
        .get_or_compute(
            &none,
            &model,
            &processor,
            &Device::Cpu,
            4,
            &ProgressBar::hidden()
        )
        .is_err());
}

/// Rewrites the catalog's `fashion.csv` with `ProductId` set by `id(row index)` (the images
/// stay where they are: the `Image` column is kept).
fn set_product_ids(dir: &Path, id: impl Fn(usize) -> String) {
    let csv_path = dir.join(KAGGLE_CSV);
    let rows = rows(&csv_path);
    let mut w = csv::Writer::from_path(&csv_path).expect("csv writer");
    w.write_record(KAGGLE_COLUMNS).expect("header");
    for (i, row) in rows.iter().enumerate() {
        let record: Vec<String> = KAGGLE_COLUMNS
            .iter()
            .map(|c| {
                if *c == "ProductId" {
                    id(i)
                } else {
                    row[*c].clone()
                }
            })
            .collect();
        w.write_record(&record).expect("row");
    }
    w.flush().expect("flush");
}

/// Real catalogs repeat ids. The split is by row: recorded as rows, it rebuilds to exactly the
/// rows held out (8 of 40), where a rebuild from ids puts every row of a repeated id into
/// validation; the repeated ids are listed for a warning that names them and their rows.
#[test]
fn repeated_ids_split_by_row() {
    let t = TempDir::new("dup-ids");
    let dir = t.path().join("catalog");
    make_catalog(&dir, 40, 9);
    // Rows 2k and 2k+1 share an id; row 39 has its own.
    set_product_ids(&dir, |i| {
        if i == 39 {
            "solo".into()
        } else {
            format!("P{}", i / 2)
        }
    });
    let cat = load_catalog(&kaggle(&dir), &LoadOptions::default()).expect("load");
    assert_eq!(cat.len(), 40);
    let rows: Vec<usize> = cat.samples.iter().map(|s| s.row).collect();
    assert_eq!(rows, (0..40).collect::<Vec<_>>());
    let dups = cat.duplicate_ids();
    assert_eq!(dups.len(), 19);
    assert_eq!(dups[0], ("P0".to_string(), 2));
    let warning = cat.duplicate_warning().expect("a warning");
    assert!(
        warning.contains("19 id(s)") && warning.contains("\"P0\" (2 rows)"),
        "{warning}"
    );
    assert!(warning.contains("and 14 more"), "{warning}");

    let split = cat.split(0.2, 42).expect("split");
    assert_eq!(split.validation.len(), 8);
    let recorded = split.validation_rows(&cat);
    assert_eq!(recorded.len(), 8);
    let (rebuilt, problems) = Split::from_rows(&cat, &recorded);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(rebuilt, split);
    // What recording ids did: the partners of the held-out rows join them.
    let (by_id, _) = Split::from_ids(&cat, &split.validation_ids(&cat));
    assert!(by_id.validation.len() > 8, "{by_id:?}");

    // A catalog whose rows moved: each recorded row that does not match is named.
    set_product_ids(&dir, |i| format!("Q{i}"));
    let moved = load_catalog(&kaggle(&dir), &LoadOptions::default()).expect("load");
    assert!(moved.duplicate_warning().is_none());
    let (_, problems) = Split::from_rows(&moved, &recorded);
    assert_eq!(problems.len(), 8);
    assert!(problems[0].contains("now has id \"Q"), "{problems:?}");
}

/// `trainer synth` killed midway leaves `DIR.tmp-<pid>-<n>`, a whole catalog: the next synth
/// into `DIR` removes those of processes that are gone and keeps those of running ones.
#[test]
fn synth_removes_stale_temporary_catalogs() {
    let t = TempDir::new("synth-stale");
    let dead = moda_tests::dead_pid();
    let sleeper = moda_tests::LiveProcess::start();
    let stale = t.path().join(format!("catalog.tmp-{dead}-0"));
    let live = t.path().join(format!("catalog.tmp-{}-0", sleeper.id()));
    let other = t.path().join(format!("other.tmp-{dead}-0"));
    for d in [&stale, &live, &other] {
        std::fs::create_dir_all(d.join("Apparel")).expect("fake temporary catalog");
    }
    make_catalog(&t.path().join("catalog"), 4, 1);
    drop(sleeper);
    assert!(!stale.exists(), "the dead process's catalog is removed");
    assert!(live.exists(), "a running process's catalog is kept");
    assert!(other.exists(), "another catalog's temporary is not ours");
}

/// An error that shows its cause in its message and also returns it from `source()` printed
/// the cause twice through anyhow's `{:#}` ("File exists (os error 17): File exists (os error
/// 17)"). The trainer's own errors show it once in a chain; `report` (what the binary prints)
/// also prints the model core's that way once.
#[test]
fn error_chains_print_each_cause_once() {
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        let mut parts = vec![e.to_string()];
        let mut next = e.source();
        while let Some(c) = next {
            parts.push(c.to_string());
            next = c.source();
        }
        parts.join(": ")
    }
    let os = || std::io::Error::from_raw_os_error(17);
    let own = Error::io("/x/run", os());
    let model = Error::Model(moda_models::Error::io("/x/ckpt", os()));
    for e in [&own, &model] {
        let printed = trainer::error::report(e);
        assert_eq!(printed.matches("os error 17").count(), 1, "{printed}");
        assert!(printed.contains("File exists"), "{printed}");
    }
    assert_eq!(
        chain(&own).matches("os error 17").count(),
        1,
        "{}",
        chain(&own)
    );
    // The reporter keeps causes that the message does not hold.
    let out = Error::OutputNotWritable {
        path: "/x/out".into(),
        source: os(),
    };
    let printed = trainer::error::report(&out);
    assert!(
        printed.contains("cannot be created or written: File exists"),
        "{printed}"
    );
}

#[test]
fn a_catalog_csv_that_is_a_fifo_or_a_device_is_refused_at_once() {
    let dir = TempDir::new("csv-fifo");
    let fifo = dir.path().join("catalog.csv");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    for (csv, needle) in [
        (fifo.clone(), "FIFO"),
        ("/dev/zero".into(), "character device"),
    ] {
        let source = CatalogSource::Csv {
            csv,
            image_column: "path".into(),
            caption_column: "text".into(),
            root: None,
        };
        let err = load_catalog(&source, &LoadOptions::default()).expect_err("refused");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

/// A row whose image is a FIFO, a directory or a device is skipped as unreadable, saying what
/// the file is; it was counted as a missing image.
#[cfg(unix)]
#[test]
fn images_that_are_not_regular_files_say_what_they_are() {
    let t = TempDir::new("image-kinds");
    let dir = t.path().join("catalog");
    make_catalog(&dir, 8, 5);
    let rows = rows(&dir.join(KAGGLE_CSV));
    let fifo = image_path(&dir, &rows[0]);
    std::fs::remove_file(&fifo).expect("rm");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let folder = image_path(&dir, &rows[1]);
    std::fs::remove_file(&folder).expect("rm");
    std::fs::create_dir(&folder).expect("mkdir");
    let device = image_path(&dir, &rows[2]);
    std::fs::remove_file(&device).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", &device).expect("symlink");
    std::fs::remove_file(image_path(&dir, &rows[3])).expect("rm");
    for check in [ImageCheck::Decode, ImageCheck::Exists] {
        let opts = LoadOptions {
            check,
            ..Default::default()
        };
        let cat = load_catalog(&kaggle(&dir), &opts).expect("load");
        let r = &cat.report;
        assert_eq!((r.loaded, r.missing, r.unreadable), (4, 1, 3), "{check:?}");
        let details: Vec<(SkipReason, &str)> = r
            .examples
            .iter()
            .map(|e| (e.reason, e.detail.as_str()))
            .collect();
        assert_eq!(
            details,
            [
                (
                    SkipReason::Unreadable,
                    "is a FIFO (named pipe), not an image file"
                ),
                (SkipReason::Unreadable, "is a directory, not an image file"),
                (
                    SkipReason::Unreadable,
                    "is a character device, not an image file"
                ),
                (SkipReason::Missing, ""),
            ],
            "{check:?}"
        );
        let summary = r.summary();
        assert!(
            summary.contains("1 missing images, 3 unreadable") && summary.contains("FIFO"),
            "{summary}"
        );
    }
}
