//! `loadgen plot`: the c10k charts and results/README.md, drawn only from stored records.
//!
//! Records are grouped by (label, connections, offered rate); each group's medians are
//! plotted (repeats of a point are medians, as the sweep intends), and the latency spectrum
//! merges the group's histograms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::record::{self, Record};

/// Okabe–Ito, a palette that colour-blind readers can tell apart.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 158, 115),
    RGBColor(213, 94, 0),
    RGBColor(0, 114, 178),
    RGBColor(204, 121, 167),
    RGBColor(240, 228, 66),
];
const ORDER: [&str; 7] = [
    "direct", "threads", "select", "poll", "epoll", "epoll-et", "async",
];
const SIZE: (u32, u32) = (1100, 700);
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// One plotted point: the medians of a group of repeated runs.
#[derive(Debug, Clone)]
struct Point {
    conns: f64,
    runs: usize,
    established: f64,
    msgs_per_s: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    rss_per_session: f64,
    cpu_us_per_msg: f64,
    rtt: Histogram<u64>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Loads every record under `dir/runs` (with `tag`, when given).
pub fn load(dir: &Path, tag: Option<&str>) -> anyhow::Result<Vec<Record>> {
    let runs = dir.join("runs");
    let mut records = Vec::new();
    let entries =
        std::fs::read_dir(&runs).with_context(|| format!("no records in {}", runs.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let record: Record = serde_json::from_str(&text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if record.schema_version != record::SCHEMA_VERSION {
            continue;
        }
        if tag.is_some_and(|tag| record.config.tag.as_deref() != Some(tag)) {
            continue;
        }
        records.push(record);
    }
    records.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    Ok(records)
}

type Series = BTreeMap<String, Vec<Point>>;

/// Groups records with the same offered load into per-label series of median points.
fn series(records: &[&Record]) -> anyhow::Result<Series> {
    let mut groups: BTreeMap<(String, usize), Vec<&Record>> = BTreeMap::new();
    for record in records {
        groups
            .entry((record.config.label.clone(), record.config.conns))
            .or_default()
            .push(record);
    }
    let mut out: Series = BTreeMap::new();
    for ((label, conns), runs) in groups {
        let collect = |f: &dyn Fn(&Record) -> f64| median(runs.iter().map(|r| f(r)).collect());
        let mut rtt = crate::workload::histogram();
        for run in &runs {
            rtt.add(record::decode(&run.histograms.rtt)?)
                .map_err(|e| anyhow::anyhow!("cannot merge histograms: {e:?}"))?;
        }
        out.entry(label).or_default().push(Point {
            conns: conns as f64,
            runs: runs.len(),
            established: collect(&|r| r.sessions.established as f64),
            msgs_per_s: collect(&|r| r.messages.per_second),
            p50: collect(&|r| r.latency_us.rtt.p50 as f64),
            p99: collect(&|r| r.latency_us.rtt.p99 as f64),
            p999: collect(&|r| r.latency_us.rtt.p999 as f64),
            rss_per_session: collect(&|r| r.proxy.rss_per_session_idle),
            cpu_us_per_msg: collect(&|r| r.proxy.cpu_us_per_message),
            rtt,
        });
    }
    Ok(out)
}

/// Labels in the order of the comparison, external servers last.
fn ordered(series: &Series) -> Vec<&String> {
    let mut labels: Vec<&String> = series.keys().collect();
    labels.sort_by_key(|label| {
        (
            ORDER.iter().position(|o| o == label).unwrap_or(ORDER.len()),
            (*label).clone(),
        )
    });
    labels
}

/// The colour and marker of a label: fixed per mode, so a mode looks the same on every chart.
fn style_of(label: &str, index: usize) -> (RGBColor, usize) {
    let slot = ORDER
        .iter()
        .position(|o| *o == label)
        .unwrap_or(ORDER.len() + index);
    (PALETTE[slot % PALETTE.len()], slot)
}

/// What a line chart shows.
struct LineChart<'a> {
    title: &'a str,
    y_label: &'a str,
    log_y: bool,
    caption: &'a str,
    /// Per label: (x, y) points.
    lines: Vec<(String, Vec<(f64, f64)>)>,
    /// A dashed reference line (e.g. y = x), with its legend text.
    reference: Option<(String, Vec<(f64, f64)>)>,
    x_label: &'a str,
    /// Percentile-spectrum x axis instead of connections.
    spectrum: bool,
}

fn bounds(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
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

fn percentile_label(x: &f64) -> String {
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

fn human(value: f64) -> String {
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

fn draw_chart<DB: DrawingBackend>(
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

fn finish<'a, DB, X, Y>(
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
fn save(out: &Path, stem: &str, chart: &LineChart<'_>) -> anyhow::Result<Vec<PathBuf>> {
    let svg = out.join(format!("{stem}.svg"));
    let png = out.join(format!("{stem}.png"));
    draw_chart(SVGBackend::new(&svg, SIZE).into_drawing_area(), chart)?;
    draw_chart(BitMapBackend::new(&png, SIZE).into_drawing_area(), chart)?;
    Ok(vec![svg, png])
}

/// The most common offered rate among open-loop records.
fn fixed_rate(records: &[Record]) -> Option<f64> {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for rate in records.iter().filter_map(|r| r.config.rate) {
        *counts.entry(rate as u64).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(rate, _)| rate as f64)
}

fn caption(records: &[Record]) -> String {
    let Some(first) = records.first() else {
        return String::new();
    };
    let h = &first.host;
    let revisions: std::collections::BTreeSet<&str> = records
        .iter()
        .filter_map(|r| r.git_revision.as_deref())
        .collect();
    format!(
        "{} · {} cores · Linux {} · {} runs, {} … {} · rev {}",
        h.cpu_model,
        h.cores,
        h.kernel,
        records.len(),
        &first.started_at[..10],
        records.last().map_or("", |r| &r.started_at[..10]),
        revisions.into_iter().collect::<Vec<_>>().join(",")
    )
}

/// Draws every chart and writes results/README.md. Returns the files written.
pub fn plot(dir: &Path, tag: Option<&str>) -> anyhow::Result<Vec<PathBuf>> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("bundled font is invalid"))?;
    let records = load(dir, tag)?;
    if records.is_empty() {
        bail!("no records to plot in {}", dir.join("runs").display());
    }
    let out = dir.join("charts");
    std::fs::create_dir_all(&out)?;
    let caption = caption(&records);
    let closed: Vec<&Record> = records.iter().filter(|r| r.config.rate.is_none()).collect();
    let rate = fixed_rate(&records);
    let open: Vec<&Record> = records
        .iter()
        .filter(|r| r.config.rate.is_some() && r.config.rate == rate)
        .collect();
    let closed_series = series(&closed)?;
    let open_series = series(&open)?;
    let mut written = Vec::new();
    let lines = |series: &Series,
                 f: &dyn Fn(&Point) -> f64,
                 skip_direct: bool|
     -> Vec<(String, Vec<(f64, f64)>)> {
        ordered(series)
            .into_iter()
            .filter(|label| !(skip_direct && label.as_str() == "direct"))
            .map(|label| {
                (
                    label.clone(),
                    series[label].iter().map(|p| (p.conns, f(p))).collect(),
                )
            })
            .collect()
    };
    let rate_text = rate.map_or("no fixed-rate runs".to_owned(), |r| {
        format!("{r:.0} msg/s offered")
    });
    let base = |series: &Series| -> Series { series.clone() };
    let any = if closed.is_empty() {
        base(&open_series)
    } else {
        base(&closed_series)
    };

    let requested: Vec<(f64, f64)> = {
        let mut xs: Vec<f64> = any.values().flatten().map(|p| p.conns).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        xs.into_iter().map(|x| (x, x)).collect()
    };
    written.extend(save(
        &out,
        "1-established",
        &LineChart {
            title: "Sessions established vs requested",
            x_label: "sessions requested (log)",
            y_label: "sessions established (log)",
            log_y: true,
            caption: &caption,
            lines: lines(&any, &|p| p.established, false),
            reference: Some(("requested".into(), requested)),
            spectrum: false,
        },
    )?);
    written.extend(save(
        &out,
        "2-throughput",
        &LineChart {
            title: "Throughput, closed loop (one 128 B message outstanding per session)",
            x_label: "concurrent sessions (log)",
            y_label: "round trips per second",
            log_y: false,
            caption: &caption,
            lines: lines(&closed_series, &|p| p.msgs_per_s, false),
            reference: None,
            spectrum: false,
        },
    )?);
    for (stem, title, f) in [
        (
            "3-p99",
            "p99 round trip at a fixed offered rate",
            (|p: &Point| p.p99 / 1000.0) as fn(&Point) -> f64,
        ),
        (
            "3-p999",
            "p99.9 round trip at a fixed offered rate",
            |p: &Point| p.p999 / 1000.0,
        ),
    ] {
        let title = format!("{title} ({rate_text})");
        written.extend(save(
            &out,
            stem,
            &LineChart {
                title: &title,
                x_label: "concurrent sessions (log)",
                y_label: "latency, ms (log)",
                log_y: true,
                caption: &caption,
                lines: lines(&open_series, &f, false),
                reference: None,
                spectrum: false,
            },
        )?);
    }
    written.extend(save(
        &out,
        "4-rss-per-session",
        &LineChart {
            title: "Proxy memory per idle session (RSS, all worker processes)",
            x_label: "concurrent sessions (log)",
            y_label: "bytes of RSS per session (log)",
            log_y: true,
            caption: &caption,
            lines: lines(&any, &|p| p.rss_per_session, true),
            reference: None,
            spectrum: false,
        },
    )?);
    let title = format!("Proxy CPU per message ({rate_text})");
    written.extend(save(
        &out,
        "5-cpu-per-message",
        &LineChart {
            title: &title,
            x_label: "concurrent sessions (log)",
            y_label: "proxy CPU µs per round trip",
            log_y: false,
            caption: &caption,
            lines: lines(&open_series, &|p| p.cpu_us_per_msg, true),
            reference: None,
            spectrum: false,
        },
    )?);
    let top = open_series
        .values()
        .flatten()
        .map(|p| p.conns)
        .fold(0.0, f64::max);
    let spectrum: Vec<(String, Vec<(f64, f64)>)> = ordered(&open_series)
        .into_iter()
        .filter_map(|label| {
            let point = open_series[label].iter().find(|p| p.conns == top)?;
            let line: Vec<(f64, f64)> = point
                .rtt
                .iter_quantiles(5)
                .filter(|v| {
                    v.quantile_iterated_to() < 0.99999 && v.count_since_last_iteration() > 0
                })
                .map(|v| {
                    let q = v.quantile_iterated_to();
                    (
                        (1.0 / (1.0 - q)).log10(),
                        v.value_iterated_to() as f64 / 1000.0,
                    )
                })
                .collect();
            (!line.is_empty()).then(|| (label.clone(), line))
        })
        .collect();
    let title = format!("Latency by percentile at {top:.0} sessions ({rate_text})");
    written.extend(save(
        &out,
        "6-latency-spectrum",
        &LineChart {
            title: &title,
            x_label: "percentile",
            y_label: "round trip, ms (log)",
            log_y: true,
            caption: &caption,
            lines: spectrum,
            reference: None,
            spectrum: true,
        },
    )?);

    let readme = dir.join("README.md");
    std::fs::write(
        &readme,
        report(dir, &records, &closed_series, &open_series, rate),
    )?;
    written.push(readme);
    Ok(written)
}

fn table(series: &Series, with_rate: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| mode | sessions | established | msgs/s | p50 ms | p99 ms | p99.9 ms | RSS/session | CPU µs/msg | runs |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for label in ordered(series) {
        for p in &series[label] {
            let rss = if label == "direct" {
                "–".to_owned()
            } else {
                format!("{:.0} B", p.rss_per_session)
            };
            let cpu = if label == "direct" || !with_rate && p.cpu_us_per_msg == 0.0 {
                "–".to_owned()
            } else {
                format!("{:.1}", p.cpu_us_per_msg)
            };
            let _ = writeln!(
                out,
                "| {label} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {rss} | {cpu} | {} |",
                p.conns,
                p.established,
                p.msgs_per_s,
                p.p50 / 1000.0,
                p.p99 / 1000.0,
                p.p999 / 1000.0,
                p.runs
            );
        }
    }
    out
}

fn report(
    dir: &Path,
    records: &[Record],
    closed: &Series,
    open: &Series,
    rate: Option<f64>,
) -> String {
    let mut out = String::new();
    let host = &records[0].host;
    let _ = writeln!(out, "# The c10k comparison: results\n");
    let _ = writeln!(
        out,
        "Generated by `loadgen plot` from the {} records in `runs/` (do not edit; edit `reading.md`).\n",
        records.len()
    );
    let _ = writeln!(
        out,
        "Machine: {} ({} cores), Linux {}, host `{}`. Regenerate the runs with `scripts/c10k.sh` \
         (about 20 minutes; `--quick` for a smaller matrix) and these charts and tables with \
         `./target/release/loadgen plot`.\n",
        host.cpu_model, host.cores, host.kernel, host.hostname
    );
    if let Ok(reading) = std::fs::read_to_string(dir.join("reading.md")) {
        let _ = writeln!(out, "{}\n", reading.trim_end());
    }
    let _ = writeln!(out, "## Charts\n");
    for (file, text) in [
        ("1-established", "Sessions established vs requested"),
        ("2-throughput", "Throughput, closed loop"),
        ("3-p99", "p99 at the fixed rate"),
        ("3-p999", "p99.9 at the fixed rate"),
        ("4-rss-per-session", "RSS per idle session"),
        ("5-cpu-per-message", "CPU per message at the fixed rate"),
        (
            "6-latency-spectrum",
            "Latency spectrum at the largest session count",
        ),
    ] {
        let _ = writeln!(out, "![{text}](charts/{file}.png)\n");
    }
    let _ = writeln!(out, "## Closed loop (maximum throughput)\n");
    out.push_str(&table(closed, false));
    let _ = writeln!(
        out,
        "\n## Fixed offered rate ({})\n",
        rate.map_or("none recorded".to_owned(), |r| format!("{r:.0} msg/s"))
    );
    out.push_str(&table(open, true));
    let _ = writeln!(
        out,
        "\nMedians over the repeated runs of each point. RSS/session is the proxy's RSS (summed \
         over its processes) holding every session idle, minus its RSS before any session, per \
         established session; kernel socket buffers are not included (see each record's \
         `kernel` section). CPU is the proxy's user+system time in the measured window per \
         round trip."
    );
    if let Ok(benches) = std::fs::read_to_string(dir.join("benchmarks.md")) {
        let _ = writeln!(out, "\n## Benchmarks (criterion)\n\n{}", benches.trim_end());
    }
    out
}
