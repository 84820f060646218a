//! What a run reports besides its record: the text summary, the .hgrm percentile files beside
//! the record, and a row of results/summary.csv.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::Target;
use crate::record::Record;

/// One row of results/summary.csv: the headline numbers of a run and where its record is.
/// Numbers are written as the file has always had them (`10000`, `48365.3`, `22.30`).
#[derive(Debug, Serialize)]
pub struct SummaryRow<'a> {
    started_at: &'a str,
    label: &'a str,
    mode: &'a str,
    conns: usize,
    workers: usize,
    rate: String,
    size: usize,
    established: u64,
    failed: u64,
    dropped: u64,
    corrupted: u64,
    msgs_per_s: String,
    rtt_p50_us: u64,
    rtt_p99_us: u64,
    rtt_p999_us: u64,
    handshake_p99_us: u64,
    rss_per_session_idle: u64,
    cpu_us_per_message: String,
    outcome: String,
    record: String,
}

impl<'a> SummaryRow<'a> {
    /// The row of `record`, whose file is `record_path` (relative to results/).
    pub fn of(record: &'a Record, record_path: &Path) -> Self {
        let c = &record.config;
        SummaryRow {
            started_at: &record.started_at,
            label: &c.label,
            mode: &c.mode,
            conns: c.conns,
            workers: c.workers,
            rate: c.rate.map_or(String::new(), |rate| format!("{rate}")),
            size: c.size,
            established: record.sessions.established,
            failed: record.sessions.failed,
            dropped: record.sessions.dropped.values().sum(),
            corrupted: record.messages.corrupted,
            msgs_per_s: format!("{:.1}", record.messages.per_second),
            rtt_p50_us: record.latency_us.rtt.p50,
            rtt_p99_us: record.latency_us.rtt.p99,
            rtt_p999_us: record.latency_us.rtt.p999,
            handshake_p99_us: record.latency_us.handshake.p99,
            rss_per_session_idle: record.proxy.rss_per_session_idle.round() as u64,
            cpu_us_per_message: format!("{:.2}", record.proxy.cpu_us_per_message),
            outcome: record.outcome.to_string(),
            record: record_path.display().to_string(),
        }
    }
}

/// Appends the run's row to `dir/summary.csv` for a run of a sweep (`--tag`), or to
/// `dir/adhoc-summary.csv` (ignored by git) for an ad-hoc run, so running the README's main job
/// changes nothing that is committed (with a header when the file is new).
pub fn append_summary(dir: &Path, record: &Record, record_path: &Path) -> anyhow::Result<()> {
    let path = dir.join(summary_file(record));
    let new_file = !path.exists();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut writer = csv::WriterBuilder::new()
        .has_headers(new_file)
        .from_writer(file);
    let relative = record_path.strip_prefix(dir).unwrap_or(record_path);
    writer.serialize(SummaryRow::of(record, relative))?;
    writer.flush()?;
    Ok(())
}

/// The index a run's row goes to: the sweeps' or the ad-hoc runs'.
pub fn summary_file(record: &Record) -> &'static str {
    if record.config.tag.is_some() {
        "summary.csv"
    } else {
        "adhoc-summary.csv"
    }
}

