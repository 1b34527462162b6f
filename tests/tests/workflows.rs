//! Durable workflow functions against a real nats-server, with the demo
//! worker's workflows run as separate processes and killed mid-step.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use jetq::broker::Broker;
use jetq::{Client, Status};
use jetq_tests::{connect, demo_worker, workspace_bin, ChildProcess, NatsServer, WAIT};
use serde_json::json;

#[tokio::test]
async fn demo_pipeline_chains_its_steps_and_reads_the_user_from_metadata() {
    let server = NatsServer::start();
    let _worker = demo_worker(&server);
    let broker = connect(&server).await;
    let client = Client::new(broker.clone());
    let handle = client
        .task("demo.pipeline")
        .args(&20)
        .metadata("user", "prryplatypus")
        .publish()
        .await
        .unwrap();
    let value: String = handle.result(WAIT).await.unwrap();
    assert!(
        value.contains("42") && value.contains("prryplatypus"),
        "{value}"
    );
    // Three checkpoints, in order, and no fourth.
    let mut names = Vec::new();
    for position in 0..4 {
        match broker.get_step(handle.id(), position).await.unwrap() {
            Some(bytes) => {
                let step: jetq::workflow::StepRecord = serde_json::from_slice(&bytes).unwrap();
                names.push((step.name, step.value));
            }
            None => break,
        }
    }
    assert_eq!(
        names,
        [
            ("add_one".to_owned(), Some(json!(21))),
            ("double".to_owned(), Some(json!(42))),
            ("describe".to_owned(), Some(json!(value))),
        ]
    );
}

/// `jetq-demo-worker` with its stdout in `log`.
fn worker_logging_to(server: &NatsServer, name: &str, log: &Path) -> ChildProcess {
    let file = std::fs::File::create(log).unwrap();
    let child = std::process::Command::new(workspace_bin("jetq-demo-worker"))
        .args(["--nats", &server.url(), "--name", name])
        .args(["--ack-wait", "1", "--concurrency", "1"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(file)
        .spawn()
        .unwrap();
    ChildProcess(child)
}

/// Wait until `log` has a line `line`.
async fn wait_for_line(log: &Path, line: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line {line:?} in the worker's output within {WAIT:?}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_workflow_whose_worker_is_killed_mid_step_resumes_without_rerunning_finished_steps() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log1, log2) = (dir.path().join("first.log"), dir.path().join("second.log"));
    let broker = connect(&server).await;
    let client = Client::new(broker.clone());
    let mut first = worker_logging_to(&server, "wf-crash-1", &log1);
    let handle = client
        .task("demo.steps")
        .id("wf-kill")
        .args(&json!({"count": 4, "ms": 300}))
        .publish()
        .await
        .unwrap();
    // Step 1 has started, so step 0 is checkpointed: kill the worker (no
    // release, no record write) while step 1 sleeps.
    wait_for_line(&log1, "step 1 of wf-kill").await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert!(broker.get_step("wf-kill", 0).await.unwrap().is_some());
    let _second = worker_logging_to(&server, "wf-crash-2", &log2);
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded, "{rec:?}");
    assert_eq!(rec.value, Some(json!(4)));
    assert_eq!(rec.attempts, 2, "{rec:?}");
    assert_eq!(rec.worker.as_deref(), Some("wf-crash-2"));
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&log1).unwrap(),
        std::fs::read_to_string(&log2).unwrap()
    );
    let runs = |i: u32| {
        both.lines()
            .filter(|l| *l == format!("step {i} of wf-kill"))
            .count()
    };
    assert_eq!(runs(0), 1, "a finished step never runs again:\n{both}");
    assert_eq!(runs(1), 2, "the step cut short runs again:\n{both}");
    assert_eq!((runs(2), runs(3)), (1, 1), "{both}");
}
