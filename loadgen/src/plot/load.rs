//! Loading stored records and reducing them to the plotted points: per (label, sessions), the
//! medians of the repeated runs and their merged round-trip histogram.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::cli::Target;
use crate::record::{self, Record};

/// One plotted point: the medians of a group of repeated runs.
#[derive(Debug, Clone)]
pub(super) struct Point {
    pub(super) conns: f64,
    pub(super) runs: usize,
    pub(super) established: f64,
    pub(super) msgs_per_s: f64,
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) p999: f64,
    pub(super) rss_per_session: f64,
    /// What an idle session cost everything included (proxy, loadgen and echo RSS, kernel
    /// TCP buffers and slab); 0 in records that predate it.
    pub(super) all_in_per_session: f64,
    pub(super) cpu_us_per_msg: f64,
    pub(super) rtt: Histogram<u64>,
    /// Whether a run of the group was marked harness-limited.
    pub(super) limited: bool,
    /// Whether a run of the group fell behind the offered rate.
    pub(super) saturated: bool,
}

pub(super) fn median(mut values: Vec<f64>) -> f64 {
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
        // Newer schemas are unknown here; an agent's record is a part of a merged one.
        if record.schema_version > record::SCHEMA_VERSION || record.config.segment.is_some() {
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

/// What `scripts/c10k.sh` writes to `results/sweeps/<tag>.json` when a sweep has finished.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Manifest {
    /// The sweep's tag (every one of its records carries it).
    pub tag: String,
    /// Runs made.
    pub runs: usize,
    /// When the last run ended, RFC 3339 (UTC).
    pub finished_at: String,
}

/// The records of one sweep (no other record of `runs/` is ever part of it).
pub struct Sweep {
    /// The sweep's tag.
    pub tag: String,
    /// Its records, oldest first.
    pub records: Vec<Record>,
    /// Runs the sweep made, by its manifest (a run that could not start leaves no record).
    pub runs_made: Option<usize>,
}

/// The finished sweeps under `dir/sweeps`, latest first.
pub fn manifests(dir: &Path) -> anyhow::Result<Vec<Manifest>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("sweeps")) else {
        return Ok(found);
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let read = std::fs::read_to_string(&path)
            .map_err(anyhow::Error::from)
            .and_then(|text| Ok(serde_json::from_str::<Manifest>(&text)?));
        match read {
            Ok(manifest) => found.push(manifest),
            // One broken manifest must not block drawing the others.
            Err(err) => eprintln!("loadgen plot: skipping {}: {err:#}", path.display()),
        }
    }
    found.sort_by(|a, b| b.finished_at.cmp(&a.finished_at));
    Ok(found)
}

/// The sweep to draw: `tag`, or else the latest finished one. Refuses a sweep whose records
/// cannot share a median (different machines, revisions or load shapes), saying why.
pub fn choose(dir: &Path, tag: Option<&str>) -> anyhow::Result<Sweep> {
    let manifests = manifests(dir)?;
    let tag = match tag {
        Some(tag) => tag.to_owned(),
        None => manifests
            .first()
            .map(|m| m.tag.clone())
            .with_context(|| {
                format!(
                    "no finished sweep in {} (scripts/c10k.sh writes one); name the records to draw with --tag",
                    dir.join("sweeps").display()
                )
            })?,
    };
    let all = load(dir, None)?;
    let records: Vec<Record> = all
        .into_iter()
        .filter(|r| r.config.tag.as_deref() == Some(tag.as_str()))
        .collect();
    if records.is_empty() {
        anyhow::bail!("no records tagged {tag} in {}", dir.join("runs").display());
    }
    comparable(&tag, &records)?;
    Ok(Sweep {
        runs_made: manifests.iter().find(|m| m.tag == tag).map(|m| m.runs),
        tag,
        records,
    })
}

