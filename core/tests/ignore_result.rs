//! Requests that start without a record read: `ignore_result` (a success
//! at the first delivery costs no record read and no record write; anything
//! else is recorded as usual) and `start_unchecked` (no read, every outcome
//! recorded).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jetq::broker::Broker;
use jetq::memory::MemoryBroker;
use jetq::{Args, Client, Context, ErrorKind, RetryPolicy, State, Status, Task, TaskError, Worker};

const WAIT: Duration = Duration::from_secs(10);

/// Wait until nothing is queued or in flight.
async fn drained(broker: &MemoryBroker) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.unsettled() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue did not drain"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

async fn count(State(runs): State<Runs>, Args(n): Args<u32>) -> Result<u32, TaskError> {
    runs.0.fetch_add(1, Ordering::SeqCst);
    Ok(n)
}

/// A memory broker and a worker running `count` on it.
fn counting_worker() -> (MemoryBroker, jetq::RunningWorker, Runs) {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("count", count)
        .spawn()
        .unwrap();
    (broker, w, runs)
}

#[tokio::test]
async fn a_success_reads_and_writes_no_record() {
    let (broker, w, runs) = counting_worker();
    let client = Client::new(broker.clone());
    let mut ids = Vec::new();
    for n in 0..50u32 {
        let handle = client
            .task("count")
            .args(&n)
            .ignore_result()
            .publish()
            .await
            .unwrap();
        ids.push(handle.id().to_owned());
    }
    drained(&broker).await;
    assert_eq!(runs.0.load(Ordering::SeqCst), 50);
    assert_eq!(broker.record_reads(), 0, "no record is read");
    assert_eq!(broker.record_writes(), 0, "no record is written");
    for id in &ids {
        let err = client.record(id).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }
    // The handle says why it cannot wait.
    let handle = client
        .task("count")
        .args(&1u32)
        .ignore_result()
        .publish()
        .await
        .unwrap();
    let err = handle.result::<u32>(WAIT).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("ignore_result"), "{err}");
    // Without it, the same task is recorded.
    let handle = client.task("count").args(&7u32).publish().await.unwrap();
    assert_eq!(handle.result::<u32>(WAIT).await.unwrap(), 7);
    w.shutdown().await.unwrap();
}

async fn flaky(State(runs): State<Runs>) -> Result<&'static str, TaskError> {
    match runs.0.fetch_add(1, Ordering::SeqCst) {
        0 => Err(TaskError::new("first attempt fails")),
        _ => Ok("second time lucky"),
    }
}

async fn broken() -> Result<(), TaskError> {
    Err(TaskError::permanent("never works").with_kind("broken"))
}

#[tokio::test]
async fn failures_and_retries_are_recorded_and_dead_lettered() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let fast = RetryPolicy::new(3)
        .base(Duration::from_millis(5))
        .max(Duration::from_millis(20));
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .register(Task::new("flaky", flaky).retry_policy(fast))
        .task("broken", broken)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let retried = client
        .task("flaky")
        .ignore_result()
        .publish()
        .await
        .unwrap();
    let failed = client
        .task("broken")
        .ignore_result()
        .publish()
        .await
        .unwrap();
    let rec = client.wait(failed.id(), WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(rec.error.unwrap().kind, "broken");
    let letter = client.dead_letter(failed.id()).await.unwrap().unwrap();
    assert_eq!(letter.error.kind, "broken");
    // A retried request has a record from its first failure on, so its
    // success is written too.
    let rec = client.wait(retried.id(), WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert_eq!(rec.attempts, 2);
    assert_eq!(rec.value_as::<String>().unwrap(), "second time lucky");
    drained(&broker).await;
    w.shutdown().await.unwrap();
}

async fn slow() -> Result<u32, TaskError> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(1)
}

