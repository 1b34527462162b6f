//! Delivery guarantees against a real nats-server: dead letters, requeue,
//! cancellation, delayed requests, payload limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jetq::broker::Broker;
use jetq::time::OffsetDateTime;
use jetq::{Args, Client, Context, ErrorKind, RetryPolicy, State, Status, Task, TaskError, Worker};
use jetq_nats::NatsBroker;
use jetq_tests::{
    add, connect, server_and_broker, stored_requests, wait_for_record, NatsServer, WAIT,
};
use tokio::sync::Notify;

/// Counts runs; fails while `fail` is set.
#[derive(Clone, Default)]
struct Runs {
    count: Arc<AtomicU32>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

async fn flaky(State(runs): State<Runs>) -> Result<u32, TaskError> {
    let n = runs.count.fetch_add(1, Ordering::SeqCst) + 1;
    if runs.fail.load(Ordering::SeqCst) {
        Err(TaskError::new(format!("flaky failed on run {n}")))
    } else {
        Ok(n)
    }
}

fn fast_retries(n: u32) -> RetryPolicy {
    RetryPolicy::new(n)
        .base(Duration::from_millis(20))
        .max(Duration::from_millis(50))
}

/// Guarantee: when retries are exhausted the original request goes to the
/// dead-letter stream with the reason, the record is `failed` with that
/// reason, and the message is terminated (the task stream is empty).
#[tokio::test]
async fn exhausted_retries_dead_letter_the_original_request() {
    let (server, broker) = server_and_broker().await;
    let runs = Runs::default();
    runs.fail.store(true, Ordering::SeqCst);
    let worker = Worker::builder(broker.clone())
        .name("dl-worker")
        .state(runs.clone())
        .register(Task::new("flaky", flaky).retry_policy(fast_retries(2)))
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("flaky")
        .id("dies-1")
        .args(&serde_json::json!({"x": 1}))
        .metadata("tenant", "acme")
        .publish()
        .await
        .unwrap();
    let record = handle.wait(WAIT).await.unwrap();
    assert_eq!(record.status, Status::Failed);
    assert_eq!(record.attempts, 3);
    let error = record.error.clone().unwrap();
    assert_eq!(error.kind, "error");
    assert_eq!(error.message, "flaky failed on run 3");
    assert_eq!(runs.count.load(Ordering::SeqCst), 3);

    let letter = client.dead_letter("dies-1").await.unwrap().unwrap();
    assert_eq!(letter.id, "dies-1");
    assert_eq!(letter.task, "flaky");
    assert_eq!(letter.queue, "default");
    assert_eq!(letter.error, error);
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.worker, "dl-worker");
    let original = letter.request().unwrap();
    assert_eq!(
        original.args_as::<serde_json::Value>().unwrap(),
        serde_json::json!({"x": 1})
    );
    assert_eq!(original.metadata["tenant"], "acme");
    let listed = client.dead_letters(100).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "dies-1");

    // Read with plain async-nats, as documented.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let dead = js.get_stream("JETQ_DEAD").await.unwrap();
    let raw = dead
        .direct_get_last_for_subject("jetq.dead.dies-1")
        .await
        .unwrap();
    assert_eq!(
        raw.headers.get("Jetq-Error-Kind").unwrap().as_str(),
        "error"
    );
    assert_eq!(raw.headers.get("Jetq-Task").unwrap().as_str(), "flaky");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&raw.payload).unwrap()["id"],
        "dies-1"
    );
    assert_eq!(stored_requests(&server).await, 0);
    worker.shutdown().await.unwrap();
}

