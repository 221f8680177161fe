//! Image preprocessing for the FashionCLIP vision tower: `pixel_values` identical to
//! `transformers`' `CLIPImageProcessorPil` (transformers 5.24, PIL backend, Pillow 13).
//!
//! Reference: `transformers/models/clip/image_processing_pil_clip.py` and the `PilBackend`
//! it uses (`image_processing_backends.py`, `image_transforms.py`), and Pillow's
//! `src/libImaging/Resample.c` (`ImagingResample`) and `AlphaComposite.c`.
//!
//! The steps, in the reference's order:
//!
//! 1. `do_convert_rgb` ([`to_rgb8`]): transformers' `convert_to_rgb`, i.e. PIL `convert("RGB")`,
//!    except that an image with an alpha band or a `transparency` entry is first alpha-composited
//!    onto opaque white (`Image.alpha_composite`, Pillow's integer formula).
//! 2. `do_resize` ([`resize_shortest_edge`]): shortest edge to `size.shortest_edge`, the long edge
//!    to `int(shortest_edge * long / short)` (truncated), with Pillow's resampler.
//! 3. `do_center_crop`: offsets `(size - crop) // 2` (floor); an image smaller than the crop is
//!    zero-padded, placed at `ceil((crop - size) / 2)`.
//! 4. `do_rescale`: `float32(float64(v) * rescale_factor)`.
//! 5. `do_normalize`: `(v - mean) / std` in `f32`; the output is CHW.
//!
//!
//! The modules: [`config`] (`preprocessor_config.json`), [`decode`] (image files and JPEG
//! decoding under limits, the conversion to RGB), [`resize`] (the shortest-edge rule and
//! Pillow's resampler) and [`processor`] ([`ImageProcessor`]). Their public items are
//! re-exported here.

pub mod config;
pub mod decode;
pub mod processor;
pub mod resize;

pub use config::{
    CropSize, ImageProcessorConfig, Size, PREPROCESSOR_CONFIG_FILE, RESAMPLE_BICUBIC,
    RESAMPLE_BILINEAR,
};
pub use decode::{decode_image, load_image, to_rgb8, ImageLimits, MAX_JPEG_SCANS};
pub use processor::{ImageProcessor, MAX_OUTPUT_SIDE};
pub use resize::resize_shortest_edge;
