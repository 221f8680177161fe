//! The CLIP vision tower against `transformers`' `CLIPModel.get_image_features`, for a full
//! `CLIPModel` checkpoint with `gelu` (safetensors) and a `CLIPVisionModelWithProjection` with
//! `quick_gelu` (fp16 `pytorch_model.bin`).

use candle_core::{DType, Device, Tensor};
use moda_models::preprocess::{ImageLimits, ImageProcessor, ImageProcessorConfig};
use moda_models::ClipVision;
use moda_tests::{cosine, fixture, get, load_refs, max_abs_diff};

const IMAGES: [&str; 7] = [
    "photo.jpg",
    "wide.png",
    "gray.png",
    "rgba.png",
    "palette.png",
    "gray16.png",
    "small.png",
];
const MODELS: [&str; 2] = ["clip_gelu", "clip_quick"];

// The f32 parity bound, and why it is 1e-4: `moda_tests::parity::F32_TOL`.
use moda_tests::parity::F32_TOL;

#[test]
fn image_features_match_transformers_from_its_pixel_values() {
    for m in MODELS {
        let dir = fixture(m);
        let model = ClipVision::from_dir(&dir, DType::F32, &Device::Cpu).expect("load CLIP");
        let refs = load_refs(&format!("{m}/reference.safetensors"));
        for img in IMAGES {
            let pixels = get(&refs, &format!("pixel_values.{img}"));
            let want = get(&refs, &format!("image_embeds.{img}"));
            let got = model.forward(pixels).expect("forward");
            let d = max_abs_diff(&got, want);
            assert!(d <= F32_TOL, "{m} {img}: max abs diff {d}");
        }
        // The whole batch at once gives the same features.
        let got = model
            .forward(get(&refs, "batch.pixel_values"))
            .expect("batch forward");
        let d = max_abs_diff(&got, get(&refs, "batch.image_embeds"));
        assert!(d <= F32_TOL, "{m} batch: max abs diff {d}");
    }
}

#[test]
fn image_features_from_our_preprocessing_match_transformers() {
    for m in MODELS {
        let dir = fixture(m);
        let model = ClipVision::from_dir(&dir, DType::F32, &Device::Cpu).expect("load CLIP");
        let cfg = ImageProcessorConfig::from_dir_or_default(&dir).expect("preprocessor config");
        let (h, w) = cfg.output_size();
        let proc = ImageProcessor::new(cfg).expect("processor");
        let refs = load_refs(&format!("{m}/reference.safetensors"));
        for img in IMAGES {
            let path = fixture(&format!("images/{img}"));
            let pixels = proc
                .preprocess_path(&path, &ImageLimits::default())
                .expect("preprocess");
            let pixels = Tensor::from_vec(pixels, (1, 3, h, w), &Device::Cpu).expect("tensor");
            let got = model.forward(&pixels).expect("forward");
            let want = get(&refs, &format!("image_embeds.{img}"));
            let c = cosine(&got, want);
            // End to end, with our own decoding and resizing in front of the encoder: the
            // embedding's cosine with transformers' (Pillow's preprocessing) is >= 0.9999.
            assert!(c >= 0.9999, "{m} {img}: cosine {c}");
        }
    }
}
