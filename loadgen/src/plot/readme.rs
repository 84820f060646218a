//! results/README.md: the tables per session count and the reading, from the plotted points.

use std::fmt::Write as _;
use std::path::Path;

use super::charts::style_of;
use super::load::{ordered, rank, Point, Series, Sweep};
use crate::cli::Target;

/// The footer of every chart: which sweep, on what, when, and how many runs per point.
pub(super) fn caption(sweep: &Sweep) -> String {
    let records = &sweep.records;
    let Some(first) = records.first() else {
        return String::new();
    };
    let h = &first.host;
    let revision = first.git_revision.as_deref().unwrap_or("unknown revision");
    let mut per_point: std::collections::BTreeMap<(String, usize, Option<u64>), usize> =
        std::collections::BTreeMap::new();
    for r in records {
        *per_point
            .entry((
                r.config.label.clone(),
                r.config.conns,
                r.config.rate.map(f64::to_bits),
            ))
            .or_default() += 1;
    }
    let fewest = per_point.values().min().copied().unwrap_or(0);
    let most = per_point.values().max().copied().unwrap_or(0);
    let runs = if fewest == most {
        format!("{most}")
    } else {
        format!("{fewest}–{most}")
    };
    format!(
        "sweep {} · rev {revision} · {} · {} cores · Linux {} · {} … {} · {runs} runs per point",
        sweep.tag,
        h.cpu_model,
        h.cores,
        h.kernel,
        &first.started_at[..10],
        records.last().map_or("", |r| &r.started_at[..10]),
    )
}

/// A table of points; `x_name` heads the column of their x (sessions, or offered msg/s).
pub(super) fn table(series: &Series, with_rate: bool, x_name: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| mode | {x_name} | established | msgs/s | p50 ms | p99 ms | p99.9 ms | RSS/session | CPU µs/msg | runs | harness |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for label in ordered(series) {
        for p in &series[label] {
            let rss = if label == Target::Direct.name() {
                "–".to_owned()
            } else {
                format!("{:.0} B", p.rss_per_session)
            };
            let cpu = if label == Target::Direct.name() || !with_rate && p.cpu_us_per_msg == 0.0 {
                "–".to_owned()
            } else {
                format!("{:.1}", p.cpu_us_per_msg)
            };
            let _ = writeln!(
                out,
                "| {label} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {rss} | {cpu} | {} | {} |",
                p.conns,
                p.established,
                p.msgs_per_s,
                p.p50 / 1000.0,
                p.p99 / 1000.0,
                p.p999 / 1000.0,
                p.runs,
                match (p.limited, p.saturated) {
                    (true, true) => "limited, saturated",
                    (true, false) => "limited",
                    (false, true) => "saturated",
                    (false, false) => "ok",
                }
            );
        }
    }
    out
}

/// The measures of the comparison, each read from a session count's closed-loop and
/// fixed-rate points; `higher` when more is better.
struct Measure {
    name: &'static str,
    unit: &'static str,
    higher: bool,
    /// Which of the row's points the measure is read from.
    point: for<'a> fn(&Row<'a>) -> Option<&'a Point>,
    value: fn(&Point) -> f64,
}

/// One server at one session count: its closed-loop and fixed-rate points.
struct Row<'a> {
    label: &'a str,
    closed: Option<&'a Point>,
    open: Option<&'a Point>,
}

impl Row<'_> {
    /// Sessions held: the fewer of the closed-loop and fixed-rate runs (a server that refused
    /// sessions in either did not hold them all).
    fn held(&self) -> Option<f64> {
        match (self.closed, self.open) {
            (Some(c), Some(o)) => Some(c.established.min(o.established)),
            (c, o) => c.or(o).map(|p| p.established),
        }
    }
    fn limited(&self) -> bool {
        self.closed.is_some_and(|p| p.limited) || self.open.is_some_and(|p| p.limited)
    }
    fn saturated(&self) -> bool {
        self.closed.is_some_and(|p| p.saturated) || self.open.is_some_and(|p| p.saturated)
    }
}

