//! The SDK (`moda_sdk::Moda`) on the recipe fixture bundle: embeddings and greedy tokens
//! against the transformers fixtures and the candle model; batch = single; threads = serial;
//! the three input kinds; generation options; streaming; bad input.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor};
use moda_models::preprocess::{ImageProcessor, ImageProcessorConfig};
use moda_sdk::{Constrain, Error, Finish, GenerationOptions, ImageInput, Moda, Norm, OpenOptions};
use moda_tests::{fixture, get, load_refs, max_abs_diff_slices, TempDir};

/// ONNX Runtime f32 against transformers f32 for the tiny models: float noise only (the
/// exporter's own verification bound).
const EMBED_TOL: f32 = 1e-4;

fn bundle() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-recipe-bundle");
        moda_tests::export_recipe_bundle(&out, exporter::Quantize::None)
    })
}

fn moda() -> &'static Moda {
    static M: OnceLock<Moda> = OnceLock::new();
    M.get_or_init(|| Moda::open(bundle(), &OpenOptions::default()).expect("open the bundle"))
}

fn image(name: &str) -> PathBuf {
    fixture(&format!("images/{name}"))
}

fn greedy(n: usize) -> GenerationOptions {
    GenerationOptions::default().with_max_new_tokens(Some(n))
}

#[test]
fn embeddings_match_transformers() {
    let refs = load_refs("moda/reference.safetensors");
    let want = get(&refs, "image_embeds");
    for (i, name) in ["photo.jpg", "wide.png"].iter().enumerate() {
        let got = moda()
            .embed(&ImageInput::Path(&image(name)), Norm::Raw)
            .expect("embed");
        let want: Vec<f32> = want.i(i).expect("row").to_vec1().expect("vec");
        let diff = max_abs_diff_slices(&got, &want);
        assert!(diff <= EMBED_TOL, "{name}: max abs diff {diff}");
        // Normalised: unit length, same direction.
        let unit = moda()
            .embed(&ImageInput::Path(&image(name)), Norm::Unit)
            .expect("embed");
        let norm: f32 = unit.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        let n0: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        for (u, g) in unit.iter().zip(&got) {
            assert!((u - g / n0).abs() < 1e-6);
        }
    }
}

/// A model opened for embeddings only (no decoder or token-embedding session) embeds as the
/// whole model does and refuses to describe with an error that says why.
#[test]
fn embeddings_only_embeds_and_refuses_to_describe() {
    let refs = load_refs("moda/reference.safetensors");
    let want = get(&refs, "image_embeds");
    let only = Moda::open(bundle(), &OpenOptions::default().with_embeddings_only(true))
        .expect("open for embeddings");
    for (i, name) in ["photo.jpg", "wide.png"].iter().enumerate() {
        let input = ImageInput::Path(&image(name));
        let got = only.embed(&input, Norm::Raw).expect("embed");
        let want: Vec<f32> = want.i(i).expect("row").to_vec1().expect("vec");
        let diff = max_abs_diff_slices(&got, &want);
        assert!(diff <= EMBED_TOL, "{name}: max abs diff {diff}");
        // The same graphs with the same session options: the whole model's values exactly.
        assert_eq!(
            got,
            moda().embed(&input, Norm::Raw).expect("embed"),
            "{name}"
        );
    }
    // No tokenizer is loaded for embeddings.
    assert!(matches!(only.tokenizer(), Err(Error::InvalidArgument(_))));
    let input = ImageInput::Path(&image("photo.jpg"));
    for result in [
        only.describe(&input, &greedy(4)).map(|_| ()),
        only.describe_batch(std::slice::from_ref(&input), &greedy(4))
            .map(|_| ()),
    ] {
        match result {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("embeddings only"), "{m}"),
            other => panic!("describe on an embeddings-only model: {other:?}"),
        }
    }
}

#[test]
fn greedy_tokens_match_transformers_and_candle() {
    let refs = load_refs("moda/reference.safetensors");
    let want = get(&refs, "greedy.tokens");
    // The fixture decodes 8 tokens with no stop at </s>; min = max = 8 does the same here.
    let opts = GenerationOptions::default()
        .with_max_new_tokens(Some(8))
        .with_min_new_tokens(8);
    for (i, name) in ["photo.jpg", "wide.png"].iter().enumerate() {
        let d = moda()
            .describe(&ImageInput::Path(&image(name)), &opts)
            .expect("describe");
        let want: Vec<u32> = want
            .i(i)
            .expect("row")
            .to_vec1::<i64>()
            .expect("ids")
            .into_iter()
            .map(|t| t as u32)
            .collect();
        assert_eq!(d.token_ids, want, "{name}: tokens differ from transformers");
        assert_eq!(d.logprobs.len(), 8);
        assert!(d.logprobs.iter().all(|l| *l <= 0.0 && l.is_finite()));
        assert_eq!(
            d.text,
            moda()
                .tokenizer()
                .expect("tokenizer")
                .decode(&want, true)
                .expect("decode")
        );

        // The candle model, from the same files, through the same search with the same
        // options, gives the same tokens.
        let (candle, prefix) = candle_prefix(&[name]);
        let c = candle.generate(&prefix, &opts).expect("candle generate");
        assert_eq!(c[0].token_ids, d.token_ids, "{name}: vs candle");
    }
}

/// The candle model of the recipe fixture and the images' prefix embeddings `[n, 1, e]`.
fn candle_prefix(names: &[&str]) -> (moda_models::CaptionModel, Tensor) {
    let dev = Device::Cpu;
    let candle = moda_models::CaptionModel::from_recipe_checkpoint(
        &fixture("moda/fashion_opt.pth"),
        &fixture("clip_gelu"),
        &fixture("opt_preln"),
        &dev,
    )
    .expect("candle model");
    let proc = ImageProcessor::new(
        ImageProcessorConfig::from_dir_or_default(&fixture("clip_gelu")).expect("cfg"),
    )
    .expect("processor");
    let mut px = Vec::new();
    for name in names {
        px.extend(
            proc.preprocess_path(&image(name), &Default::default())
                .expect("pixels"),
        );
    }
    let px = Tensor::from_vec(px, (names.len(), 3, 64, 64), &dev).expect("pixels");
    let prefix = candle
        .project(&candle.encode_images(&px).expect("enc"))
        .expect("proj");
    (candle, prefix)
}

