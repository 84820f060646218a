//! Drawing: the palette and markers (fixed per mode), line and spectrum charts, SVG and PNG.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::load::order_of;

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

/// Colours of the other servers (peers): darker tones, none of them in `PALETTE`.
const PEER_PALETTE: [RGBColor; 4] = [
    RGBColor(140, 80, 30),
    RGBColor(110, 60, 150),
    RGBColor(120, 120, 120),
    RGBColor(30, 100, 60),
];

/// The peers scripts/peers.sh runs, in the order of their fixed colours.
pub(super) const KNOWN_PEERS: [&str; 3] = ["fast-socks5", "microsocks", "dante"];

/// How a label is drawn, the same on every chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Style {
    pub(super) color: RGBColor,
    /// Which marker shape (0–3).
    pub(super) shape: usize,
    /// Another server, not ours: dashed line, hollow marker, "other server" in the legend.
    pub(super) peer: bool,
}

/// The style of a label: fixed per mode and per peer name (an unknown external label gets a
/// peer colour from its name), so a label looks the same on every chart.
pub(super) fn style_of(label: &str) -> Style {
    if let Some(slot) = order_of(label) {
        return Style {
            color: PALETTE[slot % PALETTE.len()],
            shape: slot % 4,
            peer: false,
        };
    }
    let slot = KNOWN_PEERS
        .iter()
        .position(|peer| *peer == label)
        .unwrap_or_else(|| {
            KNOWN_PEERS.len() + label.bytes().map(usize::from).sum::<usize>() % PEER_PALETTE.len()
        });
    Style {
        color: PEER_PALETTE[slot % PEER_PALETTE.len()],
        shape: slot % 4,
        peer: true,
    }
}

/// A label as the legend shows it: peers are marked as other servers.
pub(super) fn legend_text(label: &str) -> String {
    if style_of(label).peer {
        format!("{label} (other server)")
    } else {
        label.to_owned()
    }
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

/// Paints the page white and writes `caption` in its footer (every chart names its sweep
/// there); returns the area above the footer.
fn page<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    caption: &str,
) -> anyhow::Result<DrawingArea<DB, Shift>>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("drawing failed: {e:?}");
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (body, footer) = root.split_vertically(SIZE.1 - 28);
    footer
        .draw_text(
            caption,
            &("sans-serif", 14).into_font().color(&RGBColor(80, 80, 80)),
            (12, 6),
        )
        .map_err(|e| err(&e))?;
    Ok(body)
}

pub(super) fn draw_chart<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart: &LineChart<'_>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("drawing failed: {e:?}");
    let body = page(&root, chart.caption)?;
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
    for (label, points) in &chart.lines {
        let style = style_of(label);
        let color = style.color;
        let line = color.stroke_width(2);
        let drawn = if style.peer {
            ctx.draw_series(DashedLineSeries::new(points.iter().copied(), 9, 5, line))
        } else {
            ctx.draw_series(LineSeries::new(points.iter().copied(), line))
        };
        let peer = style.peer;
        drawn
            .map_err(|e| err(&e))?
            .label(legend_text(label))
            .legend(move |(x, y)| {
                // A peer's legend line is two dashes, like its line; ours is one stroke.
                let (end, restart) = if peer { (8, 12) } else { (20, 20) };
                let stroke = color.stroke_width(3);
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (end, 0)], stroke)
                    + PathElement::new(vec![(restart, 0), (20, 0)], stroke)
            });
        if !chart.spectrum {
            draw_markers(&mut ctx, points, style).map_err(|e| err(&e))?;
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

/// A label's markers at its points: filled for our modes, hollow for peers.
fn draw_markers<'a, DB, X, Y>(
    ctx: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    points: &[(f64, f64)],
    style: Style,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend + 'a,
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    let paint: ShapeStyle = if style.peer {
        style.color.stroke_width(2)
    } else {
        style.color.filled()
    };
    let points = points.iter().copied();
    match style.shape {
        0 => ctx
            .draw_series(points.map(|p| EmptyElement::at(p) + Circle::new((0, 0), 5, paint)))
            .map(|_| ()),
        1 => ctx
            .draw_series(
                points.map(|p| EmptyElement::at(p) + TriangleMarker::new((0, 0), 6, paint)),
            )
            .map(|_| ()),
        2 => ctx
            .draw_series(
                points.map(|p| EmptyElement::at(p) + Rectangle::new([(-4, -4), (4, 4)], paint)),
            )
            .map(|_| ()),
        _ => ctx
            .draw_series(
                points.map(|p| {
                    EmptyElement::at(p) + Cross::new((0, 0), 5, style.color.stroke_width(2))
                }),
            )
            .map(|_| ()),
    }
}

