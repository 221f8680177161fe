//! The `moda-sdk` command line on the recipe fixture bundle (the tiny model of
//! `tests/fixtures`, exported once per run): `describe` and `embed` against the library and the
//! transformers fixtures, input listing (directories, CSV), resumable and sharded catalog
//! jobs, bad images as records, model and runtime errors as exit status 2, `info` and `bench`.
//!
//! These tests live in the sdk package, not the `tests` crate, because cargo builds a
//! package's binaries only for its own integration tests (and names them in
//! `CARGO_BIN_EXE_*`).

#[path = "../../../tests/src/bad_images.rs"]
mod bad_images;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use moda_cli::catalog::Record;
use moda_sdk::{GenerationOptions, ImageInput, Moda, Norm, OpenOptions};
use serde_json::Value;

/// A path under `tests/fixtures` (the workspace's `tests` crate).
fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

/// The original recipe's fixture (clip_gelu encoder, `moda/fashion_opt.pth` projector and
/// OPT, opt_preln's tokenizer) exported once per test binary as a verified fp32 bundle, as
/// `moda_tests::export_recipe_bundle` does for the `tests` crate. (This crate does not depend
/// on `moda-tests`: that would build libmoda for the SDK's tests.)
fn bundle() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-cli-bundle");
        let opts = exporter::ExportOptions {
            checkpoint: fixture("moda/fashion_opt.pth"),
            out: out.clone(),
            encoder: fixture("clip_gelu").display().to_string(),
            decoder: fixture("opt_preln").display().to_string(),
            quantize: exporter::Quantize::None,
            block_size: None,
            max_new_tokens: exporter::DEFAULT_MAX_NEW_TOKENS,
            caption_template: None,
            catalog: None,
            force: true,
            verify: true,
        };
        if let Err(e) = exporter::export_onnx(&opts) {
            panic!("export the recipe fixture to {}: {e}", out.display());
        }
        out
    })
}

/// The transformers reference `greedy.tokens` (`[2, 8]` int64: photo.jpg, wide.png).
fn reference_greedy_tokens() -> Vec<Vec<u32>> {
    let bytes = std::fs::read(fixture("moda/reference.safetensors")).expect("read reference");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let t = st.tensor("greedy.tokens").expect("greedy.tokens");
    assert_eq!(t.dtype(), safetensors::Dtype::I64);
    let cols = t.shape()[1];
    let ids: Vec<u32> = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u32)
        .collect();
    ids.chunks(cols).map(<[u32]>::to_vec).collect()
}

/// A fresh temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("moda-cli-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn moda() -> &'static Moda {
    static M: OnceLock<Moda> = OnceLock::new();
    M.get_or_init(|| Moda::open(bundle(), &OpenOptions::default()).expect("open the bundle"))
}

fn image(name: &str) -> PathBuf {
    fixture(&format!("images/{name}"))
}

/// The fixture images that decode.
const GOOD: [&str; 8] = [
    "photo.jpg",
    "wide.png",
    "gray.png",
    "gray16.png",
    "palette.png",
    "rgba.png",
    "small.png",
    "photo_prog422.jpg",
];

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `moda-sdk` with `args` (the bundle is not added), `MODA_MODEL` and `ORT_DYLIB_PATH`
/// unset unless `env` sets them.
fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moda-sdk"));
    cmd.args(args)
        .env_remove("MODA_MODEL")
        .env_remove("ORT_DYLIB_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run moda-sdk");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "moda-sdk {args:?} panicked:\n{stderr}"
    );
    out
}

/// Runs `moda-sdk SUBCOMMAND --model BUNDLE ARGS...`.
fn run(sub: &str, args: &[&str]) -> Output {
    let b = s(bundle());
    let mut all = vec![sub, "--model", &b];
    all.extend_from_slice(args);
    run_env(&all, &[])
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code (not killed by a signal)")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Asserts exit status `want`, showing stderr otherwise.
fn expect_code(o: &Output, want: i32) {
    assert_eq!(code(o), want, "exit status; stderr:\n{}", stderr(o));
}

/// Every line of `text` as a JSON object.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The records of an output (its job header line left out).
fn records(text: &str) -> Vec<Record> {
    text.lines()
        .filter(|l| !l.starts_with("{\"moda_job\""))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a record ({e}): {l}")))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value, key: &str) -> Vec<f32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} array in {v}"))
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn forced(n: usize) -> GenerationOptions {
    GenerationOptions::default()
        .with_max_new_tokens(Some(n))
        .with_min_new_tokens(n)
}

#[test]
fn describe_json_matches_transformers_and_the_library() {
    let photo = image("photo.jpg");
    let wide = image("wide.png");
    let o = run(
        "describe",
        &[
            &s(&photo),
            &s(&wide),
            "--json",
            "--max-new-tokens",
            "8",
            "--min-new-tokens",
            "8",
        ],
    );
    expect_code(&o, 0);
    let lines = json_lines(&stdout(&o));
    assert_eq!(lines.len(), 2);
    let want = reference_greedy_tokens();
    for (i, (v, p)) in lines.iter().zip([&photo, &wide]).enumerate() {
        assert_eq!(v["image"], s(p));
        assert_eq!(ids(v), want[i], "{}: tokens vs transformers", s(p));
        let lib = moda()
            .describe(&ImageInput::Path(p), &forced(8))
            .expect("library");
        assert_eq!(ids(v), lib.token_ids);
        assert_eq!(v["description"], lib.text.as_str());
        assert_eq!(floats(v, "logprobs"), lib.logprobs);
        // min = max masks `</s>`: the limit ends every description.
        assert_eq!(v["finish"], "length");
        assert_eq!(lib.finish, moda_sdk::Finish::Length);
        let t = &v["timings_ms"];
        assert_eq!(t["tokens"], 8);
        for k in [
            "preprocess",
            "encoder",
            "projector",
            "prefill",
            "decode",
            "total",
        ] {
            let ms = t[k]
                .as_f64()
                .unwrap_or_else(|| panic!("timings_ms.{k} in {t}"));
            assert!(ms > 0.0, "timings_ms.{k} = {ms}");
        }
    }
}

#[test]
fn describe_text_is_one_line_per_image() {
    let paths: Vec<String> = GOOD[..3].iter().map(|n| s(&image(n))).collect();
    let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
    args.extend(["--max-new-tokens", "10"]);
    let o = run("describe", &args);
    expect_code(&o, 0);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let opts = GenerationOptions::default().with_max_new_tokens(Some(10));
    for (line, p) in lines.iter().zip(&paths) {
        let (path, text) = line.split_once('\t').expect("PATH<TAB>TEXT");
        assert_eq!(path, p);
        let lib = moda()
            .describe(&ImageInput::Path(Path::new(p)), &opts)
            .expect("library");
        let want: String = lib
            .text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        assert_eq!(text, want, "{p}");
    }
}

#[test]
fn generation_flags_and_batches_map_onto_the_library() {
    let photo = image("photo.jpg");
    let cases: Vec<(Vec<&str>, GenerationOptions)> = vec![
        (
            vec!["--num-beams", "3", "--max-new-tokens", "9"],
            GenerationOptions::default()
                .with_num_beams(3)
                .with_max_new_tokens(Some(9)),
        ),
        (
            vec![
                "--do-sample",
                "--seed",
                "7",
                "--temperature",
                "1.5",
                "--top-k",
                "40",
                "--top-p",
                "0.9",
                "--max-new-tokens",
                "12",
            ],
            GenerationOptions::default()
                .with_do_sample(true)
                .with_seed(7)
                .with_temperature(1.5)
                .with_top_k(40)
                .with_top_p(0.9)
                .with_max_new_tokens(Some(12)),
        ),
        (
            vec![
                "--repetition-penalty",
                "1.3",
                "--no-repeat-ngram-size",
                "2",
                "--max-new-tokens",
                "20",
                "--min-new-tokens",
                "20",
            ],
            forced(20)
                .with_repetition_penalty(1.3)
                .with_no_repeat_ngram_size(2),
        ),
    ];
    for (flags, opts) in cases {
        let p = s(&photo);
        let mut args = vec![p.as_str(), "--json"];
        args.extend(&flags);
        let o = run("describe", &args);
        expect_code(&o, 0);
        let v = &json_lines(&stdout(&o))[0];
        let lib = moda()
            .describe(&ImageInput::Path(&photo), &opts)
            .expect("library");
        assert_eq!(ids(v), lib.token_ids, "{flags:?}");
    }
    // Batches of 3 give what batches of 1 give.
    let paths: Vec<String> = GOOD.iter().map(|n| s(&image(n))).collect();
    let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
    args.extend(["--json", "--max-new-tokens", "10"]);
    let one = run("describe", &args);
    args.extend(["--batch-size", "3"]);
    let three = run("describe", &args);
    expect_code(&one, 0);
    expect_code(&three, 0);
    let (one, three) = (json_lines(&stdout(&one)), json_lines(&stdout(&three)));
    assert_eq!(one.len(), GOOD.len());
    for (a, b) in one.iter().zip(&three) {
        assert_eq!(a["image"], b["image"]);
        assert_eq!(ids(a), ids(b), "{}", a["image"]);
    }
    // Out-of-range options are a usage error before any image is run.
    let o = run(
        "describe",
        &[&s(&photo), "--do-sample", "--temperature", "0"],
    );
    expect_code(&o, 2);
    assert!(stderr(&o).contains("temperature"), "{}", stderr(&o));
    let o = run("describe", &[&s(&photo), "--batch-size", "0"]);
    expect_code(&o, 2);
}

#[test]
fn directories_are_searched_recursively_by_extension_and_sorted() {
    let dir = TempDir::new("cli-dirs");
    let d = dir.path();
    for sub in ["b/deep", "a"] {
        std::fs::create_dir_all(d.join(sub)).expect("mkdir");
    }
    let copy = |from: &str, to: &str| {
        std::fs::copy(image(from), d.join(to)).expect("copy");
    };
    copy("photo.jpg", "b/deep/z.JPG");
    copy("wide.png", "b/a.Png");
    copy("gray.png", "a/m.jpeg");
    copy("small.png", "top.webp.png");
    copy("rgba.png", "c.TIFF"); // a PNG named .TIFF: listed by name, decoded by its bytes
    std::fs::write(d.join("notes.txt"), "not an image").expect("write");
    std::fs::write(d.join("a/README"), "no extension").expect("write");
    let o = run("describe", &[&s(d), "--json", "--max-new-tokens", "3"]);
    expect_code(&o, 0);
    let got: Vec<String> = json_lines(&stdout(&o))
        .iter()
        .map(|v| v["image"].as_str().expect("image").to_string())
        .collect();
    let want: Vec<String> = [
        "a/m.jpeg",
        "b/a.Png",
        "b/deep/z.JPG",
        "c.TIFF",
        "top.webp.png",
    ]
    .iter()
    .map(|r| s(&d.join(r)))
    .collect();
    assert_eq!(got, want);
    // A file and a directory holding it: the image is run once.
    let o = run(
        "describe",
        &[
            &s(&d.join("c.TIFF")),
            &s(d),
            "--json",
            "--max-new-tokens",
            "2",
        ],
    );
    expect_code(&o, 0);
    let got = json_lines(&stdout(&o));
    assert_eq!(got.len(), 5);
    assert_eq!(got[0]["image"], s(&d.join("c.TIFF")));
    // A file named on the command line is taken whatever its name (and fails here).
    let o = run("describe", &[&s(&d.join("a/README")), "--json"]);
    expect_code(&o, 1);
    assert!(json_lines(&stdout(&o))[0]["error"].is_string());
    // A directory without images is a usage error, not an empty success.
    let empty = TempDir::new("cli-empty");
    std::fs::write(empty.path().join("x.txt"), "text").expect("write");
    let o = run("describe", &[&s(empty.path())]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("no images"), "{}", stderr(&o));
}

