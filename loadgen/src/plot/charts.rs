//! Drawing: the palette and markers (fixed per mode), line and spectrum charts, SVG and PNG.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::load::order_of;
use crate::cli::Target;

/// Okabe–Ito, a palette that colour-blind readers can tell apart.
pub(super) const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 158, 115),
    RGBColor(213, 94, 0),
    RGBColor(0, 114, 178),
    RGBColor(204, 121, 167),
    RGBColor(240, 228, 66),
];
pub(super) const SIZE: (u32, u32) = (1100, 700);
pub(super) const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The colour and marker of a label: fixed per mode, so a mode looks the same on every chart.
pub(super) fn style_of(label: &str, index: usize) -> (RGBColor, usize) {
    let slot = order_of(label).unwrap_or(Target::ALL.len() + index);
    (PALETTE[slot % PALETTE.len()], slot)
}

/// What a line chart shows.
pub(super) struct LineChart<'a> {
    pub(super) title: &'a str,
    pub(super) y_label: &'a str,
    pub(super) log_y: bool,
    pub(super) caption: &'a str,
    /// Per label: (x, y) points.
    pub(super) lines: Vec<(String, Vec<(f64, f64)>)>,
    /// A dashed reference line (e.g. y = x), with its legend text.
    pub(super) reference: Option<(String, Vec<(f64, f64)>)>,
    pub(super) x_label: &'a str,
    /// Percentile-spectrum x axis instead of connections.
    pub(super) spectrum: bool,
    /// Points measured by runs the instrument marked harness-limited: ringed in red.
    pub(super) limited: Vec<(f64, f64)>,
}

pub(super) fn bounds(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    if log {
        (lo / 1.6, hi * 1.6)
    } else {
        (0.0, hi * 1.12 + f64::EPSILON)
    }
}

pub(super) fn percentile_label(x: &f64) -> String {
    // x = log10(1 / (1 - p)): 0 → 0%, 1 → 90%, 2 → 99%, 3 → 99.9% …; only whole x are labelled.
    if (x - x.round()).abs() > 1e-6 {
        return String::new();
    }
    let whole = x.round() as usize;
    if whole == 0 {
        return "0%".into();
    }
    let p = 100.0 * (1.0 - 10f64.powi(-(whole as i32)));
    let digits = whole.saturating_sub(2);
    format!("{p:.digits$}%")
}

pub(super) fn human(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.0}k", value / 1e3)
    } else if value >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

pub(super) fn draw_chart<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart: &LineChart<'_>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("drawing failed: {e:?}");
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (body, footer) = root.split_vertically(SIZE.1 - 28);
    footer
        .draw_text(
            chart.caption,
            &("sans-serif", 14).into_font().color(&RGBColor(80, 80, 80)),
            (12, 6),
        )
        .map_err(|e| err(&e))?;
    let all_points = || {
        chart
            .lines
            .iter()
            .flat_map(|(_, p)| p.iter())
            .chain(chart.reference.iter().flat_map(|(_, p)| p.iter()))
    };
    let (x_lo, x_hi) = if chart.spectrum {
        (
            0.0,
            all_points()
                .map(|p| p.0)
                .fold(1.0, f64::max)
                .ceil()
                .max(1.0),
        )
    } else {
        bounds(all_points().map(|p| p.0), true)
    };
    let (y_lo, y_hi) = bounds(all_points().map(|p| p.1), chart.log_y);
    let mut builder = ChartBuilder::on(&body);
    builder
        .caption(chart.title, ("sans-serif", 24))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(48)
        .y_label_area_size(84);
    if chart.spectrum {
        if chart.log_y {
            let ctx = builder
                .build_cartesian_2d(x_lo..x_hi, (y_lo..y_hi).log_scale())
                .map_err(|e| err(&e))?;
            finish(ctx, chart, &percentile_label)
        } else {
            let ctx = builder
                .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
                .map_err(|e| err(&e))?;
            finish(ctx, chart, &percentile_label)
        }
    } else {
        let x = (x_lo..x_hi).log_scale();
        if chart.log_y {
            let ctx = builder
                .build_cartesian_2d(x, (y_lo..y_hi).log_scale())
                .map_err(|e| err(&e))?;
            finish(ctx, chart, &|v| human(*v))
        } else {
            let ctx = builder
                .build_cartesian_2d(x, y_lo..y_hi)
                .map_err(|e| err(&e))?;
            finish(ctx, chart, &|v| human(*v))
        }
    }?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

