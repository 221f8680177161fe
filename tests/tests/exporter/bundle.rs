//! `exporter onnx`: the bundle of the tiny fixture models, run in ONNX Runtime, against the
//! transformers references (not only against candle); the KV cache; the ONNX checker; bad
//! input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use exporter::verify::{f32_input, f32_raw, i64_input, open, probe_values, run, Out};
use exporter::{
    export_onnx, write_bundle, BundleOptions, BundleSources, Error, ExportOptions, Quantize,
    DECODER_FILE, DEFAULT_MAX_NEW_TOKENS, EMBED_TOKENS_FILE, ENCODER_FILE, PROJECTOR_FILE,
};
use moda_models::{CaptionModel, ClipVision, Opt, Projector, ProjectorConfig};
use moda_sdk::manifest::{Manifest, Role, FORMAT_VERSION, MANIFEST_FILE};
use moda_tests::{fixture, get, load_refs, max_abs_diff, TempDir};
use sha2::{Digest, Sha256};

/// ONNX Runtime against transformers, f32.
const TOL: f32 = 1e-4;

fn recipe_options(out: &Path) -> ExportOptions {
    ExportOptions {
        checkpoint: fixture("moda/fashion_opt.pth"),
        out: out.to_path_buf(),
        encoder: fixture("clip_gelu").display().to_string(),
        decoder: fixture("opt_preln").display().to_string(),
        quantize: Quantize::None,
        block_size: None,
        force: false,
        verify: true,
        max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
        caption_template: None,
        catalog: None,
    }
}

/// Exports the recipe fixture (clip_gelu + projector + opt_preln) into `dir/bundle`.
fn export_recipe(dir: &TempDir) -> PathBuf {
    let out = dir.path().join("bundle");
    let report = export_onnx(&recipe_options(&out)).expect("export the recipe fixture");
    let m = report.verification.expect("verified");
    assert!(m.encoder <= 1e-4 && m.projector <= 1e-4, "{m:?}");
    assert!(
        m.decoder_prefill <= 1e-3 && m.decoder_steps <= 1e-3,
        "{m:?}"
    );
    out
}

/// The post-LN variant: clip_quick (quick_gelu, fp16 weights) + a seeded projector +
/// opt_postln (post-LN, untied, project_in/out), exported into `dir/bundle`.
fn export_postln(dir: &TempDir) -> PathBuf {
    export_postln_with(dir, Quantize::None)
}

/// [`export_postln`] with a quantized decoder.
fn export_postln_with(dir: &TempDir, quantize: Quantize) -> PathBuf {
    let dev = Device::Cpu;
    let enc = ClipVision::from_dir(&fixture("clip_quick"), DType::F32, &dev).expect("clip_quick");
    let dec = Opt::from_dir(&fixture("opt_postln"), DType::F32, &dev).expect("opt_postln");
    let pcfg = ProjectorConfig::new(enc.config().projection_dim, dec.config().embed_dim());
    let mut tensors = HashMap::new();
    let mut put = |name: &str, shape: &[usize], seed: u64| {
        let n = shape.iter().product();
        let t = Tensor::from_vec(probe_values(n, seed, -0.5, 0.5), shape, &dev).expect("t");
        tensors.insert(name.to_string(), t);
    };
    put("projection.0.weight", &[pcfg.hidden_dim, pcfg.in_dim], 1);
    put("projection.0.bias", &[pcfg.hidden_dim], 2);
    put("projection.2.weight", &[pcfg.out_dim, pcfg.hidden_dim], 3);
    put("projection.2.bias", &[pcfg.out_dim], 4);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let proj = Projector::new(&pcfg, vb).expect("projector");
    let model = CaptionModel::new(enc, proj, dec).expect("moda");
    let sources =
        BundleSources::from_dirs(&fixture("clip_quick"), &fixture("opt_postln")).expect("sources");
    let out = dir.path().join("bundle");
    let options = BundleOptions {
        verify: true,
        quantize,
        ..Default::default()
    };
    let report = write_bundle(&model, &sources, &out, &options).expect("export post-LN");
    let m = report.verification.expect("verified");
    if quantize == Quantize::None {
        assert!(m.decoder_steps <= 1e-3, "{m:?}");
    }
    out
}

fn to_tensor(o: &Out) -> Tensor {
    Tensor::from_vec(o.data.clone(), o.shape.as_slice(), &Device::Cpu).expect("tensor")
}

fn manifest(bundle: &Path) -> Manifest {
    let text = std::fs::read_to_string(bundle.join(MANIFEST_FILE)).expect("moda.json");
    serde_json::from_str(&text).expect("manifest parses")
}

/// Token ids -> embeddings through `embed_tokens.onnx`.
fn embed(bundle: &Path, ids: &Tensor) -> Tensor {
    let mut s = open(bundle, EMBED_TOKENS_FILE).expect("embed_tokens session");
    let out = run(
        &mut s,
        "embed_tokens",
        vec![(
            "input_ids".into(),
            i64_input("embed_tokens", ids).expect("ids"),
        )],
        &["inputs_embeds".into()],
    )
    .expect("embed_tokens runs");
    to_tensor(&out[0])
}

/// The decoder with its KV cache, step by step, as a runtime drives it.
struct Decoder {
    session: ort::session::Session,
    layers: usize,
    past: Vec<Out>,
}

impl Decoder {
    fn new(bundle: &Path, batch: usize) -> Self {
        let m = manifest(bundle).model;
        Self {
            session: open(bundle, DECODER_FILE).expect("decoder session"),
            layers: m.num_layers,
            past: (0..2 * m.num_layers)
                .map(|_| Out {
                    shape: vec![batch, m.num_heads, 0, m.head_dim],
                    data: Vec::new(),
                })
                .collect(),
        }
    }

    /// One call: `embeds [b, seq, e]`, `mask [b, past + seq]` -> logits; the cache grows.
    fn step(&mut self, embeds: &Tensor, mask: &Tensor) -> Tensor {
        let mut inputs = vec![
            (
                "inputs_embeds".to_string(),
                f32_input("d", embeds).expect("e"),
            ),
            (
                "attention_mask".to_string(),
                i64_input("d", mask).expect("m"),
            ),
        ];
        let mut names = vec!["logits".to_string()];
        for (i, p) in self.past.drain(..).enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            let shape = p.shape.iter().map(|&d| d as i64).collect();
            let name = format!("past_key_values.{}.{kind}", i / 2);
            inputs.push((name, f32_raw("d", shape, p.data).expect("past")));
        }
        for i in 0..self.layers {
            names.push(format!("present.{i}.key"));
            names.push(format!("present.{i}.value"));
        }
        let mut out = run(&mut self.session, "decoder", inputs, &names).expect("decoder runs");
        self.past = out.split_off(1);
        to_tensor(&out[0])
    }
}