#[tokio::test]
async fn an_attempt_that_became_visible_is_closed() {
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .running_after(Duration::from_millis(20))
        .task("slow", slow)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("slow")
        .id("ir-slow")
        .ignore_result()
        .publish()
        .await
        .unwrap();
    // It says `running` while it runs, and ends `succeeded`, never left
    // `running` for ever.
    let mut watch = broker.watch_record("ir-slow").await.unwrap();
    while let Some(entry) = futures_util::StreamExt::next(&mut watch).await {
        if jetq::Record::from_json(&entry.unwrap().value)
            .unwrap()
            .status
            == Status::Running
        {
            break;
        }
    }
    let rec = client.wait(handle.id(), WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert_eq!(rec.attempts, 1);
    drained(&broker).await;
    w.shutdown().await.unwrap();
}

async fn until_cancelled(ctx: Context) -> Result<(), TaskError> {
    ctx.cancelled().await;
    Err(TaskError::new("stopped"))
}

#[tokio::test]
async fn a_cancel_signal_seen_before_the_delivery_is_honoured() {
    let broker = MemoryBroker::new();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("count", count)
        .task("block", until_cancelled)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let blocker = client
        .task("block")
        .id("ir-blocker")
        .publish()
        .await
        .unwrap();
    let mut watch = broker.watch_record("ir-blocker").await.unwrap();
    while let Some(entry) = futures_util::StreamExt::next(&mut watch).await {
        if jetq::Record::from_json(&entry.unwrap().value)
            .unwrap()
            .status
            == Status::Running
        {
            break;
        }
    }
    // The worker's listener takes cancel signals in order: once the
    // blocker's cancellation has reached it, so has the one before.
    let rec = client.cancel("ir-cancelled").await.unwrap();
    assert_eq!(rec.status, Status::Cancelled);
    client.cancel("ir-blocker").await.unwrap();
    assert_eq!(blocker.wait(WAIT).await.unwrap().status, Status::Cancelled);
    client
        .task("count")
        .id("ir-cancelled")
        .args(&1u32)
        .ignore_result()
        .publish()
        .await
        .unwrap();
    drained(&broker).await;
    assert_eq!(
        runs.0.load(Ordering::SeqCst),
        0,
        "the cancelled request never ran"
    );
    let rec = client.record("ir-cancelled").await.unwrap();
    assert_eq!(rec.status, Status::Cancelled);
    w.shutdown().await.unwrap();
}

async fn broken_once() -> Result<(), TaskError> {
    Err(TaskError::permanent("no").with_kind("broken"))
}

/// An `ignore_result` request runs without reading its record; if the id's
/// record belongs to another task, its outcome must not overwrite it.
#[tokio::test]
async fn an_unread_attempt_never_writes_over_another_tasks_record() {
    let broker = MemoryBroker::new();
    // Another task's record under the id, written long ago.
    let theirs = jetq::Request::new("other");
    let mut theirs_json: serde_json::Value =
        serde_json::from_slice(&jetq::Record::pending(&theirs).to_json().unwrap()).unwrap();
    theirs_json["id"] = "ir-shared".into();
    let bytes = bytes::Bytes::from(theirs_json.to_string());
    broker
        .create_record("ir-shared", bytes.clone())
        .await
        .unwrap();
    let w = Worker::builder(broker.clone())
        .ack_wait(Duration::from_millis(300))
        .task("broken", broken_once)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    client
        .task("broken")
        .id("ir-shared")
        .ignore_result()
        .publish()
        .await
        .unwrap();
    drained(&broker).await;
    w.shutdown().await.unwrap();
    let after = broker.get_record("ir-shared").await.unwrap().unwrap();
    assert_eq!(after.value, bytes, "the other task's record is untouched");
}

#[tokio::test]
async fn a_start_unchecked_request_reads_no_record_and_its_result_is_recorded() {
    let (broker, w, runs) = counting_worker();
    let client = Client::new(broker.clone());
    let mut handles = Vec::new();
    for n in 0..20u32 {
        let handle = client
            .task("count")
            .args(&n)
            .start_unchecked()
            .publish()
            .await
            .unwrap();
        handles.push((n, handle));
    }
    drained(&broker).await;
    assert_eq!(runs.0.load(Ordering::SeqCst), 20);
    assert_eq!(broker.record_reads(), 0, "no record is read before a run");
    assert_eq!(broker.record_writes(), 20, "each outcome is written once");
    for (n, handle) in &handles {
        assert_eq!(handle.result::<u32>(WAIT).await.unwrap(), *n);
        let rec = client.record(handle.id()).await.unwrap();
        assert_eq!((rec.status, rec.attempts), (Status::Succeeded, 1));
    }
    // Without it, each claim reads the record first.
    let reads = broker.record_reads();
    let handle = client.task("count").args(&7u32).publish().await.unwrap();
    assert_eq!(handle.result::<u32>(WAIT).await.unwrap(), 7);
    assert!(broker.record_reads() > reads, "a checked start reads");
    w.shutdown().await.unwrap();
}

/// The price of `start_unchecked`: a cancellation made while no worker
/// listened, or an earlier request's record under the id, does not stop it
/// from running. Its outcome is never written over such a record.
#[tokio::test]
async fn a_start_unchecked_request_never_writes_over_a_cancelled_or_finished_record() {
    let broker = MemoryBroker::new();
    let client = Client::new(broker.clone());
    // Cancelled before any worker ran, so no worker heard the signal.
    let rec = client.cancel("su-cancelled").await.unwrap();
    assert_eq!(rec.status, Status::Cancelled);
    let cancelled = broker.get_record("su-cancelled").await.unwrap().unwrap();
    // An earlier request's outcome under another id, also written long ago.
    let mut earlier = jetq::Record::pending(&jetq::Request::new("count"));
    earlier.id = "su-finished".to_owned();
    earlier.status = Status::Succeeded;
    earlier.value = Some(serde_json::json!(99));
    let finished = bytes::Bytes::from(earlier.to_json().unwrap());
    broker
        .create_record("su-finished", finished.clone())
        .await
        .unwrap();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("count", count)
        .spawn()
        .unwrap();
    let mut handles = Vec::new();
    for id in ["su-cancelled", "su-finished"] {
        let handle = client
            .task("count")
            .id(id)
            .args(&1u32)
            .start_unchecked()
            .publish()
            .await
            .unwrap();
        handles.push(handle);
    }
    drained(&broker).await;
    assert_eq!(runs.0.load(Ordering::SeqCst), 2, "both ran unchecked");
    let after = broker.get_record("su-cancelled").await.unwrap().unwrap();
    assert_eq!(
        after.value, cancelled.value,
        "the cancelled record is untouched"
    );
    let after = broker.get_record("su-finished").await.unwrap().unwrap();
    assert_eq!(after.value, finished, "the finished record is untouched");
    // The waits see the records as they are.
    let rec = handles[0].wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Cancelled);
    assert_eq!(handles[1].result::<u32>(WAIT).await.unwrap(), 99);
    w.shutdown().await.unwrap();
}

