//! `preprocessor_config.json`: the image processor configuration with Hugging Face's key
//! names and `CLIPImageProcessor`'s defaults.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The file name of a Hugging Face image processor configuration.
pub const PREPROCESSOR_CONFIG_FILE: &str = "preprocessor_config.json";

/// PIL's resampling code for bilinear (`PILImageResampling.BILINEAR`).
pub const RESAMPLE_BILINEAR: u32 = 2;
/// PIL's resampling code for bicubic (`PILImageResampling.BICUBIC`), CLIP's default.
pub const RESAMPLE_BICUBIC: u32 = 3;

/// The `size` entry of `preprocessor_config.json`.
///
/// Accepts `{"shortest_edge": n}`, `{"height": h, "width": w}` or a bare integer (older
/// configs; a shortest edge, as `get_size_dict(size, default_to_square=False)` reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Size {
    /// Resize so that the shorter side has this length, keeping the aspect ratio.
    ShortestEdge {
        /// Length of the shorter side after resizing.
        shortest_edge: u32,
    },
    /// Resize to exactly this height and width.
    HeightWidth {
        /// Height after resizing.
        height: u32,
        /// Width after resizing.
        width: u32,
    },
    /// A bare integer: the shortest edge.
    Int(u32),
}

impl Size {
    /// The shortest edge, for the shortest-edge forms; `None` for height/width.
    pub fn shortest_edge(&self) -> Option<u32> {
        match *self {
            Size::ShortestEdge { shortest_edge } | Size::Int(shortest_edge) => Some(shortest_edge),
            Size::HeightWidth { .. } => None,
        }
    }
}

/// The `crop_size` entry of `preprocessor_config.json`: `{"height": h, "width": w}` or a bare
/// integer (a square).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum CropSize {
    /// Crop to this height and width.
    HeightWidth {
        /// Height of the crop.
        height: u32,
        /// Width of the crop.
        width: u32,
    },
    /// A square crop of this side.
    Int(u32),
}