/// Draws `chart` as `<stem>.svg` and `<stem>.png`.
pub(super) fn save(out: &Path, stem: &str, chart: &LineChart<'_>) -> anyhow::Result<Vec<PathBuf>> {
    let svg = out.join(format!("{stem}.svg"));
    let png = out.join(format!("{stem}.png"));
    draw_chart(SVGBackend::new(&svg, SIZE).into_drawing_area(), chart)?;
    draw_chart(BitMapBackend::new(&png, SIZE).into_drawing_area(), chart)?;
    Ok(vec![svg, png])
}

/// One bar of a bar chart.
pub(super) struct Bar {
    pub(super) label: String,
    pub(super) value: f64,
    /// Measured by a run the instrument marked harness-limited: outlined in red.
    pub(super) limited: bool,
}

/// One panel of a bar chart: a measure, one bar per label, in the order given (top down).
pub(super) struct BarPanel {
    pub(super) title: String,
    pub(super) x_label: String,
    pub(super) bars: Vec<Bar>,
}

/// Draws `panels` side by side as `<stem>.svg` and `<stem>.png`.
pub(super) fn save_bars(
    out: &Path,
    stem: &str,
    title: &str,
    caption: &str,
    panels: &[BarPanel],
) -> anyhow::Result<Vec<PathBuf>> {
    let svg = out.join(format!("{stem}.svg"));
    let png = out.join(format!("{stem}.png"));
    draw_bars(
        SVGBackend::new(&svg, SIZE).into_drawing_area(),
        title,
        caption,
        panels,
    )?;
    draw_bars(
        BitMapBackend::new(&png, SIZE).into_drawing_area(),
        title,
        caption,
        panels,
    )?;
    Ok(vec![svg, png])
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    caption: &str,
    panels: &[BarPanel],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("drawing failed: {e:?}");
    let body = page(&root, caption)?
        .titled(title, ("sans-serif", 24))
        .map_err(|e| err(&e))?;
    let red = RGBColor(200, 0, 0);
    for (area, panel) in body
        .split_evenly((1, panels.len().max(1)))
        .iter()
        .zip(panels)
    {
        let n = panel.bars.len();
        if n == 0 {
            continue;
        }
        let max = panel
            .bars
            .iter()
            .map(|bar| bar.value)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        // The first bar is drawn at the top.
        let row = |i: usize| (n - 1 - i) as i32;
        let mut ctx = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 17))
            .margin(10)
            .margin_right(24)
            .x_label_area_size(40)
            .y_label_area_size(170)
            .build_cartesian_2d(
                0.0..(max * 1.3).max(f64::EPSILON),
                (0..n as i32).into_segmented(),
            )
            .map_err(|e| err(&e))?;
        let names: Vec<String> = panel
            .bars
            .iter()
            .map(|bar| legend_text(&bar.label))
            .collect();
        ctx.configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(r) if (0..n as i32).contains(r) => {
                    names[n - 1 - *r as usize].clone()
                }
                _ => String::new(),
            })
            .x_labels(4)
            .x_label_formatter(&|v| human(*v))
            .x_desc(panel.x_label.as_str())
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, bar) in panel.bars.iter().enumerate() {
            if !bar.value.is_finite() {
                continue;
            }
            let style = style_of(&bar.label);
            let corners = [
                (0.0, SegmentValue::Exact(row(i))),
                (bar.value, SegmentValue::Exact(row(i) + 1)),
            ];
            // Ours are filled; a peer's bar is pale with a solid outline.
            let fill = if style.peer {
                style.color.mix(0.35).filled()
            } else {
                style.color.filled()
            };
            let mut body = Rectangle::new(corners.clone(), fill);
            body.set_margin(4, 4, 0, 0);
            let outline_color = if bar.limited { red } else { style.color };
            let mut outline = Rectangle::new(corners, outline_color.stroke_width(2));
            outline.set_margin(4, 4, 0, 0);
            ctx.draw_series([body, outline]).map_err(|e| err(&e))?;
            ctx.draw_series(std::iter::once(Text::new(
                format!(" {}", human(bar.value)),
                (bar.value, SegmentValue::CenterOf(row(i))),
                ("sans-serif", 13).into_font(),
            )))
            .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
