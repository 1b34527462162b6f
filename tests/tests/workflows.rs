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

/// The record of `id` once `done` holds for it (watched, not polled).
async fn until(
    broker: &jetq_nats::NatsBroker,
    id: &str,
    done: impl Fn(&jetq::Record) -> bool,
) -> jetq::Record {
    use futures_util::StreamExt;
    let mut watch = broker.watch_record(id).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while let Some(entry) = watch.next().await {
            let record = jetq::Record::decode(id, &entry.unwrap().value).unwrap();
            if done(&record) {
                return record;
            }
        }
        panic!("the watch of {id} ended");
    })
    .await
    .unwrap_or_else(|_| panic!("record {id} never got there"))
}

/// Wait until the queue `default` has no delivery waiting for its
/// acknowledgement (the consumer's state, read until it holds).
async fn no_ack_pending(server: &NatsServer) {
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stream = js.get_stream("JETQ_TASKS").await.unwrap();
        let consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer("jetq-default").await.unwrap();
        let info = consumer.cached_info().clone();
        if info.num_ack_pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries still unacknowledged: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count_lines(logs: &[&Path], line: &str) -> usize {
    logs.iter()
        .map(|log| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter(|l| *l == line)
                .count()
        })
        .sum()
}

#[tokio::test]
async fn a_checkout_killed_in_its_durable_sleep_is_resumed_by_another_worker_and_charges_once() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log1, log2) = (dir.path().join("first.log"), dir.path().join("second.log"));
    let broker = connect(&server).await;
    let client = Client::new(broker.clone());
    let mut first = worker_logging_to(&server, "co-1", &log1);
    let handle = client
        .start_workflow("demo.checkout", &json!({"order": "o1"}))
        .await
        .unwrap();
    let id = handle.workflow_id().to_owned();
    let status: Option<String> = client.get_event(&id, "status", WAIT).await.unwrap();
    assert_eq!(status.as_deref(), Some("reserved"));
    // Waiting for the payment holds no worker: the run is suspended.
    let waiting = until(&broker, &id, |r| r.status == Status::Suspended).await;
    assert_eq!(waiting.waiting.as_deref(), Some("recv:payment"));
    client
        .send(&id, json!({"amount": 42}))
        .topic("payment")
        .await
        .unwrap();
    // Charged, then asleep for 5 s (suspended): kill the worker now.
    let asleep = until(&broker, &id, |r| {
        r.status == Status::Suspended && r.waiting.as_deref() == Some("sleep")
    })
    .await;
    assert_eq!(count_lines(&[&log1], "charging o1"), 1);
    // The record says `suspended` before the wake-up is scheduled and the
    // message acknowledged: kill once the suspension is complete, so that
    // the kill falls in the sleep itself (a kill inside the suspension is
    // an attempt cut short, and counted).
    no_ack_pending(&server).await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let _second = worker_logging_to(&server, "co-2", &log2);
    let rec = handle.task_handle().wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded, "{rec:?}");
    assert_eq!(rec.value, Some(json!({"paid": 42})));
    assert_eq!(rec.worker.as_deref(), Some("co-2"), "{rec:?}");
    assert_eq!(rec.attempts, 1, "suspensions are not attempts: {rec:?}");
    let wake = asleep.next_attempt_at.unwrap();
    let finished = rec.finished_at.unwrap();
    assert!(finished >= wake, "the sleep was not cut short: {rec:?}");
    // Only the time left was waited after the kill: the run ended at its
    // first wake-up time, not after another 5 s sleep.
    assert!(
        finished < wake + jetq::time::Duration::seconds(4),
        "the sleep was not started over: woke {wake}, finished {finished}"
    );
    let status: Option<String> = client.get_event(&id, "status", WAIT).await.unwrap();
    assert_eq!(status.as_deref(), Some("shipped"));
    assert_eq!(
        count_lines(&[&log1, &log2], "charging o1"),
        1,
        "the charge ran once across both workers"
    );
    let events = client.get_events(&id).await.unwrap();
    assert_eq!(events.get("status"), Some(&json!("shipped")), "{events:?}");
}

#[tokio::test]
async fn a_checkout_whose_payment_arrives_while_no_worker_runs_is_paid_once() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (log1, log2) = (dir.path().join("first.log"), dir.path().join("second.log"));
    let broker = connect(&server).await;
    let client = Client::new(broker.clone());
    let mut first = worker_logging_to(&server, "co-r1", &log1);
    let handle = client
        .workflow("demo.checkout")
        .id("co-recv")
        .args(&json!({"order": "o2"}))
        .publish()
        .await
        .unwrap();
    until(&broker, "co-recv", |r| r.status == Status::Suspended).await;
    // Killed in its recv; the payment is sent (twice, with one key) while
    // no worker runs: it waits in the mailbox, and the wake-up fires.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    for _ in 0..2 {
        client
            .send("co-recv", json!({"amount": 7}))
            .topic("payment")
            .key("pay-1")
            .await
            .unwrap();
    }
    let _second = worker_logging_to(&server, "co-r2", &log2);
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded, "{rec:?}");
    assert_eq!(rec.value, Some(json!({"paid": 7})));
    assert_eq!(count_lines(&[&log1, &log2], "charging o2"), 1);
    // One message in the mailbox: the key sent it once.
    let first_mail = broker
        .next_mail("co-recv", Some("payment"), 0)
        .await
        .unwrap()
        .unwrap();
    assert!(broker
        .next_mail("co-recv", Some("payment"), first_mail.sequence + 1)
        .await
        .unwrap()
        .is_none());
    // Sending to a run that does not exist is an error.
    let err = client.send("co-none", json!({})).await.unwrap_err();
    assert_eq!(err.kind(), jetq::ErrorKind::NotFound);
}