const MEASURES: [Measure; 5] = [
    Measure {
        name: "sessions held",
        unit: "",
        higher: true,
        // The run that held fewer.
        point: |row| match (row.closed, row.open) {
            (Some(c), Some(o)) if o.established < c.established => Some(o),
            (c, o) => c.or(o),
        },
        value: |p| p.established,
    },
    Measure {
        name: "closed-loop throughput",
        unit: " msg/s",
        higher: true,
        point: |row| row.closed,
        value: |p| p.msgs_per_s,
    },
    Measure {
        name: "p99 at the fixed rate",
        unit: " ms",
        higher: false,
        point: |row| row.open,
        value: |p| p.p99 / 1000.0,
    },
    Measure {
        name: "RSS per idle session",
        // Idle figures come from the closed-loop run when there is one.
        unit: " KiB",
        higher: false,
        point: |row| row.closed.or(row.open),
        value: |p| p.rss_per_session / 1024.0,
    },
    Measure {
        name: "CPU per message at the fixed rate",
        unit: " µs",
        higher: false,
        point: |row| row.open,
        value: |p| p.cpu_us_per_msg,
    },
];

/// Whether a point held sessions and moved messages (else its per-unit figures are empty).
pub(super) fn served(point: &Point) -> bool {
    point.established > 0.0 && point.msgs_per_s > 0.0
}

/// The share of the requested sessions a mode must hold to count as our best at that count.
const HELD_SHARE: f64 = 0.99;

