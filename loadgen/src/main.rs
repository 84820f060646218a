//! `loadgen`: opens N concurrent SOCKS5 sessions through the proxy to a loopback echo target
//! and measures throughput, latency, and the proxy's memory and CPU.
//!
//! A run reads top to bottom: `cli` (what to run) → `stack` (start the echo target and the
//! proxy) → `run` (the phase schedule, driving the sessions of `workload`, counted by
//! `measure`, sampled by `probe`) → `record` (the JSON record) → `report` (summary, .hgrm,
//! summary.csv). `plot` draws the charts from stored records; `echo` is the echo target.

mod agents;
mod cli;
mod echo;
mod k8s;
mod measure;
mod merge;
mod pacer;
mod plot;
mod probe;
mod record;
mod report;
mod run;
mod sample;
mod segment;
mod stack;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use cli::{Args, RunArgs, Sub};
use workload::Plan;

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Sub::Echo { listen, threads }) => match echo::run(&listen, threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("loadgen echo: {err:#}");
                ExitCode::FAILURE
            }
        },
        Some(Sub::Modes) => {
            for target in cli::Target::ALL {
                println!("{}", target.name());
            }
            ExitCode::SUCCESS
        }
        Some(Sub::Plot {
            results,
            tag,
            check: false,
        }) => match plot::plot(&results, tag.as_deref()) {
            Ok(files) => {
                for file in files {
                    println!("{}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("loadgen plot: {err:#}");
                ExitCode::from(2)
            }
        },
        Some(Sub::Plot {
            results,
            tag,
            check: true,
        }) => match plot::check(&results, tag.as_deref()) {
            Ok(()) => {
                println!(
                    "{}: README.md and charts match the records",
                    results.display()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("loadgen plot --check: {err:#}");
                ExitCode::from(1)
            }
        },
        Some(Sub::Merge {
            records,
            results,
            json,
        }) => match merge_records(&records, &results, json) {
            Ok(code) => code,
            Err(err) => {
                eprintln!("loadgen merge: {err:#}");
                ExitCode::from(2)
            }
        },
        Some(Sub::Sample(sample)) => match sample::sample(&sample) {
            Ok(taken) => {
                eprintln!(
                    "loadgen sample: {} processes, {:.2} CPU s in the window, {} bytes RSS idle: written to {}",
                    taken.proxy.processes,
                    taken.proxy.cpu_window_s,
                    taken.proxy.rss_idle,
                    sample.out.display()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("loadgen sample: {err:#}");
                ExitCode::from(2)
            }
        },
        Some(Sub::K8sManifest(manifest)) => match k8s::manifest(&manifest) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("loadgen k8s-manifest: {err:#}");
                ExitCode::from(2)
            }
        },
        None => measure_each_rate(args.run),
    }
}

/// `loadgen merge`: one record from the agents' records; 0 if the merged run succeeded.
fn merge_records(
    paths: &[std::path::PathBuf],
    results: &std::path::Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let merged = merge::merge_files(paths)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&merged)?);
    } else {
        let (_, stamp) = record::utc_now();
        let path = record::write(results, &stamp, &merged)?;
        report::write_hgrms(&path, &record::histograms(&merged)?)?;
        report::append_summary(results, &merged, &path)?;
        report::print_summary(&merged);
        eprintln!(
            "loadgen merge: {} segments merged into {}",
            merged.config.segments.len(),
            path.display()
        );
    }
    Ok(if merged.outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        eprintln!("loadgen merge: the merged run failed: {}", merged.outcome);
        ExitCode::from(1)
    })
}

