//! `loadgen merge`: the records of a run's agents (one per segment, from one host or many)
//! joined into the record one process would have written. Histograms are added, never their
//! percentiles averaged; counters are summed; rates are each agent's over its own window,
//! summed, and the windows must nearly coincide (rates are each agent's over its own
//! window, summed).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;

use crate::measure::histogram;
use crate::record::{
    self, decode, encode, EncodedHistograms, Outcome, Percentiles, Record, SegmentSource,
};
use crate::sample::{self, ProxySample};

/// The agents' windows must overlap by at least this share of the longest one.
pub const MIN_WINDOW_OVERLAP: f64 = 0.9;

/// Reads the records (and proxy samples) at `paths` and merges them.
pub fn merge_files(paths: &[PathBuf]) -> anyhow::Result<Record> {
    let mut records = Vec::new();
    let mut samples = Vec::new();
    for path in paths {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{name} is not JSON"))?;
        if value.get("kind").and_then(|k| k.as_str()) == Some(sample::KIND) {
            let taken: ProxySample = serde_json::from_value(value)
                .with_context(|| format!("{name} is not a proxy sample"))?;
            samples.push((name, taken));
        } else {
            let record: Record =
                serde_json::from_value(value).with_context(|| format!("{name} is not a record"))?;
            records.push((name, record));
        }
    }
    merge_with_samples(records, samples)
}

/// Merges the records of every segment of one run (named, for messages and the merged
/// record's `segments`, by `.0`). Refuses records that are not agents' records, segments
/// missing or given twice, agents of different runs, and windows that do not overlap.
pub fn merge(records: Vec<(String, Record)>) -> anyhow::Result<Record> {
    merge_with_samples(records, Vec::new())
}

