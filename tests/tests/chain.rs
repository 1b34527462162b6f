//! Chained-steps workflows against a real nats-server: a run's value, its
//! record's progress while it runs, and its step checkpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use jetq::broker::Broker;
use jetq::workflow::{Next, StepRecord, Workflow};
use jetq::{Args, Client, Meta, Progress, State, Status, TaskError, Worker};
use jetq_tests::{server_and_broker, wait_for_record, WAIT};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

/// Holds the second step until the test has seen the run's progress.
#[derive(Clone)]
struct Gate(Arc<Semaphore>);

#[derive(Deserialize)]
struct Who {
    user: String,
}

async fn add_one(Args(n): Args<u32>) -> Result<u32, TaskError> {
    Ok(n + 1)
}

async fn double(State(gate): State<Gate>, Args(n): Args<u32>) -> Result<Next<u32>, TaskError> {
    gate.0.acquire().await.unwrap().forget();
    Ok(Next::Continue(n * 2))
}

async fn describe(Meta(who): Meta<Who>, Args(n): Args<u32>) -> Result<String, TaskError> {
    Ok(format!("{} got {n}", who.user))
}

fn progress(current: u64, step: &str) -> Option<Progress> {
    Some(Progress {
        current,
        total: Some(3),
        message: Some(step.to_owned()),
    })
}

#[tokio::test]
async fn a_chained_run_succeeds_with_its_last_steps_value_and_shows_its_progress() {
    let (_server, broker) = server_and_broker().await;
    let gate = Gate(Arc::new(Semaphore::new(0)));
    let worker = Worker::builder(broker.clone())
        .state(gate.clone())
        .workflow(
            Workflow::new("chain.pipeline")
                .step("add_one", add_one)
                .step("double", double)
                .step("describe", describe),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("chain.pipeline")
        .id("chain-nats")
        .args(&20)
        .metadata("user", "prryplatypus")
        .publish()
        .await
        .unwrap();
    // While the second step runs, the record says so.
    let running = wait_for_record(&broker, "chain-nats", |r| {
        r.progress == progress(1, "double")
    })
    .await;
    assert_eq!(running.status, Status::Running);
    gate.0.add_permits(1);
    assert_eq!(
        handle.result::<String>(WAIT).await.unwrap(),
        "prryplatypus got 42"
    );
    let rec = handle.record().await.unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.progress, progress(3, "describe"));
    // One checkpoint per step, in order, and no fourth.
    let mut steps = Vec::new();
    for position in 0..4 {
        if let Some(bytes) = broker.get_step("chain-nats", position).await.unwrap() {
            let step: StepRecord = serde_json::from_slice(&bytes).unwrap();
            steps.push((step.name, step.value));
        }
    }
    assert_eq!(
        steps,
        [
            (
                "add_one".to_owned(),
                Some(json!({"value": 21, "then": "continue"}))
            ),
            (
                "double".to_owned(),
                Some(json!({"value": 42, "then": "continue"}))
            ),
            (
                "describe".to_owned(),
                Some(json!({"value": "prryplatypus got 42", "then": "continue"}))
            ),
        ]
    );
    worker.shutdown().await.unwrap();
}