#[test]
fn candle_and_the_bundle_give_the_same_tokens_through_the_one_search() {
    // Both run `moda_models::generate` over their own decoder (candle's KV cache, ONNX
    // Runtime's graph): for the same images and options the tokens are the same, and the
    // log-probabilities differ by float noise only. Beam search exercises the reordering of
    // each one's cache; a batch of several images, the rows kept apart.
    let names = ["photo.jpg", "wide.png", "small.png", "palette.png"];
    let (candle, prefix) = candle_prefix(&names);
    let paths: Vec<PathBuf> = names.iter().map(|n| image(n)).collect();
    let inputs: Vec<ImageInput<'_>> = paths.iter().map(|p| ImageInput::Path(p)).collect();
    let max_new = moda().manifest().generation.max_new_tokens;
    let cases = [
        GenerationOptions::default(),
        GenerationOptions::default().with_num_beams(3),
        GenerationOptions::default()
            .with_num_beams(2)
            .with_length_penalty(0.5)
            .with_no_repeat_ngram_size(2),
        GenerationOptions::default()
            .with_repetition_penalty(1.5)
            .with_min_new_tokens(3),
    ];
    for opts in cases {
        let bundle: Vec<_> = moda()
            .describe_batch(&inputs, &opts)
            .expect("describe")
            .into_iter()
            .map(|d| d.expect("an image"))
            .collect();
        // The bundle's default length, given to candle explicitly.
        let candle_opts = opts.clone().with_max_new_tokens(Some(max_new));
        let got = candle.generate(&prefix, &candle_opts).expect("candle");
        assert_eq!(got.len(), names.len());
        for ((name, c), d) in names.iter().zip(&got).zip(&bundle) {
            assert_eq!(c.token_ids, d.token_ids, "{name} {opts:?}");
            assert_eq!(c.logprobs.len(), d.logprobs.len());
            for (a, b) in c.logprobs.iter().zip(&d.logprobs) {
                assert!(
                    (a - b).abs() < 1e-3 || (a.is_infinite() && a == b),
                    "{name} {opts:?}: logprob {a} vs {b}"
                );
            }
        }
    }
}

/// The recipe fixture with a schema of the recipe's template: values with spaces and
/// prefixes of each other, for constrained decoding (its random weights write anything when
/// free).
fn schema_moda() -> &'static Moda {
    static M: OnceLock<Moda> = OnceLock::new();
    M.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-schema");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let catalog = dir.join("catalog.csv");
        let rows = [
            "Colour,Usage,ProductType,Gender,Category,SubCategory",
            "Blue,Casual,Jeans,Men,Apparel,Bottomwear",
            "Navy Blue,Smart Casual,Casual Shoes,Women,Footwear,Shoes",
            "Black,Formal,Shoes,Boys,Apparel,Topwear",
            "Off White,Sports,Sports Shoes,Girls,Footwear,Shoes",
            "White,Casual,Tshirts,Men,Apparel,Topwear",
        ];
        std::fs::write(&catalog, rows.join("\n")).expect("catalog");
        let out = moda_tests::export_recipe_bundle_with_schema(
            &dir.join("bundle"),
            moda_models::schema::DEFAULT_TEMPLATE,
            &catalog,
        );
        Moda::open(out, &OpenOptions::default()).expect("open the schema bundle")
    })
}

