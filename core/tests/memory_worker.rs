//! Core's fast tests: the worker and client against the in-memory broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jetq::broker::{Broker, OutgoingRequest};
use jetq::memory::MemoryBroker;
use jetq::{
    Args, Client, Context, ErrorKind, FromContext, Meta, Resource, RetryPolicy, RunningWorker,
    State, Status, Task, TaskError, Worker, WorkerBuilder,
};
use serde::Deserialize;

const WAIT: Duration = Duration::from_secs(10);

fn start(builder: WorkerBuilder) -> RunningWorker {
    builder.spawn().unwrap()
}

fn fast_retries(max: u32) -> RetryPolicy {
    RetryPolicy::new(max)
        .base(Duration::from_millis(5))
        .max(Duration::from_millis(20))
}

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

async fn add(Args(args): Args<AddArgs>) -> Result<i64, TaskError> {
    Ok(args.a + args.b)
}

#[tokio::test]
async fn runs_a_task_and_records_its_value_and_metadata() {
    let broker = MemoryBroker::new();
    let w = start(
        Worker::builder(broker.clone())
            .name("w1")
            .task("demo.add", add),
    );
    let client = Client::new(broker);
    let handle = client
        .task("demo.add")
        .args(&serde_json::json!({"a": 2, "b": 40}))
        .metadata("tenant", "acme")
        .publish()
        .await
        .unwrap();
    assert_eq!(handle.result::<i64>(WAIT).await.unwrap(), 42);
    let rec = client.record(handle.id()).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.worker.as_deref(), Some("w1"));
    assert_eq!(rec.metadata["tenant"], "acme");
    assert!(rec.started_at.is_some() && rec.finished_at.is_some());
    assert!(rec.error.is_none());
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn wrong_argument_types_fail_at_once_without_retries() {
    let broker = MemoryBroker::new();
    let w = start(
        Worker::builder(broker.clone())
            .register(Task::new("demo.add", add).retry_policy(fast_retries(5))),
    );
    let client = Client::new(broker);
    let handle = client
        .task("demo.add")
        .args(&serde_json::json!({"a": "x"}))
        .publish()
        .await
        .unwrap();
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(rec.attempts, 1);
    let err = rec.error.unwrap();
    assert_eq!(err.kind, "invalid_args");
    let e = handle.result::<i64>(WAIT).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TaskFailed);
    // The worker is still alive.
    let ok = client
        .task("demo.add")
        .args(&serde_json::json!({"a": 1, "b": 1}))
        .publish()
        .await
        .unwrap();
    assert_eq!(ok.result::<i64>(WAIT).await.unwrap(), 2);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_task_fails_with_a_clear_error() {
    let broker = MemoryBroker::new();
    let w = start(Worker::builder(broker.clone()).task("demo.add", add));
    let client = Client::new(broker);
    let handle = client.task("nope.missing").publish().await.unwrap();
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(rec.attempts, 1);
    let err = rec.error.unwrap();
    assert_eq!(err.kind, "unknown_task");
    assert!(
        err.message.contains("nope.missing") && err.message.contains("demo.add"),
        "{}",
        err.message
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_envelopes_are_dead_lettered_without_a_record_and_the_worker_lives_on() {
    let broker = MemoryBroker::new();
    let w = start(Worker::builder(broker.clone()).task("demo.add", add));
    // Valid JSON with a readable id but a broken envelope (no enqueued_at, args of wrong type fine).
    let bad = br#"{"v":1,"id":"broken-1","task":"demo.add","queue":"default"}"#;
    broker
        .publish(OutgoingRequest::new(
            "broken-1",
            "default",
            "demo.add",
            Bytes::from_static(bad),
        ))
        .await
        .unwrap();
    // Not JSON at all.
    broker
        .publish(OutgoingRequest::new(
            "broken-2",
            "default",
            "demo.add",
            Bytes::from_static(b"{not json"),
        ))
        .await
        .unwrap();
    let client = Client::new(broker.clone());
    // Invalid messages own no record (the id in one may be another
    // request's): each is dead-lettered under its sequence instead.
    let letters = loop {
        let letters = client.dead_letters(10).await.unwrap();
        if letters.len() == 2 {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(letters.iter().all(|l| l.id.starts_with("invalid-default-")));
    assert!(letters.iter().all(|l| l.error.kind == "invalid_request"));
    assert!(letters[0].error.message.contains("broken-1"), "{letters:?}");
    assert_eq!(
        client.record("broken-1").await.unwrap_err().kind(),
        jetq::ErrorKind::NotFound
    );
    let ok = client
        .task("demo.add")
        .args(&serde_json::json!({"a": 1, "b": 2}))
        .publish()
        .await
        .unwrap();
    assert_eq!(ok.result::<i64>(WAIT).await.unwrap(), 3);
    assert_eq!(
        broker.queued("default"),
        0,
        "poison messages must not be redelivered"
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn retryable_errors_are_retried_until_success() {
    let broker = MemoryBroker::new();
    async fn flaky(ctx: Context, Args(times): Args<u32>) -> Result<u32, TaskError> {
        if ctx.attempt() <= times {
            Err(TaskError::new(format!("attempt {} fails", ctx.attempt())))
        } else {
            Ok(ctx.retries())
        }
    }
    let w = start(
        Worker::builder(broker.clone())
            .register(Task::new("flaky", flaky).retry_policy(fast_retries(3))),
    );
    let client = Client::new(broker);
    let h = client.task("flaky").args(&2).publish().await.unwrap();
    assert_eq!(h.result::<u32>(WAIT).await.unwrap(), 2);
    assert_eq!(h.record().await.unwrap().attempts, 3);
    // Too many failures: ends failed after 1 + max_retries attempts.
    let h = client
        .task("flaky")
        .args(&9)
        .max_retries(1)
        .publish()
        .await
        .unwrap();
    let rec = h.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(rec.attempts, 2);
    assert_eq!(rec.max_retries, 1);
    assert_eq!(rec.error.unwrap().message, "attempt 2 fails");
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn permanent_errors_and_panics() {
    let broker = MemoryBroker::new();
    async fn permanent() -> Result<(), TaskError> {
        Err(TaskError::permanent("no way"))
    }
    async fn boom() -> Result<(), TaskError> {
        panic!("kaboom")
    }
    let w = start(
        Worker::builder(broker.clone())
            .register(Task::new("permanent", permanent).retry_policy(fast_retries(3)))
            .register(Task::new("boom", boom).retry_policy(fast_retries(1))),
    );
    let client = Client::new(broker);
    let rec = client
        .task("permanent")
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!((rec.status, rec.attempts), (Status::Failed, 1));
    let rec = client
        .task("boom")
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!((rec.status, rec.attempts), (Status::Failed, 2));
    let err = rec.error.unwrap();
    assert_eq!(err.kind, "panic");
    assert!(err.message.contains("kaboom"));
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn same_id_runs_once() {
    let broker = MemoryBroker::new();
    let runs = Arc::new(AtomicUsize::new(0));
    async fn count(State(runs): State<Arc<AtomicUsize>>) -> Result<usize, TaskError> {
        Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
    let w = start(
        Worker::builder(broker.clone())
            .state(Arc::clone(&runs))
            .task("count", count),
    );
    let client = Client::new(broker);
    let a = client.task("count").id("order-42").publish().await.unwrap();
    assert_eq!(a.result::<usize>(WAIT).await.unwrap(), 1);
    let b = client.task("count").id("order-42").publish().await.unwrap();
    assert_eq!(b.id(), "order-42");
    assert_eq!(b.result::<usize>(WAIT).await.unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_names_are_refused_at_publish() {
    let client = Client::new(MemoryBroker::new());
    for id in ["a.b>", "a b", "*", "x.y"] {
        let e = client.task("demo.add").id(id).publish().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName, "{id}");
    }
    let e = client
        .task("demo.add")
        .queue("q.>")
        .publish()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName);
    let e = client.task("demo..add").publish().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName);
    assert_eq!(
        client.record("a.b").await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
}

#[derive(Clone)]
struct Http;

#[tokio::test]
async fn missing_state_or_resource_is_a_build_error() {
    async fn needs_state(State(_h): State<Http>) -> Result<(), TaskError> {
        Ok(())
    }
    async fn needs_res(_r: Resource<String>) -> Result<(), TaskError> {
        Ok(())
    }
    let e = Worker::builder(MemoryBroker::new())
        .task("t", needs_state)
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.message().contains("Http"), "{e}");
    let e = Worker::builder(MemoryBroker::new())
        .task("t", needs_res)
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(Worker::builder(MemoryBroker::new())
        .state(Http)
        .task("t", needs_state)
        .build()
        .is_ok());
    let e = Worker::builder(MemoryBroker::new())
        .task("t", add)
        .task("t", add)
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let e = Worker::builder(MemoryBroker::new())
        .task("bad name", add)
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName);
}

#[derive(Deserialize)]
struct UserContext {
    triggered_by: String,
}

struct Now(time::OffsetDateTime);

impl FromContext for Now {
    async fn from_context(_ctx: &Context) -> Result<Self, TaskError> {
        Ok(Now(time::OffsetDateTime::now_utc()))
    }
}

struct Pool {
    id: usize,
}

#[tokio::test]
async fn extractors_meta_custom_resource_and_metadata_writes() {
    let broker = MemoryBroker::new();
    let built = Arc::new(AtomicUsize::new(0));
    async fn task(
        ctx: Context,
        Meta(user): Meta<UserContext>,
        now: Now,
        pool: Resource<Pool>,
        Args(n): Args<u32>,
    ) -> Result<String, TaskError> {
        assert!(now.0 >= ctx.enqueued_at());
        ctx.set_metadata("seen_by", format!("pool-{}", pool.id))
            .await?;
        ctx.set_progress(1, Some(2)).await?;
        Ok(format!("{}:{n}", user.triggered_by))
    }
    let counter = Arc::clone(&built);
    let w = start(
        Worker::builder(broker.clone())
            .resource(move || {
                let counter = Arc::clone(&counter);
                async move {
                    Ok::<_, std::convert::Infallible>(Pool {
                        id: counter.fetch_add(1, Ordering::SeqCst),
                    })
                }
            })
            .task("t", task),
    );
    let client = Client::new(broker);
    let mut handles = Vec::new();
    for n in 0..5 {
        handles.push(
            client
                .task("t")
                .args(&n)
                .metadata("triggered_by", "alice")
                .publish()
                .await
                .unwrap(),
        );
    }
    for (n, h) in handles.iter().enumerate() {
        assert_eq!(
            h.result::<String>(WAIT).await.unwrap(),
            format!("alice:{n}")
        );
        let meta = h.metadata().await.unwrap();
        assert_eq!(meta["seen_by"], "pool-0");
        assert_eq!(meta["triggered_by"], "alice");
        assert_eq!(h.record().await.unwrap().progress.unwrap().current, 1);
    }
    assert_eq!(
        built.load(Ordering::SeqCst),
        1,
        "the resource is built once per worker"
    );
    // Metadata of the wrong shape fails at once.
    let h = client.task("t").args(&1).publish().await.unwrap();
    let rec = h.wait(WAIT).await.unwrap();
    assert_eq!(rec.error.unwrap().kind, "invalid_metadata");
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn blocking_tasks_run_off_the_async_threads() {
    let broker = MemoryBroker::new();
    // The test runtime is single-threaded: async tasks run on this thread.
    #[derive(Clone)]
    struct RuntimeThread(std::thread::ThreadId);
    fn fib(State(rt): State<RuntimeThread>, Args(n): Args<u64>) -> Result<u64, TaskError> {
        assert_ne!(
            std::thread::current().id(),
            rt.0,
            "must not run on the runtime's thread"
        );
        let (mut a, mut b) = (0u64, 1u64);
        for _ in 0..n {
            (a, b) = (b, a + b);
        }
        Ok(a)
    }
    let w = start(
        Worker::builder(broker.clone())
            .state(RuntimeThread(std::thread::current().id()))
            .blocking_task("fib", fib),
    );
    let client = Client::new(broker);
    let h = client.task("fib").args(&50).publish().await.unwrap();
    assert_eq!(h.result::<u64>(WAIT).await.unwrap(), 12_586_269_025);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_running_tasks_finish_and_fires_cancellation() {
    let broker = MemoryBroker::new();
    let started = Arc::new(tokio::sync::Notify::new());
    async fn slow(
        ctx: Context,
        State(started): State<Arc<tokio::sync::Notify>>,
    ) -> Result<&'static str, TaskError> {
        started.notify_one();
        ctx.cancelled().await;
        // Finishing after the token fired is still a success.
        Ok("finished")
    }
    let w = start(
        Worker::builder(broker.clone())
            .state(Arc::clone(&started))
            .task("slow", slow),
    );
    let client = Client::new(broker);
    let h = client.task("slow").publish().await.unwrap();
    started.notified().await;
    w.shutdown().await.unwrap();
    let rec = h.record().await.unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert_eq!(rec.value.unwrap(), "finished");
}

#[tokio::test]
async fn tasks_past_the_shutdown_timeout_are_released_not_lost() {
    let broker = MemoryBroker::new();
    let started = Arc::new(tokio::sync::Notify::new());
    async fn stubborn(State(started): State<Arc<tokio::sync::Notify>>) -> Result<(), TaskError> {
        started.notify_one();
        std::future::pending::<()>().await;
        Ok(())
    }
    let w = start(
        Worker::builder(broker.clone())
            .state(Arc::clone(&started))
            .shutdown_timeout(Duration::from_millis(100))
            .task("stubborn", stubborn),
    );
    let client = Client::new(broker.clone());
    let h = client.task("stubborn").publish().await.unwrap();
    started.notified().await;
    w.shutdown().await.unwrap();
    let rec = h.record().await.unwrap();
    assert_eq!(rec.status, Status::Retrying);
    assert_eq!(rec.error.unwrap().kind, "interrupted");
    assert_eq!(
        broker.queued("default"),
        1,
        "the request is back in the queue"
    );
}

#[tokio::test]
async fn wait_times_out_with_the_last_status() {
    let client = Client::new(MemoryBroker::new());
    let h = client.task("nobody.serves.this").publish().await.unwrap();
    let e = h.wait(Duration::from_millis(50)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.message().contains("pending"), "{e}");
    assert_eq!(
        client.record("unknown-id").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn a_permanent_error_during_shutdown_still_fails_the_request() {
    let broker = MemoryBroker::new();
    let started = Arc::new(tokio::sync::Notify::new());
    async fn refuses(
        ctx: Context,
        State(started): State<Arc<tokio::sync::Notify>>,
    ) -> Result<(), TaskError> {
        started.notify_one();
        ctx.cancelled().await;
        Err(TaskError::permanent("bad input, whoever runs it"))
    }
    let w = start(
        Worker::builder(broker.clone())
            .state(Arc::clone(&started))
            .task("refuses", refuses),
    );
    let client = Client::new(broker.clone());
    let h = client.task("refuses").publish().await.unwrap();
    started.notified().await;
    w.shutdown().await.unwrap();
    let rec = h.record().await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(broker.queued("default"), 0);
}

async fn fail_always() -> Result<(), TaskError> {
    Err(TaskError::new("always fails"))
}

#[tokio::test]
async fn failed_requests_are_dead_lettered_and_can_be_requeued() {
    let broker = MemoryBroker::new();
    let w = start(
        Worker::builder(broker.clone())
            .register(Task::new("fail", fail_always).retry_policy(fast_retries(1))),
    );
    let client = Client::new(broker.clone());
    let handle = client.task("fail").id("dl-1").publish().await.unwrap();
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    // Written before the record was failed: there once the record says so.
    let letter = client.dead_letter("dl-1").await.unwrap().unwrap();
    assert_eq!(letter.error, rec.error.clone().unwrap());
    assert_eq!(letter.attempts, 2);
    assert_eq!(letter.task, "fail");
    assert_eq!(letter.request().unwrap().id, "dl-1");

    let again = client.requeue("dl-1").await.unwrap();
    let rec = again.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(
        rec.attempts, 2,
        "a requeued request starts from zero attempts"
    );
    let letters = client.dead_letters(10).await.unwrap();
    assert_eq!(letters.len(), 1, "the old dead letter went, a new one came");
    assert_eq!(
        client.requeue("nope").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    w.shutdown().await.unwrap();
}

async fn until_cancelled(ctx: Context) -> Result<(), TaskError> {
    ctx.cancelled().await;
    Err(TaskError::new("stopped"))
}

#[tokio::test]
async fn cancellation_of_pending_and_running_requests() {
    let broker = MemoryBroker::new();
    let client = Client::new(broker.clone());
    // Pending: never runs.
    let pending = client.task("wait").id("c-1").publish().await.unwrap();
    assert_eq!(
        client.cancel("c-1").await.unwrap().status,
        Status::Cancelled
    );
    let w = start(Worker::builder(broker.clone()).task("wait", until_cancelled));
    // Running: the token fires, the record ends cancelled.
    let running = client.task("wait").id("c-2").publish().await.unwrap();
    let mut watch = broker.watch_record("c-2").await.unwrap();
    while let Some(entry) = futures_util::StreamExt::next(&mut watch).await {
        if jetq::Record::from_json(&entry.unwrap().value)
            .unwrap()
            .status
            == Status::Running
        {
            break;
        }
    }
    let rec = client.cancel("c-2").await.unwrap();
    assert_eq!(rec.status, Status::Running);
    let rec = running.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Cancelled);
    assert_eq!(rec.attempts, 1);
    assert_eq!(pending.record().await.unwrap().attempts, 0);
    assert_eq!(broker.queued("default"), 0);
    assert!(client.dead_letters(10).await.unwrap().is_empty());
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn delayed_requests_wait_and_oversized_ones_are_refused() {
    let broker = MemoryBroker::with_max_payload(512);
    let w = start(Worker::builder(broker.clone()).task("demo.add", add));
    let client = Client::new(broker.clone());
    let handle = client
        .task("demo.add")
        .args(&serde_json::json!({"a": 1, "b": 2}))
        .delay(Duration::from_millis(300))
        .publish()
        .await
        .unwrap();
    let due = handle.record().await.unwrap().next_attempt_at.unwrap();
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert!(rec.started_at.unwrap() >= due);

    let err = client
        .task("demo.add")
        .id("too-big")
        .args(&"z".repeat(600))
        .publish()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    assert!(err.to_string().contains("512"), "{err}");
    assert_eq!(
        client.record("too-big").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_delivered_before_it_is_due_waits_without_counting_an_attempt() {
    // A producer that bypasses the broker's delay: the worker puts it back.
    let broker = MemoryBroker::new();
    let w = start(Worker::builder(broker.clone()).task("demo.add", add));
    let mut request = jetq::Request::new("demo.add");
    request
        .set_args(&serde_json::json!({"a": 1, "b": 1}))
        .unwrap();
    let due = jetq::time::OffsetDateTime::now_utc() + Duration::from_millis(800);
    request.not_before = Some(due);
    let id = request.id.clone();
    broker
        .publish(OutgoingRequest::new(
            id.clone(),
            "default",
            "demo.add",
            Bytes::from(request.to_json().unwrap()),
        ))
        .await
        .unwrap();
    let client = Client::new(broker.clone());
    let rec = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert_eq!(rec.attempts, 1);
    assert!(rec.started_at.unwrap() + Duration::from_millis(600) >= due);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_whose_workers_all_died_fails_instead_of_looping() {
    // As if every earlier attempt's worker died mid-task: the record says
    // running, owned by this message, with all attempts used.
    let broker = MemoryBroker::new();
    let mut request = jetq::Request::new("demo.add");
    request.id = "doomed".into();
    request
        .set_args(&serde_json::json!({"a": 1, "b": 1}))
        .unwrap();
    let ack = broker
        .publish(OutgoingRequest::new(
            "doomed",
            "default",
            "demo.add",
            Bytes::from(request.to_json().unwrap()),
        ))
        .await
        .unwrap();
    let mut record = jetq::Record::pending(&request);
    record.status = Status::Running;
    record.attempts = 4;
    record.max_retries = 3;
    record.seq = Some(ack.sequence);
    broker
        .create_record("doomed", Bytes::from(record.to_json().unwrap()))
        .await
        .unwrap();
    let w = start(Worker::builder(broker.clone()).task("demo.add", add));
    let client = Client::new(broker.clone());
    let rec = client.wait("doomed", WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(rec.attempts, 5);
    assert_eq!(rec.error.as_ref().unwrap().kind, "abandoned");
    assert!(
        rec.error
            .as_ref()
            .unwrap()
            .message
            .contains("gave up after 4 attempts"),
        "{:?}",
        rec.error
    );
    assert!(client.dead_letter("doomed").await.unwrap().is_some());
    w.shutdown().await.unwrap();
}

/// What the read-ahead test's tasks share.
#[derive(Clone)]
struct Held {
    /// Released to let the held tasks finish.
    gate: Arc<tokio::sync::Semaphore>,
    /// Held tasks running now.
    running: Arc<AtomicUsize>,
    /// Tells the test that one more held task started.
    started: Arc<tokio::sync::Notify>,
    /// Runs of the task that must never run.
    victim_ran: Arc<AtomicUsize>,
}

async fn held(jetq::State(h): jetq::State<Held>) -> Result<(), TaskError> {
    h.running.fetch_add(1, Ordering::SeqCst);
    h.started.notify_one();
    let _ = h.gate.acquire().await;
    Ok(())
}

async fn victim(jetq::State(h): jetq::State<Held>) -> Result<(), TaskError> {
    h.victim_ran.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Reading ahead: while every slot is busy (with tasks that looked quick so
/// far), a worker takes the next delivery and reads its record; if a client
/// cancels that request while it waits for a slot, it never starts.
#[tokio::test]
async fn a_request_cancelled_while_it_waits_for_a_slot_never_starts() {
    let broker = MemoryBroker::new();
    let h = Held {
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
        running: Arc::default(),
        started: Arc::default(),
        victim_ran: Arc::default(),
    };
    let w = start(
        Worker::builder(broker.clone())
            .concurrency(2)
            .state(h.clone())
            .task("demo.add", add)
            .task("held", held)
            .task("victim", victim),
    );
    let client = Client::new(broker.clone()).pending_records(true);
    // Quick tasks first: the worker learns that tasks are short.
    for i in 0..20 {
        let v: i64 = client
            .task("demo.add")
            .args(&serde_json::json!({"a": i, "b": 1}))
            .publish()
            .await
            .unwrap()
            .result(WAIT)
            .await
            .unwrap();
        assert_eq!(v, i + 1);
    }
    // Both slots taken by tasks that wait.
    let holders = [
        client.task("held").publish().await.unwrap(),
        client.task("held").publish().await.unwrap(),
    ];
    while h.running.load(Ordering::SeqCst) < 2 {
        h.started.notified().await;
    }
    // The next request is taken and waits for a slot.
    let v = client.task("victim").id("v-1").publish().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.queued("default") > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never taken");
        tokio::task::yield_now().await;
    }
    let cancelled = client.cancel("v-1").await.unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    h.gate.add_permits(2);
    for holder in &holders {
        assert_eq!(holder.wait(WAIT).await.unwrap().status, Status::Succeeded);
    }
    let record = v.wait(WAIT).await.unwrap();
    assert_eq!(record.status, Status::Cancelled);
    w.shutdown().await.unwrap();
    assert_eq!(h.victim_ran.load(Ordering::SeqCst), 0, "the victim ran");
    assert_eq!(broker.queued("default"), 0);
}

/// Attempts start inside their queue's driver task; one whose handler keeps
/// computing between awaits moves to a task of its own. Two such handlers
/// then compute at the same time on a two-thread runtime (inside a single
/// driver they would take turns: never both at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_computing_between_awaits_run_in_parallel() {
    static INSIDE: AtomicUsize = AtomicUsize::new(0);
    static MOST: AtomicUsize = AtomicUsize::new(0);
    async fn compute() -> Result<(), TaskError> {
        for _ in 0..400 {
            let now = INSIDE.fetch_add(1, Ordering::SeqCst) + 1;
            MOST.fetch_max(now, Ordering::SeqCst);
            // Busy for 2 ms without awaiting, as a computation would be.
            let until = std::time::Instant::now() + Duration::from_millis(2);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
            INSIDE.fetch_sub(1, Ordering::SeqCst);
            if MOST.load(Ordering::SeqCst) >= 2 {
                return Ok(());
            }
            tokio::task::yield_now().await;
        }
        Ok(())
    }
    let broker = MemoryBroker::new();
    let w = start(
        Worker::builder(broker.clone())
            .concurrency(2)
            .task("demo.compute", compute),
    );
    let client = Client::new(broker);
    let mut handles = Vec::new();
    for _ in 0..2 {
        handles.push(client.task("demo.compute").publish().await.unwrap());
    }
    for handle in handles {
        handle.result::<()>(WAIT).await.unwrap();
    }
    assert_eq!(
        MOST.load(Ordering::SeqCst),
        2,
        "the two handlers never computed at the same time"
    );
    w.shutdown().await.unwrap();
}