#[test]
fn csv_catalogs_are_read_in_row_order_relative_to_the_csv() {
    let dir = TempDir::new("cli-csv");
    let d = dir.path();
    std::fs::create_dir_all(d.join("img")).expect("mkdir");
    for n in ["photo.jpg", "wide.png", "gray.png"] {
        std::fs::copy(image(n), d.join("img").join(n)).expect("copy");
    }
    let abs = s(&image("small.png"));
    let csv = d.join("catalog.csv");
    std::fs::write(
        &csv,
        format!(
            "id,picture,caption\n1,img/wide.png,a\n2, img/photo.jpg ,b\n3,{abs},c\n4,img/wide.png,d\n5,img/gray.png,e\n"
        ),
    )
    .expect("csv");
    let o = run(
        "describe",
        &[
            "--csv",
            &s(&csv),
            "--image-column",
            "picture",
            "--json",
            "--max-new-tokens",
            "4",
        ],
    );
    expect_code(&o, 0);
    let lines = json_lines(&stdout(&o));
    let keys: Vec<&str> = lines
        .iter()
        .map(|v| v["image"].as_str().expect("image"))
        .collect();
    // The cells as written (trimmed), in row order, a repeated image once.
    assert_eq!(
        keys,
        [
            "img/wide.png",
            "img/photo.jpg",
            abs.as_str(),
            "img/gray.png"
        ]
    );
    let lib = moda()
        .describe(
            &ImageInput::Path(&image("photo.jpg")),
            &GenerationOptions::default().with_max_new_tokens(Some(4)),
        )
        .expect("library");
    assert_eq!(ids(&lines[1]), lib.token_ids);

    // --root: relative cells start there.
    let elsewhere = TempDir::new("cli-csv-root");
    let csv2 = elsewhere.path().join("c.csv");
    std::fs::write(&csv2, "picture\nimg/gray.png\n").expect("csv");
    let o = run(
        "embed",
        &[
            "--csv",
            &s(&csv2),
            "--image-column",
            "picture",
            "--root",
            &s(d),
            "--json",
        ],
    );
    expect_code(&o, 0);
    assert!(json_lines(&stdout(&o))[0]["embedding"].is_array());
    // Without it the image is looked for next to the CSV: a per-image error.
    let o = run(
        "embed",
        &["--csv", &s(&csv2), "--image-column", "picture", "--json"],
    );
    expect_code(&o, 1);
    // The record is keyed by the cell; its error names the file that was tried.
    let tried = s(&elsewhere.path().join("img/gray.png"));
    let err = json_lines(&stdout(&o))[0]["error"]
        .as_str()
        .expect("an error")
        .to_string();
    assert!(err.contains(&tried), "{err} should name {tried}");

    // A row without an image is reported and makes the status 1; the others run.
    std::fs::write(&csv, "picture,x\nimg/wide.png,1\n,2\n").expect("csv");
    let o = run(
        "describe",
        &["--csv", &s(&csv), "--image-column", "picture", "--json"],
    );
    expect_code(&o, 1);
    assert_eq!(json_lines(&stdout(&o)).len(), 1);
    assert!(stderr(&o).contains("line 3"), "{}", stderr(&o));

    // A column that is not there names the columns that are.
    let o = run("describe", &["--csv", &s(&csv), "--image-column", "photo"]);
    expect_code(&o, 2);
    let err = stderr(&o);
    assert!(
        err.contains("\"photo\"") && err.contains("\"picture\""),
        "{err}"
    );
    // --csv goes with --image-column, and not with IMAGE arguments.
    expect_code(&run("describe", &["--csv", &s(&csv)]), 2);
    expect_code(
        &run(
            "describe",
            &[
                &s(&image("photo.jpg")),
                "--csv",
                &s(&csv),
                "--image-column",
                "picture",
            ],
        ),
        2,
    );
}

#[test]
fn a_kaggle_layout_catalog_finds_its_images_in_their_folders() {
    // The Kaggle fashion-images layout: fashion.csv names `Image` files that sit at
    // <Category>/<Gender>/Images/images_with_product_ids/<Image>, as `trainer` reads them.
    let dir = TempDir::new("cli-kaggle");
    let d = dir.path();
    let mut csv = moda_models::kaggle::COLUMNS.join(",");
    csv.push('\n');
    for (id, cat, gender, img, src) in [
        (1, "Apparel", "Boys", "1.jpg", "photo.jpg"),
        (2, "Footwear", "Women", "1.jpg", "wide.png"),
    ] {
        let folder = moda_models::kaggle::image_path(d, cat, gender, "");
        std::fs::create_dir_all(&folder).expect("mkdir");
        std::fs::copy(image(src), folder.join(img)).expect("copy");
        csv.push_str(&format!(
            "{id},{gender},{cat},Topwear,Tshirts,Blue,Casual,A shirt,{img},http://x/{img}\n"
        ));
    }
    let path = d.join(moda_models::kaggle::CSV_FILE);
    std::fs::write(&path, csv).expect("csv");
    let o = run(
        "describe",
        &[
            "--csv",
            &s(&path),
            "--image-column",
            "Image",
            "--json",
            "--max-new-tokens",
            "4",
        ],
    );
    expect_code(&o, 0);
    let lines = json_lines(&stdout(&o));
    // Both rows name `1.jpg`; their folders tell them apart, and so do their keys.
    let keys: Vec<&str> = lines
        .iter()
        .map(|v| v["image"].as_str().expect("image"))
        .collect();
    assert_eq!(
        keys,
        [
            "Apparel/Boys/Images/images_with_product_ids/1.jpg",
            "Footwear/Women/Images/images_with_product_ids/1.jpg"
        ]
    );
    let lib = moda()
        .describe(
            &ImageInput::Path(&image("wide.png")),
            &GenerationOptions::default().with_max_new_tokens(Some(4)),
        )
        .expect("library");
    assert_eq!(ids(&lines[1]), lib.token_ids);
}

#[test]
fn a_stopped_job_resumes_where_it_stopped() {
    let dir = TempDir::new("cli-resume");
    let out = dir.path().join("results.jsonl");
    let paths: Vec<String> = GOOD.iter().map(|n| s(&image(n))).collect();
    let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let o = s(&out);
    args.extend(["--output", &o, "--quiet", "--max-new-tokens", "6"]);
    let first = run("describe", &args);
    expect_code(&first, 0);
    assert!(stdout(&first).is_empty(), "records go to the file");
    let full = std::fs::read_to_string(&out).expect("read");
    let complete = records(&full);
    assert_eq!(complete.len(), GOOD.len());

    // A crash: three complete lines and half of the fourth.
    let cut: usize = full.lines().take(3).map(|l| l.len() + 1).sum::<usize>()
        + full.lines().nth(3).expect("line 4").len() / 2;
    std::fs::write(&out, &full.as_bytes()[..cut]).expect("truncate");
    let second = run("describe", &args);
    expect_code(&second, 0);
    let resumed = std::fs::read_to_string(&out).expect("read");
    assert!(resumed.ends_with('\n'));
    let got = records(&resumed);
    let keys: BTreeSet<&str> = got.iter().map(Record::image).collect();
    assert_eq!(got.len(), GOOD.len(), "each image exactly once:\n{resumed}");
    assert_eq!(keys.len(), GOOD.len());
    for r in &got {
        let want = complete
            .iter()
            .find(|c| c.image() == r.image())
            .expect("same images");
        match (r, want) {
            (
                Record::Description { token_ids: a, .. },
                Record::Description { token_ids: b, .. },
            ) => assert_eq!(a, b, "{}", r.image()),
            other => panic!("not descriptions: {other:?}"),
        }
    }
    // The first three lines were kept as they were.
    let head: String = full.lines().take(3).map(|l| format!("{l}\n")).collect();
    assert!(resumed.starts_with(&head));

    // Nothing left to do: the file stays as it is.
    let third = run("describe", &args);
    expect_code(&third, 0);
    assert_eq!(std::fs::read_to_string(&out).expect("read"), resumed);

    // An embed job will not append to a describe output, nor any job to a file of other
    // things.
    let o = run("embed", &[&paths[0], "--output", &s(&out)]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("results.jsonl"), "{}", stderr(&o));
    let other = dir.path().join("other.txt");
    std::fs::write(&other, "hello\nworld\n").expect("write");
    let o = run("describe", &[&paths[0], "--output", &s(&other)]);
    expect_code(&o, 2);
    assert_eq!(
        std::fs::read_to_string(&other).expect("read"),
        "hello\nworld\n"
    );
}

#[test]
fn shards_split_a_catalog_without_overlap() {
    let dir = TempDir::new("cli-shard");
    let paths: Vec<String> = GOOD.iter().take(7).map(|n| s(&image(n))).collect();
    let mut seen = Vec::new();
    let mut all = BTreeSet::new();
    for i in 0..2 {
        let out = s(&dir.path().join(format!("shard{i}.jsonl")));
        let shard = format!("{i}/2");
        let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
        args.extend(["--shard", &shard, "--output", &out, "--max-new-tokens", "2"]);
        expect_code(&run("describe", &args), 0);
        let keys: Vec<String> = records(&std::fs::read_to_string(&out).expect("read"))
            .iter()
            .map(|r| r.image().to_string())
            .collect();
        // Every second image of the list, starting at i.
        let want: Vec<String> = paths.iter().skip(i).step_by(2).cloned().collect();
        assert_eq!(keys, want, "shard {shard}");
        all.extend(keys.iter().cloned());
        seen.push(keys);
    }
    assert_eq!(seen[0].len() + seen[1].len(), paths.len(), "disjoint");
    assert_eq!(all, paths.iter().cloned().collect::<BTreeSet<_>>(), "cover");
    for bad in ["2/2", "1/0", "x", "1", "-1/2", "0/-2"] {
        let o = run("describe", &[&paths[0], &format!("--shard={bad}")]);
        expect_code(&o, 2);
        assert!(stderr(&o).contains("shard"), "{bad}: {}", stderr(&o));
    }
}

#[test]
fn bad_images_are_error_records_and_the_job_goes_on() {
    let dir = TempDir::new("cli-bad");
    let d = dir.path();
    let jpg = std::fs::read(image("photo.jpg")).expect("jpg");
    let png = std::fs::read(image("wide.png")).expect("png");
    let good = d.join("good.jpg");
    std::fs::write(&good, &jpg).expect("write");
    let good = s(&good);
    let bad: Vec<String> = bad_images::write_bad_images(d, &jpg, &png)
        .iter()
        .map(|(p, _)| s(p))
        .collect();
    let mut args = vec![bad[0].as_str(), good.as_str()];
    args.extend(bad[1..].iter().map(String::as_str));
    args.extend(["--max-new-tokens", "4"]);
    for batch in ["1", "3"] {
        let mut a = args.clone();
        a.extend(["--json", "--batch-size", batch]);
        let o = run("describe", &a);
        expect_code(&o, 1);
        let lines = json_lines(&stdout(&o));
        assert_eq!(lines.len(), bad.len() + 1, "one record per image");
        for v in &lines {
            let img = v["image"].as_str().expect("image");
            if img == good {
                assert!(v["description"].is_string(), "{v}");
                assert!(v.get("error").is_none(), "{v}");
            } else {
                let err = v["error"]
                    .as_str()
                    .unwrap_or_else(|| panic!("error in {v}"));
                assert!(!err.is_empty());
                assert!(v.get("description").is_none(), "{v}");
            }
        }
    }
    // Text mode: the good image on stdout, each failure on stderr, status 1.
    let o = run("describe", &args);
    expect_code(&o, 1);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with(&format!("{good}\t")));
    let err = stderr(&o);
    for b in &bad {
        assert!(err.contains(&format!("{b}\terror: ")), "{b}: {err}");
    }
    // embed too.
    let mut a: Vec<&str> = args
        .iter()
        .copied()
        .filter(|x| x.ends_with("jpg") || x.ends_with("png"))
        .collect();
    a.push("--json");
    let o = run("embed", &a);
    expect_code(&o, 1);
    let lines = json_lines(&stdout(&o));
    assert_eq!(lines.iter().filter(|v| v["error"].is_string()).count(), 6);
    assert_eq!(
        lines.iter().filter(|v| v["embedding"].is_array()).count(),
        1
    );
    // The failures are recorded in an output file, and a second run skips them and still
    // reports the failure in its status.
    let out = s(&d.join("out.jsonl"));
    let mut a = args.clone();
    a.extend(["--output", &out, "--quiet"]);
    expect_code(&run("describe", &a), 1);
    let again = run("describe", &a);
    expect_code(&again, 1);
    assert_eq!(
        records(&std::fs::read_to_string(&out).expect("read")).len(),
        7
    );
}

/// Copies the bundle so a test can break its copy.
fn copy_bundle(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    for e in std::fs::read_dir(bundle()).expect("ls") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    dir
}

/// `describe --model DIR photo.jpg` fails with status 2 and a message containing `needle`.
fn model_error(dir: &Path, extra: &[&str], env: &[(&str, &str)], needle: &str) {
    let photo = s(&image("photo.jpg"));
    let d = s(dir);
    let mut args = vec!["describe", "--model", &d, &photo];
    args.extend_from_slice(extra);
    let o = run_env(&args, env);
    expect_code(&o, 2);
    let err = stderr(&o);
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    // ONNX Runtime's own log lines do not come before MODA's message.
    assert!(
        !err.contains("[E:onnxruntime"),
        "raw ONNX Runtime log in:\n{err}"
    );
    assert!(stdout(&o).is_empty());
}