#[test]
fn constrained_descriptions_fit_the_schema_even_from_random_weights() {
    let m = schema_moda();
    let schema = m.manifest().schema.clone().expect("a schema");
    let names = ["photo.jpg", "wide.png", "small.png", "palette.png"];
    let paths: Vec<PathBuf> = names.iter().map(|n| image(n)).collect();
    let inputs: Vec<ImageInput<'_>> = paths.iter().map(|p| ImageInput::Path(p)).collect();
    let constrained = GenerationOptions::default().with_constrain(Constrain::Schema);
    let free = GenerationOptions::default().with_constrain(Constrain::None);
    let mut free_fits = 0;
    for opts in [
        constrained.clone(),
        constrained.clone().with_num_beams(3),
        constrained.clone().with_do_sample(true).with_seed(5),
        constrained.clone().with_repetition_penalty(2.0),
        // Auto is constrained when the bundle has a schema.
        GenerationOptions::default(),
    ] {
        for d in m.describe_batch(&inputs, &opts).expect("describe") {
            let d = d.expect("an image");
            let parsed = schema.parse(&d.text);
            assert!(
                parsed.values().all(Option::is_some),
                "{opts:?}: {:?}",
                d.text
            );
            let attrs = d.attributes.as_ref().expect("attributes");
            for f in &schema.fields {
                let a = attrs[&f.name].as_ref().expect("every field has a value");
                assert_eq!(Some(&a.value), parsed[&f.name].as_ref());
                assert!(f.knows(&a.value));
                let c = a.confidence.expect("a confidence");
                assert!(c > 0.0 && c <= 1.0 + 1e-6, "{c}");
                for (alt, p) in &a.alternatives {
                    assert!(f.knows(alt) && alt != &a.value, "{alt}");
                    assert!(*p > 0.0 && *p <= 1.0 + 1e-6, "{p}");
                }
            }
            assert_eq!(d.token_ids.last(), Some(&m.manifest().special_tokens.eos));
            // The schema's last field forces `</s>`: a complete description.
            assert_eq!(d.finish, Finish::EndOfText, "{opts:?}: {:?}", d.text);
        }
    }
    // Free text from random weights does not fit the schema, and then no value is guessed;
    // the constrained greedy text, where free greedy already fits, is the same.
    let free_out = m.describe_batch(&inputs, &free).expect("free");
    let con_out = m
        .describe_batch(&inputs, &constrained)
        .expect("constrained");
    for (f, c) in free_out.into_iter().zip(con_out) {
        let (f, c) = (f.expect("free"), c.expect("constrained"));
        let parsed = schema.parse(&f.text);
        if parsed.values().all(Option::is_some) {
            free_fits += 1;
            assert_eq!(f.token_ids, c.token_ids);
        }
        let attrs = f.attributes.expect("attributes");
        for (name, a) in attrs {
            assert_eq!(a.map(|a| a.value), parsed[&name].clone());
        }
    }
    // Forced runs (literal text, a value's rest, the final </s>) go in with the chosen token
    // before them: fewer decoder runs than tokens, the prefill included, alone and in a batch.
    let batch = m.describe_batch(&inputs, &constrained).expect("batch");
    for (input, b) in inputs.iter().zip(batch) {
        let b = b.expect("an image");
        let c = m.describe(input, &constrained).expect("constrained");
        let f = m.describe(input, &free).expect("free");
        // In a batch each image's forced text goes in with its own chosen token (the rows
        // padded to the longest run, the padding masked): the same description as alone.
        assert_eq!(b.token_ids, c.token_ids);
        for (x, y) in b.logprobs.iter().zip(&c.logprobs) {
            // ONNX Runtime's kernels differ between batch sizes by float noise.
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        assert!(
            b.timings.decoder_runs < b.token_ids.len(),
            "batch: {} runs for {} tokens",
            b.timings.decoder_runs,
            b.token_ids.len()
        );
        assert!(
            c.timings.decoder_runs < c.token_ids.len(),
            "{} runs for {} tokens",
            c.timings.decoder_runs,
            c.token_ids.len()
        );
        assert_eq!(f.timings.decoder_runs, f.token_ids.len());
    }
    assert!(free_fits < names.len(), "random weights wrote captions");
    // A bundle without a schema: auto is free, schema an error naming the reason.
    let e = moda()
        .describe(&ImageInput::Path(&paths[0]), &constrained)
        .expect_err("no schema");
    assert!(e.to_string().contains("no caption schema"), "{e}");
}

#[test]
fn a_description_cut_at_the_token_limit_keeps_the_fields_written_before_the_cut() {
    use moda_models::schema::Piece;
    let m = schema_moda();
    let schema = m.manifest().schema.clone().expect("a schema");
    let pieces = schema.template.pieces().to_vec();
    let constrained = GenerationOptions::default().with_constrain(Constrain::Schema);
    let mut partial = 0;
    for name in ["photo.jpg", "wide.png"] {
        let path = image(name);
        let input = ImageInput::Path(&path);
        let full = m.describe(&input, &constrained).expect("full");
        assert_eq!(full.finish, Finish::EndOfText);
        let spans = schema.parse_spans(&full.text);
        let full_attrs = full.attributes.clone().expect("attributes");
        for n in 1..full.token_ids.len() {
            let cut = m
                .describe(&input, &constrained.clone().with_max_new_tokens(Some(n)))
                .expect("cut");
            assert_eq!(cut.finish, Finish::Length, "{n} tokens");
            assert_eq!(cut.token_ids[..], full.token_ids[..n]);
            assert!(full.text.starts_with(&cut.text), "{:?}", cut.text);
            let kept = cut.text.trim_end().len();
            let attrs = cut.attributes.expect("attributes");
            for (i, piece) in pieces.iter().enumerate() {
                let Piece::Field(f) = piece else { continue };
                let end = spans[f].clone().expect("the full text fits").end;
                // Expected from the full description: the field's value and the literal text
                // after it are in the cut text (a literal of spaces only counts once the next
                // value has begun, since the text's trailing spaces are not kept); the whole
                // caption (all but the final </s>) reads as complete.
                let expect = cut.text == full.text
                    || match pieces.get(i + 1) {
                        Some(Piece::Text(t)) if !t.trim_end().is_empty() => {
                            kept >= end + t.trim_end().len()
                        }
                        Some(Piece::Text(t)) => kept > end + t.len(),
                        _ => false,
                    };
                let got = attrs[f].as_ref();
                assert_eq!(got.is_some(), expect, "{n} tokens, {:?}: {f}", cut.text);
                if let (Some(got), Some(want)) = (got, full_attrs[f].as_ref()) {
                    partial += usize::from(cut.text != full.text);
                    // The same tokens and log-probabilities as the full description's.
                    assert_eq!(got.value, want.value);
                    let (c, w) = (got.confidence.expect("c"), want.confidence.expect("w"));
                    assert!((c - w).abs() <= 1e-6 * w.max(1.0), "{f}: {c} vs {w}");
                }
            }
        }
    }
    assert!(partial > 0, "no cut text kept a field");
}

#[test]
fn listed_logits_give_the_descriptions_of_every_tokens_logits() {
    // The schema bundle's decoder takes the list of tokens a constrained step reads: the same
    // descriptions and log-probabilities as from every token's logits (the listed columns are
    // the same products, summed in another order: float noise).
    let m = schema_moda();
    let every = Moda::open(m.dir(), &OpenOptions::default().with_listed_logits(false))
        .expect("open the schema bundle");
    let names = ["photo.jpg", "wide.png", "small.png", "palette.png"];
    let paths: Vec<PathBuf> = names.iter().map(|n| image(n)).collect();
    let inputs: Vec<ImageInput<'_>> = paths.iter().map(|p| ImageInput::Path(p)).collect();
    let constrained = GenerationOptions::default().with_constrain(Constrain::Schema);
    for opts in [
        constrained.clone(),
        constrained.clone().with_do_sample(true).with_seed(5),
        constrained.clone().with_repetition_penalty(2.0),
        constrained.clone().with_min_new_tokens(30),
        constrained.clone().with_num_beams(3),
    ] {
        let a = m.describe_batch(&inputs, &opts).expect("listed");
        let b = every.describe_batch(&inputs, &opts).expect("every token");
        for ((name, a), b) in names.iter().zip(a).zip(b) {
            let (a, b) = (a.expect("an image"), b.expect("an image"));
            assert_eq!(a.token_ids, b.token_ids, "{name} {opts:?}");
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!((x - y).abs() < 1e-4, "{name} {opts:?}: {x} vs {y}");
            }
            assert_eq!(a.attributes.is_some(), b.attributes.is_some());
            assert_eq!(b.timings.listed_runs, 0, "{name}: listing switched off");
            // Every run of the batch was listed, the prefill's included.
            assert!(a.timings.listed_runs > 0, "{name} {opts:?}: nothing listed");
        }
        // Alone, one image's runs are all listed (beam search's too: the union of what its
        // beams' texts allow next).
        let one = m.describe(&inputs[0], &opts).expect("one");
        assert_eq!(
            one.timings.listed_runs, one.timings.decoder_runs,
            "{opts:?}"
        );
    }
    // Free text reads every token's logits.
    let free = GenerationOptions::default().with_constrain(Constrain::None);
    for opts in [free.clone(), free.with_num_beams(2)] {
        let d = m.describe(&inputs[0], &opts).expect("describe");
        assert_eq!(d.timings.listed_runs, 0, "{opts:?}");
    }
}

/// The candle decoder behind a `StepModel` that feeds one token per step (the default
/// `step_many`), to compare multi-token steps against.
struct OneByOne<'a>(moda_models::CaptionDecoder<'a>);

impl moda_models::generate::StepModel for OneByOne<'_> {
    type Error = moda_models::Error;
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Self::Error> {
        self.0.step(tokens)
    }
    fn reorder(&mut self, rows: &[usize]) -> Result<(), Self::Error> {
        self.0.reorder(rows)
    }
}