/// Max |a - b| over the positions where `mask [b, t]` is 1 (`a`, `b`: `[b, t, v]`).
fn masked_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let mask: Vec<Vec<i64>> = mask.to_dtype(DType::I64).expect("m").to_vec2().expect("m");
    let mut max = 0f32;
    for (r, row) in mask.iter().enumerate() {
        for (c, &m) in row.iter().enumerate() {
            if m == 1 {
                let d = max_abs_diff(&a.i((r, c)).expect("a"), &b.i((r, c)).expect("b"));
                max = max.max(d);
            }
        }
    }
    max
}

/// The decoder of `bundle` against `<fixture>/reference.safetensors` (ids, left- and
/// right-padded ids, inputs_embeds), all in one pass with an empty cache.
fn check_decoder_against(bundle: &Path, opt_fixture: &str) {
    let refs = load_refs(&format!("{opt_fixture}/reference.safetensors"));
    let ids = get(&refs, "ids.input_ids");
    let mask = Tensor::ones(ids.dims(), DType::I64, &Device::Cpu).expect("ones");
    let logits = Decoder::new(bundle, ids.dim(0).expect("b")).step(&embed(bundle, ids), &mask);
    let d = max_abs_diff(&logits, get(&refs, "ids.logits"));
    assert!(d <= TOL, "{opt_fixture} ids.logits: {d}");
    eprintln!("max abs diff vs transformers, {opt_fixture} ids.logits: {d:.2e}");
    for case in ["padded", "rpadded"] {
        let ids = get(&refs, &format!("{case}.input_ids"));
        let mask = get(&refs, &format!("{case}.attention_mask"));
        let mut dec = Decoder::new(bundle, ids.dim(0).expect("b"));
        let logits = dec.step(&embed(bundle, ids), mask);
        let d = masked_diff(&logits, get(&refs, &format!("{case}.logits")), mask);
        assert!(d <= TOL, "{opt_fixture} {case}.logits: {d}");
        eprintln!("max abs diff vs transformers, {opt_fixture} {case}.logits: {d:.2e}");
    }
    let embeds = get(&refs, "embeds.inputs_embeds");
    let mask = Tensor::ones((1, embeds.dim(1).expect("t")), DType::I64, &Device::Cpu).expect("1");
    let logits = Decoder::new(bundle, 1).step(embeds, &mask);
    let d = max_abs_diff(&logits, get(&refs, "embeds.logits"));
    assert!(d <= TOL, "{opt_fixture} embeds.logits: {d}");
    eprintln!("max abs diff vs transformers, {opt_fixture} embeds.logits: {d:.2e}");
}

/// The encoder of `bundle` against `<fixture>/reference.safetensors` (the 7-image batch).
fn check_encoder_against(bundle: &Path, clip_fixture: &str) {
    let refs = load_refs(&format!("{clip_fixture}/reference.safetensors"));
    let mut s = open(bundle, ENCODER_FILE).expect("encoder session");
    let pix = get(&refs, "batch.pixel_values");
    let out = run(
        &mut s,
        "encoder",
        vec![(
            "pixel_values".into(),
            f32_input("encoder", pix).expect("pix"),
        )],
        &["image_embeds".into()],
    )
    .expect("encoder runs");
    let d = max_abs_diff(&to_tensor(&out[0]), get(&refs, "batch.image_embeds"));
    assert!(d <= TOL, "{clip_fixture} batch.image_embeds: {d}");
    eprintln!("max abs diff vs transformers, {clip_fixture} batch.image_embeds: {d:.2e}");
}

#[test]
fn recipe_bundle_matches_transformers() {
    let dir = TempDir::new("export-recipe");
    let bundle = export_recipe(&dir);
    check_encoder_against(&bundle, "clip_gelu");
    // The recipe's OPT weights are opt_preln's.
    check_decoder_against(&bundle, "opt_preln");

    // The whole MODA forward of the recipe module: projector, then prefix + tokens.
    let refs = load_refs("moda/reference.safetensors");
    let mut s = open(&bundle, PROJECTOR_FILE).expect("projector session");
    let out = run(
        &mut s,
        "projector",
        vec![(
            "image_embeds".into(),
            f32_input("projector", get(&refs, "image_embeds")).expect("in"),
        )],
        &["prefix_embeds".into()],
    )
    .expect("projector runs");
    let prefix = to_tensor(&out[0]);
    let d = max_abs_diff(&prefix, get(&refs, "prefix_embeds"));
    assert!(d <= TOL, "prefix_embeds: {d}");
    eprintln!("max abs diff vs transformers, prefix_embeds: {d:.2e}");
    let tokens = embed(&bundle, get(&refs, "input_ids"));
    let embeds = Tensor::cat(&[&prefix, &tokens], 1).expect("cat");
    let mask = get(&refs, "attention_mask");
    let logits = Decoder::new(&bundle, 2).step(&embeds, mask);
    let d = masked_diff(&logits, get(&refs, "logits"), mask);
    assert!(d <= TOL, "moda logits: {d}");
    eprintln!("max abs diff vs transformers, moda logits: {d:.2e}");

    // Greedy decoding with the cache: [prefix, BOS], then one token at a time.
    let want: Vec<Vec<i64>> = get(&refs, "greedy.tokens").to_vec2().expect("tokens");
    let got = greedy(&bundle, &prefix, want[0].len());
    assert_eq!(got, want, "greedy tokens with the ONNX KV cache");
}

#[test]
fn manifest_describes_the_bundle() {
    let dir = TempDir::new("export-manifest");
    let bundle = export_recipe(&dir);
    let m = manifest(&bundle);
    assert_eq!(m.format_version, FORMAT_VERSION);
    assert_eq!((m.model.num_layers, m.model.num_heads), (2, 4));
    assert_eq!((m.model.embed_dim, m.model.projection_dim), (32, 24));
    assert_eq!(
        (
            m.special_tokens.bos,
            m.special_tokens.eos,
            m.special_tokens.pad
        ),
        (2, 2, 1)
    );
    assert_eq!(m.preprocessing.crop_size.height_width(), (64, 64));
    assert_eq!(m.generation.max_new_tokens, DEFAULT_MAX_NEW_TOKENS);
    for (file, info) in &m.files {
        let bytes = std::fs::read(bundle.join(file)).expect("listed file exists");
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, info.sha256, "{file}");
        assert_eq!(bytes.len() as u64, info.bytes, "{file}");
    }
    for (role, g) in &m.graphs {
        assert!(m.files.contains_key(&g.file), "{role}");
        let s = open(&bundle, &g.file).expect("session");
        let names: Vec<&str> = s.inputs().iter().map(|i| i.name()).collect();
        let listed: Vec<&str> = g.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, listed, "{role} inputs");
        assert_eq!(names, role.input_names(m.model.num_layers), "{role}");
        let names: Vec<&str> = s.outputs().iter().map(|o| o.name()).collect();
        let listed: Vec<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, listed, "{role} outputs");
        // The writer's names are the bundle format's, which the SDK expects.
        assert_eq!(names, role.output_names(m.model.num_layers), "{role}");
        assert_eq!(g.file, role.default_file(), "{role}");
    }
    let roles: Vec<Role> = m.graphs.keys().copied().collect();
    assert_eq!(roles.len(), Role::ALL.len());
    // Nothing else is left beside the bundle (no temporary directory).
    let entries: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert_eq!(entries.len(), 1);
    // Deterministic: a second export writes the same bytes.
    let dir2 = TempDir::new("export-manifest-again");
    let again = manifest(&export_recipe(&dir2));
    assert_eq!(again.files, m.files);
}