#[test]
fn model_and_runtime_errors_exit_2_with_a_clear_message() {
    model_error(
        Path::new("/nonexistent/bundle"),
        &[],
        &[],
        "/nonexistent/bundle",
    );
    // The message says how to make a bundle.
    model_error(Path::new("/nonexistent/bundle"), &[], &[], "exporter onnx");

    let d = copy_bundle("cli-no-decoder");
    std::fs::remove_file(d.path().join("decoder.onnx")).expect("rm");
    model_error(d.path(), &[], &[], "decoder.onnx");

    let d = copy_bundle("cli-newer");
    let mpath = d.path().join("moda.json");
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).expect("read")).expect("json");
    m["format_version"] = serde_json::json!(99);
    std::fs::write(&mpath, m.to_string()).expect("write");
    model_error(d.path(), &[], &[], "version 99");

    // A corrupt graph of the right size: ONNX Runtime refuses it, and --verify-checksums
    // catches it first.
    let d = copy_bundle("cli-corrupt");
    let p = d.path().join("projector.onnx");
    let n = std::fs::metadata(&p).expect("meta").len() as usize;
    std::fs::write(&p, vec![0x5Au8; n]).expect("write");
    model_error(d.path(), &[], &[], "projector.onnx");
    model_error(d.path(), &["--verify-checksums"], &[], "SHA-256");

    // A wrong ORT_DYLIB_PATH: a path that does not exist, and a file that is not a library.
    let not_lib = TempDir::new("cli-ort");
    let fake = not_lib.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a shared library").expect("write");
    for path in ["/nonexistent/libonnxruntime.so", &s(&fake)] {
        model_error(bundle(), &[], &[("ORT_DYLIB_PATH", path)], "ORT_DYLIB_PATH");
        model_error(bundle(), &[], &[("ORT_DYLIB_PATH", path)], path);
        // info still shows the manifest, and fails.
        let b = s(bundle());
        let o = run_env(&["info", "--model", &b], &[("ORT_DYLIB_PATH", path)]);
        expect_code(&o, 2);
        assert!(stdout(&o).contains("decoder.onnx"));
        assert!(stderr(&o).contains("ORT_DYLIB_PATH"), "{}", stderr(&o));
    }
    // bench and embed go through the same checks.
    let b = s(bundle());
    let photo = s(&image("photo.jpg"));
    for sub in ["embed", "bench"] {
        let o = run_env(
            &[sub, "--model", &b, &photo],
            &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
        );
        expect_code(&o, 2);
        assert!(stderr(&o).contains("ORT_DYLIB_PATH"), "{}", stderr(&o));
    }
}

#[test]
fn the_model_comes_from_moda_model_when_not_given() {
    let photo = s(&image("photo.jpg"));
    let b = s(bundle());
    let o = run_env(
        &[
            "describe",
            &photo,
            "--json",
            "--max-new-tokens",
            "8",
            "--min-new-tokens",
            "8",
        ],
        &[("MODA_MODEL", &b)],
    );
    expect_code(&o, 0);
    let lib = moda()
        .describe(&ImageInput::Path(&image("photo.jpg")), &forced(8))
        .expect("library");
    assert_eq!(ids(&json_lines(&stdout(&o))[0]), lib.token_ids);
    let o = run_env(&["describe", &photo], &[("MODA_MODEL", "/nonexistent/m")]);
    expect_code(&o, 2);
    let err = stderr(&o);
    assert!(
        err.contains("MODA_MODEL") && err.contains("make demo"),
        "{err}"
    );
}

/// `describe --embed`: each description's record carries the embedding `embed` writes for the
/// same images (the same batches through the same encoder), a failed image none.
#[test]
fn describe_embed_records_the_embeddings_embed_writes() {
    let mut paths: Vec<String> = GOOD.iter().map(|n| s(&image(n))).collect();
    paths.insert(3, s(&image("not_an_image.jpg")));
    for normalize in [false, true] {
        let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
        args.extend(["--json", "--batch-size", "4"]);
        if normalize {
            args.push("--normalize");
        }
        let embedded = run("embed", &args);
        expect_code(&embedded, 1);
        let mut described_args = args.clone();
        described_args.extend(["--embed", "--max-new-tokens", "3"]);
        let described = run("describe", &described_args);
        expect_code(&described, 1);
        let want = json_lines(&stdout(&embedded));
        let got = json_lines(&stdout(&described));
        assert_eq!(got.len(), paths.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g["image"], w["image"]);
            if w.get("error").is_some() {
                assert!(
                    g.get("error").is_some() && g.get("embedding").is_none(),
                    "{g}"
                );
                continue;
            }
            assert!(g["description"].is_string(), "{g}");
            // Through JSON, f32 round-trips exactly.
            assert_eq!(
                floats(g, "embedding"),
                floats(w, "embedding"),
                "{}",
                g["image"]
            );
        }
    }
    // Without --embed a record has no embedding; --embed needs JSON records.
    let o = run("describe", &[&paths[0], "--json", "--max-new-tokens", "2"]);
    expect_code(&o, 0);
    assert!(json_lines(&stdout(&o))[0].get("embedding").is_none());
    for (args, needle) in [
        (vec![paths[0].as_str(), "--embed"], "--json"),
        (vec![paths[0].as_str(), "--embed", "--format", "csv"], "CSV"),
        (vec![paths[0].as_str(), "--json", "--normalize"], "--embed"),
    ] {
        let o = run("describe", &args);
        expect_code(&o, 2);
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty());
    }
}

#[test]
fn embed_json_equals_the_library() {
    let dim = moda().manifest().model.projection_dim;
    assert_eq!(dim, 24, "the fixture's projection_dim");
    let photo = image("photo.jpg");
    let wide = image("wide.png");
    for normalize in [false, true] {
        let mut args = vec![s(&photo), s(&wide), "--json".to_string()];
        if normalize {
            args.push("--normalize".to_string());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run("embed", &a);
        expect_code(&o, 0);
        let lines = json_lines(&stdout(&o));
        assert_eq!(lines.len(), 2);
        for (v, p) in lines.iter().zip([&photo, &wide]) {
            assert_eq!(v["image"], s(p));
            let got = floats(v, "embedding");
            let want = moda()
                .embed(&ImageInput::Path(p), Norm::unit_if(normalize))
                .expect("library");
            assert_eq!(got.len(), dim);
            // f32 through JSON round-trips exactly; the same graph on the same input.
            assert_eq!(got, want, "{} normalize={normalize}", s(p));
        }
    }
    // Text: the path, a tab, the numbers.
    let o = run("embed", &[&s(&photo)]);
    expect_code(&o, 0);
    let out = stdout(&o);
    let (path, nums) = out.trim_end().split_once('\t').expect("PATH<TAB>NUMBERS");
    assert_eq!(path, s(&photo));
    let nums: Vec<f32> = nums
        .split(' ')
        .map(|x| x.parse().expect("number"))
        .collect();
    assert_eq!(
        nums,
        moda()
            .embed(&ImageInput::Path(&photo), Norm::Raw)
            .expect("library")
    );
}

#[test]
fn info_json_describes_the_bundle() {
    let o = run("info", &["--json"]);
    expect_code(&o, 0);
    let v: Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object");
    assert_eq!(v["format"], "moda-bundle");
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["quantization"], "none");
    assert_eq!(v["model"]["projection_dim"], 24);
    let graphs: BTreeSet<&str> = v["graphs"]
        .as_object()
        .expect("graphs")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        graphs,
        BTreeSet::from(["decoder", "embed_tokens", "encoder", "projector"])
    );
    assert_eq!(v["graphs"]["encoder"]["inputs"][0]["name"], "pixel_values");
    for (name, f) in v["files"].as_object().expect("files") {
        assert_eq!(f["bytes"], f["bytes_on_disk"], "{name}");
    }
    let lib = v["onnxruntime"]["library"].as_str().expect("library path");
    assert!(Path::new(lib).is_file(), "{lib}");
    // Text: the graphs and the files.
    let o = run("info", &[]);
    expect_code(&o, 0);
    let out = stdout(&o);
    for needle in ["encoder.onnx", "pixel_values", "moda-bundle version 1", lib] {
        assert!(out.contains(needle), "{needle} in\n{out}");
    }
}

#[test]
fn bench_reports_each_stage() {
    let photo = s(&image("photo.jpg"));
    let o = run(
        "bench",
        &[
            &photo,
            "--max-new-tokens",
            "6",
            "--reps",
            "1",
            "--batch-size",
            "2",
            "--json",
        ],
    );
    expect_code(&o, 0);
    let v: Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object");
    assert_eq!(v["tokens"], 6);
    assert_eq!(v["batch"], 2);
    assert_eq!(v["reps"], 1);
    assert_eq!(v["step_ms"].as_array().expect("steps").len(), 5);
    for k in [
        "preprocess_ms",
        "encoder_ms",
        "projector_ms",
        "prefill_ms",
        "decode_ms",
        "token_ms_early",
        "token_ms_late",
        "describe_ms",
        "tokens_per_s",
        "batch_ms",
        "images_per_s",
    ] {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
        assert!(x > 0.0, "{k} = {x}");
    }
    assert_eq!(v["early_step"], 5);
    assert_eq!(v["late_step"], 5);
    // The memory floor: the decoder's files' bytes (the graph and its external data) less its
    // position table, plus the KV cache of the positions before the step, at the bandwidth
    // measured in the run.
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(bundle().join("moda.json")).expect("manifest"),
    )
    .expect("manifest JSON");
    let dims = &m["model"];
    let n = |k: &str| dims[k].as_u64().unwrap_or_else(|| panic!("{k}"));
    let decoder_file = m["graphs"]["decoder"]["file"]
        .as_str()
        .expect("decoder file");
    let decoder_data = m["graphs"]["decoder"]["data"]
        .as_str()
        .expect("decoder data");
    let file_bytes = m["files"][decoder_file]["bytes"].as_u64().expect("bytes")
        + m["files"][decoder_data]["bytes"].as_u64().expect("bytes");
    let weights = file_bytes - (n("max_positions") + 2) * n("hidden_size") * 4;
    let past = n("prefix_len") + 1 + 5;
    let kv = 2 * n("num_layers") * n("num_heads") * n("head_dim") * past * 4;
    assert_eq!(v["step_bytes_early"].as_u64(), Some(weights + kv));
    let bw = v["read_gb_per_s"].as_f64().expect("bandwidth");
    assert!(bw > 0.1 && bw < 10_000.0, "{bw} GB/s");
    let floor = v["floor_ms_early"].as_f64().expect("floor");
    let want = (weights + kv) as f64 / (bw * 1e9) * 1e3;
    assert!(
        (floor - want).abs() <= 1e-9 * want.max(1.0),
        "{floor} vs {want}"
    );
    if cfg!(target_os = "linux") {
        assert!(v["peak_rss_mb"].as_f64().expect("peak RSS") > 1.0);
    }
    // The table, and a token count the decoder cannot hold.
    let o = run("bench", &[&photo, "--max-new-tokens", "3", "--reps", "1"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("encoder"));
    let o = run(
        "bench",
        &[&photo, "--max-new-tokens", "1000", "--reps", "1"],
    );
    expect_code(&o, 2);
    assert!(stderr(&o).contains("positions"), "{}", stderr(&o));
    // A bundle with a caption schema: bench times free text of exactly the asked length
    // (a constrained caption would end sooner).
    let (schema, _) = schema_bundle();
    let o = run_env(
        &[
            "bench",
            "--model",
            &s(schema),
            &photo,
            "--max-new-tokens",
            "12",
            "--reps",
            "1",
        ],
        &[],
    );
    expect_code(&o, 0);
}