fn number(value: f64) -> String {
    if value >= 100.0 || value == 0.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Per session count: one table of every server (modes, baseline, peers), then how our best
/// mode stands against each peer on each measure, as ratios of this sweep's medians.
pub(super) fn by_sessions(closed: &Series, open: &Series) -> String {
    let mut out = String::new();
    let mut labels: Vec<&String> = closed.keys().chain(open.keys()).collect();
    labels.sort_by_key(|label| rank(label));
    labels.dedup();
    let mut counts: Vec<f64> = closed
        .values()
        .chain(open.values())
        .flatten()
        .map(|p| p.conns)
        .collect();
    counts.sort_by(f64::total_cmp);
    counts.dedup();
    fn find<'s>(series: &'s Series, label: &str, conns: f64) -> Option<&'s Point> {
        series.get(label)?.iter().find(|p| p.conns == conns)
    }
    for conns in counts {
        let rows: Vec<Row> = labels
            .iter()
            .map(|label| Row {
                label: label.as_str(),
                closed: find(closed, label, conns),
                open: find(open, label, conns),
            })
            .filter(|row| row.closed.is_some() || row.open.is_some())
            .collect();
        let _ = writeln!(
            out,
            "### {conns:.0} sessions
"
        );
        let _ = writeln!(
            out,
            "| server | sessions held | closed-loop msg/s | closed-loop p99 ms | p99 ms at the rate | p99.9 ms at the rate | RSS/session | all-in/session | CPU µs/msg at the rate | runs | harness |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        let cell = |value: Option<f64>, f: &dyn Fn(f64) -> String| value.map_or("–".to_owned(), f);
        // Latency, memory and CPU per unit only where sessions were held and messages moved.
        fn of(point: Option<&Point>) -> Option<&Point> {
            point.filter(|p| served(p))
        }
        for row in &rows {
            let is_direct = row.label == Target::Direct.name();
            let name = match (is_direct, style_of(row.label).peer) {
                (true, _) => "direct (no proxy)".to_owned(),
                (_, true) => format!("{} (other server)", row.label),
                _ => format!("**{}**", row.label),
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(row.held(), &|v| format!("{v:.0}")),
                cell(row.closed.map(|p| p.msgs_per_s), &|v| format!("{v:.0}")),
                cell(of(row.closed).map(|p| p.p99 / 1000.0), &|v| format!(
                    "{v:.2}"
                )),
                cell(of(row.open).map(|p| p.p99 / 1000.0), &|v| format!("{v:.2}")),
                cell(of(row.open).map(|p| p.p999 / 1000.0), &|v| format!(
                    "{v:.2}"
                )),
                cell(
                    of(row.closed.or(row.open))
                        .map(|p| p.rss_per_session)
                        .filter(|_| !is_direct),
                    &|v| format!("{v:.0} B")
                ),
                cell(
                    of(row.closed.or(row.open))
                        .map(|p| p.all_in_per_session)
                        .filter(|v| *v > 0.0),
                    &|v| format!("{:.1} KiB", v / 1024.0)
                ),
                cell(
                    of(row.open)
                        .map(|p| p.cpu_us_per_msg)
                        .filter(|_| !is_direct),
                    &|v| format!("{v:.1}")
                ),
                row.closed.map_or(0, |p| p.runs) + row.open.map_or(0, |p| p.runs),
                match (row.limited(), row.saturated()) {
                    (true, true) => "limited, saturated",
                    (true, false) => "limited",
                    (false, true) => "saturated",
                    (false, false) => "ok",
                }
            );
        }
        let peers: Vec<&Row> = rows.iter().filter(|row| style_of(row.label).peer).collect();
        // A mode that refused most sessions (select beyond FD_SETSIZE) serves fewer, faster:
        // only modes that held nearly every session compete for "our best".
        let ours: Vec<&Row> = rows
            .iter()
            .filter(|row| !style_of(row.label).peer && row.label != Target::Direct.name())
            .filter(|row| row.held().is_some_and(|held| held >= HELD_SHARE * conns))
            .collect();
        if peers.is_empty() || ours.is_empty() {
            let _ = writeln!(out);
            continue;
        }
        let _ = writeln!(
            out,
            "\nOur best mode against each other server ({conns:.0} sessions; our best among the \
             modes that held at least {:.0} % of them; ×r: how many times better ours is, below 1 \
             the other server wins; * a harness-limited point):\n",
            HELD_SHARE * 100.0
        );
        let _ = write!(out, "| measure | our best |");
        for peer in &peers {
            let _ = write!(out, " {} |", peer.label);
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "|---|---|{}", "---|".repeat(peers.len()));
        for measure in &MEASURES {
            let better = |a: f64, b: f64| if measure.higher { a > b } else { a < b };
            let measured = |row: &Row| -> Option<(f64, &'static str)> {
                let point = (measure.point)(row)?;
                // A point that held or served nothing has no latency, memory or CPU per unit.
                if measure.name != "sessions held" && !served(point) {
                    return None;
                }
                let value = (measure.value)(point);
                value
                    .is_finite()
                    .then_some((value, if point.limited { "*" } else { "" }))
            };
            let best = ours
                .iter()
                .filter_map(|row| Some((*row, measured(row)?)))
                .fold(
                    None,
                    |best: Option<(&Row, (f64, &str))>, (row, m)| match best {
                        Some((_, (b, _))) if !better(m.0, b) => best,
                        _ => Some((row, m)),
                    },
                );
            let Some((best_row, (best_value, best_star))) = best else {
                continue;
            };
            let _ = write!(
                out,
                "| {} | {} {}{}{best_star} |",
                measure.name,
                best_row.label,
                number(best_value),
                measure.unit,
            );
            for peer in &peers {
                let cell = match measured(peer) {
                    Some((value, star)) => {
                        let ratio = if measure.higher {
                            best_value / value
                        } else {
                            value / best_value
                        };
                        let ratio = if ratio.is_finite() {
                            format!("×{ratio:.2}")
                        } else {
                            "–".to_owned()
                        };
                        format!("{}{}{star} ({ratio})", number(value), measure.unit)
                    }
                    None => "–".to_owned(),
                };
                let _ = write!(out, " {cell} |");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
    }
    out
}

/// results/README.md: reading.md from `dir`, the charts drawn (by stem), the tables.
pub(super) fn report(
    dir: &Path,
    drawn: &[String],
    sweep: &Sweep,
    closed: &Series,
    open: &Series,
    rate: Option<f64>,
    by_rate: Option<(usize, &Series)>,
) -> String {
    let mut out = String::new();
    let records = &sweep.records;
    let host = &records[0].host;
    let _ = writeln!(out, "# The c10k comparison: results\n");
    let _ = writeln!(
        out,
        "Generated by `loadgen plot` from the {} records of sweep `{}` in `runs/`{} (do not \
         edit; edit `reading.md`). Records in `runs/` without this tag (other sweeps, ad-hoc \
         runs such as the main job) are not in this comparison and never enter a median.\n",
        records.len(),
        sweep.tag,
        match sweep.runs_made {
            Some(runs) if runs != records.len() => {
                format!(
                    " (its manifest in `sweeps/` counts {runs} runs: the others left no record)"
                )
            }
            Some(_) => " (every run the sweep made)".to_owned(),
            None => " (no manifest in `sweeps/`: named by `--tag`)".to_owned(),
        },
    );
    // scripts/c10k.sh names its sweeps by what they ran.
    let regenerate = if sweep.tag.starts_with("c100k-") {
        "`scripts/c10k.sh --c100k` (about 55 minutes) and these charts and tables with \
         `./target/release/loadgen plot --results results/c100k`; `loadgen plot --check \
         --results results/c100k`"
    } else {
        "`scripts/c10k.sh` (about 50 minutes with the other servers; `--quick` for a smaller \
         matrix) and these charts and tables with `./target/release/loadgen plot`; \
         `loadgen plot --check`"
    };
    let _ = writeln!(
        out,
        "Sweep `{}`: revision {}, {} ({} cores), Linux {}, host `{}`, {} … {}. Regenerate the runs \
         with {regenerate} verifies they match the records.\n",
        sweep.tag,
        records[0].git_revision.as_deref().unwrap_or("unknown"),
        host.cpu_model,
        host.cores,
        host.kernel,
        host.hostname,
        records[0].started_at,
        records.last().map_or("", |r| r.started_at.as_str()),
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
        (
            "4-all-in-per-session",
            "Memory per idle session, everything included",
        ),
        ("5-cpu-per-message", "CPU per message at the fixed rate"),
        (
            "6-latency-spectrum",
            "Latency spectrum at the largest session count",
        ),
        ("7-cpu-vs-rate", "CPU per message against the offered rate"),
        ("7-p99-vs-rate", "p99 against the offered rate"),
        (
            "8-at-top",
            "Our modes and other servers at the largest session count",
        ),
    ] {
        if drawn.iter().any(|stem| stem == file) {
            let _ = writeln!(out, "![{text}](charts/{file}.png)\n");
        }
    }
    let _ = writeln!(
        out,
        "## By session count: closed loop, and {} offered\n",
        rate.map_or("no fixed rate".to_owned(), |r| format!("{r:.0} msg/s"))
    );
    out.push_str(&by_sessions(closed, open));
    if let Some((sessions, by_rate)) = by_rate {
        let _ = writeln!(out, "\n## Against the offered rate ({sessions} sessions)\n");
        out.push_str(&table(by_rate, true, "offered msg/s"));
    }
    let _ = writeln!(
        out,
        "\nMedians over the repeated runs of each point. RSS/session is the proxy's RSS (summed \
         over its processes) holding every session idle, minus its RSS before any session, per \
         established session; kernel socket buffers are not included (see each record's \
         `kernel` section). All-in/session is what an idle session cost everything included: \
         the growth of the proxy's, loadgen's and the echo target's RSS and of the kernel's \
         TCP buffers and slab (sockets, inodes, epoll items; host-wide, so anything else \
         running counts too), per established session (`memory` section; – in records that \
         predate it). CPU is the proxy's user+system time in the measured window per \
         round trip. Harness: `limited` when a run of the point was marked harness-limited by \
         loadgen's self-check (schedule lateness p99 over 50 µs, sends unreached, or loadgen \
         holding most of a core: see the records' `harness.limited_by`), `saturated` when the \
         system under test fell behind the offered rate."
    );
    if let Ok(benches) = std::fs::read_to_string(dir.join("benchmarks.md")) {
        let _ = writeln!(out, "\n## Benchmarks (criterion)\n\n{}", benches.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(
        conns: f64,
        established: f64,
        msgs_per_s: f64,
        p99_us: f64,
        rss: f64,
        cpu: f64,
    ) -> Point {
        Point {
            conns,
            runs: 2,
            established,
            msgs_per_s,
            p50: p99_us / 2.0,
            p99: p99_us,
            p999: p99_us * 2.0,
            rss_per_session: rss,
            all_in_per_session: 0.0,
            cpu_us_per_msg: cpu,
            rtt: crate::measure::histogram(),
            limited: false,
            saturated: false,
        }
    }

    #[test]
    fn each_session_count_compares_our_best_mode_with_each_peer() {
        let mut closed = Series::new();
        let mut open = Series::new();
        // At 1,000 sessions: epoll holds every session at 1 KiB, async is faster; the peer
        // (microsocks) holds fewer, is slower, and costs 3 KiB and twice the CPU.
        closed.insert(
            "direct".into(),
            vec![point(1000.0, 1000.0, 90000.0, 900.0, 0.0, 0.0)],
        );
        closed.insert(
            "epoll".into(),
            vec![point(1000.0, 1000.0, 50000.0, 2000.0, 1024.0, 20.0)],
        );
        closed.insert(
            "async".into(),
            vec![point(1000.0, 1000.0, 60000.0, 1500.0, 2048.0, 18.0)],
        );
        closed.insert(
            "microsocks".into(),
            vec![point(1000.0, 500.0, 30000.0, 3000.0, 3072.0, 30.0)],
        );
        open.insert(
            "epoll".into(),
            vec![point(1000.0, 1000.0, 10000.0, 400.0, 1024.0, 25.0)],
        );
        let mut peer_open = point(1000.0, 500.0, 10000.0, 1200.0, 3072.0, 50.0);
        peer_open.limited = true;
        open.insert("microsocks".into(), vec![peer_open]);

        let text = by_sessions(&closed, &open);
        assert!(text.contains("### 1000 sessions"), "{text}");
        assert!(text.contains("| direct (no proxy) |"), "{text}");
        assert!(text.contains("| **epoll** |"), "{text}");
        assert!(text.contains("| microsocks (other server) |"), "{text}");
        // Our best is chosen per measure, and the ratio says how many times better it is.
        assert!(
            text.contains("| sessions held | epoll 1000 | 500 (×2.00) |"),
            "{text}"
        );
        assert!(
            text.contains("| closed-loop throughput | async 60000 msg/s | 30000 msg/s (×2.00) |"),
            "{text}"
        );
        assert!(
            text.contains("| p99 at the fixed rate | epoll 0.40 ms | 1.20 ms* (×3.00) |"),
            "{text}"
        );
        assert!(
            text.contains("| RSS per idle session | epoll 1.00 KiB | 3.00 KiB (×3.00) |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| CPU per message at the fixed rate | epoll 25.0 µs | 50.0 µs* (×2.00) |"
            ),
            "{text}"
        );
        // A peer that held nothing has no per-unit figures and no ratio.
        closed.insert("dante".into(), vec![point(1000.0, 0.0, 0.0, 0.0, 0.0, 0.0)]);
        let text = by_sessions(&closed, &open);
        assert!(
            text.contains("| sessions held | epoll 1000 | 0 (–) | 500 (×2.00) |"),
            "{text}"
        );
        assert!(
            text.contains("| RSS per idle session | epoll 1.00 KiB | – | 3.00 KiB (×3.00) |"),
            "{text}"
        );
        closed.remove("dante");
        // Without peers there is nothing to compare.
        closed.remove("microsocks");
        open.remove("microsocks");
        assert!(!by_sessions(&closed, &open).contains("Our best mode"));
    }
}
