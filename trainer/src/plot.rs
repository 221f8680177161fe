//! The loss plot of a run, as in the original report: training and validation loss per epoch.
//!
//! Drawn with `plotters` into an RGB buffer and encoded as PNG with `image`. Text needs a
//! font: the Hack font shipped inside the `epaint_default_fonts` crate is registered with
//! plotters' `ab_glyph` backend, so nothing is looked up on the system and it works offline.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};
use crate::fit::EpochRecord;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 500;
const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        );
    });
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        msg: format!("cannot draw the loss plot: {e}"),
    }
}

/// Writes a PNG of train and validation loss per epoch to `path` (atomically).
pub fn plot_losses(path: &Path, history: &[EpochRecord]) -> Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    register_font();
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let last = history.last().map_or(1, |r| r.epoch).max(2);
        let first = history.first().map_or(1, |r| r.epoch);
        // A log scale: the first epochs' losses are 100x the last ones'.
        let positive = || {
            history
                .iter()
                .flat_map(|r| [r.train_loss, r.val_loss])
                .filter(|v| v.is_finite() && *v > 0.0)
        };
        let hi = positive().fold(0f64, f64::max).max(1e-3) * 1.25;
        let lo = positive().fold(f64::INFINITY, f64::min).min(hi / 2.0) * 0.8;
        let mut chart = ChartBuilder::on(&root)
            .caption("MODA training: loss per epoch", (FONT, 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(first as f64..last as f64, (lo..hi).log_scale())
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("loss (log scale)")
            .label_style((FONT, 14))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        let series = [
            ("train", RGBColor(31, 119, 180), true),
            ("validation", RGBColor(255, 127, 14), false),
        ];
        for (name, colour, train) in series {
            let points: Vec<(f64, f64)> = history
                .iter()
                .map(|r| {
                    (
                        r.epoch as f64,
                        if train { r.train_loss } else { r.val_loss },
                    )
                })
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, colour.filled())),
                )
                .map_err(|e| plot_err(path, e))?;
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| plot_err(path, "buffer size"))?;
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| plot_err(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