/// `bench --profile`: ONNX Runtime's profile of each graph written into the directory, and
/// its sums: the decoder's operator types per run (as many attention nodes as the decoder
/// has layers), kernel time within run time, as many projector runs as encoder runs.
#[test]
fn bench_profile_sums_onnx_runtime_profiles() {
    let photo = s(&image("photo.jpg"));
    let dir = TempDir::new("cli-profile");
    let prof = dir.path().join("profiles");
    let o = run(
        "bench",
        &[
            &photo,
            "--max-new-tokens",
            "4",
            "--reps",
            "1",
            "--batch-size",
            "1",
            "--profile",
            &s(&prof),
            "--json",
        ],
    );
    expect_code(&o, 0);
    let v: Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object");
    let p = &v["profiles"];
    let layers = {
        let m: Value = serde_json::from_str(
            &std::fs::read_to_string(bundle().join("moda.json")).expect("manifest"),
        )
        .expect("manifest JSON");
        m["model"]["num_layers"].as_f64().expect("layers")
    };
    for role in ["encoder", "projector", "embed_tokens", "decoder"] {
        let r = &p[role];
        let file = PathBuf::from(r["file"].as_str().unwrap_or_else(|| panic!("{role}: {p}")));
        assert_eq!(file.parent(), Some(prof.as_path()), "{role}");
        assert!(file.is_file(), "{}", file.display());
        let runs = r["runs"].as_u64().expect("runs");
        let (run_ms, kernels_ms) = (
            r["run_ms"].as_f64().expect("run_ms"),
            r["kernels_ms"].as_f64().expect("kernels_ms"),
        );
        assert!(runs >= 2, "{role}: {runs} runs");
        assert!(kernels_ms > 0.0 && kernels_ms <= run_ms, "{role}: {r}");
    }
    assert_eq!(p["encoder"]["runs"], p["projector"]["runs"]);
    // Warm-up and one measured description of 4 tokens: a prefill and 3 steps each, at least.
    assert!(p["decoder"]["runs"].as_u64() >= Some(8), "{p}");
    let ops = p["decoder"]["ops"].as_array().expect("ops");
    let mha = ops
        .iter()
        .find(|o| o[0] == "MultiHeadAttention")
        .unwrap_or_else(|| panic!("{ops:?}"));
    assert_eq!(mha[1].as_f64(), Some(layers), "{mha}");
    // Largest first.
    let ms: Vec<f64> = ops.iter().map(|o| o[2].as_f64().expect("ms")).collect();
    assert!(ms.windows(2).all(|w| w[0] >= w[1]), "{ms:?}");
}

/// Runs `moda-sdk SUBCOMMAND --model BUNDLE ARGS...` with `input` on its standard input,
/// failing the test (instead of hanging it) if it runs longer than a minute.
fn run_stdin(sub: &str, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let b = s(bundle());
    let mut child = Command::new(env!("CARGO_BIN_EXE_moda-sdk"))
        .arg(sub)
        .args(["--model", &b])
        .args(args)
        .env_remove("MODA_MODEL")
        .env_remove("ORT_DYLIB_PATH")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run moda-sdk");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("moda-sdk {sub} {args:?} hung for a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = writer.join();
    let out = child.wait_with_output().expect("output");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "moda-sdk {args:?} panicked:\n{}",
        stderr(&out)
    );
    out
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {}",
        p.display()
    );
}

#[test]
fn only_regular_files_are_read_or_written() {
    let dir = TempDir::new("cli-nonregular");
    let fifo = dir.path().join("pipe.jpg");
    mkfifo(&fifo);
    let photo = s(&image("photo.jpg"));
    // A device and a FIFO as images: error records at once (they grew without end and hung).
    let o = run_stdin(
        "describe",
        &[
            "/dev/zero",
            &s(&fifo),
            &photo,
            "--json",
            "--max-new-tokens",
            "2",
        ],
        b"",
    );
    expect_code(&o, 1);
    let lines = json_lines(&stdout(&o));
    assert_eq!(lines.len(), 3);
    assert!(
        lines[0]["error"]
            .as_str()
            .expect("error")
            .contains("character device"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1]["error"].as_str().expect("error").contains("FIFO"),
        "{}",
        lines[1]
    );
    assert!(lines[2]["description"].is_string());
    // The same in a CSV cell.
    let csv = dir.path().join("c.csv");
    std::fs::write(&csv, "Image\npipe.jpg\n").expect("write");
    let o = run_stdin(
        "describe",
        &["--csv", &s(&csv), "--image-column", "Image", "--json"],
        b"",
    );
    expect_code(&o, 1);
    assert!(stdout(&o).contains("FIFO"), "{}", stdout(&o));
    // Outputs: a device, a FIFO, a directory.
    for out in ["/dev/full", "/dev/stdout", &s(&fifo), &s(dir.path())] {
        let o = run_stdin("describe", &[&photo, "--output", out], b"");
        expect_code(&o, 2);
        let err = stderr(&o);
        assert!(
            err.contains("not a regular file") || err.contains("Is a directory"),
            "{out}: {err}"
        );
    }
    // A FIFO as the CSV.
    let o = run_stdin(
        "describe",
        &["--csv", &s(&fifo), "--image-column", "Image"],
        b"",
    );
    expect_code(&o, 2);
    assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
}

#[test]
fn a_dash_is_standard_input() {
    let photo = image("photo.jpg");
    let bytes = std::fs::read(&photo).expect("read");
    let args = ["--json", "--max-new-tokens", "5"];
    let want = json_lines(&stdout(&run(
        "describe",
        &[&s(&photo), args[0], args[1], args[2]],
    )));
    let o = run_stdin("describe", &["-", args[0], args[1], args[2]], &bytes);
    expect_code(&o, 0);
    let got = json_lines(&stdout(&o));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["image"], "-");
    assert_eq!(got[0]["token_ids"], want[0]["token_ids"]);
    // A CSV from standard input; its cells are relative to --root.
    let root = s(&fixture("images"));
    let o = run_stdin(
        "describe",
        &[
            "--csv",
            "-",
            "--image-column",
            "Image",
            "--root",
            &root,
            "--json",
            "--max-new-tokens",
            "5",
        ],
        b"Image\nphoto.jpg\n",
    );
    expect_code(&o, 0);
    let got = json_lines(&stdout(&o));
    assert_eq!(got[0]["image"], "photo.jpg");
    assert_eq!(got[0]["token_ids"], want[0]["token_ids"]);
    // A header and no rows says so.
    let o = run_stdin(
        "describe",
        &["--csv", "-", "--image-column", "Image"],
        b"Image\n",
    );
    expect_code(&o, 2);
    assert!(
        stderr(&o).contains("no rows after the header"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn file_names_that_are_not_utf8_stay_distinct_and_resume() {
    use std::os::unix::ffi::OsStrExt;
    let dir = TempDir::new("cli-nonutf8");
    let jpg = std::fs::read(image("photo.jpg")).expect("read");
    let png = std::fs::read(image("wide.png")).expect("read");
    let a = dir.path().join(std::ffi::OsStr::from_bytes(b"a\xff.jpg"));
    let b = dir.path().join(std::ffi::OsStr::from_bytes(b"a\xfe.jpg"));
    std::fs::write(&a, &jpg).expect("write");
    std::fs::write(&b, &png).expect("write");
    let out = s(&dir.path().join("out.jsonl"));
    let d = s(dir.path());
    let args = [
        d.as_str(),
        "--output",
        &out,
        "--max-new-tokens",
        "4",
        "--quiet",
    ];
    expect_code(&run("describe", &args), 0);
    let text = std::fs::read_to_string(&out).expect("read");
    let recs = records(&text);
    assert_eq!(recs.len(), 2, "two images, two records:\n{text}");
    let mut hex: Vec<String> = json_lines(&text)
        .iter()
        .filter_map(|v| v["image_hex"].as_str().map(str::to_string))
        .collect();
    hex.sort();
    let name_hex = |p: &Path| -> String {
        p.as_os_str()
            .as_bytes()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    };
    let mut want = vec![name_hex(&a), name_hex(&b)];
    want.sort();
    assert_eq!(hex, want, "the exact bytes of each name");
    // Run again: both are recognised as done.
    let again = run("describe", &args[..args.len() - 1]);
    expect_code(&again, 0);
    assert!(
        stderr(&again).contains("2 of 2 images already"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read_to_string(&out).expect("read"), text);
}

#[test]
fn an_output_is_locked_and_records_its_job() {
    let dir = TempDir::new("cli-lock");
    let photo = s(&image("photo.jpg"));
    let wide = s(&image("wide.png"));
    let out = dir.path().join("out.jsonl");
    let o = s(&out);
    // A bundle that cannot be opened leaves no output file.
    let r = run_env(
        &[
            "describe",
            "--model",
            "/nonexistent",
            &photo,
            "--output",
            &o,
        ],
        &[],
    );
    expect_code(&r, 2);
    assert!(!out.exists(), "no output file for a job that never ran");

    expect_code(
        &run(
            "describe",
            &[
                &photo,
                &wide,
                "--output",
                &o,
                "--shard",
                "0/2",
                "--max-new-tokens",
                "3",
            ],
        ),
        0,
    );
    let text = std::fs::read_to_string(&out).expect("read");
    let header: Value = serde_json::from_str(text.lines().next().expect("line")).expect("json");
    assert_eq!(header["moda_job"]["task"], "describe");
    assert_eq!(header["moda_job"]["shard"], "0/2");
    assert_eq!(header["moda_job"]["options"]["max_new_tokens"], 3);
    // Another shard, other options or another task: refused, the file untouched.
    for (extra, needle) in [
        (vec!["--shard", "1/2", "--max-new-tokens", "3"], "shard"),
        (
            vec!["--shard", "0/2", "--max-new-tokens", "4"],
            "max_new_tokens",
        ),
        (
            vec![
                "--shard",
                "0/2",
                "--max-new-tokens",
                "3",
                "--num-beams",
                "2",
            ],
            "num_beams",
        ),
        (
            vec!["--shard", "0/2", "--max-new-tokens", "3", "--embed"],
            "embedding",
        ),
    ] {
        let mut args = vec![photo.as_str(), wide.as_str(), "--output", &o];
        args.extend(extra);
        let r = run("describe", &args);
        expect_code(&r, 2);
        assert!(stderr(&r).contains(needle), "{needle}: {}", stderr(&r));
        assert_eq!(std::fs::read_to_string(&out).expect("read"), text);
    }
    let r = run("embed", &[&photo, "--output", &o, "--shard", "0/2"]);
    expect_code(&r, 2);

    // A second writer is refused and told who holds the file.
    let held = std::fs::File::options()
        .append(true)
        .open(&out)
        .expect("open");
    held.try_lock().expect("lock");
    let r = run(
        "describe",
        &[
            &photo,
            &wide,
            "--output",
            &o,
            "--shard",
            "0/2",
            "--max-new-tokens",
            "3",
        ],
    );
    expect_code(&r, 2);
    let err = stderr(&r);
    assert!(err.contains("another process is writing it"), "{err}");
    assert!(
        err.contains(&format!("process {}", std::process::id())),
        "{err}"
    );
    drop(held);
    assert_eq!(std::fs::read_to_string(&out).expect("read"), text);
}

#[test]
fn huge_numbers_are_refused_or_capped() {
    let photo = s(&image("photo.jpg"));
    let o = run(
        "describe",
        &[&photo, "--max-new-tokens", "18446744073709551615"],
    );
    expect_code(&o, 2);
    let err = stderr(&o);
    assert!(
        err.contains("max_new_tokens") && !err.contains("Gather"),
        "{err}"
    );
    let o = run(
        "describe",
        &[&photo, "--threads", "100000", "--max-new-tokens", "2"],
    );
    expect_code(&o, 0);
    assert!(
        stderr(&o).contains("--threads 100000 is more than"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn info_refuses_a_manifest_that_names_files_outside_the_bundle() {
    let d = copy_bundle("cli-info-escape");
    let mpath = d.path().join("moda.json");
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).expect("read")).expect("json");
    m["files"]["/etc/shadow"] = serde_json::json!({"bytes": 1, "sha256": "00"});
    std::fs::write(&mpath, m.to_string()).expect("write");
    let o = run_env(&["info", "--model", &s(d.path())], &[]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("absolute path"), "{}", stderr(&o));
    assert!(!stdout(&o).contains("shadow"), "{}", stdout(&o));
}

#[test]
fn an_output_without_a_job_header_is_not_mixed_into() {
    let dir = TempDir::new("cli-noheader");
    let photo = s(&image("photo.jpg"));
    // Records written with --json > FILE: no header, so the job that made them is unknown.
    let out = dir.path().join("out.jsonl");
    let o = run("describe", &[&photo, "--json", "--max-new-tokens", "2"]);
    std::fs::write(&out, stdout(&o)).expect("write");
    let r = run(
        "describe",
        &[&photo, "--output", &s(&out), "--max-new-tokens", "5"],
    );
    expect_code(&r, 2);
    assert!(stderr(&r).contains("no job header"), "{}", stderr(&r));
    // A file of blank lines starts afresh, with the header.
    std::fs::write(&out, "\n\n").expect("write");
    expect_code(
        &run(
            "describe",
            &[&photo, "--output", &s(&out), "--max-new-tokens", "2"],
        ),
        0,
    );
    let text = std::fs::read_to_string(&out).expect("read");
    assert!(text.starts_with("{\"moda_job\""), "{text}");
    assert_eq!(records(&text).len(), 1);
    // Standard input cannot be resumed.
    let r = run_stdin("describe", &["-", "--output", &s(&out)], b"");
    expect_code(&r, 2);
    assert!(stderr(&r).contains("standard input"), "{}", stderr(&r));
}

#[test]
fn text_output_keeps_one_line_per_image_whatever_the_name() {
    let dir = TempDir::new("cli-names");
    let jpg = std::fs::read(image("photo.jpg")).expect("read");
    let odd = dir.path().join("two\nlines\tand\x1b[31mred.jpg");
    std::fs::write(&odd, &jpg).expect("write");
    let o = run("describe", &[&s(&odd), "--max-new-tokens", "3"]);
    expect_code(&o, 0);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out:?}");
    assert_eq!(out.matches('\t').count(), 1, "{out:?}");
    assert!(!out.contains('\x1b'), "{out:?}");
    // --json keeps the exact name.
    let o = run("describe", &[&s(&odd), "--json", "--max-new-tokens", "3"]);
    assert_eq!(json_lines(&stdout(&o))[0]["image"], s(&odd));
}

#[test]
fn batch_and_bench_sizes_are_bounded() {
    let photo = s(&image("photo.jpg"));
    for args in [
        vec![
            "describe",
            photo.as_str(),
            "--batch-size",
            "18446744073709551615",
        ],
        vec!["describe", photo.as_str(), "--batch-size", "100000"],
        vec!["bench", photo.as_str(), "--batch", "100000"],
        vec!["bench", photo.as_str(), "--reps", "18446744073709551615"],
    ] {
        let o = run(args[0], &args[1..]);
        expect_code(&o, 2);
        assert!(stderr(&o).contains("at most"), "{args:?}: {}", stderr(&o));
    }
    // info marks a file that leads out of the bundle instead of reading it.
    let d = copy_bundle("cli-info-link");
    let tok = d.path().join("tokenizer.json");
    std::fs::remove_file(&tok).expect("rm");
    std::os::unix::fs::symlink("/etc/hostname", &tok).expect("symlink");
    let o = run_env(&["info", "--model", &s(d.path())], &[]);
    assert!(stdout(&o).contains("REFUSED"), "{}", stdout(&o));
}

/// The recipe fixture exported with a caption schema derived from a catalog CSV
/// (`--caption-template "{Head} {Tail}" --catalog CSV`), whose rows are the photo's own
/// greedy description split at its first space, plus decoys: a shorter prefix of the head
/// (an ambiguous prefix) and values the model never writes. Returns the bundle and the
/// photo's description (the free text of the plain fixture bundle).
fn schema_bundle() -> &'static (PathBuf, String) {
    static B: OnceLock<(PathBuf, String)> = OnceLock::new();
    B.get_or_init(|| {
        let text = moda()
            .describe(
                &ImageInput::Path(&image("photo.jpg")),
                &GenerationOptions::default(),
            )
            .expect("describe")
            .text;
        let (head, tail) = text.trim().split_once(' ').expect("a space in the text");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-cli-schema");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let q = |v: &str| format!("\"{}\"", v.replace('"', "\"\""));
        let short: String = head.chars().take(2).collect();
        let csv = format!(
            "Head,Tail,Other\n{},{},a\n{},{},b\n{},zzz,c\n{},{},d\n,{},e\n",
            q(head),
            q(tail),
            q(head),
            q(tail),
            q(&short),
            q("Navy"),
            q("never written"),
            q(tail),
        );
        let catalog = dir.join("catalog.csv");
        std::fs::write(&catalog, csv).expect("write catalog");
        let out = dir.join("bundle");
        let opts = exporter::ExportOptions {
            checkpoint: fixture("moda/fashion_opt.pth"),
            out: out.clone(),
            encoder: fixture("clip_gelu").display().to_string(),
            decoder: fixture("opt_preln").display().to_string(),
            quantize: exporter::Quantize::None,
            block_size: None,
            max_new_tokens: exporter::DEFAULT_MAX_NEW_TOKENS,
            caption_template: Some("{Head} {Tail}".to_string()),
            catalog: Some(catalog),
            force: true,
            verify: false,
        };
        if let Err(e) = exporter::export_onnx(&opts) {
            panic!(
                "export the recipe fixture with a schema to {}: {e}",
                out.display()
            );
        }
        (out, text)
    })
}

#[test]
fn info_shows_the_schema_and_the_default_stop_string() {
    // The plain recipe bundle: no schema, `<\s>` as its default stop string.
    let o = run("info", &["--json"]);
    expect_code(&o, 0);
    let v: Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object");
    assert!(v.get("schema").is_none(), "{v}");
    assert_eq!(
        v["generation"]["stop_strings"],
        serde_json::json!(["<\\s>"])
    );
    let out = stdout(&run("info", &[]));
    assert!(out.contains("stop strings  \"<\\\\s>\""), "{out}");
    assert!(out.contains("schema        none"), "{out}");

    // The bundle with a schema derived from the catalog: the rows that fill every field.
    let (bundle, text) = schema_bundle();
    let (head, tail) = text.trim().split_once(' ').expect("space");
    let b = s(bundle);
    let o = run_env(&["info", "--model", &b, "--json"], &[]);
    expect_code(&o, 0);
    let v: Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object");
    let schema = &v["schema"];
    assert_eq!(schema["template"], "{Head} {Tail}");
    let fields = schema["fields"].as_array().expect("fields");
    assert_eq!(fields.len(), 2);
    assert_eq!(fields[0]["name"], "Head");
    // Most frequent first, ties by value: the head twice, then its two-character prefix
    // (an ambiguous prefix of it) and "Navy" once each.
    let short: String = head.chars().take(2).collect();
    let mut once = [short.as_str(), "Navy"];
    once.sort_unstable();
    assert_eq!(
        fields[0]["values"],
        serde_json::json!([
            {"value": head, "count": 2},
            {"value": once[0], "count": 1},
            {"value": once[1], "count": 1},
        ])
    );
    assert_eq!(fields[1]["name"], "Tail");
    assert_eq!(
        fields[1]["values"][0],
        serde_json::json!({"value": tail, "count": 2})
    );
    assert_eq!(fields[1]["values"].as_array().expect("values").len(), 3);
    let o = run_env(&["info", "--model", &b], &[]);
    expect_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("schema        \"{Head} {Tail}\""), "{out}");
    assert!(out.contains("  Head           3 values"), "{out}");
    assert!(out.contains("  Tail           3 values"), "{out}");
}