/// A child that doubles its input.
async fn double(jetq::Args(n): jetq::Args<i64>) -> Result<i64, jetq::TaskError> {
    Ok(n * 2)
}

/// Starts a child, sleeps long enough to suspend, then joins the child.
async fn parent(
    wf: jetq::workflow::WorkflowContext,
    jetq::Args(n): jetq::Args<i64>,
) -> Result<String, jetq::TaskError> {
    let child = wf.start_child("wf.double", n).await?;
    wf.sleep(jetq::workflow::SUSPEND_AFTER + Duration::from_millis(500))
        .await?;
    let v: i64 = wf.join(&child, Duration::from_secs(60)).await?;
    Ok(format!("{} gave {v}", child.id()))
}

/// Waits in a recv for a long time (to be cancelled).
async fn patient(wf: jetq::workflow::WorkflowContext) -> Result<Option<u32>, jetq::TaskError> {
    wf.recv::<u32>(Some("never"), Duration::from_secs(600))
        .await
}

#[tokio::test]
async fn children_retrieval_and_cancellation_of_a_suspended_run_on_nats() {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let client = Client::new(broker.clone());
    // Unknown id: NotFound at once; the waiting variant returns once started.
    let err = client.retrieve_workflow("wf-par").await.unwrap_err();
    assert_eq!(err.kind(), jetq::ErrorKind::NotFound);
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.retrieve_workflow_created("wf-par", WAIT).await })
    };
    let worker = jetq::Worker::builder(broker.clone())
        .task("wf.double", double)
        .task("wf.parent", parent)
        .task("wf.patient", patient)
        .spawn()
        .unwrap();
    let run = client
        .workflow("wf.parent")
        .id("wf-par")
        .args(&21)
        .metadata("tenant", "acme")
        .publish()
        .await
        .unwrap();
    let found = waiting.await.unwrap().unwrap();
    assert_eq!(found.workflow_id(), "wf-par");
    assert_eq!(
        found.result::<String>(WAIT).await.unwrap(),
        "wf-par-c0 gave 42"
    );
    assert_eq!(run.record().await.unwrap().attempts, 1);
    // The child: its derived id, the parent's metadata, run once.
    let child = client.record("wf-par-c0").await.unwrap();
    assert_eq!(child.status, Status::Succeeded);
    assert_eq!(child.metadata.get("tenant"), Some(&json!("acme")));
    assert_eq!(child.attempts, 1);
    let names: Vec<String> = client
        .steps("wf-par")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        [
            "start:wf.double",
            "sleep",
            "deadline:join:wf-par-c0",
            "join:wf-par-c0"
        ]
    );

    // A suspended run is cancelled at once; its wake-up never runs it.
    let patient = client
        .workflow("wf.patient")
        .id("wf-pat")
        .publish()
        .await
        .unwrap();
    until(&broker, "wf-pat", |r| r.status == Status::Suspended).await;
    let cancelled = client.cancel("wf-pat").await.unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    assert_eq!(patient.wait(WAIT).await.unwrap().status, Status::Cancelled);
    assert!(
        !broker.wake("wf-pat").await.unwrap(),
        "the wake-up schedule was removed"
    );
    worker.shutdown().await.unwrap();
}

/// Sleeps long enough to suspend, then returns how many attempts it took.
async fn napper(wf: jetq::workflow::WorkflowContext) -> Result<u32, jetq::TaskError> {
    wf.sleep(Duration::from_secs(4)).await?;
    Ok(wf.context().attempt())
}

/// Waits for one message on topic `go`.
async fn listener(wf: jetq::workflow::WorkflowContext) -> Result<Option<u32>, jetq::TaskError> {
    wf.recv::<u32>(Some("go"), Duration::from_secs(120)).await
}

#[tokio::test]
async fn suspended_workflows_survive_a_server_restart() {
    let mut server = NatsServer::start();
    let broker = connect(&server).await;
    let client = Client::new(broker.clone());
    let worker = jetq::Worker::builder(broker.clone())
        .task("wf.napper", napper)
        .task("wf.listener", listener)
        .spawn()
        .unwrap();
    let nap = client
        .workflow("wf.napper")
        .id("wf-nap")
        .publish()
        .await
        .unwrap();
    let listen = client
        .workflow("wf.listener")
        .id("wf-listen")
        .publish()
        .await
        .unwrap();
    until(&broker, "wf-nap", |r| r.status == Status::Suspended).await;
    until(&broker, "wf-listen", |r| r.status == Status::Suspended).await;
    // Both wait on the server alone (a schedule, a record): restart it.
    server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    // The client may still be reconnecting: a transient error is retried,
    // as a caller would.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match client.send("wf-listen", 7).topic("go").await {
            Ok(_) => break,
            Err(e)
                if matches!(e.kind(), jetq::ErrorKind::Broker | jetq::ErrorKind::Timeout)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("sending after the restart: {e}"),
        }
    }
    assert_eq!(listen.result::<Option<u32>>(WAIT).await.unwrap(), Some(7));
    assert_eq!(
        nap.result::<u32>(WAIT).await.unwrap(),
        1,
        "woken by its schedule after the restart, without another attempt"
    );
    worker.shutdown().await.unwrap();
    drop(server);
}