/// [`merge`], with the proxy measured by `loadgen sample` on its hosts: the merged proxy
/// section is then the samples' sum (agents' own proxy figures are not used). Each sample
/// must cover the agents' common window.
pub fn merge_with_samples(
    mut records: Vec<(String, Record)>,
    samples: Vec<(String, ProxySample)>,
) -> anyhow::Result<Record> {
    if records.is_empty() {
        bail!("nothing to merge: give the record of every agent of one run");
    }
    for (name, record) in &records {
        match record.config.segment {
            None => bail!("{name} is not an agent's record (it has no segment): only the records of one run's agents (--segment I/K) can be merged"),
            Some(s) if s.count == 0 || s.index >= s.count => {
                bail!("{name} has an impossible segment {}/{}", s.index, s.count)
            }
            Some(_) => {}
        }
    }
    records.sort_by_key(|(_, record)| record.config.segment);
    let first = records[0].1.clone();
    let count = first.config.segment.map_or(1, |s| s.count);
    let mut seen = vec![None; count as usize];
    for (name, record) in &records {
        let segment = record.config.segment.expect("checked above");
        let differs = |what: &str, a: String, b: String| {
            anyhow::anyhow!(
                "{name} is from another run: its {what} is {b}, {} has {a}",
                records[0].0
            )
        };
        if segment.count != count {
            return Err(differs(
                "agent count",
                count.to_string(),
                segment.count.to_string(),
            ));
        }
        let same = [
            (
                "sessions (--conns)",
                first.config.conns.to_string(),
                record.config.conns.to_string(),
            ),
            (
                "label",
                first.config.label.clone(),
                record.config.label.clone(),
            ),
            (
                "message size",
                first.config.size.to_string(),
                record.config.size.to_string(),
            ),
            (
                "rate",
                format!("{:?}", first.config.rate),
                format!("{:?}", record.config.rate),
            ),
            (
                "tag",
                format!("{:?}", first.config.tag),
                format!("{:?}", record.config.tag),
            ),
            (
                "--start-at",
                format!("{:?}", first.config.start_at),
                format!("{:?}", record.config.start_at),
            ),
        ];
        for (what, a, b) in same {
            if a != b {
                return Err(differs(what, a, b));
            }
        }
        match &mut seen[segment.index as usize] {
            Some(other) => bail!("segment {segment} is given twice: {other} and {name}"),
            slot => *slot = Some(name.clone()),
        }
    }
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, name)| name.is_none())
        .map(|(index, _)| format!("{index}/{count}"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "segments {} of the run are missing: a merged record must hold every session",
            missing.join(", ")
        );
    }

    // The common window: every agent must have measured (nearly) the same one.
    let start = records
        .iter()
        .map(|(_, r)| r.messages.window_start_unix_s)
        .fold(f64::MIN, f64::max);
    let end = records
        .iter()
        .map(|(_, r)| r.messages.window_end_unix_s)
        .fold(f64::MAX, f64::min);
    let longest = records
        .iter()
        .map(|(_, r)| r.messages.window_end_unix_s - r.messages.window_start_unix_s)
        .fold(0.0, f64::max);
    if !(end - start >= MIN_WINDOW_OVERLAP * longest && longest > 0.0) {
        let windows: Vec<String> = records
            .iter()
            .map(|(name, r)| {
                format!(
                    "{name}: {:.3}..{:.3}",
                    r.messages.window_start_unix_s, r.messages.window_end_unix_s
                )
            })
            .collect();
        bail!(
            "the agents did not measure the same window (they overlap {:.3} s of {longest:.3} s; at least {:.0} % is needed: start them with one --start-at and synchronised clocks): {}",
            (end - start).max(0.0),
            MIN_WINDOW_OVERLAP * 100.0,
            windows.join("; ")
        );
    }

    let mut merged = first.clone();
    merged.schema_version = record::SCHEMA_VERSION;
    merged.started_at = records
        .iter()
        .map(|(_, r)| r.started_at.clone())
        .min()
        .unwrap_or_default();
    merged.config.segment = None;
    merged.config.command = std::env::args().collect();
    merged.config.loadgen_threads = records.iter().map(|(_, r)| r.config.loadgen_threads).sum();
    merged.config.workers = records
        .iter()
        .map(|(_, r)| r.config.workers)
        .max()
        .unwrap_or(0);
    merged.config.segments = records
        .iter()
        .map(|(name, r)| SegmentSource {
            segment: r.config.segment.expect("checked above"),
            record: name.clone(),
            hostname: r.host.hostname.clone(),
            established: r.sessions.established,
            window_start_unix_s: r.messages.window_start_unix_s,
            window_end_unix_s: r.messages.window_end_unix_s,
        })
        .collect();

    // Sessions and messages: counts summed.
    let sum = |f: &dyn Fn(&Record) -> u64| records.iter().map(|(_, r)| f(r)).sum::<u64>();
    let sum_f = |f: &dyn Fn(&Record) -> f64| records.iter().map(|(_, r)| f(r)).sum::<f64>();
    let add_maps = |f: &dyn Fn(&Record) -> &BTreeMap<String, u64>| {
        let mut out = BTreeMap::new();
        for (_, r) in &records {
            for (cause, n) in f(r) {
                *out.entry(cause.clone()).or_default() += n;
            }
        }
        out
    };
    merged.sessions.requested = records.iter().map(|(_, r)| r.sessions.requested).sum();
    merged.sessions.established = sum(&|r| r.sessions.established);
    merged.sessions.failed = sum(&|r| r.sessions.failed);
    merged.sessions.failures = add_maps(&|r| &r.sessions.failures);
    merged.sessions.dropped = add_maps(&|r| &r.sessions.dropped);
    merged.messages.count = sum(&|r| r.messages.count);
    merged.messages.corrupted = sum(&|r| r.messages.corrupted);
    // Each agent's rate over its own window, summed: agents on a shared schedule measure the
    // same instants (within ms), and an agent's count belongs to its own window.
    merged.messages.window_start_unix_s = start;
    merged.messages.window_end_unix_s = end;
    merged.messages.window_s = end - start;
    merged.messages.per_second = sum_f(&|r| r.messages.per_second);
    merged.messages.bytes_per_second = sum_f(&|r| r.messages.bytes_per_second);

    // Latencies: histograms added.
    let added = |f: &dyn Fn(&Record) -> Option<&String>| -> anyhow::Result<Option<Histogram<u64>>> {
        let mut total = histogram();
        for (name, r) in &records {
            let Some(text) = f(r) else {
                return Ok(None);
            };
            let part =
                decode(text).with_context(|| format!("{name}: a histogram is unreadable"))?;
            total
                .add(part)
                .map_err(|e| anyhow::anyhow!("{name}: cannot add a histogram: {e:?}"))?;
        }
        Ok(Some(total))
    };
    let handshake = added(&|r| Some(&r.histograms.handshake))?.unwrap_or_else(histogram);
    let rtt = added(&|r| Some(&r.histograms.rtt))?.unwrap_or_else(histogram);
    let service = added(&|r| r.histograms.service.as_ref())?;
    let lateness = added(&|r| r.histograms.lateness.as_ref())?;
    merged.latency_us.handshake = Percentiles::of(&handshake);
    merged.latency_us.rtt = Percentiles::of(&rtt);
    merged.latency_us.service = service.as_ref().map(Percentiles::of);
    merged.histograms = EncodedHistograms {
        handshake: encode(&handshake)?,
        rtt: encode(&rtt)?,
        service: service.as_ref().map(encode).transpose()?,
        lateness: lateness.as_ref().map(encode).transpose()?,
    };

    // The proxy: measured by one agent per proxy host (an agent given its PID); summed over
    // those, then divided by the whole run's sessions and messages.
    for (name, taken) in &samples {
        let covered = taken.window_end_unix_s.min(end) - taken.window_start_unix_s.max(start);
        if covered < MIN_WINDOW_OVERLAP * (end - start) {
            bail!(
                "{name} sampled {:.3}..{:.3}, not the agents' window {start:.3}..{end:.3}: give `loadgen sample` the agents' --start-at and run flags",
                taken.window_start_unix_s,
                taken.window_end_unix_s
            );
        }
    }
    let measured: Vec<&record::ProxyUsage> = if samples.is_empty() {
        records
            .iter()
            .map(|(_, r)| &r.proxy)
            .filter(|p| p.processes > 0)
            .collect()
    } else {
        samples.iter().map(|(_, s)| &s.proxy).collect()
    };
    let mut proxy = record::ProxyUsage::default();
    for p in measured {
        proxy.processes += p.processes;
        proxy.rss_before += p.rss_before;
        proxy.rss_idle += p.rss_idle;
        proxy.rss_peak += p.rss_peak;
        proxy.cpu_ramp_s += p.cpu_ramp_s;
        proxy.cpu_window_s += p.cpu_window_s;
        proxy.context_switches_window += p.context_switches_window;
    }
    let established = merged.sessions.established;
    let messages = merged.messages.count;
    let per = |value: f64, n: u64| if n == 0 { 0.0 } else { value / n as f64 };
    proxy.rss_per_session_idle = per(
        proxy.rss_idle.saturating_sub(proxy.rss_before) as f64,
        established,
    );
    proxy.rss_per_session_peak = per(
        proxy.rss_peak.saturating_sub(proxy.rss_before) as f64,
        established,
    );
    proxy.cpu_us_per_message = per(proxy.cpu_window_s * 1e6, messages);
    proxy.context_switches_per_message = per(proxy.context_switches_window as f64, messages);
    merged.proxy = proxy;

    // Host-wide figures: once per host (every agent on a host reads the same), summed over
    // hosts.
    let mut by_host: BTreeMap<&str, &Record> = BTreeMap::new();
    for (_, r) in &records {
        by_host.entry(r.host.hostname.as_str()).or_insert(r);
    }
    let mut kernel = record::KernelUsage {
        tcp_mem_unit: "bytes".into(),
        ..Default::default()
    };
    for r in by_host.values() {
        kernel.tcp_mem_before += r.kernel.tcp_mem_before;
        kernel.tcp_mem_idle += r.kernel.tcp_mem_idle;
        kernel.tcp_mem_peak += r.kernel.tcp_mem_peak;
        kernel.tcp_sockets_idle += r.kernel.tcp_sockets_idle;
        kernel.slab_before += r.kernel.slab_before;
        kernel.slab_idle += r.kernel.slab_idle;
    }
    merged.kernel = kernel;
    let mut memory = record::HostMemory::default();
    for (_, r) in &records {
        let m = &r.memory;
        memory.loadgen_processes += m.loadgen_processes;
        memory.loadgen_rss_before += m.loadgen_rss_before;
        memory.loadgen_rss_idle += m.loadgen_rss_idle;
        memory.echo_processes += m.echo_processes;
        memory.echo_rss_before += m.echo_rss_before;
        memory.echo_rss_idle += m.echo_rss_idle;
    }
    memory.account(&merged.proxy, &merged.kernel, established);
    merged.memory = memory;

    // loadgen's cost, per host.
    merged.loadgen.cpu_window_s = sum_f(&|r| r.loadgen.cpu_window_s);
    let mut host_cpu: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for (_, r) in &records {
        let entry = host_cpu
            .entry(r.host.hostname.as_str())
            .or_insert((0.0, r.host.cores));
        entry.0 += r.loadgen.cpu_window_s;
    }
    merged.loadgen.maybe_bottleneck = records.iter().any(|(_, r)| r.loadgen.maybe_bottleneck)
        || host_cpu.values().any(|(cpu, cores)| {
            merged.messages.window_s > 0.0 && cpu / merged.messages.window_s > 0.8 * *cores as f64
        });

    merged.harness = harness(&records, &merged, lateness.as_ref(), &by_host);
    merged.outcome = outcome(&records, &merged);
    Ok(merged)
}