#[test]
fn forced_multi_token_steps_equal_single_steps_and_candle_equals_the_bundle() {
    use moda_models::constrain::Constraint;
    use moda_models::generate::{generate, Search, StepModel};
    let m = schema_moda();
    let schema = m.manifest().schema.clone().expect("schema");
    let eos = m.manifest().special_tokens.eos;
    let constraint =
        Constraint::new(&schema, m.tokenizer().expect("tokenizer"), eos).expect("constraint");
    let names = ["photo.jpg", "wide.png"];
    let (candle, prefix) = candle_prefix(&names);
    let vocab = m.manifest().model.vocab_size;
    let max_new = m.manifest().generation.max_new_tokens;
    // candle's multi-token step against its single steps: the same logits (float noise of
    // matmuls of another shape only).
    let (mut a, _) = candle.prefill(&prefix, 1).expect("prefill");
    let (mut b, _) = candle.prefill(&prefix, 1).expect("prefill");
    let tokens = [5u32, 9, 13, 7, 11, 3];
    let many = a.step_many(&tokens, 3).expect("many");
    let mut single = vec![Vec::new(); 2];
    for j in 0..3 {
        let l = b.step(&[tokens[j], tokens[3 + j]]).expect("step");
        for r in 0..2 {
            single[r].extend_from_slice(&l[r * vocab..(r + 1) * vocab]);
        }
    }
    let single: Vec<f32> = single.concat();
    let diff = max_abs_diff_slices(&many, &single);
    assert!(diff < 1e-4, "multi-token step vs single steps: {diff}");
    // The bundle (ONNX Runtime, forced runs as multi-token steps) against candle fed one
    // token per step, through the one constrained search: the same tokens, log-probabilities
    // within float noise.
    let paths: Vec<PathBuf> = names.iter().map(|n| image(n)).collect();
    let inputs: Vec<ImageInput<'_>> = paths.iter().map(|p| ImageInput::Path(p)).collect();
    for opts in [
        GenerationOptions::default().with_constrain(Constrain::Schema),
        GenerationOptions::default()
            .with_constrain(Constrain::Schema)
            .with_num_beams(2),
    ] {
        let bundle = m.describe_batch(&inputs, &opts).expect("describe");
        let (state, first) = candle.prefill(&prefix, opts.num_beams).expect("prefill");
        let mut one = OneByOne(state);
        let search = Search::new(vocab, eos, max_new).with_constraint(Some(&constraint));
        let got = generate(&mut one, first, names.len(), &opts, search).expect("candle");
        for ((name, c), d) in names.iter().zip(&got).zip(bundle) {
            let d = d.expect("an image");
            assert_eq!(c.token_ids, d.token_ids, "{name} {opts:?}");
            for (x, y) in c.logprobs.iter().zip(&d.logprobs) {
                // candle vs ONNX Runtime f32 logits differ by ~1e-5; the log-softmax over the
                // allowed tokens keeps that scale.
                assert!((x - y).abs() < 1e-3, "{name} {opts:?}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn logprobs_are_the_decoders_log_softmax() {
    // With greedy search the reported log-probability of the first token is log_softmax of
    // the transformers logits at the BOS position for the same prefix... the fixture's
    // teacher-forced logits use other tokens, so check against candle's prefill instead.
    let dev = Device::Cpu;
    let candle = moda_models::CaptionModel::from_recipe_checkpoint(
        &fixture("moda/fashion_opt.pth"),
        &fixture("clip_gelu"),
        &fixture("opt_preln"),
        &dev,
    )
    .expect("candle model");
    let refs = load_refs("moda/reference.safetensors");
    let prefix = get(&refs, "prefix_embeds").i(0..1).expect("row");
    let bos = Tensor::full(2u32, (1, 1), &dev).expect("bos");
    let bos = candle.decoder().embed_tokens(&bos).expect("emb");
    let input = Tensor::cat(&[&prefix, &bos], 1).expect("cat");
    let logits = candle
        .decoder()
        .forward(moda_models::DecoderInput::Embeds(&input), None, None)
        .expect("fwd");
    let last: Vec<f32> = logits.i((0, 1)).expect("last").to_vec1().expect("v");
    let max = last.iter().copied().fold(f32::MIN, f32::max);
    let lse = max + last.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
    let d = moda()
        .describe(&ImageInput::Path(&image("photo.jpg")), &greedy(1))
        .expect("describe");
    let t = d.token_ids[0] as usize;
    let want = last[t] - lse;
    // ONNX Runtime vs candle logits agree to ~1e-5; the log-softmax adds float noise.
    assert!(
        (d.logprobs[0] - want).abs() < 1e-4,
        "{} vs {want}",
        d.logprobs[0]
    );
    let _ = DType::F32;
}

#[test]
fn bytes_and_rgb_inputs_equal_the_path() {
    let path = image("photo.jpg");
    let bytes = std::fs::read(&path).expect("read");
    let a = moda()
        .describe(&ImageInput::Path(&path), &greedy(8))
        .expect("path");
    let b = moda()
        .describe(
            &ImageInput::Bytes {
                bytes: &bytes,
                name: "photo.jpg",
            },
            &greedy(8),
        )
        .expect("bytes");
    assert_eq!(a.token_ids, b.token_ids);
    assert_eq!(a.logprobs, b.logprobs);
    // The same pixels decoded by the test (the fixture's own RGB array from Pillow).
    let refs = load_refs("pixel_values.safetensors");
    let rgb = get(&refs, "photo.jpg.rgb_u8");
    let (h, w, _) = rgb.dims3().expect("hw3");
    let data: Vec<u8> = rgb.flatten_all().expect("flat").to_vec1().expect("u8");
    let c = moda()
        .describe(
            &ImageInput::Rgb8 {
                data: &data,
                width: w as u32,
                height: h as u32,
            },
            &greedy(8),
        )
        .expect("rgb");
    assert_eq!(a.token_ids, c.token_ids);
    let ea = moda()
        .embed(&ImageInput::Path(&path), Norm::Raw)
        .expect("e");
    let ec = moda()
        .embed(
            &ImageInput::Rgb8 {
                data: &data,
                width: w as u32,
                height: h as u32,
            },
            Norm::Raw,
        )
        .expect("e");
    assert_eq!(ea, ec, "byte-identical decode gives identical embeddings");
    // A buffer of the wrong size is an argument error naming the sizes.
    let err = moda()
        .describe(
            &ImageInput::Rgb8 {
                data: &data[1..],
                width: w as u32,
                height: h as u32,
            },
            &greedy(2),
        )
        .expect_err("short buffer");
    assert!(err.to_string().contains("needs"), "{err}");
}

#[test]
fn batch_equals_single_and_bad_images_get_their_own_error() {
    let names = ["photo.jpg", "wide.png", "gray.png", "rgba.png", "small.png"];
    let paths: Vec<PathBuf> = names.iter().map(|n| image(n)).collect();
    let bad = image("not_an_image.jpg");
    let mut inputs: Vec<ImageInput> = paths.iter().map(|p| ImageInput::Path(p)).collect();
    inputs.insert(2, ImageInput::Path(&bad));
    let opts = greedy(12);
    let batch = moda().describe_batch(&inputs, &opts).expect("batch");
    assert_eq!(batch.len(), inputs.len());
    assert!(
        matches!(batch[2], Err(Error::Image { .. })),
        "{:?}",
        batch[2]
    );
    let mut k = 0;
    for (i, r) in batch.iter().enumerate() {
        if i == 2 {
            continue;
        }
        let one = moda().describe(&inputs[i], &opts).expect("single");
        let r = r.as_ref().expect("batch item");
        assert_eq!(r.token_ids, one.token_ids, "{}", names[k]);
        assert_eq!(r.text, one.text);
        for (a, b) in r.logprobs.iter().zip(&one.logprobs) {
            // Batched kernels sum in another order: float noise only.
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        k += 1;
    }
    let embeds = moda().embed_batch(&inputs, Norm::Raw).expect("embed batch");
    assert!(embeds[2].is_err());
    let one = moda().embed(&inputs[0], Norm::Raw).expect("one");
    let diff = max_abs_diff_slices(embeds[0].as_ref().expect("e"), &one);
    assert!(diff < 1e-5, "{diff}");
    // Each description carries the embedding its encoder run computed: the same batch of
    // pixels through the same session as embed_batch, so the same floats to the bit.
    let mut compared = 0;
    for (i, (d, e)) in batch.iter().zip(&embeds).enumerate() {
        if let (Ok(d), Ok(e)) = (d, e) {
            assert_eq!(&d.embedding, e, "image {i}");
            compared += 1;
        }
    }
    assert_eq!(compared, names.len());
}

#[test]
fn eight_threads_equal_serial() {
    let names = [
        "photo.jpg",
        "wide.png",
        "gray.png",
        "rgba.png",
        "palette.png",
        "gray16.png",
        "small.png",
        "photo.jpg",
    ];
    let opts = greedy(10);
    let serial: Vec<Vec<u32>> = names
        .iter()
        .map(|n| {
            moda()
                .describe(&ImageInput::Path(&image(n)), &opts)
                .expect("serial")
                .token_ids
        })
        .collect();
    // One handle shared by 8 threads, with a pool of 1 (callers take turns) and of 3.
    for sessions in [1, 3] {
        let m =
            Moda::open(bundle(), &OpenOptions::default().with_sessions(sessions)).expect("open");
        let got: Vec<Vec<u32>> = std::thread::scope(|s| {
            let hs: Vec<_> = names
                .iter()
                .map(|n| {
                    let m = &m;
                    let opts = &opts;
                    s.spawn(move || {
                        m.describe(&ImageInput::Path(&image(n)), opts)
                            .expect("thread")
                            .token_ids
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("join")).collect()
        });
        assert_eq!(got, serial, "sessions = {sessions}");
    }
}

#[test]
fn generation_options_behave() {
    let img = image("photo.jpg");
    let input = ImageInput::Path(&img);
    let g = moda().describe(&input, &greedy(10)).expect("greedy");
    // One beam is greedy search.
    let b1 = moda()
        .describe(&input, &greedy(10).with_num_beams(1))
        .expect("beam 1");
    assert_eq!(b1.token_ids, g.token_ids);
    // Beam search finds a hypothesis at least as likely (per token) as greedy's.
    let b4 = moda()
        .describe(&input, &greedy(10).with_num_beams(4))
        .expect("beam 4");
    let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len() as f32;
    assert!(
        mean(&b4.logprobs) >= mean(&g.logprobs) - 1e-4,
        "beam {} < greedy {}",
        mean(&b4.logprobs),
        mean(&g.logprobs)
    );
    // Sampling: seeded, so repeatable; top_k = 1 is greedy.
    let s = |seed, top_k| {
        moda()
            .describe(
                &input,
                &greedy(10)
                    .with_do_sample(true)
                    .with_seed(seed)
                    .with_top_k(top_k)
                    .with_temperature(1.5),
            )
            .expect("sample")
            .token_ids
    };
    assert_eq!(s(11, 0), s(11, 0));
    assert_eq!(s(5, 1), g.token_ids);
    let seeds: Vec<Vec<u32>> = (0..6).map(|k| s(k, 0)).collect();
    assert!(
        seeds.iter().any(|x| x != &seeds[0]),
        "six seeds at temperature 1.5 over a 600-token vocabulary all gave the same text"
    );
    // min/max new tokens.
    let long = moda()
        .describe(&input, &greedy(20).with_min_new_tokens(20))
        .expect("min");
    assert_eq!(long.token_ids.len(), 20);
    assert!(long.token_ids.iter().all(|&t| t != 2));
    // No repeated bigram.
    let nr = moda()
        .describe(
            &input,
            &greedy(30)
                .with_no_repeat_ngram_size(2)
                .with_min_new_tokens(30),
        )
        .expect("no repeat");
    let mut pairs: Vec<(u32, u32)> = nr.token_ids.windows(2).map(|w| (w[0], w[1])).collect();
    let n = pairs.len();
    pairs.sort_unstable();
    pairs.dedup();
    assert_eq!(pairs.len(), n, "a bigram repeated: {:?}", nr.token_ids);
    // Bad options are errors, not panics.
    let err = moda()
        .describe(
            &input,
            &greedy(5).with_temperature(-1.0).with_do_sample(true),
        )
        .expect_err("bad temperature");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn streaming_pieces_add_up_and_can_stop() {
    let img = image("wide.png");
    let mut pieces = String::new();
    let mut ids = Vec::new();
    let d = moda()
        .describe_with(&ImageInput::Path(&img), &greedy(16), &mut |ev| {
            assert_eq!(ev.image, 0);
            assert_eq!(ev.index, ids.len());
            ids.push(ev.token_id);
            pieces.push_str(ev.text);
            true
        })
        .expect("stream");
    assert_eq!(ids, d.token_ids);
    assert_eq!(pieces, d.text);
    let mut seen = 0;
    let d = moda()
        .describe_with(&ImageInput::Path(&img), &greedy(16), &mut |_| {
            seen += 1;
            seen < 3
        })
        .expect("stop");
    assert_eq!(d.token_ids.len(), 3, "stopped after the third token");
    assert_eq!(d.finish, Finish::Stopped);
}

#[test]
fn bad_images_are_clear_errors() {
    let dir = TempDir::new("sdk-bad");
    let jpg = std::fs::read(image("photo.jpg")).expect("jpg");
    let png = std::fs::read(image("wide.png")).expect("png");
    let cases = moda_tests::bad_images::write_bad_images(dir.path(), &jpg, &png);
    for (path, what) in &cases {
        let err = moda()
            .describe(&ImageInput::Path(path), &greedy(4))
            .expect_err(what);
        let msg = err.to_string();
        assert!(matches!(err, Error::Image { .. }), "{what}: {msg}");
        assert!(
            msg.contains(&path.display().to_string()),
            "{what}: the message names the file: {msg}"
        );
    }
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

#[test]
fn broken_bundles_are_clear_errors() {
    let err = Moda::open("/nonexistent/bundle", &OpenOptions::default()).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/bundle"), "{err}");

    let d = copy_bundle("sdk-no-decoder");
    std::fs::remove_file(d.path().join("decoder.onnx")).expect("rm");
    let err = Moda::open(d.path(), &OpenOptions::default()).expect_err("no decoder");
    assert!(err.to_string().contains("decoder.onnx"), "{err}");

    let d = copy_bundle("sdk-newer");
    let mpath = d.path().join("moda.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).expect("read")).expect("json");
    m["format_version"] = serde_json::json!(99);
    std::fs::write(&mpath, m.to_string()).expect("write");
    let err = Moda::open(d.path(), &OpenOptions::default()).expect_err("newer");
    assert!(err.to_string().contains("version 99"), "{err}");

    // A corrupt graph of the right size: the size check passes, the checksum check does
    // not, and without it ONNX Runtime refuses the file with an error naming it.
    let d = copy_bundle("sdk-corrupt");
    let p = d.path().join("projector.onnx");
    let n = std::fs::metadata(&p).expect("meta").len() as usize;
    std::fs::write(&p, vec![0x5Au8; n]).expect("write");
    let err = Moda::open(
        d.path(),
        &OpenOptions::default().with_verify_checksums(true),
    )
    .expect_err("checksum");
    assert!(err.to_string().contains("SHA-256"), "{err}");
    let err = Moda::open(d.path(), &OpenOptions::default()).expect_err("corrupt onnx");
    assert!(err.to_string().contains("projector.onnx"), "{err}");

    // A truncated graph fails the size check.
    let d = copy_bundle("sdk-trunc");
    let p = d.path().join("decoder.onnx");
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("write");
    let err = Moda::open(d.path(), &OpenOptions::default()).expect_err("truncated");
    assert!(err.to_string().contains("bytes"), "{err}");

    // A tokenizer.json of the right size that is not a tokenizer (it loads while the sessions
    // are built): refused, named, whether or not it is JSON.
    let d = copy_bundle("sdk-bad-tokenizer");
    let p = d.path().join("tokenizer.json");
    let n = std::fs::metadata(&p).expect("meta").len() as usize;
    let array = format!("[{}]", " ".repeat(n - 2));
    let object = format!("{{\"model\":1{}}}", " ".repeat(n - 11));
    for bytes in [vec![b'x'; n], array.into_bytes(), object.into_bytes()] {
        assert_eq!(bytes.len(), n);
        std::fs::write(&p, &bytes).expect("write");
        let err = Moda::open(d.path(), &OpenOptions::default()).expect_err("bad tokenizer");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}

/// Opens a copy of the bundle whose `moda.json` `edit` changed; it must be refused with a
/// message holding `needle` (and never panic).
fn refused_manifest(tag: &str, needle: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let d = copy_bundle(tag);
    let mpath = d.path().join("moda.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).expect("read")).expect("json");
    edit(&mut m);
    std::fs::write(&mpath, m.to_string()).expect("write");
    let err = Moda::open(d.path(), &OpenOptions::default())
        .expect_err(&format!("{tag}: the bundle must be refused"));
    let msg = err.to_string();
    assert!(msg.contains(needle), "{tag}: expected {needle:?} in: {msg}");
    assert!(
        msg.contains("moda.json") || msg.contains(".onnx"),
        "{tag}: names the file: {msg}"
    );
}

#[test]
fn manifest_numbers_that_disagree_with_the_graphs_are_refused() {
    // Each of these panicked, truncated embeddings or described with garbage before.
    let graphs = "manifest's \"model\" dimensions";
    refused_manifest("m-embed", graphs, |m| {
        m["model"]["embed_dim"] = 100_000.into()
    });
    refused_manifest("m-proj", graphs, |m| {
        m["model"]["projection_dim"] = 100_000.into()
    });
    refused_manifest("m-proj8", graphs, |m| {
        m["model"]["projection_dim"] = 8.into()
    });
    refused_manifest("m-vocab", graphs, |m| {
        let v = m["model"]["vocab_size"].as_u64().expect("vocab");
        m["model"]["vocab_size"] = (v + 1).into();
    });
    refused_manifest("m-heads", graphs, |m| {
        let h = m["model"]["num_heads"].as_u64().expect("heads");
        let d = m["model"]["head_dim"].as_u64().expect("head_dim");
        m["model"]["num_heads"] = (h * 2).into();
        m["model"]["head_dim"] = (d / 2).into();
    });
    refused_manifest("m-chan0", "num_channels", |m| {
        m["model"]["num_channels"] = 0.into()
    });
    refused_manifest("m-chan4", graphs, |m| m["model"]["num_channels"] = 4.into());
    refused_manifest("m-pos0", "max_positions", |m| {
        m["model"]["max_positions"] = 0.into()
    });
    // More positions than the decoder's table holds (its graph metadata says how many): the
    // inputs and outputs cannot tell, and it would fail only deep into a long description.
    refused_manifest("m-pos-more", "position table", |m| {
        let n = m["model"]["max_positions"].as_u64().expect("max_positions");
        m["model"]["max_positions"] = (n + 1).into()
    });
    refused_manifest("m-huge", "image_size", |m| {
        m["model"]["image_size"] = serde_json::json!(u64::MAX)
    });
    refused_manifest("m-bos", "bos", |m| {
        m["special_tokens"]["bos"] = 4_000_000.into()
    });
    refused_manifest("m-maxnew", "max_new_tokens", |m| {
        m["generation"]["max_new_tokens"] = 1_000_000.into()
    });
    refused_manifest("m-std", "image_std", |m| {
        m["preprocessing"]["image_std"] = serde_json::json!([0.0, 0.0, 0.0])
    });
    refused_manifest("m-rescale", "rescale_factor", |m| {
        m["preprocessing"]["rescale_factor"] = serde_json::json!(-1.0)
    });
}

#[test]
fn manifest_paths_must_stay_inside_the_bundle() {
    refused_manifest("p-graph", "leads out of the bundle", |m| {
        m["graphs"]["encoder"]["file"] = "../../../../etc/passwd".into();
    });
    refused_manifest("p-tok", "absolute path", |m| {
        m["tokenizer"] = "/etc/passwd".into();
    });
    refused_manifest("p-files", "absolute path", |m| {
        m["files"]["/etc/shadow"] = serde_json::json!({"bytes": 0, "sha256": ""});
    });
    refused_manifest("p-zero", "absolute path", |m| {
        m["files"]["/dev/zero"] = serde_json::json!({"bytes": 0, "sha256": ""});
    });
    refused_manifest("p-dot", ". component", |m| {
        m["tokenizer"] = "./tokenizer.json".into();
    });

    // A symbolic link that leads out of the bundle, even to a file of the right content.
    let d = copy_bundle("p-link");
    let outside = TempDir::new("p-link-outside");
    let tok = d.path().join("tokenizer.json");
    let target = outside.path().join("tokenizer.json");
    std::fs::rename(&tok, &target).expect("move");
    std::os::unix::fs::symlink(&target, &tok).expect("symlink");
    let err = Moda::open(d.path(), &OpenOptions::default()).expect_err("link out");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    // A link inside the bundle is fine.
    std::fs::rename(&target, d.path().join("tok.real")).expect("move back");
    std::fs::remove_file(&tok).expect("rm link");
    std::os::unix::fs::symlink("tok.real", &tok).expect("symlink");
    Moda::open(d.path(), &OpenOptions::default()).expect("a link inside the bundle");

    // A FIFO or a device in place of a bundle file: refused at once, never read.
    let d = copy_bundle("p-fifo");
    let tok = d.path().join("tokenizer.json");
    std::fs::remove_file(&tok).expect("rm");
    let c = std::ffi::CString::new(tok.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let err = Moda::open(
        d.path(),
        &OpenOptions::default().with_verify_checksums(true),
    )
    .expect_err("a FIFO");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn user_numbers_never_overflow_or_oversubscribe() {
    // A max_new_tokens that wrapped the position check and reached ONNX Runtime.
    let err = moda()
        .describe(
            &ImageInput::Path(&image("photo.jpg")),
            &GenerationOptions::default().with_max_new_tokens(Some(usize::MAX)),
        )
        .expect_err("too many tokens");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("max_new_tokens"), "{err}");

    // Threads are capped at the cores this process may use.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let m = Moda::open(
        bundle(),
        &OpenOptions::default().with_intra_threads(Some(100_000)),
    )
    .expect("open");
    assert_eq!(m.intra_threads(), cores);
}

#[test]
fn rgb8_pixels_count_against_the_image_limit_and_are_not_copied() {
    // 16384 x 16384 RGB8 is 768 MiB, over the default 512 MiB limit: refused before a
    // byte is read (the zeroed buffer is never touched, so it costs no memory).
    let (w, h) = (16384u32, 16384u32);
    let data = vec![0u8; (w as usize) * (h as usize) * 3];
    let err = moda()
        .describe(
            &ImageInput::Rgb8 {
                data: &data,
                width: w,
                height: h,
            },
            &greedy(2),
        )
        .expect_err("over the limit");
    assert!(err.to_string().contains("limit"), "{err}");
}

/// Moves the first weight of the bundle's projector graph into an external data file named
/// `location` (`length` bytes), rewriting the graph and the manifest's size and SHA-256 of it
/// so that only the external data is out of the ordinary. Returns the weight's bytes.
fn projector_weight_to_external_data(bundle: &Path, location: &str) -> Vec<u8> {
    use candle_onnx::onnx::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto};
    use prost::Message;
    let entry = |k: &str, v: &str| StringStringEntryProto {
        key: k.to_string(),
        value: v.to_string(),
    };
    let p = bundle.join("projector.onnx");
    let mut m = ModelProto::decode(std::fs::read(&p).expect("read").as_slice()).expect("onnx");
    let t = &mut m.graph.as_mut().expect("graph").initializer[0];
    let data: Vec<u8> = if t.raw_data.is_empty() {
        t.float_data.iter().flat_map(|x| x.to_le_bytes()).collect()
    } else {
        t.raw_data.clone()
    };
    t.raw_data.clear();
    t.float_data.clear();
    t.data_location = DataLocation::External as i32;
    t.external_data = vec![
        entry("location", location),
        entry("length", &data.len().to_string()),
    ];
    let bytes = m.encode_to_vec();
    std::fs::write(&p, &bytes).expect("write");
    let mpath = bundle.join("moda.json");
    let mut man: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).expect("read")).expect("json");
    let sha: String = {
        use sha2::{Digest, Sha256};
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    man["files"]["projector.onnx"] = serde_json::json!({"bytes": bytes.len(), "sha256": sha});
    std::fs::write(&mpath, man.to_string()).expect("write");
    data
}

#[test]
fn graph_data_outside_the_bundle_is_refused() {
    // A graph may keep a tensor's data in another file ("external data"); one that names a
    // file outside the bundle, directly or through a symbolic link, must not be read. ONNX
    // Runtime (1.31 and later) refuses both; this guards that for the versions we load.
    for (tag, location) in [
        ("ext-dotdot", "../../../../etc/hostname"),
        ("ext-link", "data.bin"),
    ] {
        let d = copy_bundle(tag);
        let outside = TempDir::new("ext-outside");
        let secret = outside.path().join("secret.bin");
        std::fs::write(&secret, [7u8; 4096]).expect("write");
        std::os::unix::fs::symlink(&secret, d.path().join("data.bin")).expect("symlink");
        projector_weight_to_external_data(d.path(), location);
        let err = Moda::open(d.path(), &OpenOptions::default()).expect_err(tag);
        let msg = err.to_string();
        assert!(
            msg.contains("projector.onnx") && msg.contains("escapes"),
            "{tag}: {msg}"
        );
    }
}

#[test]
fn verified_checksums_cover_every_byte_a_graph_runs() {
    // A graph whose weights sit in an external data file inside the bundle, a file the
    // manifest does not list: its sizes and checksums say nothing about that file. Opened
    // plainly, ONNX Runtime reads it (the manifest's own checks cover listed files only);
    // with checksums verified the graph runs from its checked bytes, which cannot reach the
    // file, so the bundle is refused.
    let d = copy_bundle("ext-inside");
    let data = projector_weight_to_external_data(d.path(), "weights.bin");
    std::fs::write(d.path().join("weights.bin"), &data).expect("write");

    // Plainly opened, the same weights give the same embedding as the original bundle.
    let plain = Moda::open(d.path(), &OpenOptions::default()).expect("open without checksums");
    let photo = image("photo.jpg");
    let img = ImageInput::Path(&photo);
    let want = moda().embed(&img, Norm::Raw).expect("embed");
    assert_eq!(plain.embed(&img, Norm::Raw).expect("embed"), want);

    let verified = OpenOptions::default().with_verify_checksums(true);
    let err = Moda::open(d.path(), &verified).expect_err("external data under checksums");
    let msg = err.to_string();
    assert!(msg.contains("projector.onnx"), "{msg}");
    // ONNX Runtime's words, not ours: it refused the external data (and looked for it
    // nowhere a file could be, not in the current directory).
    assert!(msg.contains("External data path"), "{msg}");
    assert!(
        !msg.contains(&*std::env::current_dir().expect("cwd").to_string_lossy()),
        "{msg}"
    );
    // The untouched bundle opens with checksums verified, and runs the same.
    let ok = Moda::open(bundle(), &verified).expect("verified open");
    assert_eq!(ok.embed(&img, Norm::Raw).expect("embed"), want);
}

#[test]
fn external_weight_files_are_listed_checked_and_run() {
    // The exporter keeps each graph's large weights in `<graph>.onnx.data`, listed in the
    // manifest as the graph's `data` with its size and checksum.
    let man: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle().join("moda.json")).expect("read"))
            .expect("json");
    let data = man["graphs"]["decoder"]["data"]
        .as_str()
        .expect("decoder data");
    assert_eq!(data, "decoder.onnx.data");
    let bytes = std::fs::read(bundle().join(data)).expect("read the data file");
    assert_eq!(man["files"][data]["bytes"], bytes.len());
    // Only tensors of 64 KiB or more are there.
    assert!(bytes.len() >= 64 << 10, "{}", bytes.len());

    // Verified, from checked bytes (the data file given to ONNX Runtime in memory), and
    // plainly, mapped: the same embedding and description.
    let photo = image("photo.jpg");
    let img = ImageInput::Path(&photo);
    let verified = OpenOptions::default().with_verify_checksums(true);
    let checked = Moda::open(bundle(), &verified).expect("verified open");
    let opts = greedy(6);
    assert_eq!(
        checked.embed(&img, Norm::Raw).expect("embed"),
        moda().embed(&img, Norm::Raw).expect("embed")
    );
    assert_eq!(
        checked.describe(&img, &opts).expect("describe").token_ids,
        moda().describe(&img, &opts).expect("describe").token_ids
    );

    // One weight changed in the data file, its size kept: refused under checksums, naming
    // the data file.
    let d = copy_bundle("ext-tampered");
    let mut tampered = bytes.clone();
    tampered[0] ^= 0x40;
    std::fs::write(d.path().join(data), &tampered).expect("write");
    let err = Moda::open(d.path(), &verified).expect_err("tampered data");
    let msg = err.to_string();
    assert!(
        msg.contains("decoder.onnx.data") && msg.contains("SHA-256"),
        "{msg}"
    );
    // Truncated: refused when the bundle opens, checksums or not.
    std::fs::write(d.path().join(data), &bytes[..bytes.len() - 4]).expect("write");
    let err = Moda::open(d.path(), &OpenOptions::default()).expect_err("truncated data");
    let msg = err.to_string();
    assert!(
        msg.contains("decoder.onnx.data") && msg.contains("the manifest says"),
        "{msg}"
    );
    // Gone: refused, naming it.
    std::fs::remove_file(d.path().join(data)).expect("rm");
    let err = Moda::open(d.path(), &OpenOptions::default()).expect_err("missing data");
    assert!(err.to_string().contains("decoder.onnx.data"), "{err}");
}

#[test]
fn bundles_with_every_weight_inside_the_graphs_still_open() {
    // Bundles written before external data files: each graph holds all its weights and the
    // manifest names no data file. Rebuilt here from the exported bundle by moving every
    // tensor back into its graph; it opens and describes exactly as the bundle it came from.
    use candle_onnx::onnx::{tensor_proto::DataLocation, ModelProto};
    use prost::Message;
    let d = copy_bundle("inline-weights");
    let mpath = d.path().join("moda.json");
    let mut man: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).expect("read")).expect("json");
    let roles: Vec<String> = man["graphs"]
        .as_object()
        .expect("graphs")
        .keys()
        .cloned()
        .collect();
    let mut moved = 0;
    for role in roles {
        let Some(data_file) = man["graphs"][&role]["data"].as_str().map(str::to_string) else {
            continue;
        };
        let file = man["graphs"][&role]["file"]
            .as_str()
            .expect("file")
            .to_string();
        let data = std::fs::read(d.path().join(&data_file)).expect("read data");
        let gpath = d.path().join(&file);
        let mut m =
            ModelProto::decode(std::fs::read(&gpath).expect("read").as_slice()).expect("onnx");
        for t in &mut m.graph.as_mut().expect("graph").initializer {
            if t.data_location != DataLocation::External as i32 {
                continue;
            }
            let get = |k: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == k)
                    .map(|e| e.value.clone())
                    .expect(k)
            };
            assert_eq!(get("location"), data_file);
            let offset: usize = get("offset").parse().expect("offset");
            let length: usize = get("length").parse().expect("length");
            t.raw_data = data[offset..offset + length].to_vec();
            t.external_data.clear();
            t.data_location = DataLocation::Default as i32;
            moved += 1;
        }
        let bytes = m.encode_to_vec();
        std::fs::write(&gpath, &bytes).expect("write");
        std::fs::remove_file(d.path().join(&data_file)).expect("rm");
        let sha: String = {
            use sha2::{Digest, Sha256};
            Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        man["files"][&file] = serde_json::json!({"bytes": bytes.len(), "sha256": sha});
        man["files"]
            .as_object_mut()
            .expect("files")
            .remove(&data_file);
        man["graphs"][&role]
            .as_object_mut()
            .expect("graph")
            .remove("data");
    }
    assert!(
        moved > 0,
        "the exported bundle had no external weights to move"
    );
    std::fs::write(&mpath, man.to_string()).expect("write");

    let photo = image("photo.jpg");
    let img = ImageInput::Path(&photo);
    for verify in [false, true] {
        let inline = Moda::open(
            d.path(),
            &OpenOptions::default().with_verify_checksums(verify),
        )
        .expect("open the inline bundle");
        assert_eq!(
            inline.embed(&img, Norm::Raw).expect("embed"),
            moda().embed(&img, Norm::Raw).expect("embed")
        );
        assert_eq!(
            inline
                .describe(&img, &greedy(6))
                .expect("describe")
                .token_ids,
            moda()
                .describe(&img, &greedy(6))
                .expect("describe")
                .token_ids
        );
    }
}

#[test]
fn the_decoder_cache_is_paired_by_name_and_counted() {
    // Two layers' cache names swapped: the shapes agree, only the names tell.
    refused_manifest("c-swap", "layer 0's cache", |m| {
        let outs = m["graphs"]["decoder"]["outputs"]
            .as_array_mut()
            .expect("outputs");
        let a = outs[1]["name"].clone();
        outs[1]["name"] = outs[3]["name"].clone();
        outs[3]["name"] = a;
    });
    // One layer fewer in the manifest than in the graph.
    refused_manifest("c-layers", "the manifest lists", |m| {
        let l = m["model"]["num_layers"].as_u64().expect("layers");
        m["model"]["num_layers"] = (l - 1).into();
        for side in ["inputs", "outputs"] {
            let v = m["graphs"]["decoder"][side].as_array_mut().expect("list");
            v.truncate(v.len() - 2);
        }
    });
    // An optional input that is also a required one.
    refused_manifest(
        "c-optional",
        "among both its inputs and its optional inputs",
        |m| {
            m["graphs"]["decoder"]["optional_inputs"] =
                serde_json::json!([{"name": "attention_mask", "dtype": "int64", "shape": ["n"]}]);
        },
    );
    // A manifest without the optional list: the bundle opens, and every step computes every
    // token's logits (as an SDK that does not know the list runs it).
    let d = copy_bundle("c-no-optional");
    let mpath = d.path().join("moda.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).expect("read")).expect("json");
    assert!(v["graphs"]["decoder"]["optional_inputs"].is_array());
    v["graphs"]["decoder"]
        .as_object_mut()
        .expect("decoder")
        .remove("optional_inputs");
    std::fs::write(&mpath, v.to_string()).expect("write");
    Moda::open(d.path(), &OpenOptions::default()).expect("opens without the list");
}

#[test]
fn broken_weights_are_an_error_not_a_description() {
    // NaN in the projector's weights: the image embeddings are fine, the prefix and so the
    // logits are NaN. Before, the search took token 0 at every step and answered "<s><s>...".
    use candle_onnx::onnx::ModelProto;
    use prost::Message;
    let d = copy_bundle("nan-weights");
    let p = d.path().join("projector.onnx");
    let mut m = ModelProto::decode(std::fs::read(&p).expect("read").as_slice()).expect("onnx");
    let g = m.graph.as_mut().expect("graph");
    let t = g
        .initializer
        .iter_mut()
        .find(|t| !t.raw_data.is_empty() || !t.float_data.is_empty())
        .expect("an initializer with data");
    if t.raw_data.is_empty() {
        t.float_data.iter_mut().for_each(|x| *x = f32::NAN);
    } else {
        for c in t.raw_data.chunks_exact_mut(4) {
            c.copy_from_slice(&f32::NAN.to_le_bytes());
        }
    }
    let bytes = m.encode_to_vec();
    std::fs::write(&p, &bytes).expect("write");
    let mpath = d.path().join("moda.json");
    let mut man: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).expect("read")).expect("json");
    man["files"]["projector.onnx"]["bytes"] = bytes.len().into();
    std::fs::write(&mpath, man.to_string()).expect("write");
    let moda = Moda::open(d.path(), &OpenOptions::default()).expect("open");
    let err = moda
        .describe(&ImageInput::Path(&image("photo.jpg")), &greedy(4))
        .expect_err("NaN logits");
    assert!(err.to_string().contains("NaN"), "{err}");
}

#[test]
fn records_with_non_finite_numbers_read_back() {
    // serde_json writes -inf and NaN as null; a job must read its own output again.
    let line = r#"{"image":"a.jpg","description":"x","token_ids":[5,2],"logprobs":[null,-0.5],
        "timings_ms":{"preprocess":1.0,"encoder":1.0,"projector":1.0,"prefill":1.0,
        "decode":1.0,"total":5.0,"tokens":2}}"#;
    match serde_json::from_str::<moda_cli::catalog::Record>(line).expect("a record") {
        moda_cli::catalog::Record::Description { logprobs, .. } => {
            assert!(logprobs[0].is_nan());
            assert_eq!(logprobs[1], -0.5);
        }
        other => panic!("not a description: {other:?}"),
    }
}