/// Fails, naming the first difference, when `records` differ in anything that changes the
/// numbers besides what a sweep varies on purpose (server, sessions, offered rate).
pub fn comparable(tag: &str, records: &[Record]) -> anyhow::Result<()> {
    type Key = fn(&Record) -> Option<String>;
    let keys: [(&str, Key); 9] = [
        ("machines", |r| {
            Some(format!(
                "{} ({} cores, {})",
                r.host.hostname, r.host.cores, r.host.cpu_model
            ))
        }),
        ("kernels", |r| Some(r.host.kernel.clone())),
        ("revisions", |r| {
            Some(r.git_revision.clone().unwrap_or_else(|| "unknown".into()))
        }),
        ("message sizes", |r| Some(format!("{} B", r.config.size))),
        ("windows", |r| Some(format!("{} s", r.config.duration_s))),
        ("warm-ups", |r| Some(format!("{} s", r.config.warmup_s))),
        ("pacers", |r| r.harness.pacer.clone()),
        ("arrivals", |r| r.harness.arrivals.clone()),
        // A merged run's pacer threads are its agents' summed, and a sweep gives bigger
        // points more agents: what must match is each agent's pacing.
        ("pacer threads", |r| {
            r.config.rate.map(|_| match r.config.segments.len() {
                0 => r.harness.pacer_threads.to_string(),
                agents => format!("{} per agent", r.harness.pacer_threads / agents),
            })
        }),
    ];
    for (what, key) in keys {
        let mut seen: Vec<String> = records.iter().filter_map(key).collect();
        seen.sort();
        seen.dedup();
        if seen.len() > 1 {
            anyhow::bail!(
                "sweep {tag} mixes {what} ({}): refusing to take medians across them",
                seen.join(" vs ")
            );
        }
    }
    Ok(())
}

/// Per label, its points in order of sessions.
pub(super) type Series = BTreeMap<String, Vec<Point>>;

/// Groups records with the same offered load into per-label series of median points, one
/// point per session count.
pub(super) fn series(records: &[&Record]) -> anyhow::Result<Series> {
    series_over(records, |record| record.config.conns as f64)
}

/// Like [`series`], with the points along `x` (e.g. the offered rate) instead of sessions; a
/// point's `conns` then holds its `x`.
pub(super) fn series_over(
    records: &[&Record],
    x: impl Fn(&Record) -> f64,
) -> anyhow::Result<Series> {
    let mut groups: BTreeMap<(String, u64), Vec<&Record>> = BTreeMap::new();
    for record in records {
        groups
            .entry((record.config.label.clone(), x(record).to_bits()))
            .or_default()
            .push(record);
    }
    let mut out: Series = BTreeMap::new();
    for ((label, x_bits), runs) in groups {
        let conns = f64::from_bits(x_bits);
        let collect = |f: &dyn Fn(&Record) -> f64| median(runs.iter().map(|r| f(r)).collect());
        let mut rtt = crate::measure::histogram();
        for run in &runs {
            rtt.add(record::decode(&run.histograms.rtt)?)
                .map_err(|e| anyhow::anyhow!("cannot merge histograms: {e:?}"))?;
        }
        out.entry(label).or_default().push(Point {
            conns,
            runs: runs.len(),
            established: collect(&|r| r.sessions.established as f64),
            msgs_per_s: collect(&|r| r.messages.per_second),
            p50: collect(&|r| r.latency_us.rtt.p50 as f64),
            p99: collect(&|r| r.latency_us.rtt.p99 as f64),
            p999: collect(&|r| r.latency_us.rtt.p999 as f64),
            rss_per_session: collect(&|r| r.proxy.rss_per_session_idle),
            all_in_per_session: collect(&|r| r.memory.bytes_per_session_idle),
            cpu_us_per_msg: collect(&|r| r.proxy.cpu_us_per_message),
            rtt,
            limited: runs.iter().any(|r| r.harness.limited),
            saturated: runs.iter().any(|r| r.harness.saturated.is_some()),
        });
    }
    Ok(out)
}

/// The most common offered rate among open-loop records.
pub(super) fn fixed_rate(records: &[Record]) -> Option<f64> {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for rate in records.iter().filter_map(|r| r.config.rate) {
        *counts.entry(rate as u64).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(rate, _)| rate as f64)
}

/// Labels in the order of the comparison, external servers last.
pub(super) fn ordered(series: &Series) -> Vec<&String> {
    let mut labels: Vec<&String> = series.keys().collect();
    labels.sort_by_key(|label| rank(label));
    labels
}

/// A label's place in the comparison: `direct`, the modes, then the peers by name.
pub(super) fn rank(label: &str) -> (usize, String) {
    (
        order_of(label).unwrap_or(Target::ALL.len()),
        label.to_owned(),
    )
}

/// Where a label stands in the comparison: `direct`, then the modes in `Mode::ALL` order;
/// `None` for anything else (external servers), which comes last.
pub(super) fn order_of(label: &str) -> Option<usize> {
    Target::ALL.iter().position(|target| target.name() == label)
}