/// `--max-new-tokens` becomes the manifest's default; one the decoder's positions cannot
/// hold is refused before anything is written.
#[test]
fn max_new_tokens_is_written_and_checked_against_the_positions() {
    let dir = TempDir::new("export-max-new");
    let out = dir.path().join("bundle");
    let opts = ExportOptions {
        verify: false,
        max_new_tokens: 7,
        ..recipe_options(&out)
    };
    export_onnx(&opts).expect("export");
    assert_eq!(manifest(&out).generation.max_new_tokens, 7);
    let allowed = manifest(&out).model.max_new_tokens_allowed();
    for n in [0, allowed + 1] {
        let out = dir.path().join(format!("bundle-{n}"));
        let opts = ExportOptions {
            verify: false,
            max_new_tokens: n,
            ..recipe_options(&out)
        };
        match export_onnx(&opts).expect_err("must refuse") {
            Error::Usage(msg) => assert!(
                msg.contains("--max-new-tokens") && msg.contains(&format!("1 to {allowed}")),
                "{msg}"
            ),
            other => panic!("expected a usage error, got {other:?}"),
        }
        assert!(!out.exists(), "nothing written for {n}");
    }
}

#[test]
fn postln_bundle_matches_transformers() {
    let dir = TempDir::new("export-postln");
    let bundle = export_postln(&dir);
    check_encoder_against(&bundle, "clip_quick");
    check_decoder_against(&bundle, "opt_postln");
}

/// A first step with an empty cache, then ten cached steps of one position, give the logits of
/// one full pass over the same sequence.
#[test]
fn cached_steps_equal_one_full_pass() {
    let dir = TempDir::new("export-cache");
    for bundle in [export_recipe(&dir), {
        let d2 = TempDir::new("export-cache-postln");
        let b = export_postln(&d2);
        let keep = dir.path().join("postln");
        std::fs::rename(&b, &keep).expect("move");
        keep
    }] {
        let e = manifest(&bundle).model.embed_dim;
        let (b, t) = (2, 11);
        let dev = Device::Cpu;
        let embeds =
            Tensor::from_vec(probe_values(b * t * e, 9, -1.0, 1.0), (b, t, e), &dev).expect("e");
        let mut mask_rows = vec![1i64; b * t];
        mask_rows[t] = 0; // row 1 left-padded by one
        let mask = Tensor::from_vec(mask_rows, (b, t), &dev).expect("mask");
        let full = Decoder::new(&bundle, b).step(&embeds, &mask);
        let mut dec = Decoder::new(&bundle, b);
        for pos in 0..t {
            let x = embeds.narrow(1, pos, 1).expect("x");
            let m = mask.narrow(1, 0, pos + 1).expect("m");
            let step = dec.step(&x, &m);
            let want = full.narrow(1, pos, 1).expect("want");
            let row_mask = mask.narrow(1, pos, 1).expect("rm");
            let d = masked_diff(&step, &want, &row_mask);
            assert!(d <= TOL, "{}: position {pos}: {d}", bundle.display());
        }
    }
}

/// Every graph passes `onnx.checker.check_model(m, full_check=True)`, with the `onnx` package
/// that scripts/setup.sh installs into `.ort/py`.
#[test]
fn graphs_pass_the_onnx_checker() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf();
    let py = root.join(".ort").join("py");
    assert!(
        py.join("onnx").is_dir(),
        "the onnx Python package is not installed in {}: run `bash scripts/setup.sh`",
        py.display()
    );
    let dir = TempDir::new("export-checker");
    let dir2 = TempDir::new("export-checker-postln");
    let mut files = Vec::new();
    for bundle in [export_recipe(&dir), export_postln(&dir2)] {
        for f in [
            ENCODER_FILE,
            PROJECTOR_FILE,
            EMBED_TOKENS_FILE,
            DECODER_FILE,
        ] {
            files.push(bundle.join(f).display().to_string());
        }
    }
    // The quantized decoders (com.microsoft.MatMulNBits) too.
    for q in [Quantize::Int8, Quantize::Int4] {
        let out = dir.path().join(q.name());
        let mut opts = recipe_options(&out);
        opts.quantize = q;
        opts.verify = false;
        export_onnx(&opts).expect("quantized export");
        files.push(out.join(DECODER_FILE).display().to_string());
    }
    let script = "import sys, onnx\n\
                  for p in sys.argv[1:]:\n    \
                  onnx.checker.check_model(onnx.load(p), full_check=True)\n    \
                  print('ok', p)\n";
    let out = std::process::Command::new("python3")
        .env("PYTHONPATH", &py)
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "onnx.checker failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        files.len()
    );
}