/// Writes each histogram as `<record stem>-<name>.hgrm` beside the record.
pub fn write_hgrms(
    record_path: &Path,
    histograms: &[(&str, Histogram<u64>)],
) -> anyhow::Result<()> {
    let stem = record_path.with_extension("");
    for (name, histogram) in histograms {
        let path = stem.with_file_name(format!(
            "{}-{name}.hgrm",
            stem.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ));
        std::fs::write(&path, percentile_distribution(histogram))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// HdrHistogram's percentile distribution text (the .hgrm format), values in µs.
pub fn percentile_distribution(histogram: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for value in histogram.iter_quantiles(5) {
        total += value.count_since_last_iteration();
        let quantile = value.quantile_iterated_to();
        if quantile < 1.0 {
            let _ = writeln!(
                out,
                "{:>12.3} {:>14.12} {:>10} {:>14.2}",
                value.value_iterated_to() as f64,
                quantile,
                total,
                1.0 / (1.0 - quantile)
            );
        } else {
            let _ = writeln!(
                out,
                "{:>12.3} {:>14.12} {:>10}",
                value.value_iterated_to() as f64,
                quantile,
                total
            );
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        histogram.mean(),
        histogram.stdev()
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        histogram.max() as f64,
        histogram.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        histogram.buckets(),
        histogram.distinct_values()
    );
    out
}

/// Prints the run's summary on stdout.
pub fn print_summary(record: &Record) {
    let c = &record.config;
    let s = &record.sessions;
    let m = &record.messages;
    let p = &record.proxy;
    let l = &record.latency_us;
    let kib = |b: f64| b / 1024.0;
    println!();
    println!(
        "{} · {} sessions · {} B messages · {}",
        c.label,
        c.conns,
        c.size,
        c.rate
            .map_or("closed loop".to_owned(), |r| format!("open loop {r} msg/s"))
    );
    println!(
        "  sessions     {} established, {} failed {:?}, {} dropped",
        s.established,
        s.failed,
        s.failures,
        s.dropped.values().sum::<u64>()
    );
    println!(
        "  throughput   {:.0} msg/s, {:.2} MB/s each way over {:.1} s",
        m.per_second,
        m.bytes_per_second / 1e6,
        m.window_s
    );
    println!(
        "  round trip   p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
        l.rtt.p50, l.rtt.p90, l.rtt.p99, l.rtt.p999, l.rtt.max
    );
    if let Some(service) = &l.service {
        println!(
            "  service      p50 {} µs  p99 {} µs  p99.9 {} µs  (from the actual write)",
            service.p50, service.p99, service.p999
        );
    }
    let h = &record.harness;
    if let (Some(lateness), Some(offered)) = (&h.lateness_us, h.offered_rate) {
        println!(
            "  schedule     pacer {} ({} thread{}), {} arrivals: lateness p50 {} µs  p99 {} µs  max {} µs; {:.2} % of sends > 50 µs late",
            h.pacer.as_deref().unwrap_or("-"),
            h.pacer_threads,
            if h.pacer_threads == 1 { "" } else { "s" },
            h.arrivals.as_deref().unwrap_or("-"),
            lateness.p50,
            lateness.p99,
            lateness.max,
            h.late_share.unwrap_or(0.0) * 100.0
        );
        println!(
            "  rate         offered {offered:.0}, dispatched {:.0}, achieved {:.0} msg/s; {} sends waited for an echo, {} not reached, {} never completed",
            h.dispatched_rate.unwrap_or(0.0),
            h.achieved_rate,
            h.queued_behind_echo,
            h.backlog,
            h.unfinished
        );
        if let Some(saturated) = &h.saturated {
            println!("  saturated    {saturated}");
        }
    }
    println!(
        "  host         a 1 ms sleep woke late by p50 {} µs  p99 {} µs  max {} µs; {:.2} cores busy, {:.1} % of CPU stolen by the hypervisor",
        h.control_sleep_late_us.p50,
        h.control_sleep_late_us.p99,
        h.control_sleep_late_us.max,
        h.host_busy_cores,
        h.host_steal_share * 100.0
    );
    if let (Some(slept), Some(polled)) = (h.pacer_slept_share, h.pacer_idle_poll_share) {
        println!(
            "  pacer        slept {:.0} % of the window, polled idle {:.0} % (per thread)",
            slept * 100.0,
            polled * 100.0
        );
    }
    println!(
        "  harness      loadgen {:.2} cores ({:.2} busy); {}",
        h.loadgen_cores,
        h.loadgen_busy_cores,
        if h.limited {
            format!("HARNESS-LIMITED: {}", h.limited_by.join("; "))
        } else {
            "self-check passed".to_owned()
        }
    );
    println!(
        "  handshake    p50 {} µs  p99 {} µs  max {} µs",
        l.handshake.p50, l.handshake.p99, l.handshake.max
    );
    if c.mode != Target::Direct.name() {
        println!(
            "  proxy RSS    {:.0} KiB before, {:.0} KiB idle, {:.0} KiB peak: {:.0} B/session idle, {:.0} B/session peak ({} processes)",
            kib(p.rss_before as f64),
            kib(p.rss_idle as f64),
            kib(p.rss_peak as f64),
            p.rss_per_session_idle,
            p.rss_per_session_peak,
            p.processes
        );
        println!(
            "  proxy CPU    {:.2} s in the ramp, {:.2} s in the window: {:.1} µs per message; \
             {:.2} context switches (wake-ups) per message",
            p.cpu_ramp_s, p.cpu_window_s, p.cpu_us_per_message, p.context_switches_per_message
        );
    }
    println!(
        "  kernel TCP   {:.0} KiB before, {:.0} KiB idle, {:.0} KiB peak ({} sockets idle); slab {:+.0} KiB idle",
        kib(record.kernel.tcp_mem_before as f64),
        kib(record.kernel.tcp_mem_idle as f64),
        kib(record.kernel.tcp_mem_peak as f64),
        record.kernel.tcp_sockets_idle,
        kib(record.kernel.slab_idle as f64 - record.kernel.slab_before as f64)
    );
    let memory = &record.memory;
    if memory.loadgen_processes > 0 {
        println!(
            "  memory       loadgen +{:.0} KiB ({} processes), echo +{:.0} KiB ({} processes): {:.0} B per idle session everything included (proxy, kernel TCP, loadgen, echo)",
            kib(memory.loadgen_rss_idle.saturating_sub(memory.loadgen_rss_before) as f64),
            memory.loadgen_processes,
            kib(memory.echo_rss_idle.saturating_sub(memory.echo_rss_before) as f64),
            memory.echo_processes,
            memory.bytes_per_session_idle
        );
    }
    if !record.config.segments.is_empty() {
        let skew = record
            .config
            .segments
            .iter()
            .map(|s| s.window_start_unix_s)
            .fold(f64::MIN, f64::max)
            - record
                .config
                .segments
                .iter()
                .map(|s| s.window_start_unix_s)
                .fold(f64::MAX, f64::min);
        println!(
            "  agents       {} segments merged; their windows started within {:.1} ms of each other",
            record.config.segments.len(),
            skew * 1e3
        );
    }
    println!(
        "  loadgen CPU  {:.2} s in the window{}",
        record.loadgen.cpu_window_s,
        if record.loadgen.maybe_bottleneck {
            "  (WARNING: loadgen may be the bottleneck)"
        } else {
            ""
        }
    );
    println!("  outcome      {}", record.outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_text_counts_every_sample() {
        let mut histogram = crate::measure::histogram();
        for value in 1..=2000 {
            histogram.record(value).expect("record");
        }
        let text = percentile_distribution(&histogram);
        assert!(text.contains("Total count    =         2000"), "{text}");
    }

    #[test]
    fn a_summary_row_round_trips_through_csv_with_quoting() {
        let runs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../results/runs");
        let stored = std::fs::read_dir(&runs)
            .expect("results/runs")
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|e| e == "json"))
            .expect("a stored record");
        let text = std::fs::read_to_string(&stored).expect("read");
        let mut record: Record = serde_json::from_str(&text).expect("a record");
        record.config.label = "odd, \"label\"".into();
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer
            .serialize(SummaryRow::of(&record, Path::new("runs/x.json")))
            .expect("row");
        let bytes = writer.into_inner().expect("flush");
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        let headers = reader.headers().expect("headers").clone();
        assert_eq!(headers.len(), 20);
        assert_eq!(&headers[1], "label");
        let row = reader.records().next().expect("a row").expect("valid");
        assert_eq!(&row[1], "odd, \"label\"");
        assert_eq!(&row[19], "runs/x.json");
    }
}
