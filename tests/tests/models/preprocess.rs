//! Image preprocessing against transformers' `CLIPImageProcessor` (its Pillow backend) on every
//! fixture image: RGB conversion, bicubic resize of the shortest edge, center crop, rescale and
//! normalisation.

use candle_core::{DType, Device, Tensor};
use moda_models::preprocess::{
    load_image, resize_shortest_edge, to_rgb8, ImageLimits, ImageProcessor, ImageProcessorConfig,
};
use moda_tests::{fixture, get, load_refs, max_abs_diff};

const IMAGES: [&str; 8] = [
    "photo.jpg",
    "photo_prog422.jpg",
    "wide.png",
    "gray.png",
    "rgba.png",
    "palette.png",
    "gray16.png",
    "small.png",
];

#[test]
fn pixel_values_match_clip_image_processor() {
    let refs = load_refs("pixel_values.safetensors");
    let cfg = ImageProcessorConfig::default();
    let proc = ImageProcessor::new(cfg).expect("processor");
    for img in IMAGES {
        let got = proc
            .preprocess_path(&fixture(&format!("images/{img}")), &ImageLimits::default())
            .expect("preprocess");
        let got = Tensor::from_vec(got, (1, 3, 224, 224), &Device::Cpu).expect("tensor");
        let d = max_abs_diff(&got, get(&refs, img));
        // Decoding (libjpeg-turbo via mozjpeg, as in Pillow), RGB conversion and resampling are
        // byte-exact, so only f32 rounding in rescale and normalisation is left: 1e-6 is far
        // below one 8-bit step (1 / 255 / 0.2613 = 0.015): one pixel value off by one in
        // decoding or resampling fails it.
        assert!(d <= 1e-6, "{img}: max abs diff {d}");
    }
}

#[test]
fn resized_bytes_match_pillow_bicubic() {
    let refs = load_refs("pixel_values.safetensors");
    for img in IMAGES {
        let decoded = load_image(&fixture(&format!("images/{img}")), &ImageLimits::default())
            .expect("decode");
        let rgb = to_rgb8(&decoded);
        let resized = resize_shortest_edge(&rgb, 224).expect("resize");
        let want = get(&refs, &format!("{img}.resized_u8"));
        let (h, w) = (resized.height() as usize, resized.width() as usize);
        assert_eq!(want.dims(), [h, w, 3], "{img}: resized size");
        let got = Tensor::from_vec(resized.into_raw(), (h, w, 3), &Device::Cpu).expect("tensor");
        let got = got.to_dtype(DType::F32).expect("f32");
        let want = want.to_dtype(DType::F32).expect("f32");
        let d = max_abs_diff(&got, &want);
        // Pillow-exact decoding and resampling: identical bytes.
        assert!(d == 0.0, "{img}: resized bytes differ by up to {d}");
    }
}

#[test]
fn resampler_is_byte_identical_to_pillow_on_the_same_rgb_input() {
    // The fixture's own decoded RGB (Pillow's), so decoding is out of the comparison: the
    // resampler must give exactly Pillow's bytes.
    let refs = load_refs("pixel_values.safetensors");
    let mut checked = 0;
    for img in IMAGES {
        let Some(rgb) = refs.get(&format!("{img}.rgb_u8")) else {
            continue;
        };
        let (h, w, _) = rgb.dims3().expect("dims");
        let bytes: Vec<u8> = rgb.flatten_all().and_then(|t| t.to_vec1()).expect("bytes");
        let rgb = image::RgbImage::from_raw(w as u32, h as u32, bytes).expect("image");
        let resized = resize_shortest_edge(&rgb, 224).expect("resize");
        let want: Vec<u8> = get(&refs, &format!("{img}.resized_u8"))
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("bytes");
        assert_eq!(resized.into_raw(), want, "{img}");
        checked += 1;
    }
    assert!(
        checked >= 5,
        "only {checked} images carry their decoded RGB"
    );
}