/// The instrument's self-check of the whole run: every agent's, plus the sums.
fn harness(
    records: &[(String, Record)],
    merged: &Record,
    lateness: Option<&Histogram<u64>>,
    by_host: &BTreeMap<&str, &Record>,
) -> record::Harness {
    let first = &records[0].1.harness;
    let sum = |f: &dyn Fn(&record::Harness) -> u64| {
        records.iter().map(|(_, r)| f(&r.harness)).sum::<u64>()
    };
    let sum_f = |f: &dyn Fn(&record::Harness) -> f64| {
        records.iter().map(|(_, r)| f(&r.harness)).sum::<f64>()
    };
    let sum_opt = |f: &dyn Fn(&record::Harness) -> Option<f64>| {
        records
            .iter()
            .map(|(_, r)| f(&r.harness))
            .collect::<Option<Vec<f64>>>()
            .map(|v| v.iter().sum::<f64>())
    };
    let threads = sum(&|h| h.pacer_threads as u64).max(1) as f64;
    let weighted = |f: &dyn Fn(&record::Harness) -> Option<f64>| {
        records
            .iter()
            .map(|(_, r)| f(&r.harness).map(|v| v * r.harness.pacer_threads as f64))
            .collect::<Option<Vec<f64>>>()
            .map(|v| v.iter().sum::<f64>() / threads)
    };
    let worst = |f: &dyn Fn(&Percentiles) -> u64| {
        records
            .iter()
            .map(|(_, r)| f(&r.harness.control_sleep_late_us))
            .max()
            .unwrap_or(0)
    };
    let dispatched = sum(&|h| h.dispatched);
    let late = sum_f(&|h| h.late_share.unwrap_or(0.0) * h.dispatched as f64);
    let mut limited_by: Vec<String> = records
        .iter()
        .flat_map(|(_, r)| {
            let segment = r.config.segment.unwrap_or(crate::segment::Segment::WHOLE);
            r.harness
                .limited_by
                .iter()
                .map(move |reason| format!("agent {segment}: {reason}"))
        })
        .collect();
    let offered = sum_opt(&|h| h.offered_rate);
    let achieved = merged.messages.per_second;
    let unfinished = sum(&|h| h.unfinished);
    let saturated = offered.and_then(|offered| {
        (achieved / offered - 1.0 < -record::limits::RATE_ERROR || unfinished > 0).then(|| {
            format!(
                "achieved {achieved:.0} of {offered:.0} msg/s offered; {} sends waited for an echo; {unfinished} never completed",
                sum(&|h| h.queued_behind_echo)
            )
        })
    });
    // Agents on one host share its cores: their loadgen CPU together must stay small too.
    let window = merged.messages.window_s;
    for (host, record) in by_host {
        let cores: f64 = records
            .iter()
            .filter(|(_, r)| r.host.hostname == *host)
            .map(|(_, r)| r.harness.loadgen_cores)
            .sum();
        let agents = records
            .iter()
            .filter(|(_, r)| r.host.hostname == *host)
            .count();
        if agents > 1 && window > 0.0 && cores > record::limits::CORES {
            limited_by.push(format!(
                "the {agents} agents on {host} held {cores:.2} of its {} cores together",
                record.host.cores
            ));
        }
    }
    record::Harness {
        pacer: first.pacer.clone(),
        arrivals: first.arrivals.clone(),
        pacer_threads: threads as usize,
        lateness_us: lateness.map(Percentiles::of),
        late_share: first.late_share.map(|_| {
            if dispatched == 0 {
                0.0
            } else {
                late / dispatched as f64
            }
        }),
        offered_rate: offered,
        dispatched_rate: sum_opt(&|h| h.dispatched_rate),
        dispatched,
        achieved_rate: achieved,
        queued_behind_echo: sum(&|h| h.queued_behind_echo),
        skipped: sum(&|h| h.skipped),
        backlog: sum(&|h| h.backlog),
        unfinished,
        saturated,
        // Only percentiles were stored: the worst agent's, per percentile (never an average).
        control_sleep_late_us: Percentiles {
            count: sum(&|h| h.control_sleep_late_us.count),
            min: records
                .iter()
                .map(|(_, r)| r.harness.control_sleep_late_us.min)
                .min()
                .unwrap_or(0),
            mean: records
                .iter()
                .map(|(_, r)| r.harness.control_sleep_late_us.mean)
                .fold(0.0, f64::max),
            p50: worst(&|p| p.p50),
            p90: worst(&|p| p.p90),
            p99: worst(&|p| p.p99),
            p999: worst(&|p| p.p999),
            max: worst(&|p| p.max),
        },
        host_steal_share: records
            .iter()
            .map(|(_, r)| r.harness.host_steal_share)
            .fold(0.0, f64::max),
        host_busy_cores: by_host.values().map(|r| r.harness.host_busy_cores).sum(),
        pacer_slept_share: weighted(&|h| h.pacer_slept_share),
        pacer_idle_poll_share: weighted(&|h| h.pacer_idle_poll_share),
        loadgen_cores: sum_f(&|h| h.loadgen_cores),
        loadgen_busy_cores: sum_f(&|h| h.loadgen_busy_cores),
        limited: !limited_by.is_empty(),
        limited_by,
    }
}