/// Guarantee: poison requests (a malformed envelope, an unknown task,
/// arguments that do not decode) fail at once, each with a dead letter
/// naming the reason, and the worker keeps serving.
#[tokio::test]
async fn poison_requests_are_dead_lettered_at_once_and_the_worker_lives() {
    let (server, broker) = server_and_broker().await;
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    broker.ensure_queue("default").await.unwrap();
    let client = Client::new(broker.clone());

    // Not JSON at all: no id to address, dead-lettered under its sequence.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let ack = js
        .publish("jetq.tasks.default.demo.add", "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // An envelope with a usable id but no task field.
    let broken = js
        .publish(
            "jetq.tasks.default.demo.add",
            r#"{"v":1,"id":"broken-1","args":{}}"#.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let unknown = client.task("no.such.task").publish().await.unwrap();
    let bad_args = client
        .task("demo.add")
        .args(&serde_json::json!({"a": "x"}))
        .max_retries(5)
        .publish()
        .await
        .unwrap();

    let r = unknown.wait(WAIT).await.unwrap();
    assert_eq!(
        (r.status, r.error.unwrap().kind.as_str()),
        (Status::Failed, "unknown_task")
    );
    let r = bad_args.wait(WAIT).await.unwrap();
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.attempts, 1, "invalid arguments are not retried");
    assert_eq!(r.error.unwrap().kind, "invalid_args");
    // An invalid message owns no record, even with a readable id.
    let broken_key = jetq::DeadLetter::invalid_key("default", broken.sequence);
    jetq_tests::wait_for_dead_letter(&broker, &broken_key).await;
    assert_eq!(
        client.record("broken-1").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // The worker lives on.
    let ok = client
        .task("demo.add")
        .args(&serde_json::json!({"a": 2, "b": 3}))
        .publish()
        .await
        .unwrap();
    assert_eq!(ok.result::<i64>(WAIT).await.unwrap(), 5);

    let invalid_key = jetq::DeadLetter::invalid_key("default", ack.sequence);
    let letters = client.dead_letters(100).await.unwrap();
    let find = |id: &str| {
        letters
            .iter()
            .find(|l| l.id == id)
            .unwrap_or_else(|| panic!("no dead letter {id} in {letters:?}"))
    };
    let garbage = find(&invalid_key);
    assert_eq!(garbage.error.kind, "invalid_request");
    assert_eq!(&garbage.payload[..], b"{not json");
    assert!(garbage.request().is_err());
    assert_eq!(find(&broken_key).error.kind, "invalid_request");
    assert!(find(&broken_key).error.message.contains("broken-1"));
    assert_eq!(find(unknown.id()).error.kind, "unknown_task");
    assert!(find(unknown.id()).error.message.contains("no.such.task"));
    assert_eq!(find(bad_args.id()).error.kind, "invalid_args");
    assert_eq!(letters.len(), 4);
    // A garbage dead letter cannot be requeued, and says why.
    let err = client.requeue(&invalid_key).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Serialization, "{err}");
    assert_eq!(stored_requests(&server).await, 0);
    worker.shutdown().await.unwrap();
}

/// Guarantee: `requeue` publishes a dead letter again as a fresh request
/// (attempts from zero) with the same id, and removes the dead letter.
#[tokio::test]
async fn a_requeued_dead_letter_runs_again_as_a_fresh_request() {
    let (_server, broker) = server_and_broker().await;
    let runs = Runs::default();
    runs.fail.store(true, Ordering::SeqCst);
    let worker = Worker::builder(broker.clone())
        .state(runs.clone())
        .register(Task::new("flaky", flaky).retry_policy(fast_retries(1)))
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client.task("flaky").id("again-1").publish().await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap().status, Status::Failed);
    assert!(client.dead_letter("again-1").await.unwrap().is_some());

    // The cause is fixed; requeue.
    runs.fail.store(false, Ordering::SeqCst);
    let again = client.requeue("again-1").await.unwrap();
    assert_eq!(again.id(), "again-1");
    let record = again.wait(WAIT).await.unwrap();
    assert_eq!(record.status, Status::Succeeded);
    assert_eq!(
        record.attempts, 1,
        "a fresh request counts attempts from zero"
    );
    assert_eq!(record.value, Some(serde_json::json!(3)));
    assert!(client.dead_letter("again-1").await.unwrap().is_none());
    assert!(client.dead_letters(10).await.unwrap().is_empty());
    // Nothing left to requeue.
    let err = client.requeue("again-1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    // Publishing the id again is still idempotent: it has succeeded.
    client.task("flaky").id("again-1").publish().await.unwrap();
    assert_eq!(runs.count.load(Ordering::SeqCst), 3);
    worker.shutdown().await.unwrap();
}

/// Guarantee: a cancelled request that has not started never runs, and its
/// record is `cancelled`.
#[tokio::test]
async fn a_pending_request_cancelled_never_runs() {
    let (server, broker) = server_and_broker().await;
    let client = Client::new(broker.clone());
    let runs = Runs::default();
    // No worker yet: the request waits in the stream.
    let handle = client.task("flaky").id("never-1").publish().await.unwrap();
    let record = client.cancel("never-1").await.unwrap();
    assert_eq!(record.status, Status::Cancelled);
    assert_eq!(record.error.as_ref().unwrap().kind, "cancelled");
    assert!(record.cancel_requested_at.is_some());

    let worker = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("flaky", flaky)
        .spawn()
        .unwrap();
    // A request published after it completes, so the worker has been
    // through the cancelled one (one queue, in order).
    let after = client.task("flaky").publish().await.unwrap();
    assert_eq!(after.result::<u32>(WAIT).await.unwrap(), 1);
    assert_eq!(handle.status().await.unwrap(), Status::Cancelled);
    assert_eq!(
        runs.count.load(Ordering::SeqCst),
        1,
        "the cancelled one ran"
    );
    let err = handle.result::<u32>(WAIT).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    assert_eq!(stored_requests(&server).await, 0);
    assert!(client.dead_letters(10).await.unwrap().is_empty());
    // Cancelling again, or an id with no record (queued, or unknown: they
    // cannot be told apart without scanning the queue): a `cancelled` record
    // with no task, which a later publish of the id does not run.
    assert_eq!(
        client.cancel("never-1").await.unwrap().status,
        Status::Cancelled
    );
    let nope = client.cancel("nope").await.unwrap();
    assert_eq!((nope.status, nope.task.as_str()), (Status::Cancelled, ""));
    let late = client.task("nope.task").id("nope").publish().await.unwrap();
    let err = late.result::<u32>(WAIT).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    worker.shutdown().await.unwrap();
}

#[derive(Clone, Default)]
struct Started(Arc<Notify>);

/// Waits for its cancellation token, then reports how it ended.
async fn wait_for_cancel(ctx: Context, State(started): State<Started>) -> Result<(), TaskError> {
    started.0.notify_one();
    ctx.cancelled().await;
    Err(TaskError::new("stopped: cancelled"))
}

/// Ignores its token and returns a value after a while.
async fn stubborn(State(started): State<Started>) -> Result<u32, TaskError> {
    started.0.notify_one();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Ok(7)
}

/// Guarantee: cancelling a running request fires its cancellation token on
/// whatever worker runs it; the record ends `cancelled`, not failed or retried.
#[tokio::test]
async fn a_running_request_cancelled_sees_its_token_fire_on_its_worker() {
    let (server, broker) = server_and_broker().await;
    let started = Started::default();
    // Two workers with their own connections; the client has a third.
    let mut workers = Vec::new();
    for name in ["w-a", "w-b"] {
        workers.push(
            Worker::builder(connect(&server).await)
                .name(name)
                .state(started.clone())
                .task("wait.cancel", wait_for_cancel)
                .task("stubborn", stubborn)
                .spawn()
                .unwrap(),
        );
    }
    let client = Client::new(broker.clone());
    let handle = client
        .task("wait.cancel")
        .id("run-1")
        .publish()
        .await
        .unwrap();
    started.0.notified().await;
    // Cancelled once its record says `running` (after `running_after`):
    // the attempt is asked to stop and ends the record.
    jetq_tests::wait_for_record(&broker, "run-1", |r| r.status == Status::Running).await;
    let record = client.cancel("run-1").await.unwrap();
    assert_eq!(record.status, Status::Running);
    assert!(record.cancel_requested_at.is_some());
    let record = handle.wait(WAIT).await.unwrap();
    assert_eq!(record.status, Status::Cancelled);
    assert_eq!(record.attempts, 1);
    assert_eq!(record.error.unwrap().kind, "cancelled");

    // A task that ignores its token still ends `cancelled`: the cancellation
    // wins. Cancelled before its record says `running`, the record is
    // `cancelled` at once and the running attempt is told all the same.
    let handle = client.task("stubborn").id("run-2").publish().await.unwrap();
    started.0.notified().await;
    let record = client.cancel("run-2").await.unwrap();
    assert_eq!(record.status, Status::Cancelled);
    let record = handle.wait(WAIT).await.unwrap();
    assert_eq!(record.status, Status::Cancelled);
    assert_eq!(record.value, None);
    // Its attempt ends (and acknowledges) on its own time.
    for w in workers {
        w.shutdown().await.unwrap();
    }
    assert_eq!(stored_requests(&server).await, 0);
}

/// Guarantee: a worker that missed the cancellation signal finds the
/// cancellation in the record at its next keep-alive.
#[tokio::test]
async fn a_cancellation_written_only_to_the_record_still_reaches_the_task() {
    let (_server, broker) = server_and_broker().await;
    let started = Started::default();
    let worker = Worker::builder(broker.clone())
        .ack_wait(Duration::from_millis(900))
        .state(started.clone())
        .task("wait.cancel", wait_for_cancel)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("wait.cancel")
        .id("quiet-1")
        .publish()
        .await
        .unwrap();
    started.0.notified().await;
    jetq_tests::wait_for_record(&broker, "quiet-1", |r| r.status == Status::Running).await;
    // Write the request into the record, without the signal.
    let entry = broker.get_record("quiet-1").await.unwrap().unwrap();
    let mut record = jetq::Record::from_json(&entry.value).unwrap();
    record.cancel_requested_at = Some(OffsetDateTime::now_utc());
    broker
        .update_record("quiet-1", record.to_json().unwrap().into(), entry.revision)
        .await
        .unwrap();
    let record = handle.wait(WAIT).await.unwrap();
    assert_eq!(record.status, Status::Cancelled);
    worker.shutdown().await.unwrap();
}

/// Guarantee: a delayed request is stored at once, holds no worker slot while
/// it waits, and runs once when due, not before.
#[tokio::test]
async fn a_delayed_request_runs_once_when_due_and_holds_no_slot() {
    let (server, broker) = server_and_broker().await;
    let runs = Runs::default();
    let worker = Worker::builder(broker.clone())
        .concurrency(1)
        .state(runs.clone())
        .task("flaky", flaky)
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let delay = Duration::from_secs(2);
    let handle = client
        .task("flaky")
        .id("later-1")
        .delay(delay)
        .publish()
        .await
        .unwrap();
    let pending = handle.record().await.unwrap();
    assert_eq!(pending.status, Status::Pending);
    let due = pending.next_attempt_at.expect("a delayed record says when");
    // The only slot is free meanwhile.
    let now = client
        .task("demo.add")
        .args(&serde_json::json!({"a": 1, "b": 1}))
        .publish()
        .await
        .unwrap();
    assert_eq!(now.result::<i64>(WAIT).await.unwrap(), 2);
    assert_eq!(
        runs.count.load(Ordering::SeqCst),
        0,
        "ran before it was due"
    );
    // Publishing the same id again keeps it to one run, at the first due time.
    client
        .task("flaky")
        .id("later-1")
        .delay(Duration::from_secs(60))
        .publish()
        .await
        .unwrap();
    let record = handle.wait(WAIT).await.unwrap();
    assert_eq!(record.status, Status::Succeeded);
    assert_eq!(record.attempts, 1);
    let started = record.started_at.unwrap();
    assert!(started >= due, "started {started} before due {due}");
    assert!(
        started - due < jetq::time::Duration::seconds(2),
        "started {started}, long after due {due}"
    );
    assert_eq!(runs.count.load(Ordering::SeqCst), 1);
    assert_eq!(stored_requests(&server).await, 0);
    worker.shutdown().await.unwrap();
}

/// Guarantee: a delayed request survives a restart of the server and of the
/// workers while it waits, and then runs once.
#[tokio::test]
async fn a_delayed_request_survives_server_and_worker_restarts() {
    let mut server = NatsServer::start();
    let broker = connect(&server).await;
    let runs = Runs::default();
    let client = Client::new(broker.clone());
    let handle = client
        .task("flaky")
        .id("durable-1")
        .delay(Duration::from_secs(3))
        .publish()
        .await
        .unwrap();
    let due = handle.record().await.unwrap().next_attempt_at.unwrap();
    // The server goes down and comes back with the same store; no worker
    // was running when the request was stored.
    server.stop();
    server.restart();
    let broker = connect(&server).await;
    let worker = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("flaky", flaky)
        .spawn()
        .unwrap();
    let record = wait_for_record(&broker, "durable-1", |r| r.status.is_terminal()).await;
    assert_eq!(record.status, Status::Succeeded);
    assert!(record.started_at.unwrap() >= due);
    assert_eq!(runs.count.load(Ordering::SeqCst), 1);
    worker.shutdown().await.unwrap();
}

/// Guarantee: a delayed request cancelled before it is due never runs, and
/// its schedule is removed from the stream.
#[tokio::test]
async fn a_delayed_request_cancelled_never_runs() {
    let (server, broker) = server_and_broker().await;
    let runs = Runs::default();
    let worker = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("flaky", flaky)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    client
        .task("flaky")
        .id("later-2")
        .delay(Duration::from_secs(1))
        .publish()
        .await
        .unwrap();
    assert_eq!(stored_requests(&server).await, 1);
    let record = client.cancel("later-2").await.unwrap();
    assert_eq!(record.status, Status::Cancelled);
    assert_eq!(stored_requests(&server).await, 0, "the schedule is gone");
    // Past its due time, a later request runs and the cancelled one did not.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = client.task("flaky").publish().await.unwrap();
    assert_eq!(after.result::<u32>(WAIT).await.unwrap(), 1);
    assert_eq!(
        client.record("later-2").await.unwrap().status,
        Status::Cancelled
    );
    worker.shutdown().await.unwrap();
}

/// Guarantee: an oversized request is refused at publish with an error that
/// names the limit, and nothing is written (no record, no message).
#[tokio::test]
async fn an_oversized_request_is_refused_naming_the_limit() {
    let (server, broker) = server_and_broker().await;
    let limit = broker.max_payload().unwrap();
    let client = Client::new(broker.clone());
    let big = "x".repeat(limit + 1);
    let err = client
        .task("demo.add")
        .id("huge-1")
        .args(&big)
        .publish()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    assert!(err.to_string().contains(&limit.to_string()), "{err}");
    assert_eq!(
        client.record("huge-1").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // A publish that fails after the pending record was written (here a
    // header NATS reserves) removes that record again.
    let client = client.pending_records(true);
    let err = client
        .task("demo.add")
        .id("bad-header-1")
        .header("Nats-Msg-Id", "x")
        .publish()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName);
    assert_eq!(
        client.record("bad-header-1").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // The id is free for a correct publish.
    client
        .task("demo.add")
        .id("bad-header-1")
        .publish()
        .await
        .unwrap();
    assert_eq!(
        client.record("bad-header-1").await.unwrap().status,
        Status::Pending
    );
    let _ = server;
}

/// A broker on a server whose `max_payload` is small.
async fn small_payload_server() -> (NatsServer, NatsBroker, tempfile::TempDir) {
    let (server, dir) = jetq_tests::server_with_config("max_payload: 4096\n");
    let broker = connect(&server).await;
    (server, broker, dir)
}

async fn big_value(Args(n): Args<usize>) -> Result<String, TaskError> {
    Ok("y".repeat(n))
}

/// Guarantee: a task whose value does not fit in a record fails with kind
/// `too_large` (and a dead letter) instead of being retried for ever.
#[tokio::test]
async fn a_value_too_large_for_a_record_fails_once_with_a_clear_reason() {
    let (_server, broker, _conf) = small_payload_server().await;
    assert_eq!(broker.max_payload(), Some(4096));
    let worker = Worker::builder(broker.clone())
        .task("big.value", big_value)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("big.value")
        .args(&8000usize)
        .publish()
        .await
        .unwrap();
    let record = handle.wait(WAIT).await.unwrap();
    assert_eq!(record.status, Status::Failed);
    assert_eq!(record.attempts, 1);
    let error = record.error.unwrap();
    assert_eq!(error.kind, "too_large");
    assert!(error.message.contains("4096"), "{}", error.message);
    assert!(client.dead_letter(handle.id()).await.unwrap().is_some());
    worker.shutdown().await.unwrap();
}

/// The server delivers a message again while its attempt still runs on the
/// same worker (here: the queue's ack wait was shortened under the worker,
/// which keeps sending keep-alives at the old pace until it reads the new
/// one): the second delivery leaves the message to that attempt instead of
/// taking the record over and running the task a second time.
#[tokio::test]
async fn a_delivery_of_a_message_whose_attempt_runs_here_is_left_to_that_attempt() {
    let (server, broker) = server_and_broker().await;
    let runs = Arc::new(AtomicU32::new(0));
    async fn linger(State(runs): State<Arc<AtomicU32>>) -> Result<u32, TaskError> {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        Ok(n)
    }
    let worker = Worker::builder(broker.clone())
        .name("lingering")
        .ack_wait(Duration::from_secs(30))
        .state(Arc::clone(&runs))
        .task("demo.linger", linger)
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    // Once a request has run, the worker's consumer is there.
    let warm = client
        .task("demo.add")
        .args(&serde_json::json!({"a": 1, "b": 1}));
    assert_eq!(
        warm.publish()
            .await
            .unwrap()
            .result::<i64>(WAIT)
            .await
            .unwrap(),
        2
    );
    // The queue's ack wait, shortened to 1 s behind the worker's back.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let stream = js.get_stream(broker.stream_name()).await.unwrap();
    let name = broker.consumer_name("default").unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(&name).await.unwrap();
    let mut config = consumer.info().await.unwrap().config.clone();
    config.ack_wait = Duration::from_secs(1);
    stream.update_consumer(config).await.unwrap();
    let handle = client.task("demo.linger").publish().await.unwrap();
    let record = handle.wait(WAIT).await.unwrap();
    assert_eq!(record.status, Status::Succeeded, "{record:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the task ran again: {record:?}"
    );
    assert_eq!(record.attempts, 1, "{record:?}");
    assert_eq!(record.value, Some(serde_json::json!(1)));
    let info = consumer.info().await.unwrap();
    assert!(
        // Two messages (the warm-up, this one), so more deliveries than that.
        info.delivered.consumer_sequence > info.delivered.stream_sequence,
        "the message was never delivered again, so this tested nothing: {info:?}"
    );
    assert_eq!(stored_requests(&server).await, 0);
    worker.shutdown().await.unwrap();
}

/// A `start_unchecked` request runs without the record read a checked start
/// makes: here on a worker whose user may not read records at all (direct
/// and stream gets denied), where a checked start could never claim.
#[tokio::test]
async fn a_start_unchecked_request_runs_without_reading_its_record() {
    let (server, _conf) = jetq_tests::server_with_config(
        r#"
authorization {
  users = [
    { user: producer, password: p }
    { user: worker, password: w, permissions: {
        publish: { deny: ["$JS.API.DIRECT.GET.>", "$JS.API.STREAM.MSG.GET.>"] } } }
  ]
}
"#,
    );
    let producer = jetq_tests::connect_as(&server, "producer", "p").await;
    let worker = Worker::builder(jetq_tests::connect_as(&server, "worker", "w").await)
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(producer.clone());
    for (a, b) in [(1, 2), (40, 2)] {
        let handle = client
            .task("demo.add")
            .args(&serde_json::json!({ "a": a, "b": b }))
            .start_unchecked()
            .publish()
            .await
            .unwrap();
        assert_eq!(handle.result::<i64>(WAIT).await.unwrap(), a + b);
        let record = client.record(handle.id()).await.unwrap();
        assert_eq!((record.status, record.attempts), (Status::Succeeded, 1));
    }
    worker.shutdown().await.unwrap();
}

/// The price of `start_unchecked`, and its limit: a request cancelled while
/// no worker listened runs all the same, and its record stays `cancelled`.
#[tokio::test]
async fn a_start_unchecked_request_never_writes_over_its_cancelled_record() {
    let (_server, broker) = server_and_broker().await;
    let client = Client::new(broker.clone());
    let cancelled = client.cancel("unchecked-1").await.unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    let stored = broker.get_record("unchecked-1").await.unwrap().unwrap();
    let runs = Runs::default();
    let worker = Worker::builder(broker.clone())
        .state(runs.clone())
        .task("flaky", flaky)
        .spawn()
        .unwrap();
    let handle = client
        .task("flaky")
        .id("unchecked-1")
        .start_unchecked()
        .publish()
        .await
        .unwrap();
    // A request published after it completes, so the worker has been
    // through the unchecked one (one queue, in order).
    let after = client.task("flaky").publish().await.unwrap();
    assert_eq!(after.result::<u32>(WAIT).await.unwrap(), 2);
    assert_eq!(
        runs.count.load(Ordering::SeqCst),
        2,
        "the unchecked one ran"
    );
    let err = handle.result::<u32>(WAIT).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    let now = broker.get_record("unchecked-1").await.unwrap().unwrap();
    assert_eq!(
        (now.revision, now.value),
        (stored.revision, stored.value),
        "the cancelled record is untouched"
    );
    worker.shutdown().await.unwrap();
}
