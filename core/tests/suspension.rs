//! Workflows that wait without holding a worker, on the in-memory broker:
//! durable sleep, `recv` with topics and timeouts, `send`, early wake-ups,
//! cancellation of a suspended run, forged wake-up messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use jetq::broker::{Broker, OutgoingRequest};
use jetq::memory::MemoryBroker;
use jetq::workflow::{WorkflowContext, SUSPEND_AFTER};
use jetq::{Args, Client, Record, Request, State, Status, TaskError, Worker};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Default)]
struct Runs {
    before: Arc<AtomicU32>,
    after: Arc<AtomicU32>,
}

/// A step, a durable sleep of `secs` seconds, a step.
async fn napper(
    wf: WorkflowContext,
    State(runs): State<Runs>,
    Args(secs): Args<u64>,
) -> Result<u32, TaskError> {
    wf.step("before", async {
        Ok::<_, TaskError>(runs.before.fetch_add(1, Ordering::SeqCst))
    })
    .await?;
    wf.sleep(Duration::from_secs(secs)).await?;
    wf.step("after", async {
        Ok::<_, TaskError>(runs.after.fetch_add(1, Ordering::SeqCst))
    })
    .await?;
    Ok(wf.context().attempt())
}

async fn quick() -> Result<&'static str, TaskError> {
    Ok("quick")
}

/// The record of `id` once `done` holds for it (watched, not polled).
async fn until(broker: &MemoryBroker, id: &str, done: impl Fn(&Record) -> bool) -> Record {
    let mut watch = broker.watch_record(id).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while let Some(entry) = watch.next().await {
            let record = Record::decode(id, &entry.unwrap().value).unwrap();
            if done(&record) {
                return record;
            }
        }
        panic!("the watch of {id} ended");
    })
    .await
    .expect("the record never got there")
}

#[tokio::test]
async fn a_long_sleep_suspends_frees_the_slot_and_resumes_without_an_attempt() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .concurrency(1)
        .state(runs.clone())
        .task("napper", napper)
        .task("quick", quick)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let started = Instant::now();
    let secs = SUSPEND_AFTER.as_secs() + 2;
    let nap = client
        .task("napper")
        .id("nap-1")
        .args(&secs)
        .publish()
        .await
        .unwrap();
    let suspended = until(&broker, "nap-1", |r| r.status == Status::Suspended).await;
    assert_eq!(suspended.waiting.as_deref(), Some("sleep"));
    assert!(suspended.resume.is_some(), "{suspended:?}");
    assert!(suspended.next_attempt_at.is_some(), "{suspended:?}");
    assert_eq!(suspended.attempts, 1);

    // The only slot is free while it sleeps: another task runs.
    let q = client.task("quick").publish().await.unwrap();
    assert_eq!(q.result::<String>(WAIT).await.unwrap(), "quick");
    assert_eq!(
        nap.status().await.unwrap(),
        Status::Suspended,
        "still asleep"
    );

    // A wake-up message with another token is dropped; the record keeps its own.
    let mut forged = Request::new("napper");
    forged.id = "nap-1".to_owned();
    forged.set_args(&secs).unwrap();
    forged.resume = Some("forged".to_owned());
    let mut out = OutgoingRequest::new(
        "nap-1",
        "default",
        "napper",
        Bytes::from(forged.to_json().unwrap()),
    );
    out.dedup_key = Some(Request::resume_dedup_key("nap-1", "forged"));
    broker.publish(out).await.unwrap();

    // Resumed when due, by replay: the first step is not run again, and the
    // resumption is not an attempt.
    assert_eq!(nap.result::<u32>(WAIT).await.unwrap(), 1, "attempt 1");
    assert!(started.elapsed() >= Duration::from_secs(secs));
    assert_eq!(runs.before.load(Ordering::SeqCst), 1);
    assert_eq!(runs.after.load(Ordering::SeqCst), 1);
    let record = nap.record().await.unwrap();
    assert_eq!(record.attempts, 1);
    assert_eq!(record.resume, None);
    assert_eq!(record.waiting, None);
    w.shutdown().await.unwrap();
    assert_eq!(broker.unsettled(), 0, "every message settled");
}

/// Two messages on topic `t`, then one without a topic within a second.
async fn inbox(wf: WorkflowContext) -> Result<Vec<Option<String>>, TaskError> {
    let a = wf
        .recv::<String>(Some("t"), Duration::from_secs(60))
        .await?;
    wf.set_event("got", &a).await?;
    let b = wf
        .recv::<String>(Some("t"), Duration::from_secs(60))
        .await?;
    let c = wf.recv::<String>(None, Duration::from_millis(300)).await?;
    Ok(vec![a, b, c])
}

