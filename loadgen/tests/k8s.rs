//! `loadgen k8s-manifest` parsed back into Kubernetes' own Job type: the Job is not run here
//! (no cluster), so its fields are what is checked.
#![allow(missing_docs)]

use std::process::Command;

use k8s_openapi::api::batch::v1::Job;

fn manifest(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("k8s-manifest")
        .args(args)
        .output()
        .expect("run loadgen k8s-manifest")
}

fn arg_after<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
    &args[at + 1]
}

#[test]
fn the_manifest_is_an_indexed_job_of_one_agent_per_segment() {
    let output = manifest(&[
        "--conns",
        "200000",
        "--agents",
        "4",
        "--proxy",
        "10.0.0.5:1080",
        "--echo",
        "10.0.0.6:7,10.0.0.6:8",
        "--rate",
        "10000",
        "--duration",
        "30s",
        "--image",
        "registry.example/loadgen:1",
        "--start-at",
        "2031-01-02T03:04:05Z",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    let job: Job = serde_yaml::from_str(&text).expect("a valid Job");
    assert_eq!(job.metadata.name.as_deref(), Some("loadgen-c200000"));
    let spec = job.spec.expect("spec");
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    assert_eq!(spec.completions, Some(4));
    assert_eq!(spec.parallelism, Some(4));
    assert_eq!(spec.backoff_limit, Some(0));
    assert!(spec.active_deadline_seconds.is_some_and(|s| s > 30));
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.containers.len(), 1);
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/loadgen:1")
    );
    assert_eq!(
        container.command.as_deref(),
        Some(&["loadgen".to_owned()][..])
    );
    let args = container.args.clone().expect("args");
    // Each pod its own segment, from the index Kubernetes sets; one shared start for all.
    assert_eq!(arg_after(&args, "--segment"), "$(JOB_COMPLETION_INDEX)/4");
    assert_eq!(arg_after(&args, "--conns"), "200000");
    assert_eq!(arg_after(&args, "--rate"), "10000");
    assert_eq!(arg_after(&args, "--proxy"), "10.0.0.5:1080");
    assert_eq!(arg_after(&args, "--echo"), "10.0.0.6:7,10.0.0.6:8");
    assert_eq!(arg_after(&args, "--duration"), "30000000us");
    let start: f64 = arg_after(&args, "--start-at")
        .parse()
        .expect("Unix seconds");
    assert_eq!(start, 1_925_089_445.0, "2031-01-02T03:04:05Z");
    // Records on the shared volume, where the printed merge command reads them.
    assert_eq!(arg_after(&args, "--results"), "/results/loadgen-c200000");
    let mounts = container.volume_mounts.clone().expect("mounts");
    assert_eq!(mounts[0].mount_path, "/results");
    let volumes = pod.volumes.expect("volumes");
    let claim = volumes[0]
        .persistent_volume_claim
        .as_ref()
        .expect("a claim");
    assert_eq!(claim.claim_name, "loadgen-results");
    assert!(text.contains("loadgen merge /results/loadgen-c200000/runs/*-agent-*-of-4.json"));

    // What each pod runs parses as a loadgen run (index 2 substituted as Kubernetes would).
    let substituted: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(JOB_COMPLETION_INDEX)", "2"))
        .collect();
    let help = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(&substituted)
        .arg("--help")
        .output()
        .expect("run loadgen");
    assert!(
        help.status.success(),
        "{}",
        String::from_utf8_lossy(&help.stderr)
    );
}

#[test]
fn a_manifest_without_what_the_pods_need_is_refused() {
    for (args, says) in [
        (
            &[
                "--conns",
                "1000",
                "--proxy",
                "10.0.0.5:1080",
                "--echo",
                "10.0.0.6:7",
            ][..],
            "--agents",
        ),
        (
            &["--conns", "1000", "--agents", "2", "--echo", "10.0.0.6:7"][..],
            "--proxy",
        ),
        (
            &[
                "--conns",
                "1000",
                "--agents",
                "2",
                "--proxy",
                "10.0.0.5:1080",
            ][..],
            "--echo",
        ),
    ] {
        let output = manifest(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains(says), "{args:?}: {message}");
    }
}