#[test]
fn existing_out_needs_force() {
    let dir = TempDir::new("export-exists");
    let out = dir.path().join("bundle");
    std::fs::create_dir(&out).expect("mkdir");
    std::fs::write(out.join("keep.txt"), "mine").expect("write");
    let err = export_onnx(&recipe_options(&out)).expect_err("must refuse");
    assert!(matches!(err, Error::OutExists(_)), "{err:?}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(
        out.join("keep.txt").is_file(),
        "the existing directory is untouched"
    );
    // --force replaces only a bundle: a directory of other files is refused (it was deleted).
    let mut opts = recipe_options(&out);
    opts.force = true;
    opts.verify = false;
    let err = export_onnx(&opts).expect_err("not a bundle");
    assert!(matches!(err, Error::OutNotBundle(_)), "{err:?}");
    assert!(err.to_string().contains("not a MODA bundle"), "{err}");
    assert!(out.join("keep.txt").is_file(), "the directory is untouched");
    // So is a regular file.
    let file = dir.path().join("file");
    std::fs::write(&file, "mine").expect("write");
    opts.out = file.clone();
    let err = export_onnx(&opts).expect_err("a file");
    assert!(matches!(err, Error::OutNotBundle(_)), "{err:?}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "mine");
    // A bundle, and an empty directory, are replaced.
    std::fs::remove_file(&file).expect("rm");
    std::fs::remove_file(out.join("keep.txt")).expect("rm");
    opts.out = out.clone();
    export_onnx(&opts).expect("--force replaces an empty directory");
    assert!(out.join(MANIFEST_FILE).is_file());
    export_onnx(&opts).expect("--force replaces a bundle");
    let entries: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert_eq!(entries.len(), 1, "no temporary or old directory left");
}

/// Saves the recipe fixture's weights as a trainer checkpoint directory at `ckpt` (the
/// clip_gelu encoder, external unless `encoder` gives a copy to record), after `edit` changes
/// its state dict.
fn save_recipe_checkpoint(
    ckpt: &Path,
    encoder: Option<&Path>,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, Tensor>),
) {
    use moda_models::checkpoint::{
        recipe_state_dict, save, CheckpointConfig, CheckpointContents, EncoderInfo,
    };
    use moda_models::preprocess::ImageProcessorConfig;
    use moda_models::tokenizer::ModaTokenizer;
    use moda_models::{ClipVisionConfig, OptConfig, Weights};

    let weights = Weights::from_file(&fixture("moda/fashion_opt.pth")).expect("pth");
    let mut tensors = recipe_state_dict(&weights, true).expect("state dict");
    edit(&mut tensors);
    let clip_dir = encoder.map_or_else(|| fixture("clip_gelu"), Path::to_path_buf);
    let enc_cfg = ClipVisionConfig::from_file(&clip_dir.join("config.json")).expect("clip cfg");
    let dec_cfg = OptConfig::from_file(&fixture("opt_preln").join("config.json")).expect("opt cfg");
    let config = CheckpointConfig::new(
        EncoderInfo {
            config: enc_cfg.clone(),
            source: clip_dir.display().to_string(),
            embedded: false,
            trained: false,
        },
        dec_cfg.clone(),
        ProjectorConfig::new(enc_cfg.projection_dim, dec_cfg.embed_dim()),
        ImageProcessorConfig::from_dir_or_default(&clip_dir).expect("preprocessor"),
    );
    let tokenizer = ModaTokenizer::from_dir(&fixture("opt_preln")).expect("tokenizer");
    save(
        ckpt,
        &CheckpointContents {
            config: &config,
            model: &tensors,
            encoder: None,
            tokenizer: &tokenizer,
            extra_files: Vec::new(),
            extra_tensors: Vec::new(),
        },
    )
    .expect("save checkpoint");
}

/// A copy of the files of fixture directory `name` in `dir`.
fn copy_fixture(name: &str, dir: &Path) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).expect("mkdir");
    for entry in std::fs::read_dir(fixture(name)).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    to
}

/// Lists every file under `dir` with its size, to see that nothing changed.
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let entry = entry.expect("entry");
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// `--out` must lie apart from everything the export reads: it deleted the run when it was
/// the run (`--checkpoint run/best --out run --force`), and the checkpoint's encoder when it
/// lay inside the checkpoint. Paths are compared with links resolved.
#[test]
fn out_overlapping_an_input_is_refused_and_nothing_is_touched() {
    let dir = TempDir::new("export-overlap");
    let run = dir.path().join("run");
    let encoder = copy_fixture("clip_gelu", dir.path());
    let decoder = copy_fixture("opt_preln", dir.path());
    let best = run.join("best");
    save_recipe_checkpoint(&best, Some(&encoder), |_| {});
    std::fs::write(run.join("metrics.jsonl"), "{}\n").expect("metrics");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&run, dir.path().join("run-link")).expect("symlink");
    let pth = dir.path().join("fashion_opt.pth");
    std::fs::copy(fixture("moda/fashion_opt.pth"), &pth).expect("copy pth");
    let before = tree(dir.path());

    let mut cases: Vec<(PathBuf, PathBuf, &str, &str)> = vec![
        // (checkpoint, out, relation, what)
        (best.clone(), run.clone(), "contains", "checkpoint"),
        (best.clone(), best.clone(), "is", "checkpoint"),
        (
            best.clone(),
            best.join("encoder"),
            "is inside",
            "checkpoint",
        ),
        (best.clone(), encoder.clone(), "is", "encoder"),
        (best.clone(), encoder.join("sub"), "is inside", "encoder"),
        (
            best.clone(),
            dir.path().to_path_buf(),
            "contains",
            "checkpoint",
        ),
        (pth.clone(), pth.clone(), "is", "checkpoint"),
        (pth.clone(), decoder.clone(), "is", "decoder"),
        (pth.clone(), encoder.clone(), "is", "encoder"),
    ];
    #[cfg(unix)]
    cases.push((
        best.clone(),
        dir.path().join("run-link"),
        "contains",
        "checkpoint",
    ));
    for (checkpoint, out, relation, what) in cases {
        let opts = ExportOptions {
            checkpoint: checkpoint.clone(),
            out: out.clone(),
            encoder: encoder.display().to_string(),
            decoder: decoder.display().to_string(),
            quantize: Quantize::None,
            block_size: None,
            force: true,
            verify: false,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            caption_template: None,
            catalog: None,
        };
        let err = export_onnx(&opts).expect_err("must refuse");
        match &err {
            Error::OutOverlapsInput {
                relation: r,
                what: w,
                ..
            } => assert_eq!((*r, *w), (relation, what), "{out:?}: {err}"),
            other => panic!("{out:?}: expected OutOverlapsInput, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("--out {}", out.display())), "{msg}");
    }
    assert_eq!(tree(dir.path()), before, "nothing was removed or written");
    // Apart from them, the same export works.
    let opts = ExportOptions {
        checkpoint: best,
        out: dir.path().join("bundle"),
        encoder: encoder.display().to_string(),
        decoder: decoder.display().to_string(),
        quantize: Quantize::None,
        block_size: None,
        force: true,
        verify: false,
        max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
        caption_template: None,
        catalog: None,
    };
    export_onnx(&opts).expect("export apart from the inputs");
}

/// A checkpoint whose config.json is a FIFO (or a link to /dev/zero) is refused at once: the
/// export waited for a writer forever (or read zeros until memory ran out).
#[cfg(unix)]
#[test]
fn checkpoint_config_that_is_a_fifo_or_a_device_is_refused_at_once() {
    let dir = TempDir::new("export-fifo");
    let ckpt = dir.path().join("ckpt");
    save_recipe_checkpoint(&ckpt, None, |_| {});
    let config = ckpt.join("config.json");
    for kind in ["FIFO", "character device"] {
        std::fs::remove_file(&config).expect("rm config");
        if kind == "FIFO" {
            let c = std::ffi::CString::new(config.as_os_str().as_encoded_bytes()).expect("path");
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        } else {
            std::os::unix::fs::symlink("/dev/zero", &config).expect("symlink");
        }
        let mut opts = recipe_options(&dir.path().join("bundle"));
        opts.checkpoint = ckpt.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(export_onnx(&opts).map(|_| ()).map_err(|e| e.to_string()));
        });
        let msg = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the export must not hang")
            .expect_err("must refuse");
        assert!(msg.contains("config.json") && msg.contains(kind), "{msg}");
        assert!(!dir.path().join("bundle").exists());
    }
}