/// One measured run per offered rate of `--rate` (or one closed-loop run). Stops at the first
/// run that could not run or was interrupted; a run that ran but failed is reported and the
/// next rate still runs, and the exit code says the worst that happened.
fn measure_each_rate(mut args: RunArgs) -> ExitCode {
    let runs = args.each_run();
    if runs.len() > 1 && args.json {
        eprintln!("loadgen: --json prints one record; give --rate one rate with it (each run of a list writes its own record under --results)");
        return ExitCode::from(2);
    }
    let mut worst = ExitCode::SUCCESS;
    for (index, rate) in runs.iter().enumerate() {
        args.rate = *rate;
        if runs.len() > 1 && !args.is_quiet() {
            eprintln!(
                "loadgen: run {} of {}: {} msg/s",
                index + 1,
                runs.len(),
                rate.unwrap_or_default()
            );
        }
        match measure_run(&args) {
            Ok(code) if code == ExitCode::SUCCESS => {}
            Ok(code) if code == ExitCode::from(130) => return code,
            Ok(code) => worst = code,
            Err(err) => {
                eprintln!("loadgen: {err:#}");
                return ExitCode::from(2);
            }
        }
    }
    worst
}

/// One measured run: 0 when it succeeded, 1 when it ran but failed, 130 when interrupted.
fn measure_run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let resources = stack::plan(args)?;
    let auth = args.credentials()?;
    if resources.agents > 1 {
        return agents::run(args, &resources);
    }
    // A shared start that has passed is refused before anything starts.
    let timeline = args
        .start_at
        .map(|start| run::Timeline::new(start, args))
        .transpose()?;
    let mut stack = stack::Stack::start(args, &resources)?;
    let ids = args.segment.ids(args.conns as usize);
    if !args.is_quiet() {
        let echo: Vec<String> = stack.echo.iter().map(|e| e.pid().to_string()).collect();
        eprintln!(
            "loadgen: {}: {} sessions{}, echo pid {}{}",
            stack.label,
            ids.len(),
            if args.segment.is_split() {
                format!(" (segment {} of {})", args.segment, args.conns)
            } else {
                String::new()
            },
            if echo.is_empty() {
                "given".to_owned()
            } else {
                echo.join(",")
            },
            stack
                .proxy_pid
                .map_or(String::new(), |p| format!(", proxy pid {p}"))
        );
    }
    let plan = Arc::new(Plan {
        conns: ids.len(),
        first_id: ids.start,
        proxy: stack.proxy_addr,
        echo: stack.echo_addrs.clone(),
        sources: resources.sources.clone(),
        auth,
        size: args.size as usize,
        rate: args.rate,
        io_timeout: args.io_timeout,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.runtime_threads())
        .enable_all()
        .build()?;
    let (started_at, stamp) = record::utc_now();
    let echo_pids = stack.echo_pids(args);
    let Ok(mut measured) = runtime.block_on(run::drive(
        args,
        plan.clone(),
        stack.proxy_pid,
        echo_pids,
        timeline,
    )) else {
        eprintln!("loadgen: interrupted; stopping the echo target and the proxy");
        drop(stack);
        return Ok(ExitCode::from(130));
    };
    measured.proxy_died = stack.proxy_exited();
    let label = stack.label.clone();
    // Stop the proxy and the echo target before writing anything (no orphans on any path).
    stack.stop();
    let record = record::assemble(args, &plan, &resources, &label, started_at, measured)?;

    if !args.no_record {
        let path = record::write(&args.results, &stamp, &record)?;
        report::write_hgrms(&path, &record::histograms(&record)?)?;
        // An agent's record is a part: only the merged record gets a summary row (and agents
        // on several hosts may share one results volume).
        if !args.segment.is_split() {
            report::append_summary(&args.results, &record, &path)?;
        }
        if !args.is_quiet() && !args.segment.is_split() {
            eprintln!("loadgen: record written to {}", path.display());
            if args.tag.is_none() {
                eprintln!(
                    "loadgen: an ad-hoc run (no --tag): its row went to {}, and `loadgen plot` draws one tagged sweep, so it is not part of the published comparison",
                    args.results.join(report::summary_file(&record)).display()
                );
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        report::print_summary(&record);
    }
    Ok(if record.outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        eprintln!("loadgen: run failed: {}", record.outcome);
        ExitCode::from(1)
    })
}