pub(super) fn finish<'a, DB, X, Y>(
    mut ctx: ChartContext<'a, DB, Cartesian2d<X, Y>>,
    chart: &LineChart<'_>,
    x_format: &dyn Fn(&f64) -> String,
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: plotters::coord::ranged1d::Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("drawing failed: {e:?}");
    let mut mesh = ctx.configure_mesh();
    if chart.spectrum {
        // One tick per decade of 1/(1-p): 0%, 90%, 99%, 99.9% …
        let decades = chart
            .lines
            .iter()
            .flat_map(|(_, p)| p.iter())
            .map(|p| p.0)
            .fold(1.0, f64::max)
            .ceil();
        mesh.x_labels(decades as usize + 1);
    }
    mesh.x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .x_label_formatter(x_format)
        .y_label_formatter(&|v| human(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;
    if let Some((name, points)) = &chart.reference {
        let gray = RGBColor(150, 150, 150);
        ctx.draw_series(DashedLineSeries::new(
            points.iter().copied(),
            6,
            6,
            gray.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], gray.stroke_width(2)));
    }
    for (index, (label, points)) in chart.lines.iter().enumerate() {
        let (color, shape) = style_of(label, index);
        ctx.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(label.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        if !chart.spectrum {
            let points = points.iter().copied();
            let filled = color.filled();
            let drawn = match shape % 4 {
                0 => ctx
                    .draw_series(
                        points.map(|p| EmptyElement::at(p) + Circle::new((0, 0), 5, filled)),
                    )
                    .map(|_| ()),
                1 => ctx
                    .draw_series(
                        points
                            .map(|p| EmptyElement::at(p) + TriangleMarker::new((0, 0), 6, filled)),
                    )
                    .map(|_| ()),
                2 => ctx
                    .draw_series(
                        points.map(|p| {
                            EmptyElement::at(p) + Rectangle::new([(-4, -4), (4, 4)], filled)
                        }),
                    )
                    .map(|_| ()),
                _ => ctx
                    .draw_series(points.map(|p| {
                        EmptyElement::at(p) + Cross::new((0, 0), 5, color.stroke_width(2))
                    }))
                    .map(|_| ()),
            };
            drawn.map_err(|e| err(&e))?;
        }
    }
    if !chart.limited.is_empty() {
        let red = RGBColor(200, 0, 0);
        ctx.draw_series(
            chart
                .limited
                .iter()
                .map(|&p| EmptyElement::at(p) + Circle::new((0, 0), 10, red.stroke_width(2))),
        )
        .map_err(|e| err(&e))?
        .label("harness-limited run (see its record)")
        .legend(move |(x, y)| Circle::new((x + 10, y), 6, red.stroke_width(2)));
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

/// Draws `chart` as `<stem>.svg` and `<stem>.png`.
pub(super) fn save(out: &Path, stem: &str, chart: &LineChart<'_>) -> anyhow::Result<Vec<PathBuf>> {
    let svg = out.join(format!("{stem}.svg"));
    let png = out.join(format!("{stem}.png"));
    draw_chart(SVGBackend::new(&svg, SIZE).into_drawing_area(), chart)?;
    draw_chart(BitMapBackend::new(&png, SIZE).into_drawing_area(), chart)?;
    Ok(vec![svg, png])
}