/// A NaN in a weight is refused when the graph is written, naming the tensor and where the
/// value is: in a row of the position table beyond the verification's probes it used to
/// export and verify, and the runtime then produced garbage. Quantized weights are checked
/// before they are quantized.
#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let dir = TempDir::new("export-nonfinite");
    let cases = [
        (
            "opt.model.decoder.embed_positions.weight",
            40usize,
            f32::NAN,
            Quantize::None,
            "embed_positions.weight",
        ),
        (
            "opt.model.decoder.layers.0.fc1.weight",
            3,
            f32::INFINITY,
            Quantize::Int8,
            "layers.0.fc1.weight",
        ),
        (
            "opt.model.decoder.layers.1.fc2.weight",
            5,
            f32::NAN,
            Quantize::Int4,
            "layers.1.fc2.weight",
        ),
    ];
    for (i, (name, row, value, quantize, shown)) in cases.into_iter().enumerate() {
        let ckpt = dir.path().join(format!("ckpt{i}"));
        save_recipe_checkpoint(&ckpt, None, |tensors| {
            let t = tensors.get_mut(name).expect("tensor");
            let (rows, cols) = t.dims2().expect("2-d");
            let mut v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("values");
            v[row * cols + 1] = value;
            *t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor");
        });
        let out = dir.path().join(format!("bundle{i}"));
        let mut opts = recipe_options(&out);
        opts.checkpoint = ckpt;
        opts.quantize = quantize;
        let err = export_onnx(&opts).expect_err("a non-finite weight");
        match &err {
            Error::NonFinite {
                tensor, value: v, ..
            } => {
                assert!(tensor.contains(shown), "{err}");
                assert!(!v.is_finite(), "{err}");
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(shown) && msg.contains("no bundle was written"),
            "{msg}"
        );
        if quantize == Quantize::None {
            assert!(msg.contains("[40, 1]"), "the index of the value: {msg}");
        }
        assert!(!out.exists());
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("ckpt"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn read_only_out_is_a_clear_error() {
    // /proc refuses new entries even to root (CI runs as root, so chmod would not do).
    let out = PathBuf::from("/proc/moda-exporter-test/bundle");
    let err = export_onnx(&recipe_options(&out)).expect_err("must fail");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/proc/moda-exporter-test"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn truncated_or_missing_checkpoint_leaves_no_bundle() {
    let dir = TempDir::new("export-trunc");
    let pth = dir.path().join("fashion_opt.pth");
    let bytes = std::fs::read(fixture("moda/fashion_opt.pth")).expect("read");
    std::fs::write(&pth, &bytes[..bytes.len() / 2]).expect("write");
    let out = dir.path().join("bundle");
    let mut opts = recipe_options(&out);
    opts.checkpoint = pth.clone();
    let err = export_onnx(&opts).expect_err("must fail");
    assert!(err.to_string().contains("fashion_opt.pth"), "{err}");
    opts.checkpoint = dir.path().join("missing.pth");
    let err = export_onnx(&opts).expect_err("must fail");
    assert!(err.to_string().contains("missing.pth"), "{err}");
    let entries: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert_eq!(entries.len(), 1, "only the truncated checkpoint is there");
}

#[test]
fn pth_with_unknown_keys_lists_them_and_leaves_no_bundle() {
    let dir = TempDir::new("export-keys");
    let out = dir.path().join("bundle");
    let mut opts = recipe_options(&out);
    opts.checkpoint = fixture("moda/fashion_opt_extra_keys.pth");
    let err = export_onnx(&opts).expect_err("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("extra.weight") && msg.contains("extra.bias"),
        "{msg}"
    );
    assert!(msg.contains("fashion_opt_extra_keys.pth"), "{msg}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}

#[test]
fn checkpoint_not_matching_the_decoder_config_names_the_tensor() {
    // The recipe's weights against a decoder config with a wider feed-forward block.
    let dir = TempDir::new("export-shape");
    let decoder = dir.path().join("decoder");
    std::fs::create_dir_all(&decoder).expect("mkdir");
    for entry in std::fs::read_dir(fixture("opt_preln")).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.path().is_file() {
            std::fs::copy(entry.path(), decoder.join(entry.file_name())).expect("copy");
        }
    }
    let cfg_path = decoder.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("read")).expect("json");
    let ffn = cfg["ffn_dim"].as_u64().expect("ffn_dim");
    cfg["ffn_dim"] = (2 * ffn).into();
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let out = dir.path().join("bundle");
    let mut opts = recipe_options(&out);
    opts.decoder = decoder.display().to_string();
    let err = export_onnx(&opts).expect_err("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("opt.model.decoder.layers.0.fc1.weight")
            && msg.contains(&(2 * ffn).to_string())
            && msg.contains(&ffn.to_string()),
        "{msg}"
    );
    assert!(!out.exists());
}

/// A trainer checkpoint directory (`moda_models::checkpoint`) holding the recipe's weights
/// exports to a bundle that gives the same logits as the recipe's `.pth` (the transformers
/// reference).
#[test]
fn trainer_checkpoint_exports_like_the_recipe() {
    let dir = TempDir::new("export-ckpt");
    let ckpt = dir.path().join("ckpt");
    save_recipe_checkpoint(&ckpt, None, |_| {});
    let bundle = dir.path().join("bundle");
    let mut opts = recipe_options(&bundle);
    opts.checkpoint = ckpt;
    export_onnx(&opts).expect("export the trainer checkpoint");

    let refs = load_refs("moda/reference.safetensors");
    let tokens = embed(&bundle, get(&refs, "input_ids"));
    let embeds = Tensor::cat(&[get(&refs, "prefix_embeds"), &tokens], 1).expect("cat");
    let mask = get(&refs, "attention_mask");
    let logits = Decoder::new(&bundle, 2).step(&embeds, mask);
    let d = masked_diff(&logits, get(&refs, "logits"), mask);
    eprintln!("max abs diff vs transformers, trainer checkpoint logits: {d:.2e}");
    assert!(d <= TOL, "trainer checkpoint logits: {d}");
    check_encoder_against(&bundle, "clip_gelu");
}

/// Greedy decoding with the ONNX KV cache from `prefix [b, 1, e]`: `steps` tokens per row.
fn greedy(bundle: &Path, prefix: &Tensor, steps: usize) -> Vec<Vec<i64>> {
    let b = prefix.dim(0).expect("b");
    let bos = Tensor::full(2i64, (b, 1), &Device::Cpu).expect("bos");
    let mut input = Tensor::cat(&[prefix, &embed(bundle, &bos)], 1).expect("cat");
    let mut dec = Decoder::new(bundle, b);
    let mut total = 0;
    let mut got = vec![Vec::new(); b];
    for _ in 0..steps {
        total += input.dim(1).expect("t");
        let mask = Tensor::ones((b, total), DType::I64, &Device::Cpu).expect("mask");
        let logits = dec.step(&input, &mask);
        let last = logits.i((.., logits.dim(1).expect("t") - 1)).expect("last");
        let next = last
            .argmax(1)
            .expect("argmax")
            .to_dtype(DType::I64)
            .expect("i64");
        for (row, tok) in next.to_vec1::<i64>().expect("ids").into_iter().enumerate() {
            got[row].push(tok);
        }
        input = embed(bundle, &next.unsqueeze(1).expect("col"));
    }
    got
}

/// A batch of several images with identical prompts decodes like each image alone.
#[test]
fn batch_decodes_like_each_alone() {
    let dir = TempDir::new("export-batch");
    let bundle = export_recipe(&dir);
    let refs = load_refs("clip_gelu/reference.safetensors");
    let mut enc = open(&bundle, ENCODER_FILE).expect("encoder");
    let pix = get(&refs, "batch.pixel_values");
    let emb = run(
        &mut enc,
        "encoder",
        vec![("pixel_values".into(), f32_input("e", pix).expect("pix"))],
        &["image_embeds".into()],
    )
    .expect("encoder runs");
    let mut proj = open(&bundle, PROJECTOR_FILE).expect("projector");
    let prefix = run(
        &mut proj,
        "projector",
        vec![(
            "image_embeds".into(),
            f32_input("p", &to_tensor(&emb[0])).expect("emb"),
        )],
        &["prefix_embeds".into()],
    )
    .expect("projector runs");
    let prefix = to_tensor(&prefix[0]);
    let batch = greedy(&bundle, &prefix, 8);
    for (i, row) in batch.iter().enumerate() {
        let alone = greedy(&bundle, &prefix.narrow(0, i, 1).expect("row"), 8);
        assert_eq!(&alone[0], row, "image {i}");
    }
}

/// int8 and int4 bundles (`MatMulNBits` decoders, `DynamicQuantizeMatMul` encoders): smaller
/// decoders, verified against fp32 (cosine of
/// embeddings and logits; argmax agreement measured) (the tiny random model is a hard case for int4: width 32, weights of std 0.3).
#[test]
fn quantized_bundles_agree_with_fp32() {
    let dir = TempDir::new("export-quant");
    let fp32 = export_recipe(&dir);
    let fp32_size = std::fs::metadata(fp32.join(DECODER_FILE))
        .expect("fp32")
        .len();
    for (q, min_rate) in [(Quantize::Int8, 0.75), (Quantize::Int4, 0.3)] {
        let out = dir.path().join(q.name());
        let mut opts = recipe_options(&out);
        opts.quantize = q;
        let report = export_onnx(&opts).expect("quantized export");
        let m = report.verification.expect("verified");
        let rate = m.greedy_agreement.expect("agreement measured");
        let cos = m.min_logits_cosine.expect("cosine measured");
        eprintln!(
            "{}: argmax agreement with fp32 {:.1}%, min logits cosine {cos:.4}",
            q.name(),
            100.0 * rate
        );
        assert!(rate >= min_rate, "{}: {rate}", q.name());
        assert_eq!(manifest(&out).quantization, q);
        let size = std::fs::metadata(out.join(DECODER_FILE)).expect("q").len();
        assert!(size < fp32_size, "{}: {size} >= {fp32_size}", q.name());
        // The encoder's products are int8 dynamic ones in both kinds (the decoder's blocks).
        let encoder = std::fs::read(out.join("encoder.onnx")).expect("encoder");
        let has = |op: &[u8]| encoder.windows(op.len()).any(|w| w == op);
        assert!(
            has(b"DynamicQuantizeMatMul") && !has(b"MatMulNBits"),
            "{}",
            q.name()
        );
        // Embeddings of int8 weights with a scale per column: within 1% of fp32's direction
        // (the exporter's own bound is `min_embeds_cosine`).
        let ecos = m.min_embeds_cosine.expect("embeddings cosine measured");
        assert!(ecos >= 0.99, "{}: {ecos}", q.name());
        // The quantized graph runs where the runtime drives it: full-sequence logits.
        let refs = load_refs("opt_preln/reference.safetensors");
        let ids = get(&refs, "ids.input_ids");
        let mask = Tensor::ones(ids.dims(), DType::I64, &Device::Cpu).expect("ones");
        let logits = Decoder::new(&out, 2).step(&embed(&out, ids), &mask);
        assert_eq!(logits.dims(), get(&refs, "ids.logits").dims());
    }
    // Post-LN with project_in/out (K = 16, less than one block) and an untied head.
    for q in [Quantize::Int8, Quantize::Int4] {
        let d = TempDir::new("export-quant-postln");
        let out = export_postln_with(&d, q);
        assert_eq!(manifest(&out).quantization, q);
    }
}

/// The decoder's `MatMulNBits` blocks: the kind's default (int8's 128, int4's 32) or
/// `--block-size`, narrowed to the largest power of two within a layer's inputs (the
/// fixture's layers take 32 or 64), on every node; a block size that
/// the op does not take, or one without quantization, is refused before anything is written.
#[test]
fn block_size_reaches_every_quantized_layer() {
    use candle_onnx::onnx::{ModelProto, NodeProto};
    use prost::Message;
    // Every node of a graph and of its subgraphs (the LM head's `If` branches).
    fn all_nodes(nodes: &[NodeProto]) -> Vec<&NodeProto> {
        let mut out = Vec::new();
        for n in nodes {
            out.push(n);
            for g in n.attribute.iter().filter_map(|a| a.g.as_ref()) {
                out.extend(all_nodes(&g.node));
            }
        }
        out
    }
    // (K, block_size) of each node.
    let blocks = |bundle: &Path| -> Vec<(i64, i64)> {
        let bytes = std::fs::read(bundle.join(DECODER_FILE)).expect("decoder");
        let m = ModelProto::decode(bytes.as_slice()).expect("onnx");
        let graph = m.graph.expect("graph");
        all_nodes(&graph.node)
            .into_iter()
            .filter(|n| n.op_type == "MatMulNBits")
            .map(|n| {
                let attr = |name: &str| {
                    n.attribute
                        .iter()
                        .find(|a| a.name == name)
                        .unwrap_or_else(|| panic!("{name}"))
                        .i
                };
                (attr("K"), attr("block_size"))
            })
            .collect()
    };
    let dir = TempDir::new("export-blocks");
    for (q, block_size, asked) in [
        (Quantize::Int8, None, 128),
        (Quantize::Int4, None, 32),
        (Quantize::Int4, Some(16), 16),
        (Quantize::Int8, Some(64), 64),
    ] {
        let out = dir.path().join(format!("{}-{block_size:?}", q.name()));
        let mut opts = recipe_options(&out);
        opts.quantize = q;
        opts.block_size = block_size;
        export_onnx(&opts).expect("quantized export");
        let got = blocks(&out);
        // The fixture decoder: 2 layers of qkv (one product), out, fc1, fc2, and the LM head.
        assert_eq!(got.len(), 9, "{} {block_size:?}", q.name());
        for &(k, b) in &got {
            let widest = 1i64 << (63 - k.leading_zeros());
            assert_eq!(b, asked.min(widest), "{} K = {k}: {got:?}", q.name());
        }
        assert!(
            got.iter().any(|&(k, _)| k == 64),
            "a 64-wide layer: {got:?}"
        );
    }
    for (q, block_size) in [
        (Quantize::Int4, 48),
        (Quantize::Int4, 512),
        (Quantize::None, 32),
    ] {
        let out = dir
            .path()
            .join(format!("refused-{}-{block_size}", q.name()));
        let mut opts = recipe_options(&out);
        opts.quantize = q;
        opts.block_size = Some(block_size);
        let err = export_onnx(&opts).expect_err("refused");
        assert!(
            matches!(&err, Error::Usage(m) if m.contains(&format!("--block-size {block_size}"))),
            "{err}"
        );
        assert!(!out.exists());
    }
}

/// The verification names the graph and the output that diverge: a bundle whose projector
/// graph comes from another model fails on `projector` / `prefix_embeds`.
#[test]
fn verification_names_the_diverging_graph_and_output() {
    let dev = Device::Cpu;
    let dir = TempDir::new("export-diverge");
    let bundle = export_recipe(&dir);
    let model = CaptionModel::from_recipe_checkpoint(
        &fixture("moda/fashion_opt.pth"),
        &fixture("clip_gelu"),
        &fixture("opt_preln"),
        &dev,
    )
    .expect("recipe model");

    // The same encoder and decoder with another projector.
    let other = recipe_with_projector(*model.projector().config(), None);
    let sources =
        BundleSources::from_dirs(&fixture("clip_gelu"), &fixture("opt_preln")).expect("sources");
    let other_bundle = dir.path().join("other");
    write_bundle(&other, &sources, &other_bundle, &BundleOptions::default()).expect("export");
    std::fs::copy(
        other_bundle.join(PROJECTOR_FILE),
        bundle.join(PROJECTOR_FILE),
    )
    .expect("swap the projector");

    let err =
        exporter::verify::verify_bundle(&model, &bundle, Quantize::None).expect_err("must diverge");
    match &err {
        Error::Verify { graph, output, .. } => {
            assert_eq!(
                (graph.as_str(), output.as_str()),
                ("projector", "prefix_embeds")
            );
        }
        other => panic!("expected a verification error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("projector") && msg.contains("prefix_embeds"),
        "{msg}"
    );
}

/// The recipe fixture's encoder and decoder with a projector of seeded values, one of them NaN
/// when `nan_at` is given (an index into `projection.0.weight`).
fn recipe_with_projector(pcfg: ProjectorConfig, nan_at: Option<usize>) -> CaptionModel {
    let dev = Device::Cpu;
    let enc = ClipVision::from_dir(&fixture("clip_gelu"), DType::F32, &dev).expect("clip");
    let dec = Opt::from_dir(&fixture("opt_preln"), DType::F32, &dev).expect("opt");
    let mut tensors = HashMap::new();
    for (i, (name, shape)) in [
        ("projection.0.weight", vec![pcfg.hidden_dim, pcfg.in_dim]),
        ("projection.0.bias", vec![pcfg.hidden_dim]),
        ("projection.2.weight", vec![pcfg.out_dim, pcfg.hidden_dim]),
        ("projection.2.bias", vec![pcfg.out_dim]),
    ]
    .into_iter()
    .enumerate()
    {
        let n = shape.iter().product();
        let mut values = probe_values(n, 50 + i as u64, -0.3, 0.3);
        if let (0, Some(k)) = (i, nan_at) {
            values[k] = f32::NAN;
        }
        let t = Tensor::from_vec(values, shape, &dev);
        tensors.insert(name.to_string(), t.expect("tensor"));
    }
    let proj = Projector::new(&pcfg, VarBuilder::from_tensors(tensors, DType::F32, &dev));
    CaptionModel::new(enc, proj.expect("projector"), dec).expect("moda")
}

/// A failure inside `write_bundle` after its temporary directory exists (here a NaN weight in
/// the projector, refused when its graph is written) is an error naming the tensor, and
/// leaves neither the bundle nor its temporary directory behind.
#[test]
fn failed_export_leaves_no_bundle() {
    let dir = TempDir::new("export-nan");
    let pcfg = *CaptionModel::from_recipe_checkpoint(
        &fixture("moda/fashion_opt.pth"),
        &fixture("clip_gelu"),
        &fixture("opt_preln"),
        &Device::Cpu,
    )
    .expect("recipe model")
    .projector()
    .config();
    let model = recipe_with_projector(pcfg, Some(3));
    let sources =
        BundleSources::from_dirs(&fixture("clip_gelu"), &fixture("opt_preln")).expect("sources");
    let out = dir.path().join("bundle");
    let options = BundleOptions {
        verify: true,
        ..BundleOptions::default()
    };
    let err = write_bundle(&model, &sources, &out, &options).expect_err("a NaN must fail");
    match &err {
        Error::NonFinite { tensor, index, .. } => {
            assert_eq!(tensor, "projection.0.weight.T");
            // `projection.0.weight` is [hidden, in]; written transposed.
            assert_eq!(index, &vec![3 % pcfg.in_dim, 3 / pcfg.in_dim]);
        }
        other => panic!("expected a non-finite weight error, got {other:?}"),
    }
    assert!(err.to_string().contains("no bundle was written"), "{err}");
    assert!(!out.exists(), "the bundle must not exist");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// An export killed midway (`kill -9`) leaves `.<name>.partial-<pid>`, a whole bundle copy.
/// The next export to that `--out` removes those of processes that are gone, and keeps the
/// ones of running processes and of other bundles.
#[test]
fn stale_partial_bundles_are_removed_by_the_next_export() {
    let dir = TempDir::new("export-stale");
    let dead = moda_tests::dead_pid();
    let sleeper = moda_tests::LiveProcess::start();
    let stale = dir.path().join(format!(".bundle.partial-{dead}"));
    let live = dir.path().join(format!(".bundle.partial-{}", sleeper.id()));
    let mine_other = dir
        .path()
        .join(format!(".other.partial-{}", std::process::id()));
    for d in [&stale, &live, &mine_other] {
        std::fs::create_dir_all(d).expect("fake partial bundle");
        std::fs::write(d.join("decoder.onnx"), b"partial").expect("fake graph");
    }
    let out = dir.path().join("bundle");
    let mut opts = recipe_options(&out);
    opts.verify = false;
    export_onnx(&opts).expect("export");
    drop(sleeper);
    assert!(
        !stale.exists(),
        "the dead process's partial bundle is removed"
    );
    assert!(live.exists(), "a running process's partial bundle is kept");
    assert!(
        mine_other.exists(),
        "another bundle's partial directory is kept"
    );
    assert!(out.join(MANIFEST_FILE).is_file());

    // A killed export's moved-aside old bundle goes once `out` exists again.
    let old = dir.path().join(format!(".bundle.old-{dead}"));
    std::fs::create_dir_all(&old).expect("fake old bundle");
    opts.force = true;
    export_onnx(&opts).expect("export again");
    assert!(!old.exists(), "the stale old bundle is removed");
}

/// `--checkpoint` naming something that is neither a directory nor a regular file says what it
/// is, not that it does not exist; a missing one still says so.
#[test]
fn checkpoint_that_is_a_device_says_what_it_is() {
    let dir = TempDir::new("export-dev");
    let mut opts = recipe_options(&dir.path().join("bundle"));
    opts.checkpoint = PathBuf::from("/dev/zero");
    let msg = export_onnx(&opts)
        .expect_err("not a checkpoint")
        .to_string();
    assert!(msg.contains("/dev/zero is a character device"), "{msg}");
    assert!(!msg.contains("does not exist"), "{msg}");
    opts.checkpoint = dir.path().join("absent");
    let msg = export_onnx(&opts).expect_err("missing").to_string();
    assert!(msg.contains("does not exist"), "{msg}");
    // Loading it as a checkpoint directory says the same.
    let err = moda_models::checkpoint::load(Path::new("/dev/zero"), &Device::Cpu)
        .expect_err("not a directory");
    assert!(
        err.to_string()
            .contains("is a character device, not a MODA checkpoint directory"),
        "{err}"
    );
}

/// An I/O error's cause is printed once, also through a chain printer (anyhow's `{:#}`): the
/// exporter's error shows it or returns it as its source, not both, and `exporter::report`
/// (what the binary prints) prints the model core's once too.
#[test]
fn error_causes_are_printed_once() {
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        let mut parts = vec![e.to_string()];
        let mut next = e.source();
        while let Some(c) = next {
            parts.push(c.to_string());
            next = c.source();
        }
        parts.join(": ")
    }
    let dir = TempDir::new("export-chain");
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a directory").expect("file");
    let mut opts = recipe_options(&file.join("bundle"));
    opts.verify = false;
    let err = export_onnx(&opts).expect_err("parent is a file");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    for printed in [chain(&err), exporter::report(&err)] {
        assert_eq!(printed.matches("os error").count(), 1, "{printed}");
    }
    let model = Error::Model(moda_models::Error::io(
        "/x/ckpt",
        std::io::Error::from_raw_os_error(17),
    ));
    let printed = exporter::report(&model);
    assert_eq!(printed.matches("os error 17").count(), 1, "{printed}");
}

/// `--caption-template` and `--catalog`: a Kaggle layout folder (its `fashion.csv`) gives
/// each template field's values counted over the rows that fill every field; a template
/// column the CSV lacks, or a bad template, is a usage error; neither flag, no schema.
#[test]
fn a_schema_is_derived_from_a_catalog_for_a_recipe_checkpoint() {
    use exporter::schema_from_flags;
    let dir = TempDir::new("export-schema-flags");
    let csv = "ProductId,Gender,Category,SubCategory,ProductType,Colour,Usage,ProductTitle,Image,ImageURL\n\
               1,Men,Footwear,Shoes,Casual Shoes,Navy Blue,Casual,t,1.jpg,u\n\
               2,Women,Apparel,Topwear,Tshirts,Blue,Smart Casual,t,2.jpg,u\n\
               3,Men,Apparel,Topwear,Tshirts,Navy Blue,Casual,t,3.jpg,u\n\
               4,Men,Apparel,Topwear,Tshirts,,Casual,t,4.jpg,u\n";
    std::fs::write(dir.path().join("fashion.csv"), csv).expect("csv");
    assert_eq!(schema_from_flags(None, None).expect("nothing"), None);
    let s = schema_from_flags(None, Some(dir.path()))
        .expect("derive")
        .expect("a schema");
    assert_eq!(s.template.as_str(), moda_models::schema::DEFAULT_TEMPLATE);
    let counts = |f: &str| -> Vec<(String, u64)> {
        s.field(f)
            .expect("field")
            .values
            .iter()
            .map(|v| (v.value.clone(), v.count))
            .collect()
    };
    // Row 4 has no Colour: it makes no caption and is not counted.
    assert_eq!(
        counts("Colour"),
        [("Navy Blue".to_string(), 2), ("Blue".to_string(), 1)]
    );
    assert_eq!(
        counts("ProductType"),
        [("Tshirts".to_string(), 2), ("Casual Shoes".to_string(), 1)]
    );
    let a = s.parse("Navy Blue Smart Casual Casual Shoes for Women - Footwear Topwear");
    assert_eq!(a["Colour"].as_deref(), Some("Navy Blue"));
    assert_eq!(a["Usage"].as_deref(), Some("Smart Casual"));
    assert_eq!(a["ProductType"].as_deref(), Some("Casual Shoes"));
    // A template alone: its fields, no values.
    let s = schema_from_flags(Some("{Colour} {Pattern}"), None)
        .expect("template")
        .expect("a schema");
    assert!(s.fields.iter().all(|f| f.values.is_empty()));
    // A column the CSV lacks; a malformed template.
    let csv_file = dir.path().join("fashion.csv");
    let e = schema_from_flags(Some("{Colour} {Pattern}"), Some(&csv_file)).expect_err("column");
    assert!(e.to_string().contains("\"Pattern\""), "{e}");
    let e = schema_from_flags(Some("{Colour"), Some(&csv_file)).expect_err("template");
    assert!(e.to_string().contains("--caption-template"), "{e}");
}

/// A recipe `.pth` exports with `<\s>`, the recipe's end of caption, as its default stop
/// string, and without a schema unless asked for one.
#[test]
fn a_recipe_bundle_stops_at_the_recipe_end_marker() {
    let dir = TempDir::new("export-recipe-stop");
    let out = dir.path().join("bundle");
    export_onnx(&ExportOptions {
        verify: false,
        ..recipe_options(&out)
    })
    .expect("export");
    let m = manifest(&out);
    assert_eq!(m.generation.stop_strings, ["<\\s>"]);
    assert_eq!(exporter::RECIPE_STOP_STRING, "<\\s>");
    assert!(m.schema.is_none());
    let text = std::fs::read_to_string(out.join("moda.json")).expect("moda.json");
    assert!(!text.contains("\"schema\""), "no schema key at all");
}