#[tokio::test]
async fn recv_takes_messages_in_order_once_wakes_early_and_times_out() {
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .task("inbox", inbox)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    // Nothing to send to yet.
    let err = client.send("box-1", "early").await.unwrap_err();
    assert_eq!(err.kind(), jetq::ErrorKind::NotFound);

    let started = Instant::now();
    let run = client.task("inbox").id("box-1").publish().await.unwrap();
    let first = until(&broker, "box-1", |r| r.status == Status::Suspended).await;
    assert_eq!(first.waiting.as_deref(), Some("recv:t"));
    // A message on another topic does not wake it.
    client.send("box-1", "elsewhere").topic("u").await.unwrap();
    let seq = client
        .send("box-1", "one")
        .topic("t")
        .key("k1")
        .await
        .unwrap();
    // The same key sends once.
    let again = client
        .send("box-1", "one")
        .topic("t")
        .key("k1")
        .await
        .unwrap();
    assert_eq!(again, seq);
    let got: Option<Option<String>> = client.get_event("box-1", "got", WAIT).await.unwrap();
    assert_eq!(got, Some(Some("one".to_owned())));
    until(&broker, "box-1", |r| {
        r.status == Status::Suspended && r.resume != first.resume
    })
    .await;
    client.send("box-1", "two").topic("t").await.unwrap();
    let value: Vec<Option<String>> = run.result(WAIT).await.unwrap();
    assert_eq!(
        value,
        vec![Some("one".to_owned()), Some("two".to_owned()), None]
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "woken by the messages, not by the 60 s timeouts"
    );
    assert_eq!(run.record().await.unwrap().attempts, 1);
    // The mailbox of `t` holds the two messages sent, once each.
    let m1 = broker
        .next_mail("box-1", Some("t"), 0)
        .await
        .unwrap()
        .unwrap();
    let m2 = broker
        .next_mail("box-1", Some("t"), m1.sequence + 1)
        .await
        .unwrap()
        .unwrap();
    assert!(broker
        .next_mail("box-1", Some("t"), m2.sequence + 1)
        .await
        .unwrap()
        .is_none());
    // Topics follow the id rule; `_` is reserved.
    for bad in ["a.b", "_", ""] {
        let err = client.send("box-1", "x").topic(bad).await.unwrap_err();
        assert_eq!(err.kind(), jetq::ErrorKind::InvalidName, "{bad:?}");
    }
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_recv_that_times_out_while_suspended_gets_none() {
    async fn patient(wf: WorkflowContext) -> Result<Option<u32>, TaskError> {
        wf.recv::<u32>(Some("never"), SUSPEND_AFTER + Duration::from_secs(1))
            .await
    }
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .task("patient", patient)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let run = client.task("patient").id("p-1").publish().await.unwrap();
    let suspended = until(&broker, "p-1", |r| r.status == Status::Suspended).await;
    assert_eq!(suspended.waiting.as_deref(), Some("recv:never"));
    assert_eq!(run.result::<Option<u32>>(WAIT).await.unwrap(), None);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_suspended_run_is_cancelled_at_once_and_its_wake_up_dropped() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("napper", napper)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let nap = client
        .task("napper")
        .id("nap-c")
        .args(&600u64)
        .publish()
        .await
        .unwrap();
    until(&broker, "nap-c", |r| r.status == Status::Suspended).await;
    let record = client.cancel("nap-c").await.unwrap();
    assert_eq!(record.status, Status::Cancelled);
    assert_eq!(nap.wait(WAIT).await.unwrap().status, Status::Cancelled);
    assert_eq!(broker.unsettled(), 0, "the wake-up message is gone");
    assert_eq!(runs.after.load(Ordering::SeqCst), 0);
    w.shutdown().await.unwrap();
}

#[derive(Clone, Default)]
struct ChildRuns(Arc<AtomicU32>);

/// A child that takes longer than SUSPEND_AFTER, then doubles its input.
async fn slow_double(State(runs): State<ChildRuns>, Args(n): Args<i64>) -> Result<i64, TaskError> {
    runs.0.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(SUSPEND_AFTER + Duration::from_secs(1)).await;
    if n < 0 {
        return Err(TaskError::permanent("negative").with_kind("negative"));
    }
    Ok(n * 2)
}

/// Start a child, wait for it, and report its value (or its error kind).
async fn parent(wf: WorkflowContext, Args(n): Args<i64>) -> Result<String, TaskError> {
    let child = wf.start_child("slow_double", n).await?;
    match wf.join::<i64>(&child, Duration::from_secs(60)).await {
        Ok(v) => Ok(format!("{} gave {v}", child.id())),
        Err(e) if e.is_suspension() => Err(e),
        Err(e) => Ok(format!("{} failed: {}", child.id(), e.kind())),
    }
}

#[tokio::test]
async fn a_parent_waits_for_its_child_suspended_and_is_woken_by_its_end() {
    let broker = MemoryBroker::new();
    let runs = ChildRuns::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("parent", parent)
        .task("slow_double", slow_double)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let started = Instant::now();
    let run = client
        .task("parent")
        .id("par-1")
        .args(&21)
        .metadata("tenant", "acme")
        .publish()
        .await
        .unwrap();
    let waiting = until(&broker, "par-1", |r| r.status == Status::Suspended).await;
    assert_eq!(waiting.waiting.as_deref(), Some("join:par-1-c0"));
    assert_eq!(
        run.result::<String>(WAIT).await.unwrap(),
        "par-1-c0 gave 42"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "woken by the child's end, not the 60 s timeout"
    );
    // Replayed after the wake-up, `start_child` did not start another.
    assert_eq!(runs.0.load(Ordering::SeqCst), 1);
    let child = client.record("par-1-c0").await.unwrap();
    assert_eq!(
        child.metadata.get("tenant"),
        Some(&serde_json::json!("acme"))
    );
    assert_eq!(run.record().await.unwrap().attempts, 1);

    // A child that fails: the parent sees its error kind.
    let run = client
        .task("parent")
        .id("par-2")
        .args(&-1)
        .publish()
        .await
        .unwrap();
    assert_eq!(
        run.result::<String>(WAIT).await.unwrap(),
        "par-2-c0 failed: negative"
    );
    w.shutdown().await.unwrap();
}

/// A durable sleep, then a step that fails (retryably) at its first try.
async fn wake_then_fail(wf: WorkflowContext, State(runs): State<Runs>) -> Result<u32, TaskError> {
    wf.sleep(SUSPEND_AFTER + Duration::from_secs(1)).await?;
    wf.step("after", async {
        if runs.after.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(TaskError::new("not yet"));
        }
        Ok::<_, TaskError>(7)
    })
    .await
}

