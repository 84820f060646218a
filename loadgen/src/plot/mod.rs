//! `loadgen plot`: the c10k charts and results/README.md, drawn only from stored records.
//!
//! Records are grouped by (label, connections, offered rate); each group's medians are
//! plotted (repeats of a point are medians, as the sweep intends), and the latency spectrum
//! merges the group's histograms.

use std::path::{Path, PathBuf};

use anyhow::bail;
use plotters::prelude::*;

use crate::cli::Target;
use crate::record::Record;

mod charts;
mod load;
mod readme;

use charts::{save, save_bars, Bar, BarPanel, LineChart, FONT};
use load::{choose, fixed_rate, ordered, series, Point, Series};
use readme::{caption, report};

/// Draws every chart and writes results/README.md for one sweep (`tag`, or the latest
/// finished one) from the records in `dir`. Returns the files written.
pub fn plot(dir: &Path, tag: Option<&str>) -> anyhow::Result<Vec<PathBuf>> {
    draw(dir, tag, dir)
}

/// Redraws into a temporary directory and fails, naming the files, when `dir`'s README.md or
/// charts differ from what its records produce (or it holds charts they do not produce).
pub fn check(dir: &Path, tag: Option<&str>) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("loadgen-plot-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = draw(dir, tag, &scratch).and_then(|written| {
        let mut differ = Vec::new();
        for fresh in &written {
            let name = fresh.strip_prefix(&scratch).unwrap_or(fresh);
            let stored = dir.join(name);
            if std::fs::read(&stored).ok() != Some(std::fs::read(fresh)?) {
                differ.push(name.display().to_string());
            }
        }
        let produced: Vec<PathBuf> = written
            .iter()
            .filter_map(|p| p.strip_prefix(&scratch).ok().map(Path::to_path_buf))
            .collect();
        if let Ok(entries) = std::fs::read_dir(dir.join("charts")) {
            for entry in entries.flatten() {
                let name = Path::new("charts").join(entry.file_name());
                let chart = name.extension().is_some_and(|e| e == "svg" || e == "png");
                if chart && !produced.contains(&name) {
                    differ.push(format!("{} (no record produces it)", name.display()));
                }
            }
        }
        if differ.is_empty() {
            Ok(())
        } else {
            differ.sort();
            bail!(
                "{} differs from what its records produce: {} (run `loadgen plot` and commit)",
                dir.display(),
                differ.join(", ")
            )
        }
    });
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Draws the sweep's charts and README.md from `dir`'s records (and its reading.md) into `dir_out`.
fn draw(dir: &Path, tag: Option<&str>, dir_out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    // Registering the same font twice is harmless; it makes `draw` callable more than once.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("bundled font is invalid"))?;
    let sweep = choose(dir, tag)?;
    let records = &sweep.records;
    let out = dir_out.join("charts");
    std::fs::create_dir_all(&out)?;
    let caption = caption(&sweep);
    let closed: Vec<&Record> = records.iter().filter(|r| r.config.rate.is_none()).collect();
    let rate = fixed_rate(records);
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
            .filter(|label| !(skip_direct && label.as_str() == Target::Direct.name()))
            .map(|label| {
                (
                    label.clone(),
                    series[label].iter().map(|p| (p.conns, f(p))).collect(),
                )
            })
            .collect()
    };
    let ringed =
        |series: &Series, f: &dyn Fn(&Point) -> f64, skip_direct: bool| -> Vec<(f64, f64)> {
            series
                .iter()
                .filter(|(label, _)| !(skip_direct && label.as_str() == Target::Direct.name()))
                .flat_map(|(_, points)| points.iter().filter(|p| p.limited))
                .map(|p| (p.conns, f(p)))
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
            limited: ringed(&any, &|p| p.established, false),
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
            limited: ringed(&closed_series, &|p| p.msgs_per_s, false),
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
                limited: ringed(&open_series, &f, false),
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
            limited: ringed(&any, &|p| p.rss_per_session, true),
            reference: None,
            spectrum: false,
        },
    )?);
    // Records from before the `memory` section have no all-in figure: drawn only when some do.
    let all_in: Series = any
        .iter()
        .map(|(label, points)| {
            let known = points.iter().filter(|p| p.all_in_per_session > 0.0);
            (label.clone(), known.cloned().collect::<Vec<_>>())
        })
        .filter(|(_, points)| !points.is_empty())
        .collect();
    if !all_in.is_empty() {
        written.extend(save(
            &out,
            "4-all-in-per-session",
            &LineChart {
                title: "Memory per idle session, everything included (proxy, loadgen and echo RSS, kernel TCP and slab)",
                x_label: "concurrent sessions (log)",
                y_label: "bytes per session (log)",
                log_y: true,
                caption: &caption,
                lines: lines(&all_in, &|p| p.all_in_per_session, false),
                limited: ringed(&all_in, &|p| p.all_in_per_session, false),
                reference: None,
                spectrum: false,
            },
        )?);
    }
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
            limited: ringed(&open_series, &|p| p.cpu_us_per_msg, true),
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
            limited: Vec::new(),
        },
    )?);

    // Against the offered rate, at the largest session count measured at several rates.
    let by_rate_conns = records
        .iter()
        .filter(|r| r.config.rate.is_some())
        .map(|r| r.config.conns)
        .max();
    let at_top: Vec<&Record> = records
        .iter()
        .filter(|r| r.config.rate.is_some() && Some(r.config.conns) == by_rate_conns)
        .collect();
    let rate_series = load::series_over(&at_top, |r| r.config.rate.unwrap_or(0.0))?;
    let rates = rate_series.values().map(Vec::len).max().unwrap_or(0);
    if rates > 1 {
        let sessions = by_rate_conns.unwrap_or(0);
        for (stem, title, y_label, f, skip_direct, log_y) in [
            (
                "7-cpu-vs-rate",
                format!("Proxy CPU per round trip against the offered rate ({sessions} sessions)"),
                "proxy CPU µs per round trip",
                (|p: &Point| p.cpu_us_per_msg) as fn(&Point) -> f64,
                true,
                false,
            ),
            (
                "7-p99-vs-rate",
                format!("p99 round trip against the offered rate ({sessions} sessions)"),
                "latency, ms (log)",
                |p: &Point| p.p99 / 1000.0,
                false,
                true,
            ),
        ] {
            written.extend(save(
                &out,
                stem,
                &LineChart {
                    title: &title,
                    x_label: "messages per second offered (log)",
                    y_label,
                    log_y,
                    caption: &caption,
                    lines: lines(&rate_series, &f, skip_direct),
                    limited: ringed(&rate_series, &f, skip_direct),
                    reference: None,
                    spectrum: false,
                },
            )?);
        }
    }

    // Modes and peers side by side at the largest session count.
    let top_conns = any.values().flatten().map(|p| p.conns).fold(0.0, f64::max);
    let at = |series: &Series, label: &str| -> Option<Point> {
        series
            .get(label)?
            .iter()
            .find(|p| p.conns == top_conns)
            .cloned()
    };
    let mut labels: Vec<String> = closed_series
        .keys()
        .chain(open_series.keys())
        .cloned()
        .collect();
    labels.sort_by_key(|label| load::rank(label));
    labels.dedup();
    let bars = |series: &Series, f: &dyn Fn(&Point) -> f64, skip_direct: bool| -> Vec<Bar> {
        labels
            .iter()
            .filter(|label| !(skip_direct && label.as_str() == Target::Direct.name()))
            .filter_map(|label| {
                let point = at(series, label).filter(readme::served)?;
                Some(Bar {
                    label: label.clone(),
                    value: f(&point),
                    limited: point.limited,
                })
            })
            .collect()
    };
    let panels = [
        BarPanel {
            title: "RSS per idle session".into(),
            x_label: "KiB per session".into(),
            bars: bars(&any, &|p| p.rss_per_session / 1024.0, true),
        },
        BarPanel {
            title: format!("CPU per message ({rate_text})"),
            x_label: "proxy CPU µs per round trip".into(),
            bars: bars(&open_series, &|p| p.cpu_us_per_msg, true),
        },
        BarPanel {
            title: "Throughput, closed loop".into(),
            x_label: "round trips per second".into(),
            bars: bars(&closed_series, &|p| p.msgs_per_s, false),
        },
    ];
    if panels.iter().any(|panel| !panel.bars.is_empty()) {
        let title = format!("Our modes and other servers at {top_conns:.0} sessions");
        written.extend(save_bars(&out, "8-at-top", &title, &caption, &panels)?);
    }

    // Charts this sweep does not produce (an earlier sweep's) would be read as its own.
    for entry in std::fs::read_dir(&out)?.flatten() {
        let path = entry.path();
        let chart = path.extension().is_some_and(|e| e == "svg" || e == "png");
        if chart && !written.contains(&path) {
            std::fs::remove_file(&path)?;
        }
    }
    let drawn: Vec<String> = written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    let readme = dir_out.join("README.md");
    std::fs::write(
        &readme,
        report(
            dir,
            &drawn,
            &sweep,
            &closed_series,
            &open_series,
            rate,
            (rates > 1).then(|| (by_rate_conns.unwrap_or(0), &rate_series)),
        ),
    )?;
    written.push(readme);
    Ok(written)
}
