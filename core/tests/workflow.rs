//! Durable workflow functions on the in-memory broker: steps run once
//! across attempts, checkpoints win races, nondeterminism is caught, events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jetq::broker::Broker;
use jetq::memory::MemoryBroker;
use jetq::workflow::{StepRecord, WorkflowContext};
use jetq::{Args, Client, RetryPolicy, State, Status, Task, TaskError, Worker};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
struct Runs {
    reserve: Arc<AtomicU32>,
    charge: Arc<AtomicU32>,
}

/// Reserve, then charge; the charge fails (retryably) at its first try.
async fn checkout(
    wf: WorkflowContext,
    State(runs): State<Runs>,
    Args(order): Args<String>,
) -> Result<String, TaskError> {
    let reservation: String = wf
        .step("reserve", async {
            runs.reserve.fetch_add(1, Ordering::SeqCst);
            Ok::<_, TaskError>(format!("r-{order}"))
        })
        .await?;
    wf.set_event("status", "reserved").await?;
    let receipt: String = wf
        .step("charge", async {
            if runs.charge.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(TaskError::new("payment service unavailable"));
            }
            Ok(format!("paid {reservation}"))
        })
        .await?;
    wf.set_event("status", "paid").await?;
    Ok(receipt)
}

fn fast() -> RetryPolicy {
    RetryPolicy::new(3)
        .base(Duration::from_millis(5))
        .max(Duration::from_millis(10))
}

#[tokio::test]
async fn a_finished_step_never_runs_again_and_a_failed_one_does() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .register(Task::new("checkout", checkout).retry_policy(fast()))
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("checkout")
        .id("wf-1")
        .args(&"o1")
        .publish()
        .await
        .unwrap();
    assert_eq!(handle.result::<String>(WAIT).await.unwrap(), "paid r-o1");
    assert_eq!(handle.record().await.unwrap().attempts, 2);
    assert_eq!(runs.reserve.load(Ordering::SeqCst), 1, "replayed, not run");
    assert_eq!(
        runs.charge.load(Ordering::SeqCst),
        2,
        "not checkpointed: run again"
    );
    // The step log: what ran at each position.
    let first: StepRecord =
        serde_json::from_slice(&broker.get_step("wf-1", 0).await.unwrap().unwrap()).unwrap();
    assert_eq!((first.name.as_str(), first.attempt), ("reserve", 1));
    assert_eq!(first.value, Some(serde_json::json!("r-o1")));
    // Setting an event is a step too: replayed, not set again.
    let event: StepRecord =
        serde_json::from_slice(&broker.get_step("wf-1", 1).await.unwrap().unwrap()).unwrap();
    assert_eq!(
        (event.name.as_str(), event.attempt),
        ("set_event:status", 1)
    );
    let second: StepRecord =
        serde_json::from_slice(&broker.get_step("wf-1", 2).await.unwrap().unwrap()).unwrap();
    assert_eq!((second.name.as_str(), second.attempt), ("charge", 2));
    assert!(broker.get_step("wf-1", 3).await.unwrap().is_some());
    assert!(broker.get_step("wf-1", 4).await.unwrap().is_none());
    let status: Option<String> = client.get_event("wf-1", "status", WAIT).await.unwrap();
    assert_eq!(status.as_deref(), Some("paid"));
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_checkpoint_written_first_wins_and_a_changed_step_is_nondeterministic() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    // Another attempt checkpointed `reserve` already (a stale attempt that
    // raced this one): its value is the one this attempt goes on with.
    let theirs = serde_json::json!({
        "v": 1, "position": 0, "name": "reserve", "value": "r-theirs",
        "attempt": 1, "at": "2026-01-01T00:00:00Z"
    });
    broker
        .create_step("wf-2", 0, Bytes::from(theirs.to_string()))
        .await
        .unwrap();
    let other = serde_json::json!({
        "v": 1, "position": 0, "name": "refund", "value": null,
        "attempt": 1, "at": "2026-01-01T00:00:00Z"
    });
    broker
        .create_step("wf-3", 0, Bytes::from(other.to_string()))
        .await
        .unwrap();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .register(Task::new("checkout", checkout).retry_policy(fast()))
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("checkout")
        .id("wf-2")
        .args(&"o2")
        .publish()
        .await
        .unwrap();
    assert_eq!(
        handle.result::<String>(WAIT).await.unwrap(),
        "paid r-theirs"
    );
    assert_eq!(runs.reserve.load(Ordering::SeqCst), 0);
    let handle = client
        .task("checkout")
        .id("wf-3")
        .args(&"o3")
        .publish()
        .await
        .unwrap();
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    let error = rec.error.unwrap();
    assert_eq!(error.kind, "nondeterministic");
    assert!(
        error.message.contains("`reserve`") && error.message.contains("`refund`"),
        "{}",
        error.message
    );
    assert_eq!(rec.attempts, 1, "nondeterminism is permanent");
    w.shutdown().await.unwrap();
}