/// The run's outcome: corruption anywhere first, then an agent's failure, then drops.
fn outcome(records: &[(String, Record)], merged: &Record) -> Outcome {
    if merged.messages.corrupted > 0 {
        return Outcome::Corrupted(merged.messages.corrupted);
    }
    for (_, r) in records {
        match &r.outcome {
            Outcome::Ok | Outcome::Dropped(_) | Outcome::Corrupted(_) => {}
            other => {
                let segment = r.config.segment.unwrap_or(crate::segment::Segment::WHOLE);
                return Outcome::Failed(format!("agent {segment}: {other}"));
            }
        }
    }
    if merged.sessions.dropped.values().sum::<u64>() > 0 {
        return Outcome::Dropped(merged.sessions.dropped.clone());
    }
    Outcome::Ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Segment;

    /// An agent's record of segment `index`/`count` whose round trips are `rtts`, measured
    /// over `window` (Unix seconds).
    fn agent(index: u32, count: u32, rtts: &[u64], window: (f64, f64)) -> (String, Record) {
        let mut h = histogram();
        for &v in rtts {
            h.record(v).expect("record");
        }
        let mut r = Record::default();
        r.config.conns = 1000;
        r.config.label = "epoll".into();
        r.config.rate = Some(1000.0);
        r.config.segment = Some(Segment { index, count });
        r.sessions.requested = Segment { index, count }.share(1000);
        r.sessions.established = r.sessions.requested as u64;
        r.messages.count = rtts.len() as u64;
        r.messages.window_start_unix_s = window.0;
        r.messages.window_end_unix_s = window.1;
        r.messages.window_s = window.1 - window.0;
        r.messages.per_second = rtts.len() as f64 / r.messages.window_s;
        r.latency_us.rtt = Percentiles::of(&h);
        r.histograms.rtt = encode(&h).expect("encode");
        r.histograms.handshake = encode(&histogram()).expect("encode");
        r.harness.offered_rate = Some(1000.0 / f64::from(count));
        r.harness.pacer_threads = 1;
        (format!("agent-{index}.json"), r)
    }

    #[test]
    fn merging_shards_equals_the_unsplit_histogram_and_averaging_p99_would_not() {
        // One agent's sessions are fast, the other's have a slow tail.
        let fast: Vec<u64> = (1..=990).collect();
        let slow: Vec<u64> = (1..=900).chain((0..90).map(|i| 50_000 + i)).collect();
        let mut whole = histogram();
        for &v in fast.iter().chain(&slow) {
            whole.record(v).expect("record");
        }
        let merged = merge(vec![
            agent(1, 2, &slow, (100.0, 110.0)),
            agent(0, 2, &fast, (100.0, 110.0)),
        ])
        .expect("merges");
        let rtt = decode(&merged.histograms.rtt).expect("decode");
        assert_eq!(rtt, whole, "the merged histogram is the unsplit one");
        assert_eq!(merged.latency_us.rtt, Percentiles::of(&whole));
        let averaged = (Percentiles::of(&histogram_of(&fast)).p99
            + Percentiles::of(&histogram_of(&slow)).p99)
            / 2;
        assert_ne!(
            merged.latency_us.rtt.p99, averaged,
            "averaging p99 is not a p99"
        );
        assert!(
            merged.latency_us.rtt.p99 >= 50_000,
            "{:?}",
            merged.latency_us.rtt
        );
        assert_eq!(merged.messages.count, 1980);
        assert_eq!(merged.sessions.established, 1000);
        assert_eq!(merged.config.segment, None);
        assert_eq!(merged.config.segments.len(), 2);
        assert_eq!(
            merged.config.segments[0].segment,
            Segment { index: 0, count: 2 }
        );
        assert_eq!(merged.harness.offered_rate, Some(1000.0));
        assert!(merged.outcome.is_ok());
    }

    #[test]
    fn k_shards_of_one_histogram_merge_back_exactly() {
        let values: Vec<u64> = (0..10_000u64).map(|i| 1 + (i * 7919) % 100_000).collect();
        for count in [1u32, 3, 7] {
            let shards: Vec<(String, Record)> = (0..count)
                .map(|index| {
                    let part: Vec<u64> = values
                        .iter()
                        .copied()
                        .skip(index as usize)
                        .step_by(count as usize)
                        .collect();
                    agent(index, count, &part, (5.0, 15.0))
                })
                .collect();
            let merged = merge(shards).expect("merges");
            assert_eq!(
                decode(&merged.histograms.rtt).expect("decode"),
                histogram_of(&values),
                "{count} shards"
            );
        }
    }

    #[test]
    fn missing_duplicate_foreign_and_non_overlapping_segments_are_refused() {
        let a = agent(0, 3, &[1], (0.0, 10.0));
        let b = agent(1, 3, &[1], (0.0, 10.0));
        let c = agent(2, 3, &[1], (0.0, 10.0));
        let err = |records: Vec<(String, Record)>| merge(records).expect_err("refused").to_string();
        assert!(err(vec![a.clone(), c.clone()]).contains("1/3"), "missing");
        assert!(
            err(vec![a.clone(), b.clone(), b.clone(), c.clone()]).contains("twice"),
            "duplicate"
        );
        let mut other_run = c.clone();
        other_run.1.config.conns = 2000;
        assert!(err(vec![a.clone(), b.clone(), other_run]).contains("another run"));
        let late = agent(2, 3, &[1], (8.0, 18.0));
        assert!(err(vec![a.clone(), b.clone(), late]).contains("same window"));
        let mut whole = a.clone();
        whole.1.config.segment = None;
        assert!(err(vec![whole]).contains("not an agent's record"));
        assert!(err(Vec::new()).contains("nothing to merge"));
        assert!(merge(vec![c, a, b]).is_ok());
    }

    #[test]
    fn failures_anywhere_fail_the_merged_run() {
        let mut a = agent(0, 2, &[1, 2], (0.0, 10.0));
        let b = agent(1, 2, &[3], (0.0, 10.0));
        a.1.sessions.dropped.insert("reset".into(), 2);
        a.1.outcome = Outcome::Dropped(a.1.sessions.dropped.clone());
        let merged = merge(vec![a.clone(), b.clone()]).expect("merges");
        assert_eq!(merged.sessions.dropped.get("reset"), Some(&2));
        assert!(matches!(merged.outcome, Outcome::Dropped(_)));
        a.1.outcome = Outcome::ProxyDied("signal 9".into());
        let merged = merge(vec![a, b]).expect("merges");
        assert!(
            merged.outcome.to_string().starts_with("agent 0/2"),
            "{}",
            merged.outcome
        );
    }

    #[test]
    fn proxy_samples_from_proxy_hosts_make_the_proxy_section() {
        let mut a = agent(0, 2, &[1, 2], (100.0, 110.0));
        let b = agent(1, 2, &[3, 4], (100.0, 110.0));
        // Agent 0 also measured a proxy: with samples given, the samples count instead.
        a.1.proxy.processes = 1;
        a.1.proxy.cpu_window_s = 99.0;
        let host = |cpu: f64, rss: u64, window: (f64, f64)| ProxySample {
            kind: sample::KIND.into(),
            host: record::Host::default(),
            pid: 1,
            start_at_unix_s: 50.0,
            window_start_unix_s: window.0,
            window_end_unix_s: window.1,
            proxy: record::ProxyUsage {
                processes: 2,
                rss_before: 1_000,
                rss_idle: 1_000 + rss,
                rss_peak: 1_000 + rss,
                cpu_window_s: cpu,
                ..Default::default()
            },
        };
        let samples = vec![
            ("proxy-a.json".to_owned(), host(1.0, 500, (100.0, 110.0))),
            ("proxy-b.json".to_owned(), host(3.0, 1_500, (100.0, 110.0))),
        ];
        let merged = merge_with_samples(vec![a.clone(), b.clone()], samples).expect("merges");
        assert_eq!(merged.proxy.processes, 4);
        assert_eq!(merged.proxy.cpu_window_s, 4.0);
        // 4 CPU seconds over 4 messages; 2,000 bytes over 1,000 sessions.
        assert_eq!(merged.proxy.cpu_us_per_message, 1e6);
        assert_eq!(merged.proxy.rss_per_session_idle, 2.0);
        let late = vec![("proxy-c.json".to_owned(), host(1.0, 1, (104.0, 114.0)))];
        let err = merge_with_samples(vec![a, b], late).expect_err("refused");
        assert!(err.to_string().contains("not the agents' window"), "{err}");
    }

    fn histogram_of(values: &[u64]) -> Histogram<u64> {
        let mut h = histogram();
        for &v in values {
            h.record(v).expect("record");
        }
        h
    }
}