#[test]
fn describe_json_has_the_attributes_of_the_schema() {
    let (bundle, text) = schema_bundle();
    let (head, tail) = text.trim().split_once(' ').expect("space");
    let photo = image("photo.jpg");
    let wide = image("wide.png");
    let b = s(bundle);
    // Free text (as the plain bundle writes it), read back into the schema's fields.
    let o = run_env(
        &[
            "describe",
            "--model",
            &b,
            "--json",
            "--constrain",
            "none",
            &s(&photo),
            &s(&wide),
        ],
        &[],
    );
    expect_code(&o, 0);
    let lines = json_lines(&stdout(&o));
    assert_eq!(lines[0]["description"], text.as_str());
    let attrs = &lines[0]["attributes"];
    assert_eq!(attrs["Head"]["value"], head);
    assert_eq!(attrs["Tail"]["value"], tail);
    // Confidence: the probability of the tokens whose text overlaps the value, from the
    // record's own log-probabilities (the head is the text of the first tokens up to the
    // space, which the next token carries).
    let lp = floats(&lines[0], "logprobs");
    let tokens = ids(&lines[0]);
    let tok = moda().tokenizer().expect("tokenizer");
    let head_tokens = (1..=tokens.len())
        .find(|&j| tok.decode(&tokens[..j], true).expect("decode").len() >= head.len())
        .expect("the head's tokens");
    let want: f32 = lp[..head_tokens].iter().sum::<f32>().exp();
    let got = attrs["Head"]["confidence"].as_f64().expect("confidence") as f32;
    assert!(
        (got - want).abs() < 1e-5 * want.max(1e-30),
        "{got} vs {want}"
    );
    let tail_conf = attrs["Tail"]["confidence"].as_f64().expect("confidence");
    assert!(tail_conf > 0.0 && tail_conf < 1.0, "{tail_conf}");
    // The wide image's description is not in the schema: every field null, none guessed.
    if lines[1]["description"] != text.as_str() {
        assert_eq!(
            lines[1]["attributes"],
            serde_json::json!({"Head": null, "Tail": null}),
            "{}",
            lines[1]
        );
    }
    // A bundle without a schema writes no attributes.
    let o = run("describe", &["--json", &s(&photo)]);
    expect_code(&o, 0);
    assert!(json_lines(&stdout(&o))[0].get("attributes").is_none());
    // The library gives the same typed attributes.
    let m = Moda::open(bundle, &OpenOptions::default()).expect("open");
    let free = GenerationOptions::default().with_constrain(moda_sdk::Constrain::None);
    let d = m
        .describe(&ImageInput::Path(&photo), &free)
        .expect("describe");
    let a = d.attributes.expect("attributes");
    assert_eq!(a["Head"].as_ref().map(|x| x.value.as_str()), Some(head));
    assert_eq!(a["Tail"].as_ref().map(|x| x.value.as_str()), Some(tail));
}

#[test]
fn stop_strings_end_the_description_before_them() {
    let photo = image("photo.jpg");
    let free = moda()
        .describe(&ImageInput::Path(&photo), &GenerationOptions::default())
        .expect("describe");
    // Four characters from inside the text, and one that never comes.
    let stop: String = free.text.chars().skip(3).take(4).collect();
    let at = free.text.find(&stop).expect("inside");
    let want = free.text[..at].trim_end();
    let o = run(
        "describe",
        &[
            "--json",
            "--stop-string",
            "never written",
            "--stop-string",
            &stop,
            &s(&photo),
        ],
    );
    expect_code(&o, 0);
    let v = &json_lines(&stdout(&o))[0];
    assert_eq!(v["description"], want);
    assert_eq!(v["finish"], "stop_string");
    // Generation stopped at the token that completed the stop string: a prefix of the free
    // run's tokens, whose text holds the stop string while one token fewer does not.
    let got = ids(v);
    assert!(got.len() < free.token_ids.len(), "{got:?}");
    assert_eq!(got[..], free.token_ids[..got.len()]);
    let tok = moda().tokenizer().expect("tokenizer");
    assert!(tok.decode(&got, true).expect("decode").contains(&stop));
    assert!(!tok
        .decode(&got[..got.len() - 1], true)
        .expect("decode")
        .contains(&stop));
    // The bundle's default `<\s>` never comes in this model's text: the free run is whole.
    assert_eq!(free.token_ids.len(), 32);
    assert_eq!(free.finish, moda_sdk::Finish::Length);
    // An empty stop string is a usage error.
    let o = run("describe", &["--stop-string", "", &s(&photo)]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("stop string"), "{}", stderr(&o));
}

/// The scheduler variables `--shard auto` reads, all removed from a run's environment unless
/// the test sets them (a test run inside a Slurm job must not see its own).
const SCHEDULER_VARS: [&str; 7] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_ARRAY_TASK_COUNT",
    "JOB_COMPLETION_INDEX",
    "MODA_SHARD_COUNT",
];