async fn counted_until_cancelled(State(runs): State<Runs>, ctx: Context) -> Result<(), TaskError> {
    runs.0.fetch_add(1, Ordering::SeqCst);
    ctx.cancelled().await;
    Err(TaskError::new("stopped"))
}

/// A `start_unchecked` attempt that outlives `running_after` writes its
/// claim, finds the cancellation it was not told of, and has its token
/// fired: a cancellation it missed stops it then, and the record stays
/// `cancelled`.
#[tokio::test]
async fn a_slow_start_unchecked_request_finds_a_missed_cancellation_when_it_says_running() {
    let broker = MemoryBroker::new();
    let client = Client::new(broker.clone());
    // Cancelled before any worker ran, so no worker heard the signal.
    client.cancel("su-slow").await.unwrap();
    let runs = Runs::default();
    let w = Worker::builder(broker.clone())
        .running_after(Duration::from_millis(20))
        .state(runs.clone())
        .task("block", counted_until_cancelled)
        .spawn()
        .unwrap();
    let handle = client
        .task("block")
        .id("su-slow")
        .start_unchecked()
        .publish()
        .await
        .unwrap();
    // `block` ends only when its token fires.
    drained(&broker).await;
    assert_eq!(runs.0.load(Ordering::SeqCst), 1, "it started unchecked");
    assert_eq!(handle.wait(WAIT).await.unwrap().status, Status::Cancelled);
    w.shutdown().await.unwrap();
}