#[tokio::test]
async fn a_woken_run_that_fails_is_retried_on_its_wake_up_message() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .register(
            jetq::Task::new("wake_then_fail", wake_then_fail).retry_policy(
                jetq::RetryPolicy::new(3)
                    .base(Duration::from_millis(5))
                    .max(Duration::from_millis(10)),
            ),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let run = client
        .task("wake_then_fail")
        .id("wtf-1")
        .publish()
        .await
        .unwrap();
    // Before the fix, the retried wake-up was dropped as stale and the run
    // stayed `retrying` for good.
    assert_eq!(run.result::<u32>(WAIT).await.unwrap(), 7);
    let record = run.record().await.unwrap();
    assert_eq!(
        record.attempts, 2,
        "the failed try and its retry: {record:?}"
    );
    assert_eq!(runs.after.load(Ordering::SeqCst), 2);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_worker_can_suspend_every_wait() {
    async fn short_nap(wf: WorkflowContext) -> Result<u32, TaskError> {
        wf.sleep(Duration::from_millis(300)).await?;
        Ok(wf.context().attempt())
    }
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .suspend_after(Duration::ZERO)
        .task("short_nap", short_nap)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let run = client.task("short_nap").id("sn-1").publish().await.unwrap();
    // 300 ms is below the default threshold; this worker suspends anyway.
    let suspended = until(&broker, "sn-1", |r| r.status == Status::Suspended).await;
    assert_eq!(suspended.waiting.as_deref(), Some("sleep"));
    assert_eq!(run.result::<u32>(WAIT).await.unwrap(), 1);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn cancelling_a_queued_child_wakes_its_waiting_parent() {
    /// Starts a child on a queue no worker serves, and waits for it.
    async fn waits_for_nobody(wf: WorkflowContext) -> Result<String, TaskError> {
        let child = wf.start_child_on("unserved", "kid", 1).await?;
        match wf.join::<i64>(&child, Duration::from_secs(600)).await {
            Ok(v) => Ok(format!("got {v}")),
            Err(e) if e.is_suspension() => Err(e),
            Err(e) => Ok(format!("{} ended: {}", child.id(), e.kind())),
        }
    }
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .task("waits_for_nobody", waits_for_nobody)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let run = client
        .task("waits_for_nobody")
        .id("wfn-1")
        .publish()
        .await
        .unwrap();
    let waiting = until(&broker, "wfn-1", |r| r.status == Status::Suspended).await;
    assert_eq!(waiting.waiting.as_deref(), Some("join:wfn-1-c0"));
    let child = client.record("wfn-1-c0").await.unwrap();
    assert_eq!(child.status, Status::Pending);
    assert_eq!(child.parent.as_deref(), Some("wfn-1"));
    // The child never ran: the client marks it cancelled, and wakes the
    // parent (else it would wait for the join's 600 s timeout).
    assert_eq!(
        client.cancel("wfn-1-c0").await.unwrap().status,
        Status::Cancelled
    );
    assert_eq!(
        run.result::<String>(WAIT).await.unwrap(),
        "wfn-1-c0 ended: cancelled"
    );
    w.shutdown().await.unwrap();
}