/// Runs `moda-sdk SUBCOMMAND --model BUNDLE ARGS...` with only the scheduler variables `env`.
fn run_scheduled(sub: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let b = s(bundle());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moda-sdk"));
    cmd.args([sub, "--model", &b])
        .args(args)
        .env_remove("MODA_MODEL")
        .env_remove("ORT_DYLIB_PATH");
    for v in SCHEDULER_VARS {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run moda-sdk");
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    out
}

/// The `"shard"` of an output's job header.
fn header_shard(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read");
    let first: Value = serde_json::from_str(text.lines().next().expect("a header")).expect("JSON");
    first["moda_job"]["shard"]
        .as_str()
        .expect("shard")
        .to_string()
}

#[test]
fn shard_auto_comes_from_slurm_arrays_and_kubernetes_indexed_jobs() {
    let dir = TempDir::new("cli-shard-auto");
    let paths: Vec<String> = GOOD.iter().take(5).map(|n| s(&image(n))).collect();
    let keys_of = |p: &Path| -> Vec<String> {
        records(&std::fs::read_to_string(p).expect("read"))
            .iter()
            .map(|r| r.image().to_string())
            .collect()
    };
    let every = |from: usize, n: usize| -> Vec<String> {
        paths.iter().skip(from).step_by(n).cloned().collect()
    };
    // A Slurm array --array=1-3: task ids 1, 2, 3 are shards 0, 1, 2 of 3.
    for id in 1..=3 {
        let out = dir.path().join(format!("slurm-{id}.jsonl"));
        let o = s(&out);
        let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
        args.extend(["--shard", "auto", "--output", &o]);
        let id = id.to_string();
        let env = [
            ("SLURM_ARRAY_TASK_ID", id.as_str()),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
            ("SLURM_ARRAY_TASK_STEP", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        let r = run_scheduled("embed", &args, &env);
        expect_code(&r, 0);
        let index: usize = id.parse::<usize>().expect("id") - 1;
        assert!(
            stderr(&r).contains(&format!("shard {index}/3 (from SLURM_ARRAY_TASK_ID={id}")),
            "{}",
            stderr(&r)
        );
        assert_eq!(header_shard(&out), format!("{index}/3"));
        assert_eq!(keys_of(&out), every(index, 3), "Slurm task {id}");
    }
    // A Kubernetes Indexed Job of 2 completions: the count from --shard-count or
    // MODA_SHARD_COUNT.
    for (index, count_env) in [("0", true), ("1", false)] {
        let out = dir.path().join(format!("k8s-{index}.jsonl"));
        let o = s(&out);
        let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
        args.extend(["--shard", "auto", "--output", &o, "--quiet"]);
        let mut env = vec![("JOB_COMPLETION_INDEX", index)];
        if count_env {
            env.push(("MODA_SHARD_COUNT", "2"));
        } else {
            args.extend(["--shard-count", "2"]);
        }
        expect_code(&run_scheduled("embed", &args, &env), 0);
        let i: usize = index.parse().expect("index");
        assert_eq!(header_shard(&out), format!("{i}/2"));
        assert_eq!(keys_of(&out), every(i, 2), "completion index {index}");
    }
    // What cannot be resolved is an error naming the variables; nothing is written.
    // (scheduler variables, more arguments, what the error says)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: [Case; 7] = [
        (&[], &[], "neither SLURM_ARRAY_TASK_ID"),
        (&[("JOB_COMPLETION_INDEX", "1")], &[], "--shard-count"),
        (
            &[("JOB_COMPLETION_INDEX", "2")],
            &["--shard-count", "2"],
            "not below",
        ),
        (
            &[("JOB_COMPLETION_INDEX", "x")],
            &["--shard-count", "2"],
            "whole number",
        ),
        (
            &[("JOB_COMPLETION_INDEX", "0"), ("MODA_SHARD_COUNT", "3")],
            &["--shard-count", "2"],
            "disagree",
        ),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "7"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_MAX", "7"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ],
            &[],
            "not one regular range",
        ),
        (
            &[("SLURM_ARRAY_TASK_ID", "0")],
            &[],
            "SLURM_ARRAY_TASK_MIN is not",
        ),
    ];
    for (env, extra, needle) in cases {
        let out = dir.path().join("refused.jsonl");
        let o = s(&out);
        let mut args = vec![paths[0].as_str(), "--shard", "auto", "--output", &o];
        args.extend_from_slice(extra);
        let r = run_scheduled("embed", &args, env);
        expect_code(&r, 2);
        assert!(stderr(&r).contains(needle), "{env:?}: {}", stderr(&r));
        assert!(!out.exists(), "{env:?}: nothing written");
    }
    // --shard-count belongs to auto.
    let r = run_scheduled(
        "embed",
        &[&paths[0], "--shard", "0/2", "--shard-count", "2"],
        &[],
    );
    expect_code(&r, 2);
    assert!(stderr(&r).contains("--shard-count goes with --shard auto"));
}

/// Runs `describe` shard `i` of `n` of `paths` into `out` (`tokens` tokens), and asserts its
/// status.
fn describe_shard(paths: &[String], i: usize, n: usize, out: &Path, tokens: &str, want: i32) {
    let shard = format!("{i}/{n}");
    let o = s(out);
    let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
    args.extend([
        "--shard",
        &shard,
        "--output",
        &o,
        "--max-new-tokens",
        tokens,
        "--quiet",
    ]);
    expect_code(&run("describe", &args), want);
}

/// Runs `moda-sdk merge ARGS...`.
fn merge(args: &[&str]) -> Output {
    run_env(&[&["merge"], args].concat(), &[])
}

#[test]
fn merge_joins_the_shards_of_a_job_each_image_once() {
    let dir = TempDir::new("cli-merge");
    let d = dir.path();
    let paths: Vec<String> = GOOD.iter().take(7).map(|n| s(&image(n))).collect();
    let shard = |i: usize| d.join(format!("shard{i}.jsonl"));
    for i in 0..3 {
        describe_shard(&paths, i, 3, &shard(i), "2", 0);
    }
    let sh: Vec<String> = (0..3).map(|i| s(&shard(i))).collect();
    let merged = d.join("merged.jsonl");
    let m = s(&merged);
    let with_images: Vec<&str> = paths.iter().flat_map(|p| ["--image", p.as_str()]).collect();

    // Any order of the shards; checked against the images the job listed.
    let o = merge(&[&["-o", &m, &sh[2], &sh[0], &sh[1]], with_images.as_slice()].concat());
    expect_code(&o, 0);
    assert!(
        stderr(&o).contains("merged 3 shards of a `describe` job")
            && stderr(&o).contains("7 images, 0 failed"),
        "{}",
        stderr(&o)
    );
    let text = std::fs::read_to_string(&merged).expect("read");
    let header: Value = serde_json::from_str(text.lines().next().expect("header")).expect("JSON");
    let shard0: Value = serde_json::from_str(
        std::fs::read_to_string(shard(0))
            .expect("read")
            .lines()
            .next()
            .expect("header"),
    )
    .expect("JSON");
    assert_eq!(header["moda_job"]["shard"], "0/1");
    assert_eq!(header["moda_job"]["merged_shards"], 3);
    for key in ["task", "options", "model"] {
        assert_eq!(header["moda_job"][key], shard0["moda_job"][key], "{key}");
    }
    // The records in catalog order, each line as its shard wrote it.
    let keys: Vec<String> = records(&text)
        .iter()
        .map(|r| r.image().to_string())
        .collect();
    assert_eq!(keys, paths);
    let shard_lines: BTreeSet<String> = (0..3)
        .flat_map(|i| {
            std::fs::read_to_string(shard(i))
                .expect("read")
                .lines()
                .skip(1)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let merged_lines: BTreeSet<String> = text.lines().skip(1).map(str::to_string).collect();
    assert_eq!(merged_lines, shard_lines);
    assert_eq!(text.lines().count(), 1 + paths.len());
    // Without the inputs: the shards interleaved, which is the same order here.
    let loose = d.join("loose.jsonl");
    let o = merge(&["-o", &s(&loose), &sh[1], &sh[2], &sh[0]]);
    expect_code(&o, 0);
    assert_eq!(std::fs::read_to_string(&loose).expect("read"), text);
    // The merge is the output of the whole job: an unsharded run of it has nothing to do.
    let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
    args.extend(["--output", &m, "--max-new-tokens", "2"]);
    let again = run("describe", &args);
    expect_code(&again, 0);
    assert!(
        stderr(&again).contains("7 of 7 images already"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read_to_string(&merged).expect("read"), text);

    // Refusals write nothing (exit status 2) and say what is wrong.
    let refused = |args: &[&str], needles: &[&str]| {
        let out = d.join("refused.jsonl");
        let o = s(&out);
        let o = merge(&[&["-o", o.as_str()], args].concat());
        expect_code(&o, 2);
        for n in needles {
            assert!(
                stderr(&o).contains(n),
                "{args:?}: want {n:?} in\n{}",
                stderr(&o)
            );
        }
        assert!(!out.exists(), "{args:?}: nothing written");
        assert!(
            std::fs::read_dir(d).expect("dir").all(|e| !e
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")),
            "no temporary file left"
        );
    };
    refused(&[&sh[0], &sh[1]], &["1 of the 3 shards are not given: 2/3"]);
    // With the job's images: which of them the missing shard holds (positions 2 and 5 of 7).
    let held = format!(
        "the missing shards hold 2 of the 7 images listed: {:?}, {:?}",
        paths[2], paths[5]
    );
    refused(
        &[&[sh[0].as_str(), sh[1].as_str()], with_images.as_slice()].concat(),
        &["1 of the 3 shards are not given: 2/3", &held],
    );
    refused(
        &[&sh[0], &sh[1], &sh[2], &sh[2]],
        &["shard 2/3 is given twice"],
    );
    // Another option: not a shard of the same job.
    let other = d.join("other1.jsonl");
    describe_shard(&paths, 1, 3, &other, "3", 0);
    refused(
        &[&sh[0], &s(&other), &sh[2]],
        &["headers differ in options"],
    );
    // Shards of another split.
    let half = d.join("half.jsonl");
    describe_shard(&paths, 1, 2, &half, "2", 0);
    refused(
        &[&sh[0], &s(&half), &sh[2]],
        &["is shard 1/2", "not one split"],
    );
    // An image recorded twice.
    let shard1 = std::fs::read_to_string(shard(1)).expect("read");
    let dup = d.join("dup1.jsonl");
    let first_of_0 = std::fs::read_to_string(shard(0))
        .expect("read")
        .lines()
        .nth(1)
        .expect("a record")
        .to_string();
    std::fs::write(&dup, format!("{shard1}{first_of_0}\n")).expect("write");
    refused(
        &[&sh[0], &s(&dup), &sh[2]],
        &[
            "1 images are recorded more than once",
            &format!("{:?}", paths[0]),
        ],
    );
    // An image missing: without the inputs it cannot be seen; with them it is named.
    let lines: Vec<&str> = shard1.lines().collect();
    let short = d.join("short1.jsonl");
    std::fs::write(&short, format!("{}\n{}\n", lines[0], lines[1])).expect("write");
    let lost = &paths[4]; // shard 1's second image
    refused(
        &[
            &[sh[0].as_str(), &s(&short), &sh[2]],
            with_images.as_slice(),
        ]
        .concat(),
        &[
            "1 of the 7 images listed are in no shard's output",
            &format!("{lost:?}"),
        ],
    );
    let o = merge(&["-o", &s(&d.join("six.jsonl")), &sh[0], &s(&short), &sh[2]]);
    expect_code(&o, 0);
    assert!(stderr(&o).contains("6 images"), "{}", stderr(&o));
    // An image that is not listed (the job ran on more), and one out of its shard.
    let six: Vec<&str> = with_images[..12].to_vec();
    refused(
        &[&[sh[0].as_str(), &sh[1], &sh[2]], six.as_slice()].concat(),
        &[
            "1 images recorded are not among the images listed",
            &format!("{:?}", paths[6]),
        ],
    );
    // A crash's incomplete last line; the output as an input; not an output at all.
    let cut = d.join("cut1.jsonl");
    std::fs::write(&cut, &shard1.as_bytes()[..shard1.len() - 5]).expect("write");
    refused(&[&sh[0], &s(&cut), &sh[2]], &["an incomplete last line"]);
    let o = merge(&["-o", &sh[0], &sh[0], &sh[1], &sh[2]]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("is also an input"), "{}", stderr(&o));
    let plain = d.join("plain.jsonl");
    std::fs::write(&plain, "{\"image\": \"a.jpg\", \"error\": \"x\"}\n").expect("write");
    refused(&[&sh[0], &s(&plain), &sh[2]], &["not a job header"]);
    // A shard that a job is still writing (it holds the lock).
    {
        let held = std::fs::File::options()
            .append(true)
            .open(shard(2))
            .expect("open");
        held.try_lock().expect("lock");
        refused(&[&sh[0], &sh[1], &sh[2]], &["a job is still writing it"]);
    }
    // Every shard file is as it was.
    assert_eq!(std::fs::read_to_string(shard(1)).expect("read"), shard1);
}

#[test]
fn merge_exits_1_when_images_failed() {
    let dir = TempDir::new("cli-merge-failed");
    let d = dir.path();
    let bad = d.join("bad.jpg");
    std::fs::write(&bad, b"not an image").expect("write");
    let paths = vec![s(&image("photo.jpg")), s(&bad), s(&image("wide.png"))];
    for i in 0..2 {
        // Shard 1 holds the bad image: its job exits 1.
        describe_shard(&paths, i, 2, &d.join(format!("s{i}.jsonl")), "2", i as i32);
    }
    let out = d.join("all.jsonl");
    let (s0, s1) = (s(&d.join("s0.jsonl")), s(&d.join("s1.jsonl")));
    let o = merge(&["-o", &s(&out), &s0, &s1]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("3 images, 1 failed"), "{}", stderr(&o));
    let recs = records(&std::fs::read_to_string(&out).expect("read"));
    assert_eq!(recs.iter().map(Record::image).collect::<Vec<_>>(), paths);
    assert!(recs[1].is_error() && !recs[0].is_error() && !recs[2].is_error());
}

/// A `.npy` file read back: its shape and its numbers, after checking the format byte by byte.
fn read_npy(path: &Path) -> ((usize, usize), Vec<f32>) {
    let bytes = std::fs::read(path).expect("read .npy");
    assert_eq!(&bytes[..6], b"\x93NUMPY", "magic");
    assert_eq!(&bytes[6..8], &[1, 0], "format version 1.0");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let data = 10 + header_len;
    assert_eq!(data % 64, 0, "the data starts at a multiple of 64 bytes");
    let header = std::str::from_utf8(&bytes[10..data]).expect("ASCII header");
    assert!(header.ends_with('\n'), "{header:?}");
    let dict = header.trim_end_matches('\n').trim_end_matches(' ');
    let shape = dict
        .strip_prefix("{'descr': '<f4', 'fortran_order': False, 'shape': (")
        .and_then(|r| r.strip_suffix("), }"))
        .unwrap_or_else(|| panic!("header {dict:?}"));
    let (n, d) = shape.split_once(", ").expect("two dimensions");
    let (n, d): (usize, usize) = (n.parse().expect("n"), d.parse().expect("d"));
    assert_eq!(
        bytes.len(),
        data + 4 * n * d,
        "exactly n x d float32 after the header"
    );
    let values = bytes[data..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    ((n, d), values)
}

#[test]
fn embed_writes_a_numpy_array_with_its_images_beside() {
    use std::os::unix::ffi::OsStrExt;
    let dir = TempDir::new("cli-npy");
    let d = dir.path();
    // A folder of images (listed sorted by name): a.jpg, b.png (bad), c.png, e\xff.jpg (a
    // name that is not UTF-8, which only a folder passes on intact).
    let folder = d.join("images");
    std::fs::create_dir(&folder).expect("mkdir");
    let bad = folder.join("b.png");
    std::fs::write(&bad, b"not an image").expect("write");
    let odd = folder.join(std::ffi::OsStr::from_bytes(b"e\xff.jpg"));
    let imgs = [
        folder.join("a.jpg"),
        bad.clone(),
        folder.join("c.png"),
        odd.clone(),
    ];
    std::fs::copy(image("photo.jpg"), &imgs[0]).expect("copy");
    std::fs::copy(image("gray.png"), &imgs[2]).expect("copy");
    std::fs::copy(image("wide.png"), &odd).expect("copy");
    let args: Vec<String> = vec![s(&folder)];
    let npy = d.join("emb.npy");
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    let n = s(&npy);
    a.extend(["--output", &n, "--normalize", "--batch-size", "2"]);
    let o = run("embed", &a);
    expect_code(&o, 1);
    assert!(
        stderr(&o).contains("b.png\terror"),
        "the failure on stderr: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("wrote 3 embeddings"), "{}", stderr(&o));
    let ((rows, dim), values) = read_npy(&npy);
    assert_eq!((rows, dim), (3, moda().manifest().model.projection_dim));
    let good = [&imgs[0], &imgs[2], &imgs[3]];
    for (r, p) in good.iter().enumerate() {
        let want = moda()
            .embed(&ImageInput::Path(p), Norm::Unit)
            .expect("library");
        assert_eq!(&values[r * dim..(r + 1) * dim], want.as_slice(), "row {r}");
    }
    // The images file: the rows in order, then the failure.
    let order = d.join("emb.images.jsonl");
    let lines = json_lines(&std::fs::read_to_string(&order).expect("images file"));
    assert_eq!(lines.len(), 4);
    assert_eq!(
        lines[0],
        serde_json::json!({"image": s(&imgs[0]), "row": 0})
    );
    assert_eq!(
        lines[1],
        serde_json::json!({"image": s(&imgs[2]), "row": 1})
    );
    let hex: String = odd
        .as_os_str()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(lines[2]["row"], 2);
    assert_eq!(
        lines[2]["image_hex"], hex,
        "the exact bytes of a name that is not UTF-8"
    );
    assert_eq!(lines[3]["image"], s(&bad));
    assert!(lines[3]["error"].is_string() && lines[3].get("row").is_none());
    assert!(
        std::fs::read_dir(d).expect("dir").all(|e| !e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .contains(".tmp-")),
        "no temporary file left"
    );

    // Shards written as JSON Lines and merged into a .npy: the same two files.
    let mut shards = Vec::new();
    for i in 0..2 {
        let out = s(&d.join(format!("e{i}.jsonl")));
        let shard = format!("{i}/2");
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend([
            "--output",
            &out,
            "--normalize",
            "--shard",
            &shard,
            "--quiet",
        ]);
        let r = run("embed", &a);
        assert!(code(&r) <= 1, "{}", stderr(&r));
        shards.push(out);
    }
    let merged = d.join("merged.npy");
    let with_images: Vec<&str> = args.iter().flat_map(|p| ["--image", p.as_str()]).collect();
    let o = merge(
        &[
            &["-o", &s(&merged), &shards[1], &shards[0]],
            with_images.as_slice(),
        ]
        .concat(),
    );
    expect_code(&o, 1);
    assert_eq!(
        std::fs::read(&merged).expect("read"),
        std::fs::read(&npy).expect("read")
    );
    assert_eq!(
        std::fs::read(d.join("merged.images.jsonl")).expect("read"),
        std::fs::read(&order).expect("read")
    );

    // `describe --embed` shards merged into a .npy: the same two files again (each shard's
    // images through the encoder in the same batches as embed's); without --embed, refused.
    for embed in [true, false] {
        let mut shards = Vec::new();
        for i in 0..2 {
            let out = s(&d.join(format!("d{i}-{embed}.jsonl")));
            let shard = format!("{i}/2");
            let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
            a.extend(["--output", &out, "--shard", &shard, "--quiet"]);
            a.extend(["--max-new-tokens", "2"]);
            if embed {
                a.extend(["--embed", "--normalize"]);
            }
            let r = run("describe", &a);
            assert!(code(&r) <= 1, "{}", stderr(&r));
            shards.push(out);
        }
        let merged = d.join(format!("described-{embed}.npy"));
        let o = merge(&["-o", &s(&merged), &shards[0], &shards[1]]);
        if embed {
            expect_code(&o, 1);
            assert_eq!(
                std::fs::read(&merged).expect("read"),
                std::fs::read(&npy).expect("read")
            );
            assert_eq!(
                std::fs::read(d.join(format!("described-{embed}.images.jsonl"))).expect("read"),
                std::fs::read(&order).expect("read")
            );
        } else {
            expect_code(&o, 2);
            assert!(stderr(&o).contains("--embed"), "{}", stderr(&o));
            assert!(!merged.exists());
        }
    }

    // A description is not an array; nothing is written.
    let o = run("describe", &[&args[0], "--output", &s(&d.join("x.npy"))]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("goes with `embed`"), "{}", stderr(&o));
    assert!(!d.join("x.npy").exists());
    let o = merge(&["-o", &s(&d.join("y.npy")), &s(&d.join("nothing.jsonl"))]);
    expect_code(&o, 2);
}

/// `moda-sdk describe --model BUNDLE ARGS...` for another bundle than the plain fixture's.
fn describe_with(bundle: &Path, args: &[&str]) -> Output {
    let b = s(bundle);
    run_env(&[&["describe", "--model", &b], args].concat(), &[])
}

/// The output file `path` with its job header's `constrain` option taken out: a header as a
/// `moda-sdk` from before `--constrain` wrote it.
fn strip_constrain(path: &Path) {
    let text = std::fs::read_to_string(path).expect("read");
    let (first, rest) = text.split_once('\n').expect("a header line");
    let mut header: Value = serde_json::from_str(first).expect("JSON header");
    let options = header["moda_job"]["options"]
        .as_object_mut()
        .expect("options");
    assert!(options.remove("constrain").is_some(), "{first}");
    std::fs::write(path, format!("{header}\n{rest}")).expect("write");
}

#[test]
fn constrain_is_passed_on_and_recorded_in_the_job_header() {
    use moda_sdk::Constrain;
    let (schema, _) = schema_bundle();
    let photo = image("photo.jpg");
    let p = s(&photo);
    let with_schema = Moda::open(schema, &OpenOptions::default()).expect("open");
    // Each value reaches the library (the default is auto), on a bundle with a schema and on
    // one without.
    for (bundle, lib) in [(schema.as_path(), &with_schema), (bundle(), moda())] {
        for (flag, c) in [
            ("", Constrain::Auto),
            ("auto", Constrain::Auto),
            ("schema", Constrain::Schema),
            ("none", Constrain::None),
        ] {
            if c == Constrain::Schema && bundle == self::bundle() {
                continue;
            }
            let mut args = vec![p.as_str(), "--json", "--max-new-tokens", "12"];
            if !flag.is_empty() {
                args.extend(["--constrain", flag]);
            }
            let o = describe_with(bundle, &args);
            expect_code(&o, 0);
            let v = &json_lines(&stdout(&o))[0];
            let opts = GenerationOptions::default()
                .with_max_new_tokens(Some(12))
                .with_constrain(c);
            let want = lib
                .describe(&ImageInput::Path(&photo), &opts)
                .expect("library");
            assert_eq!(ids(v), want.token_ids, "{flag:?} on {}", bundle.display());
            assert_eq!(v["description"], want.text.as_str(), "{flag:?}");
        }
    }
    let o = run("describe", &[&p, "--constrain", "free"]);
    expect_code(&o, 2);
    assert!(
        stderr(&o).contains("[possible values: auto, schema, none]"),
        "{}",
        stderr(&o)
    );
    // `schema` with a bundle that has none: refused before any output is written.
    let dir = TempDir::new("cli-constrain");
    let out = dir.path().join("out.jsonl");
    let o = run(
        "describe",
        &[&p, "--constrain", "schema", "--output", &s(&out)],
    );
    expect_code(&o, 2);
    assert!(stderr(&o).contains("no caption schema"), "{}", stderr(&o));
    assert!(!out.exists());

    // The job header records it; another value is refused rather than mixed in.
    let wide = s(&image("wide.png"));
    let o = s(&out);
    let job = |extra: &[&str]| {
        let mut args = vec![p.as_str(), wide.as_str(), "--output", &o, "--quiet"];
        args.extend(["--max-new-tokens", "4"]);
        args.extend(extra);
        describe_with(schema, &args)
    };
    expect_code(&job(&["--constrain", "none"]), 0);
    let text = std::fs::read_to_string(&out).expect("read");
    let header: Value = serde_json::from_str(text.lines().next().expect("line")).expect("json");
    assert_eq!(header["moda_job"]["options"]["constrain"], "none");
    let r = job(&[]);
    expect_code(&r, 2);
    assert!(
        stderr(&r).contains("constrain \"auto\" here, \"none\" there"),
        "{}",
        stderr(&r)
    );
    assert_eq!(std::fs::read_to_string(&out).expect("read"), text);
    expect_code(&job(&["--constrain", "none"]), 0);
    assert_eq!(std::fs::read_to_string(&out).expect("read"), text);

    // An output from before --constrain (no "constrain" in its header) was written with the
    // default: the same command resumes it; another value is refused.
    std::fs::remove_file(&out).expect("rm");
    expect_code(&job(&[]), 0);
    let text = std::fs::read_to_string(&out).expect("read");
    let header: Value = serde_json::from_str(text.lines().next().expect("line")).expect("json");
    assert_eq!(header["moda_job"]["options"]["constrain"], "auto");
    let first_two: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&out, &first_two).expect("write");
    strip_constrain(&out);
    let old = std::fs::read_to_string(&out).expect("read");
    let r = job(&["--constrain", "none"]);
    expect_code(&r, 2);
    assert!(stderr(&r).contains("constrain"), "{}", stderr(&r));
    assert_eq!(std::fs::read_to_string(&out).expect("read"), old);
    expect_code(&job(&[]), 0);
    let resumed = std::fs::read_to_string(&out).expect("read");
    assert!(resumed.starts_with(&old), "appended to:\n{resumed}");
    assert_eq!(records(&resumed).len(), 2);

    // Shards written before and after --constrain merge: the old header reads as auto.
    let paths = vec![p.clone(), wide.clone(), s(&image("small.png"))];
    let shard = |i: usize| dir.path().join(format!("shard{i}.jsonl"));
    for i in 0..2 {
        describe_shard(&paths, i, 2, &shard(i), "2", 0);
    }
    strip_constrain(&shard(0));
    let merged = dir.path().join("merged.jsonl");
    let o = merge(&["-o", &s(&merged), &s(&shard(0)), &s(&shard(1))]);
    expect_code(&o, 0);
    let text = std::fs::read_to_string(&merged).expect("read");
    let header: Value = serde_json::from_str(text.lines().next().expect("line")).expect("json");
    assert_eq!(header["moda_job"]["options"]["constrain"], "auto");
    assert_eq!(records(&text).len(), 3);
    // A shard with another value is not of the same job.
    describe_shard(&paths, 1, 2, &shard(1), "2", 0);
    let other = dir.path().join("other1.jsonl");
    let o = s(&other);
    let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
    args.extend(["--shard", "1/2", "--output", &o, "--max-new-tokens", "2"]);
    args.extend(["--constrain", "none", "--quiet"]);
    expect_code(&run("describe", &args), 0);
    let o = merge(&["-o", &s(&merged), &s(&shard(0)), &s(&other)]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("differ in options"), "{}", stderr(&o));
}

/// A CSV read whole: its header row and its rows.
fn csv_rows(bytes: &[u8]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::ReaderBuilder::new().from_reader(bytes);
    let header = r
        .headers()
        .expect("a header row")
        .iter()
        .map(str::to_string)
        .collect();
    let rows = r
        .records()
        .map(|row| row.expect("a CSV row").iter().map(str::to_string).collect())
        .collect();
    (header, rows)
}

/// Where each row of a CSV ends (its header row's first).
fn csv_row_ends(bytes: &[u8]) -> Vec<usize> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(bytes);
    let mut rec = csv::ByteRecord::new();
    let mut ends = Vec::new();
    while r.read_byte_record(&mut rec).expect("CSV") {
        ends.push(r.position().byte() as usize);
    }
    ends
}

#[test]
fn describe_csv_has_one_row_per_image_with_the_json_records_values() {
    let (schema, _) = schema_bundle();
    let dir = TempDir::new("cli-csv");
    let d = dir.path();
    // Names that CSV must quote: a comma, quotes and a line break.
    let bad = d.join("bad, \"quoted\"\nname.jpg");
    std::fs::write(&bad, b"not an image").expect("write");
    let odd = d.join("a,\"b\".png");
    std::fs::copy(image("wide.png"), &odd).expect("copy");
    let images = [
        s(&image("photo.jpg")),
        s(&odd),
        s(&bad),
        s(&image("small.png")),
    ];
    let mut args: Vec<&str> = images.iter().map(String::as_str).collect();
    args.extend(["--max-new-tokens", "12", "--quiet"]);
    let json = describe_with(schema, &[args.as_slice(), &["--json"]].concat());
    expect_code(&json, 1);
    let json = json_lines(&stdout(&json));
    let csv = describe_with(schema, &[args.as_slice(), &["--format", "csv"]].concat());
    expect_code(&csv, 1);
    let (header, rows) = csv_rows(&csv.stdout);
    assert_eq!(
        header,
        [
            "image",
            "description",
            "finish",
            "Head",
            "Head_confidence",
            "Tail",
            "Tail_confidence",
            "error"
        ]
    );
    assert_eq!(rows.len(), images.len());
    assert_eq!(json.len(), images.len());
    let mut values = 0;
    for (row, rec) in rows.iter().zip(&json) {
        assert_eq!(row.len(), header.len(), "{row:?}");
        assert_eq!(rec["image"], row[0].as_str());
        if let Some(error) = rec.get("error") {
            assert_eq!(error, row[7].as_str());
            assert!(row[1..7].iter().all(String::is_empty), "{row:?}");
            continue;
        }
        assert_eq!(rec["description"], row[1].as_str(), "{row:?}");
        assert_eq!(rec["finish"], row[2].as_str(), "{row:?}");
        assert_eq!(row[7], "", "{row:?}");
        for (k, field) in ["Head", "Tail"].iter().enumerate() {
            let (value, confidence) = (&row[3 + 2 * k], &row[4 + 2 * k]);
            let a = &rec["attributes"][field];
            if a.is_null() {
                assert!(value.is_empty() && confidence.is_empty(), "{row:?}");
                continue;
            }
            values += 1;
            assert_eq!(a["value"], value.as_str(), "{field}");
            match a["confidence"].as_f64() {
                Some(c) => assert_eq!(confidence.parse::<f32>().expect("a number"), c as f32),
                None => assert!(confidence.is_empty(), "{row:?}"),
            }
        }
    }
    assert!(values > 0, "no attribute values in {rows:?}");
    // The failed image is the only one with an error.
    assert_eq!(rows.iter().filter(|r| !r[7].is_empty()).count(), 1);
    assert_eq!(rows[2][0], s(&bad));

    // The same rows in an --output named .csv (CSV without --format); a crash's half row is
    // cut off and the job goes on, each image once.
    let out = d.join("out.csv");
    let o = s(&out);
    let job = |extra: &[&str]| {
        let mut a = args.clone();
        a.extend(["--output", o.as_str()]);
        a.extend(extra);
        describe_with(schema, &a)
    };
    expect_code(&job(&[]), 1);
    let full = std::fs::read(&out).expect("read");
    assert_eq!(full, csv.stdout, "the --output rows are those of stdout");
    let ends = csv_row_ends(&full);
    assert_eq!(ends.len(), 1 + images.len());
    let cut = ends[1] + (ends[2] - ends[1]) / 2;
    std::fs::write(&out, &full[..cut]).expect("truncate");
    expect_code(&job(&[]), 1);
    assert_eq!(std::fs::read(&out).expect("read"), full);
    // Nothing left to do: unchanged, and the earlier failure still counts.
    let again = job(&["--format", "csv"]);
    expect_code(&again, 1);
    assert_eq!(std::fs::read(&out).expect("read"), full);
    // A bundle with other fields (here none) is refused, the file untouched.
    let r = run("describe", &[&images[0], "--output", &o]);
    expect_code(&r, 2);
    assert!(stderr(&r).contains("header row"), "{}", stderr(&r));
    assert!(stderr(&r).contains("Head_confidence"), "{}", stderr(&r));
    assert_eq!(std::fs::read(&out).expect("read"), full);

    // Without a schema: no attribute columns.
    let o = run(
        "describe",
        &[&images[0], "--format", "csv", "--max-new-tokens", "3"],
    );
    expect_code(&o, 0);
    let (header, rows) = csv_rows(&o.stdout);
    assert_eq!(header, ["image", "description", "finish", "error"]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], images[0]);
    // Three tokens of this model's text, none of them `</s>` (its free run is 32 tokens).
    assert_eq!(rows[0][2], "length");
}

#[test]
fn csv_output_guards_cells_a_spreadsheet_would_run_and_resumes_past_them() {
    let dir = TempDir::new("cli-csv-formula");
    let d = dir.path();
    std::fs::copy(image("photo.jpg"), d.join("=1+1.jpg")).expect("copy");
    std::fs::copy(image("wide.png"), d.join("@x.png")).expect("copy");
    std::fs::write(d.join("-bad.jpg"), b"not an image").expect("write");
    let catalog = d.join("catalog.csv");
    std::fs::write(&catalog, "image\n=1+1.jpg\n@x.png\n-bad.jpg\n").expect("csv");
    let out = d.join("out.csv");
    let job = || {
        run(
            "describe",
            &[
                "--csv",
                &s(&catalog),
                "--image-column",
                "image",
                "--max-new-tokens",
                "4",
                "--output",
                &s(&out),
                "--quiet",
            ],
        )
    };
    expect_code(&job(), 1);
    let first = std::fs::read(&out).expect("read");
    let (_, rows) = csv_rows(&first);
    let images: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    // The catalog's cells, each behind a `'`, so that a spreadsheet shows it as text.
    assert_eq!(images, ["'=1+1.jpg", "'@x.png", "'-bad.jpg"]);
    // The error names the file by its path, which begins with the folder: not guarded.
    assert!(rows[2][3].starts_with(&s(d)), "{:?}", rows[2]);
    assert!(
        rows[2][3].contains("-bad.jpg: not an image"),
        "{:?}",
        rows[2]
    );
    // Run again: every image is recorded under its own name, nothing is described twice.
    expect_code(&job(), 1);
    assert_eq!(std::fs::read(&out).expect("read"), first);
}

#[test]
fn csv_format_choice_shards_and_merge() {
    let (schema, _) = schema_bundle();
    let dir = TempDir::new("cli-csv-format");
    let d = dir.path();
    let photo = s(&image("photo.jpg"));
    let paths: Vec<String> = GOOD.iter().take(5).map(|n| s(&image(n))).collect();
    let path_args: Vec<&str> = paths.iter().map(String::as_str).collect();
    // A --format (or --json) that the output's name contradicts, CSV for embed: usage errors,
    // no file written.
    for (args, needle) in [
        (
            vec!["--format", "jsonl", "--output", "x.csv"],
            "--format asks for jsonl",
        ),
        (
            vec!["--format", "csv", "--output", "x.jsonl"],
            "--format asks for csv",
        ),
        (
            vec!["--format", "csv", "--output", "x.JSON"],
            "--format asks for csv",
        ),
        (vec!["--json", "--output", "x.csv"], "--json asks for jsonl"),
        (
            vec!["--json", "--format", "csv"],
            "cannot go with --format csv",
        ),
    ] {
        let mut all = vec![photo.as_str()];
        let named: Vec<String> = args
            .iter()
            .map(|a| {
                if a.starts_with("x.") {
                    s(&d.join(a))
                } else {
                    a.to_string()
                }
            })
            .collect();
        all.extend(named.iter().map(String::as_str));
        let o = describe_with(schema, &all);
        expect_code(&o, 2);
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(
        std::fs::read_dir(d).expect("ls").count(),
        0,
        "no file written"
    );
    let o = run("embed", &[&photo, "--output", &s(&d.join("emb.csv"))]);
    expect_code(&o, 2);
    assert!(
        stderr(&o).contains("CSV is for `describe`"),
        "{}",
        stderr(&o)
    );
    assert!(!d.join("emb.csv").exists());

    // --format jsonl on stdout is --json; --format csv takes any other output name.
    let o = describe_with(
        schema,
        &[&photo, "--format", "jsonl", "--max-new-tokens", "3"],
    );
    expect_code(&o, 0);
    let j = describe_with(schema, &[&photo, "--json", "--max-new-tokens", "3"]);
    assert_eq!(
        ids(&json_lines(&stdout(&o))[0]),
        ids(&json_lines(&stdout(&j))[0])
    );
    let txt = d.join("rows.txt");
    let o = describe_with(
        schema,
        &[
            &photo,
            "--format",
            "csv",
            "--output",
            &s(&txt),
            "--max-new-tokens",
            "3",
        ],
    );
    expect_code(&o, 0);
    let (header, rows) = csv_rows(&std::fs::read(&txt).expect("read"));
    assert_eq!(header.len(), 8);
    assert_eq!(rows.len(), 1);
    // Three tokens cannot spell the schema's caption: cut at the limit, said in the row and
    // in the job's summary.
    assert_eq!(rows[0][2], "length", "{rows:?}");
    assert!(
        stderr(&o).contains("1 of the descriptions reached the token limit"),
        "{}",
        stderr(&o)
    );

    // Shards: each a plain CSV; together the unsharded job's rows.
    let mut whole_args = path_args.clone();
    whole_args.extend(["--format", "csv", "--max-new-tokens", "3", "--quiet"]);
    let whole = describe_with(schema, &whole_args);
    expect_code(&whole, 0);
    let (want_header, want_rows) = csv_rows(&whole.stdout);
    let mut got = Vec::new();
    let shard = |i: usize| d.join(format!("shard{i}.csv"));
    for i in 0..2 {
        let spec = format!("{i}/2");
        let out = s(&shard(i));
        let mut a = path_args.clone();
        a.extend(["--shard", &spec, "--output", &out, "--max-new-tokens", "3"]);
        expect_code(&describe_with(schema, &a), 0);
        let (header, rows) = csv_rows(&std::fs::read(shard(i)).expect("read"));
        assert_eq!(header, want_header);
        let keys: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        let want: Vec<&str> = path_args.iter().skip(i).step_by(2).copied().collect();
        assert_eq!(keys, want, "shard {i}");
        got.extend(rows);
    }
    got.sort();
    let mut want_rows = want_rows;
    want_rows.sort();
    assert_eq!(got, want_rows);
    // merge takes JSON Lines only: CSV inputs and a CSV output are refused, saying why.
    let (s0, s1) = (s(&shard(0)), s(&shard(1)));
    let o = merge(&["-o", &s(&d.join("all.jsonl")), &s0, &s1]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("a CSV output"), "{}", stderr(&o));
    assert!(!d.join("all.jsonl").exists());
    let js = d.join("s0.jsonl");
    describe_shard(&paths, 0, 1, &js, "2", 0);
    let o = merge(&["-o", &s(&d.join("all.csv")), &s(&js)]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("not CSV"), "{}", stderr(&o));
    assert!(!d.join("all.csv").exists());
}
