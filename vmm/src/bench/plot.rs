//! `--svg`: the latency spread of every path on a log axis: a whisker from
//! p1 to p99, a box from p25 to p75 and a tick at the median.

use super::report::BenchReport;
use super::BenchError;
use plotters::prelude::*;
use std::path::Path;

const ROW_H: u32 = 28;
const LABEL_W: u32 = 170;

pub fn draw(rep: &BenchReport, path: &Path) -> Result<(), BenchError> {
    let rows: Vec<(&str, [u64; 5], bool)> = rep
        .paths
        .iter()
        .filter_map(|p| p.spread.map(|s| (p.name, s, p.floor.is_none())))
        .collect();
    let err = |e: &dyn std::fmt::Display| BenchError::Plot(e.to_string());
    let height = 120 + ROW_H * rows.len().max(1) as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let lo = rows.iter().map(|r| r.1[0]).min().unwrap_or(100).max(1) as f64 / 1.5;
    let hi = rows.iter().map(|r| r.1[4]).max().unwrap_or(100_000).max(2) as f64 * 1.5;
    let n = rows.len().max(1) as f64;
    let caption = format!(
        "round trip per exit, p1-p25-p50-p75-p99 ({} iters x {} runs)",
        rep.iters, rep.runs
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(LABEL_W)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..n)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("ns (log scale)")
        .disable_y_mesh()
        .y_labels(0)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, s, is_floorless)) in rows.iter().enumerate() {
        // Top row first.
        let y = n - i as f64 - 0.5;
        let color = if name.starts_with("floor") {
            RGBColor(120, 120, 120)
        } else if *is_floorless {
            RGBColor(30, 120, 60)
        } else {
            RGBColor(30, 80, 180)
        };
        let (p1, p25, p50, p75, p99) = (
            s[0] as f64,
            s[1] as f64,
            s[2] as f64,
            s[3] as f64,
            s[4] as f64,
        );
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(p1.max(lo), y), (p99.min(hi), y)],
                color.stroke_width(1),
            )))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (p25.max(lo), y - 0.3),
                    (p75.max(p25 * 1.01).min(hi), y + 0.3),
                ],
                color.mix(0.5).filled(),
            )))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(p50, y - 0.4), (p50, y + 0.4)],
                BLACK.stroke_width(2),
            )))
            .map_err(|e| err(&e))?;
        let (_, py) = chart.backend_coord(&(lo, y));
        root.draw(&Text::new(
            name.to_string(),
            (14, py - 7),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))
        .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
