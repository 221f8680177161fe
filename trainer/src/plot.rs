//! The loss plot of a run, as in the original report: training and validation loss per epoch.
//!
//! Drawn with `plotters` into an RGB buffer and encoded as PNG with `image`. Text needs a
//! font: the Hack font shipped inside the `epaint_default_fonts` crate is registered with
//! plotters' `ab_glyph` backend, so nothing is looked up on the system and it works offline.

use std::path::Path;
use std::sync::Once;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
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
        let positive = || {
            history
                .iter()
                .flat_map(|r| [r.train_loss, r.val_loss])
                .filter(|v| v.is_finite() && *v > 0.0)
        };
        let max = positive().fold(0f64, f64::max).max(1e-3);
        let min = positive().fold(f64::INFINITY, f64::min).min(max);
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption("MODA training: loss per epoch", (FONT, 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55);
        let x = first as f64..last as f64;
        // A log scale where the losses span a power of ten (a run's first epochs' are often
        // 100x its last ones'); a log axis over a narrower range has no labelled tick, so there
        // the axis is linear.
        let (lo, hi) = (min * 0.8, max * 1.25);
        if lo.log10().ceil() <= hi.log10() {
            let chart = builder
                .build_cartesian_2d(x, (lo..hi).log_scale())
                .map_err(|e| plot_err(path, e))?;
            draw_losses(chart, history, "loss (log scale)", path)?;
        } else {
            let pad = 0.1 * (max - min).max(1e-3 * max);
            let chart = builder
                .build_cartesian_2d(x, (min - pad).max(0.0)..max + pad)
                .map_err(|e| plot_err(path, e))?;
            draw_losses(chart, history, "loss", path)?;
        }
        root.present().map_err(|e| plot_err(path, e))?;
    }
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| plot_err(path, "buffer size"))?;
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| plot_err(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Draws the axes, both loss series and their legend on `chart`, whose y axis is `y_desc`.
fn draw_losses<'a, Y>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    history: &[EpochRecord],
    y_desc: &str,
    path: &Path,
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let epochs = history.last().map_or(1, |r| r.epoch) - history.first().map_or(1, |r| r.epoch);
    chart
        .configure_mesh()
        // At most one label per epoch.
        .x_labels((epochs + 1).clamp(2, 12))
        .x_desc("epoch")
        // Whole epochs as "3", not "3.0"; a short run's fractional ticks keep a decimal.
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{x:.0}")
            } else {
                format!("{x:.1}")
            }
        })
        .y_desc(y_desc)
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dark pixels (label text) in the band left of the y axis where its tick labels go,
    /// clear of the axis description further left.
    fn y_label_ink(history: &[EpochRecord], name: &str) -> usize {
        let dir = std::env::temp_dir().join(format!("moda-plot-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("loss.png");
        plot_losses(&path, history).expect("plot");
        let img = image::open(&path).expect("png").to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let _ = std::fs::remove_dir_all(&dir);
        (40..HEIGHT - 60)
            .flat_map(|y| (32..62).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y)[0] < 100)
            .count()
    }

    fn history(losses: &[f64]) -> Vec<EpochRecord> {
        losses
            .iter()
            .enumerate()
            .map(|(i, &l)| EpochRecord {
                epoch: i + 1,
                train_loss: l,
                val_loss: l * 1.05,
                lr: 1e-3,
                step: i as u64 + 1,
                seconds: 1.0,
            })
            .collect()
    }

    #[test]
    fn the_loss_axis_is_labelled_over_narrow_and_wide_ranges() {
        // 6.0 -> 4.0 holds no power of ten (a log axis would have no labelled tick there);
        // 6.6 -> 0.2 spans one.
        let narrow = y_label_ink(&history(&[6.0, 5.6, 5.2, 4.8, 4.4, 4.0]), "narrow");
        let wide = y_label_ink(&history(&[6.6, 2.0, 0.9, 0.5, 0.3, 0.2]), "wide");
        assert!(narrow > 100, "narrow range: {narrow} label pixels");
        assert!(wide > 100, "wide range: {wide} label pixels");
    }
}