impl CropSize {
    /// `(height, width)` of the crop.
    pub fn height_width(&self) -> (u32, u32) {
        match *self {
            CropSize::HeightWidth { height, width } => (height, width),
            CropSize::Int(n) => (n, n),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_size() -> Size {
    Size::ShortestEdge { shortest_edge: 224 }
}
fn default_resample() -> u32 {
    RESAMPLE_BICUBIC
}
fn default_crop_size() -> CropSize {
    CropSize::HeightWidth {
        height: 224,
        width: 224,
    }
}
fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> [f32; 3] {
    // OPENAI_CLIP_MEAN
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn default_std() -> [f32; 3] {
    // OPENAI_CLIP_STD
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}

/// `preprocessor_config.json` with Hugging Face's key names. Missing keys take
/// `CLIPImageProcessor`'s defaults: shortest edge 224, bicubic, center crop 224x224, rescale by
/// 1/255, OpenAI CLIP mean and std, every `do_*` true. Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ImageProcessorConfig {
    /// Whether to resize.
    #[serde(default = "default_true")]
    pub do_resize: bool,
    /// The resize target.
    #[serde(default = "default_size")]
    pub size: Size,
    /// PIL resampling filter code (3 = bicubic, 2 = bilinear).
    #[serde(default = "default_resample")]
    pub resample: u32,
    /// Whether to center-crop.
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    /// The center-crop size.
    #[serde(default = "default_crop_size")]
    pub crop_size: CropSize,
    /// Whether to multiply by `rescale_factor`.
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    /// The rescale factor (1/255).
    #[serde(default = "default_rescale_factor")]
    pub rescale_factor: f64,
    /// Whether to normalize with `image_mean` and `image_std`.
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    /// Per-channel mean (RGB).
    #[serde(default = "default_mean")]
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation (RGB).
    #[serde(default = "default_std")]
    pub image_std: [f32; 3],
    /// Whether to convert inputs to RGB (compositing alpha onto white).
    #[serde(default = "default_true")]
    pub do_convert_rgb: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: default_size(),
            resample: default_resample(),
            do_center_crop: true,
            crop_size: default_crop_size(),
            do_rescale: true,
            rescale_factor: default_rescale_factor(),
            do_normalize: true,
            image_mean: default_mean(),
            image_std: default_std(),
            do_convert_rgb: true,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads a `preprocessor_config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_text_bounded(path, crate::files::TEXT_FILE_MAX_BYTES)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::MissingFile {
                        path: path.to_path_buf(),
                        what: "image preprocessor configuration".into(),
                    }
                } else {
                    Error::io(path, e)
                }
            })?;
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads `dir/preprocessor_config.json` if it exists, else returns the defaults.
    pub fn from_dir_or_default(dir: &Path) -> Result<Self> {
        let path = dir.join(PREPROCESSOR_CONFIG_FILE);
        if path.is_file() {
            Self::from_file(&path)
        } else {
            Ok(Self::default())
        }
    }

    /// `(height, width)` of the `pixel_values` this configuration produces: the crop size when
    /// center-cropping, else the fixed resize size. For the configurations that
    /// [`ImageProcessor::new`](super::ImageProcessor::new) refuses (output size depending on
    /// the input) this returns the size a square input would get.
    pub fn output_size(&self) -> (usize, usize) {
        if self.do_center_crop {
            let (h, w) = self.crop_size.height_width();
            return (h as usize, w as usize);
        }
        match self.size {
            Size::HeightWidth { height, width } => (height as usize, width as usize),
            Size::ShortestEdge { shortest_edge: s } | Size::Int(s) => (s as usize, s as usize),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::preprocess::ImageProcessor;

    #[test]
    fn config_defaults_and_variants() {
        let c: ImageProcessorConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, ImageProcessorConfig::default());
        assert_eq!(c.output_size(), (224, 224));

        let c: ImageProcessorConfig = serde_json::from_str(
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 320},
                "image_processor_type": "CLIPImageProcessor", "resample": 3}"#,
        )
        .unwrap();
        assert_eq!(c.size, Size::ShortestEdge { shortest_edge: 336 });
        assert_eq!(c.output_size(), (336, 320));

        let c: ImageProcessorConfig =
            serde_json::from_str(r#"{"size": 224, "crop_size": 200}"#).unwrap();
        assert_eq!(c.size.shortest_edge(), Some(224));
        assert_eq!(c.output_size(), (200, 200));

        let c: ImageProcessorConfig = serde_json::from_str(
            r#"{"size": {"height": 64, "width": 48}, "do_center_crop": false}"#,
        )
        .unwrap();
        assert_eq!(c.output_size(), (64, 48));
        assert!(ImageProcessor::new(c).is_ok());
    }

    #[test]
    fn config_files() {
        let t = crate::testutil::TempDir::new();
        let d = t.0.clone();
        // Missing file -> defaults.
        let c = ImageProcessorConfig::from_dir_or_default(&d).unwrap();
        assert_eq!(c, ImageProcessorConfig::default());
        // Missing file named explicitly -> MissingFile naming it.
        let e = ImageProcessorConfig::from_file(&d.join("nope.json")).unwrap_err();
        assert!(matches!(e, Error::MissingFile { .. }) && e.to_string().contains("nope.json"));
        // Malformed JSON -> error naming the file.
        let p = d.join(PREPROCESSOR_CONFIG_FILE);
        std::fs::write(&p, "{\"size\": ").unwrap();
        let e = ImageProcessorConfig::from_dir_or_default(&d).unwrap_err();
        assert!(matches!(e, Error::Json { .. }), "{e}");
        assert!(e.to_string().contains(PREPROCESSOR_CONFIG_FILE), "{e}");
        // Well-formed.
        std::fs::write(&p, r#"{"crop_size": 32, "image_mean": [0.5, 0.5, 0.5]}"#).unwrap();
        let c = ImageProcessorConfig::from_dir_or_default(&d).unwrap();
        assert_eq!(c.output_size(), (32, 32));
        assert_eq!(c.image_mean, [0.5; 3]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
