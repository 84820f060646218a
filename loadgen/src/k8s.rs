//! `loadgen k8s-manifest`: one run's agents as a Kubernetes Indexed Job. Kubernetes already
//! schedules, restarts and indexes pods; this only writes the Job: pod I runs
//! `--segment I/K` (from `JOB_COMPLETION_INDEX`) with the run's settings and one shared
//! `--start-at`, and writes its record to a shared volume, where `loadgen merge` joins them.

use std::time::{Duration, SystemTime};

use anyhow::bail;
use proxy::config::parse_duration;
use serde_json::{json, Value};

use crate::agents::shared_agent_args;
use crate::cli::RunArgs;

/// Where each pod mounts the results volume.
const RESULTS_MOUNT: &str = "/results";

/// `loadgen k8s-manifest`'s settings: the run's own, plus where it runs.
#[derive(Debug, clap::Args)]
pub struct ManifestArgs {
    /// The run, as for a local run; --agents, --proxy and --echo are required.
    #[command(flatten)]
    pub run: RunArgs,

    /// The container image: one with `loadgen` on its PATH (built from this repository).
    #[arg(long, default_value = "loadgen:latest")]
    pub image: String,

    /// The Job's name [default: loadgen-c<conns>].
    #[arg(long)]
    pub name: Option<String>,

    /// The PersistentVolumeClaim (ReadWriteMany) every pod writes its record to, under
    /// /results/<name>/runs/.
    #[arg(long, default_value = "loadgen-results")]
    pub results_claim: String,

    /// With no --start-at: the shared start is this long after the manifest is printed (the
    /// Job must be applied, and its pods running, before then).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub start_in: Duration,
}

/// The Job, as YAML: JSON is YAML (1.2), so it is written by serde_json, under YAML comments
/// that say how to use it; `kubectl apply -f` reads either.
pub fn manifest(args: &ManifestArgs) -> anyhow::Result<String> {
    let job = job(args, SystemTime::now())?;
    let name = job["metadata"]["name"]
        .as_str()
        .unwrap_or("loadgen")
        .to_owned();
    let agents = job["spec"]["completions"].as_u64().unwrap_or(1);
    let mut out = format!(
        "# {agents} loadgen agents as an Indexed Job. Apply it with `kubectl apply -f`, before the\n\
         # shared start in the pods' --start-at; the nodes' clocks must agree (chrony/PTP). When it\n\
         # has completed, merge the agents' records from the results volume:\n\
         #   loadgen merge {RESULTS_MOUNT}/{name}/runs/*-agent-*-of-{agents}.json --results {RESULTS_MOUNT}/{name}\n"
    );
    out.push_str(&serde_json::to_string_pretty(&job)?);
    out.push('\n');
    Ok(out)
}

/// The Job object for `args`, with its shared start computed from `now`.
pub fn job(args: &ManifestArgs, now: SystemTime) -> anyhow::Result<Value> {
    let run = &args.run;
    let Some(agents) = run.agents else {
        bail!("--agents K is required: the Job runs K agent pods");
    };
    let Some(proxy) = run.proxy else {
        bail!("--proxy HOST:PORT is required: the address the agents reach the proxy (or its balancer) at");
    };
    if run.echo.is_empty() {
        bail!("--echo ADDR[,ADDR...] is required: an echo target the proxy can reach (e.g. `loadgen echo --listen 0.0.0.0:7` on a host of its own)");
    }
    if run.rates.len() > 1 {
        bail!("--rate takes one rate here: a Job is one run");
    }
    if run.segment.is_split() {
        bail!("--segment is set per pod by the Job; do not give it");
    }
    let start_at = run.start_at.unwrap_or(now + args.start_in);
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("loadgen-c{}", run.conns));
    let label = run.label.clone().unwrap_or_else(|| "external".into());
    let mut run = run.clone();
    run.rate = run.rates.first().copied();
    let mut container_args = vec![
        "--segment".to_owned(),
        format!("$(JOB_COMPLETION_INDEX)/{agents}"),
        "--proxy".to_owned(),
        proxy.to_string(),
        "--results".to_owned(),
        format!("{RESULTS_MOUNT}/{name}"),
        "--quiet".to_owned(),
    ];
    container_args.extend(shared_agent_args(&run, &label, &run.echo, agents, start_at));
    // Bounded: the shared start, the ramp's budget, the phases, and five minutes to spare.
    let deadline = start_at.duration_since(now).unwrap_or_default()
        + crate::run::ramp_budget(&run)
        + run.idle_hold
        + run.warmup
        + run.duration
        + Duration::from_secs(300);
    let labels = json!({ "app.kubernetes.io/name": "loadgen", "app.kubernetes.io/instance": name });
    Ok(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name, "labels": labels.clone() },
        "spec": {
            "completionMode": "Indexed",
            "completions": agents,
            "parallelism": agents,
            // An agent that fails cannot rejoin a shared window: the run is over.
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline.as_secs(),
            "template": {
                "metadata": { "labels": labels.clone() },
                "spec": {
                    "restartPolicy": "Never",
                    // One agent per node where the nodes allow: agents sharing a node share
                    // its cores and its ephemeral ports.
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": { "matchLabels": labels },
                    }],
                    "containers": [{
                        "name": "agent",
                        "image": args.image,
                        "command": ["loadgen"],
                        "args": container_args,
                        "volumeMounts": [{ "name": "results", "mountPath": RESULTS_MOUNT }],
                    }],
                    "volumes": [{
                        "name": "results",
                        "persistentVolumeClaim": { "claimName": args.results_claim },
                    }],
                }
            }
        }
    }))
}