/// A permanent step error is checkpointed: the workflow handles it, and a
/// later attempt gets the same error back without running the step.
async fn tolerant(wf: WorkflowContext, State(runs): State<Runs>) -> Result<String, TaskError> {
    let charged: Result<String, TaskError> = wf
        .step("charge", async {
            runs.charge.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(TaskError::permanent("card declined").with_kind("declined"))
        })
        .await;
    let note = match charged {
        Ok(_) => "charged".to_owned(),
        Err(e) => format!("{}: {}", e.kind(), e.message()),
    };
    // Fails once after the checkpoint, so that a second attempt replays.
    wf.step("notify", async {
        if runs.reserve.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(TaskError::new("mail server down"));
        }
        Ok(())
    })
    .await?;
    Ok(note)
}

#[tokio::test]
async fn a_permanent_step_error_is_checkpointed_and_replayed() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .register(Task::new("tolerant", tolerant).retry_policy(fast()))
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    let handle = client.task("tolerant").publish().await.unwrap();
    assert_eq!(
        handle.result::<String>(WAIT).await.unwrap(),
        "declined: card declined"
    );
    assert_eq!(runs.charge.load(Ordering::SeqCst), 1);
    assert_eq!(runs.reserve.load(Ordering::SeqCst), 2);
    w.shutdown().await.unwrap();
}

async fn eventful(wf: WorkflowContext, Args(go): Args<bool>) -> Result<(), TaskError> {
    wf.set_event("stage", "started").await?;
    if go {
        wf.set_event("stage", "done").await?;
    }
    Ok(())
}

#[tokio::test]
async fn events_are_readable_at_once_waited_for_and_time_out() {
    let broker = MemoryBroker::new();
    let client = Client::new(broker.clone());
    // Nothing set: a wait times out with None.
    let none: Option<String> = client
        .get_event("ev-1", "stage", Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(none, None);
    // A wait begun before the workflow runs returns the first value set.
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.get_event::<String>("ev-1", "stage", WAIT).await })
    };
    tokio::task::yield_now().await;
    let w = Worker::builder(broker.clone())
        .task("eventful", eventful)
        .spawn()
        .unwrap();
    let handle = client
        .task("eventful")
        .id("ev-1")
        .args(&true)
        .publish()
        .await
        .unwrap();
    handle.wait(WAIT).await.unwrap();
    let first = waiter.await.unwrap().unwrap();
    assert!(
        matches!(first.as_deref(), Some("started") | Some("done")),
        "{first:?}"
    );
    // Once set, the latest value at once.
    let now: Option<String> = client.get_event("ev-1", "stage", WAIT).await.unwrap();
    assert_eq!(now.as_deref(), Some("done"));
    // Event keys follow the id rule.
    let err = client
        .get_event::<String>("ev-1", "a.b", WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), jetq::ErrorKind::InvalidName);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn start_retrieve_and_the_same_id_starts_once() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let client = Client::new(broker.clone());
    // Unknown: an error at once; a wait for it returns once it is started.
    let err = client.retrieve_workflow("wf-s").await.unwrap_err();
    assert_eq!(err.kind(), jetq::ErrorKind::NotFound);
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.retrieve_workflow_created("wf-s", WAIT).await })
    };
    let timed_out = client
        .retrieve_workflow_created("wf-never", Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(timed_out.kind(), jetq::ErrorKind::Timeout);
    // Started with no worker running: durably stored, found by id at once.
    let first = client
        .workflow("checkout")
        .id("wf-s")
        .args(&"o9")
        .publish()
        .await
        .unwrap();
    let found = client.retrieve_workflow("wf-s").await.unwrap();
    assert_eq!(found.workflow_id(), "wf-s");
    assert_eq!(found.status().await.unwrap(), Status::Pending);
    assert_eq!(waiting.await.unwrap().unwrap().workflow_id(), "wf-s");
    // The same id again: the same run.
    let again = client
        .workflow("checkout")
        .id("wf-s")
        .args(&"o9")
        .publish()
        .await
        .unwrap();
    assert_eq!(again.id(), first.id());
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .register(Task::new("checkout", checkout).retry_policy(fast()))
        .spawn()
        .unwrap();
    assert_eq!(found.result::<String>(WAIT).await.unwrap(), "paid r-o9");
    assert_eq!(runs.reserve.load(Ordering::SeqCst), 1, "one run");
    let started = client.start_workflow("checkout", "o10").await.unwrap();
    assert_eq!(started.result::<String>(WAIT).await.unwrap(), "paid r-o10");
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_step_retries_by_its_own_policy_within_one_attempt() {
    async fn flaky_step(wf: WorkflowContext, State(runs): State<Runs>) -> Result<u32, TaskError> {
        let policy = RetryPolicy::new(3).base(Duration::from_millis(1));
        wf.step_retrying("flaky", &policy, || async {
            let n = runs.charge.fetch_add(1, Ordering::SeqCst) + 1;
            if n < 3 {
                Err(TaskError::new(format!("try {n} failed")))
            } else {
                Ok(n)
            }
        })
        .await
    }
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("flaky", flaky_step)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client.task("flaky").id("fl-1").publish().await.unwrap();
    assert_eq!(handle.result::<u32>(WAIT).await.unwrap(), 3);
    assert_eq!(handle.record().await.unwrap().attempts, 1, "one attempt");
    assert_eq!(runs.charge.load(Ordering::SeqCst), 3);
    w.shutdown().await.unwrap();
}
