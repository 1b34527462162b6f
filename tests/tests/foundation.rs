//! The foundation slice against a real nats-server: requests flow through
//! JetStream to workers, records land in KV.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jetq::{Args, Client, Context, ErrorKind, RetryPolicy, State, Status, Task, TaskError, Worker};
use jetq_tests::{add, connect, publish_add, server_and_broker, WAIT};
use tokio::sync::Notify;

#[tokio::test]
async fn a_request_runs_and_its_record_lands_in_kv() {
    let (server, broker) = server_and_broker().await;
    let worker = Worker::builder(broker.clone())
        .name("it-worker")
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    let handle = client
        .task("demo.add")
        .args(&serde_json::json!({"a": 2, "b": 40}))
        .metadata("tenant", "acme")
        .publish()
        .await
        .unwrap();
    assert_eq!(handle.result::<i64>(WAIT).await.unwrap(), 42);

    // Any other client reads it by id, straight from KV.
    let other = Client::new(connect(&server).await);
    let record = other.record(handle.id()).await.unwrap();
    assert_eq!(record.status, Status::Succeeded);
    assert_eq!(record.value, Some(serde_json::json!(42)));
    assert_eq!(record.metadata["tenant"], "acme");
    assert_eq!(record.attempts, 1);
    assert_eq!(record.worker.as_deref(), Some("it-worker"));
    assert!(record.started_at.is_some() && record.finished_at.is_some());
    assert_eq!(other.metadata(handle.id()).await.unwrap()["tenant"], "acme");
    assert_eq!(handle.status().await.unwrap(), Status::Succeeded);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_record_is_stored_as_documented_json_in_the_results_bucket() {
    let (server, broker) = server_and_broker().await;
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    let handle = client
        .task("demo.add")
        .id("wire-1")
        .args(&serde_json::json!({"a": 1, "b": 2}))
        .publish()
        .await
        .unwrap();
    handle.wait(WAIT).await.unwrap();
    // Read it with plain async-nats, as a client of another language would.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let kv = js.get_key_value("JETQ_RESULTS").await.unwrap();
    let raw = kv
        .get("wire-1")
        .await
        .unwrap()
        .expect("record under key = id");
    let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(json["v"], 1);
    assert_eq!(json["id"], "wire-1");
    assert_eq!(json["status"], "succeeded");
    assert_eq!(json["value"], 3);
    assert_eq!(json["attempts"], 1);
    for field in [
        "task",
        "queue",
        "max_retries",
        "enqueued_at",
        "started_at",
        "finished_at",
        "worker",
        "seq",
    ] {
        assert!(json.get(field).is_some(), "record lacks `{field}`: {json}");
    }
    // Unset fields are left out, not written as `null` (no metadata was
    // given, so none is written either).
    let object = json.as_object().unwrap();
    for field in ["error", "progress", "next_attempt_at", "metadata"] {
        assert!(!object.contains_key(field), "record has `{field}`: {json}");
    }
    assert!(object.values().all(|v| !v.is_null()), "{json}");
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_fails_at_once_and_the_worker_keeps_running() {
    let (server, broker) = server_and_broker().await;
    let worker = Worker::builder(broker.clone())
        .register(Task::new("demo.add", add).max_retries(5))
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());

    // Unknown task.
    let rec = client
        .task("no.such.task")
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!((rec.status, rec.attempts), (Status::Failed, 1));
    let err = rec.error.unwrap();
    assert_eq!(err.kind, "unknown_task");
    assert!(
        err.message.contains("no.such.task") && err.message.contains("demo.add"),
        "{}",
        err.message
    );

    // Wrong argument types.
    let rec = client
        .task("demo.add")
        .args(&serde_json::json!({"a": "x"}))
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!((rec.status, rec.attempts), (Status::Failed, 1));
    assert_eq!(rec.error.unwrap().kind, "invalid_args");

    // Malformed JSON, published raw to the task subject with a readable id.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let broken = js
        .publish(
            "jetq.tasks.default.demo.add",
            r#"{"v":1,"id":"raw-broken","task":"demo.add"}"#.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish("jetq.tasks.default.demo.add", "this is not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A message that is not a valid request owns no record (the id in it
    // could be another request's): it is dead-lettered under its sequence,
    // naming the id it claims, and `raw-broken` gets no record.
    let key = jetq::DeadLetter::invalid_key("default", broken.sequence);
    let letter = jetq_tests::wait_for_dead_letter(&broker, &key).await;
    assert_eq!(letter.error.kind, "invalid_request");
    assert!(
        letter.error.message.contains("raw-broken"),
        "{}",
        letter.error.message
    );
    assert_eq!(
        client.record("raw-broken").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // Still serving.
    let ok = publish_add(&client, 20, 22).await;
    assert_eq!(ok.result::<i64>(WAIT).await.unwrap(), 42);

    // Nothing is left to be redelivered forever.
    assert_eq!(jetq_tests::stored_requests(&server).await, 0);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_names_are_refused_before_reaching_nats() {
    let (_server, broker) = server_and_broker().await;
    let client = Client::new(broker);
    for id in ["a.b>", "a.b", "*", ">", "a b", ""] {
        let e = client.task("demo.add").id(id).publish().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName, "id {id:?}");
    }
    for queue in ["q.x", "q*", "q >"] {
        let e = client
            .task("demo.add")
            .queue(queue)
            .publish()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName, "queue {queue:?}");
    }
    for task in ["demo.*", "demo.>", "demo..add", " demo"] {
        let e = client.task(task).publish().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName, "task {task:?}");
    }
    let e = client.record("a.b>").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName);
    assert!(
        e.to_string().contains("`.`"),
        "the error names the rule: {e}"
    );
}

#[tokio::test]
async fn the_same_id_published_twice_runs_once() {
    let (_server, broker) = server_and_broker().await;
    let runs = Arc::new(AtomicUsize::new(0));
    async fn count(State(runs): State<Arc<AtomicUsize>>) -> Result<usize, TaskError> {
        Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
    let worker = Worker::builder(broker.clone())
        .state(Arc::clone(&runs))
        .task("count", count)
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    let first = client
        .task("count")
        .id("order-42-thumb")
        .publish()
        .await
        .unwrap();
    let second = client
        .task("count")
        .id("order-42-thumb")
        .publish()
        .await
        .unwrap();
    assert_eq!(first.result::<usize>(WAIT).await.unwrap(), 1);
    assert_eq!(second.result::<usize>(WAIT).await.unwrap(), 1);
    // And again after it finished.
    let third = client
        .task("count")
        .id("order-42-thumb")
        .publish()
        .await
        .unwrap();
    assert_eq!(third.result::<usize>(WAIT).await.unwrap(), 1);
    worker.shutdown().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn metadata_set_by_a_running_task_is_readable_before_it_ends() {
    let (_server, broker) = server_and_broker().await;
    #[derive(Clone)]
    struct Gates {
        written: Arc<Notify>,
        release: Arc<Notify>,
    }
    async fn long(ctx: Context, State(g): State<Gates>) -> Result<(), TaskError> {
        ctx.set_metadata("stage", "halfway").await?;
        ctx.set_progress(50, Some(100)).await?;
        g.written.notify_one();
        g.release.notified().await;
        ctx.set_metadata("stage", "done").await?;
        Ok(())
    }
    let gates = Gates {
        written: Arc::new(Notify::new()),
        release: Arc::new(Notify::new()),
    };
    let worker = Worker::builder(broker.clone())
        .state(gates.clone())
        .task("long", long)
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    let handle = client
        .task("long")
        .metadata("tenant", "acme")
        .publish()
        .await
        .unwrap();
    gates.written.notified().await;
    let rec = handle.record().await.unwrap();
    assert_eq!(rec.status, Status::Running);
    assert_eq!(rec.metadata["stage"], "halfway");
    assert_eq!(rec.metadata["tenant"], "acme");
    assert_eq!(rec.progress.unwrap().current, 50);
    gates.release.notify_one();
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert_eq!(rec.metadata["stage"], "done");
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn retryable_failures_are_retried_and_counted() {
    let (_server, broker) = server_and_broker().await;
    async fn flaky(ctx: Context, Args(times): Args<u32>) -> Result<u32, TaskError> {
        if ctx.attempt() <= times {
            return Err(TaskError::new(format!("attempt {} fails", ctx.attempt())));
        }
        Ok(ctx.retries())
    }
    async fn boom() -> Result<(), TaskError> {
        panic!("boom")
    }
    let fast = RetryPolicy::new(3)
        .base(Duration::from_millis(20))
        .max(Duration::from_millis(100));
    let worker = Worker::builder(broker.clone())
        .register(Task::new("flaky", flaky).retry_policy(fast))
        .register(Task::new("boom", boom).retry_policy(fast))
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    let h = client.task("flaky").args(&2).publish().await.unwrap();
    assert_eq!(h.result::<u32>(WAIT).await.unwrap(), 2);
    assert_eq!(h.record().await.unwrap().attempts, 3);
    let rec = client
        .task("flaky")
        .args(&9)
        .max_retries(1)
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!((rec.status, rec.attempts), (Status::Failed, 2));
    let rec = client
        .task("boom")
        .max_retries(0)
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!((rec.status, rec.attempts), (Status::Failed, 1));
    assert_eq!(rec.error.unwrap().kind, "panic");
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn queues_are_separate_and_a_worker_serves_several() {
    let (_server, broker) = server_and_broker().await;
    async fn which(ctx: Context) -> Result<String, TaskError> {
        Ok(ctx.queue().to_owned())
    }
    let worker = Worker::builder(broker.clone())
        .register(Task::new("which", which).queue("alpha").queue("beta"))
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let a = client.task("which").queue("alpha").publish().await.unwrap();
    let b = client.task("which").queue("beta").publish().await.unwrap();
    assert_eq!(a.result::<String>(WAIT).await.unwrap(), "alpha");
    assert_eq!(b.result::<String>(WAIT).await.unwrap(), "beta");
    // A request on a queue nobody serves stays pending, untouched.
    let g = client.task("which").queue("gamma").publish().await.unwrap();
    let e = g.wait(Duration::from_millis(300)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert_eq!(g.status().await.unwrap(), Status::Pending);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn concurrency_is_limited() {
    let (_server, broker) = server_and_broker().await;
    #[derive(Clone, Default)]
    struct Gauge {
        now: Arc<AtomicUsize>,
        max: Arc<AtomicUsize>,
    }
    async fn busy(State(g): State<Gauge>) -> Result<(), TaskError> {
        let n = g.now.fetch_add(1, Ordering::SeqCst) + 1;
        g.max.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        g.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    let gauge = Gauge::default();
    let worker = Worker::builder(broker.clone())
        .state(gauge.clone())
        .concurrency(3)
        .task("busy", busy)
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    let mut handles = Vec::new();
    for _ in 0..12 {
        handles.push(client.task("busy").publish().await.unwrap());
    }
    for h in &handles {
        assert_eq!(h.wait(WAIT).await.unwrap().status, Status::Succeeded);
    }
    worker.shutdown().await.unwrap();
    assert_eq!(
        gauge.max.load(Ordering::SeqCst),
        3,
        "at most (and, under load, exactly) 3 at once"
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_tasks_and_loses_nothing() {
    let (server, broker) = server_and_broker().await;
    #[derive(Clone)]
    struct Started(Arc<Notify>);
    async fn slow(State(s): State<Started>, Args(ms): Args<u64>) -> Result<u64, TaskError> {
        s.0.notify_one();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    }
    let started = Started(Arc::new(Notify::new()));
    let worker = Worker::builder(broker.clone())
        .state(started.clone())
        .concurrency(1)
        .task("slow", slow)
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(client.task("slow").args(&300u64).publish().await.unwrap());
    }
    started.0.notified().await;
    worker.shutdown().await.unwrap();
    // The one that was running finished during shutdown.
    let done: Vec<Status> = {
        let mut v = Vec::new();
        for h in &handles {
            v.push(h.status().await.unwrap());
        }
        v
    };
    assert_eq!(
        done.iter().filter(|s| **s == Status::Succeeded).count(),
        1,
        "{done:?}"
    );
    assert!(
        done.iter()
            .all(|s| matches!(s, Status::Succeeded | Status::Pending)),
        "{done:?}"
    );
    // A new worker (new connection) runs the rest.
    let broker2 = connect(&server).await;
    let worker2 = Worker::builder(broker2.clone())
        .state(started)
        .concurrency(4)
        .task("slow", slow)
        .spawn()
        .unwrap();
    for h in &handles {
        let rec = Client::new(broker2.clone())
            .wait(h.id(), WAIT)
            .await
            .unwrap();
        assert_eq!((rec.status, rec.attempts), (Status::Succeeded, 1));
    }
    worker2.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_published_as_a_worker_stops_is_not_stranded() {
    // An idle worker has a pull request open on the server. After it stops,
    // a new request must go to the next worker at once, not sit out the
    // 30 s ack wait in a pull nobody reads.
    let (server, broker) = server_and_broker().await;
    let first = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    one_through(&client).await;
    first.shutdown().await.unwrap();
    let h = publish_add(&client, 1, 1).await;
    let second = Worker::builder(connect(&server).await)
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let rec = h.wait(Duration::from_secs(10)).await.unwrap();
    assert_eq!((rec.status, rec.attempts), (Status::Succeeded, 1));
    second.shutdown().await.unwrap();
}

/// Run the worker `builder` makes until the returned sender fires.
fn run_until_told(
    builder: jetq::WorkerBuilder,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<jetq::Result<()>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = builder.build().unwrap();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    (stop, running)
}

/// One `demo.add` request through, waited for.
async fn one_through(client: &Client) {
    let warm = publish_add(client, 0, 0).await;
    warm.wait(WAIT).await.unwrap();
}

/// Requests delivered to the pull of a worker that is stopping are put back
/// at once, marked as never run: the next worker runs each as its first
/// attempt, not its second, and well before the ack wait (30 s).
#[tokio::test]
async fn requests_delivered_to_a_stopping_worker_run_next_as_their_first_attempt() {
    let (server, broker) = server_and_broker().await;
    let client = Client::new(broker.clone());
    let (stop, first) = run_until_told(Worker::builder(broker.clone()).task("demo.add", add));
    // Idle, with a pull open on the server.
    one_through(&client).await;
    // Published as it stops: the server hands them to its open pull (they
    // may also come before it sees the stop, and run there).
    stop.send(()).unwrap();
    let mut handles = Vec::new();
    for (n, pending) in [(1, false), (2, true)] {
        let mut builder = client
            .task("demo.add")
            .args(&serde_json::json!({"a": n, "b": n}));
        if pending {
            builder = builder.pending_record();
        }
        handles.push((n, builder.publish().await.unwrap()));
    }
    first.await.unwrap().unwrap();
    let second = Worker::builder(connect(&server).await)
        .task("demo.add", add)
        .spawn()
        .unwrap();
    for (n, h) in &handles {
        let rec = h.wait(Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            (rec.status, rec.attempts),
            (Status::Succeeded, 1),
            "{rec:?}"
        );
        assert_eq!(rec.value, Some(serde_json::json!(2 * n)));
    }
    second.shutdown().await.unwrap();
}

async fn until_cancelled(ctx: Context) -> Result<(), TaskError> {
    ctx.cancelled().await;
    Err(TaskError::new("stopped"))
}

/// A delivery that a stopping worker holds for a task slot (it read ahead
/// while the slot was busy) is put back unrun, not started with its token
/// fired: the next worker runs it, as its first attempt.
#[tokio::test]
async fn a_delivery_waiting_for_a_slot_when_its_worker_stops_is_put_back_unrun() {
    let (server, broker) = server_and_broker().await;
    let client = Client::new(broker.clone());
    let (stop, first) = run_until_told(
        Worker::builder(broker.clone())
            .name("stopping")
            .concurrency(1)
            .task("demo.add", add)
            .task("block", until_cancelled),
    );
    // A quick task first: then the worker reads ahead while its slot is busy.
    one_through(&client).await;
    client.task("block").publish().await.unwrap();
    let waiting = publish_add(&client, 2, 3).await;
    // Both handed to the worker: one runs, one waits for the slot.
    let js = async_nats::jetstream::new(broker.client().clone());
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("JETQ_TASKS")
        .await
        .unwrap()
        .get_consumer("jetq-default")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while consumer.info().await.unwrap().num_ack_pending < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not take both requests"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(()).unwrap();
    first.await.unwrap().unwrap();
    let next = Worker::builder(connect(&server).await)
        .name("next")
        .task("demo.add", add)
        .task("block", until_cancelled)
        .spawn()
        .unwrap();
    let rec = waiting.wait(WAIT).await.unwrap();
    assert_eq!(
        (rec.status, rec.attempts, rec.worker.as_deref()),
        (Status::Succeeded, 1, Some("next")),
        "{rec:?}"
    );
    next.shutdown().await.unwrap();
}

/// Reads asked for together go out as one batch direct get: each gets its
/// own entry (with its revision), `None` for a key never written or deleted,
/// and a key asked for twice gets its entry both times.
#[tokio::test]
async fn record_reads_asked_for_together_each_get_their_own_entry() {
    use jetq::broker::Broker;
    let (server, broker) = server_and_broker().await;
    let mut written = std::collections::HashMap::new();
    for i in 0..40 {
        let key = format!("batch-{i}");
        let revision = broker
            .create_record(&key, bytes::Bytes::from(format!("value {i}")))
            .await
            .unwrap();
        written.insert(key, revision);
    }
    for i in (0..40).step_by(5) {
        let key = format!("batch-{i}");
        broker.delete_record(&key, written[&key]).await.unwrap();
        written.remove(&key);
    }
    // A second connection, so that the reads are its first ones.
    let reader = connect(&server).await;
    let keys: Vec<String> = (0..60)
        .map(|i| format!("batch-{i}"))
        .chain(["batch-1".to_owned(), "batch-5".to_owned()])
        .collect();
    let reads = futures_util::future::join_all(keys.iter().map(|k| reader.get_record(k))).await;
    for (key, read) in keys.iter().zip(reads) {
        let entry = read.unwrap();
        match written.get(key) {
            Some(revision) => {
                let entry = entry.unwrap_or_else(|| panic!("{key} was not found"));
                let i = key.trim_start_matches("batch-");
                assert_eq!(
                    entry.value,
                    bytes::Bytes::from(format!("value {i}")),
                    "{key}"
                );
                assert_eq!(entry.revision, *revision, "{key}");
            }
            None => assert!(entry.is_none(), "{key} should have no entry"),
        }
    }
}

/// A bucket that does not answer batch direct gets (here: made by another
/// tool without direct gets) still answers every read, one by one, and a
/// refused batch does not hold up the reads in flight with it until their
/// timeout (5 s).
#[tokio::test]
async fn record_reads_fall_back_to_single_reads_when_batches_are_refused() {
    use async_nats::jetstream::stream;
    use jetq::broker::Broker;
    let (server, broker) = server_and_broker().await;
    let bucket = broker.bucket_name();
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    js.create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_direct: false,
        allow_rollup: true,
        deny_delete: true,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..20 {
        js.publish(
            format!("$KV.{bucket}.plain-{i}"),
            format!("value {i}").into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let reader = connect(&server).await;
    let started = std::time::Instant::now();
    let keys: Vec<String> = (0..30).map(|i| format!("plain-{i}")).collect();
    let reads = futures_util::future::join_all(keys.iter().map(|k| reader.get_record(k))).await;
    for (i, read) in reads.into_iter().enumerate() {
        let entry = read.unwrap();
        if i < 20 {
            let entry = entry.unwrap_or_else(|| panic!("plain-{i} was not found"));
            assert_eq!(entry.value, bytes::Bytes::from(format!("value {i}")));
        } else {
            assert!(entry.is_none(), "plain-{i} should have no entry");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the reads waited for a batch timeout: {:?}",
        started.elapsed()
    );
}

/// A record is created once: a second create is refused as existing, an
/// update needs the revision last read, and a deleted record (its delete
/// marker) can be created again.
#[tokio::test]
async fn records_are_created_once_updated_by_revision_and_created_again_after_a_delete() {
    use jetq::broker::Broker;
    let (_server, broker) = server_and_broker().await;
    let value = |s: &str| bytes::Bytes::from(s.to_owned());
    let first = broker.create_record("once", value("first")).await.unwrap();
    let again = broker.create_record("once", value("second")).await;
    assert_eq!(again.unwrap_err().kind(), ErrorKind::AlreadyExists);
    let stale = broker
        .update_record("once", value("stale"), first + 100)
        .await;
    assert_eq!(stale.unwrap_err().kind(), ErrorKind::Conflict);
    let updated = broker
        .update_record("once", value("updated"), first)
        .await
        .unwrap();
    assert!(updated > first);
    let entry = broker.get_record("once").await.unwrap().unwrap();
    assert_eq!((entry.value, entry.revision), (value("updated"), updated));

    broker.delete_record("once", updated).await.unwrap();
    assert!(broker.get_record("once").await.unwrap().is_none());
    let recreated = broker.create_record("once", value("reborn")).await.unwrap();
    assert!(recreated > updated, "{recreated} after {updated}");
    let entry = broker.get_record("once").await.unwrap().unwrap();
    assert_eq!((entry.value, entry.revision), (value("reborn"), recreated));
    let twice = broker.create_record("once", value("twice")).await;
    assert_eq!(twice.unwrap_err().kind(), ErrorKind::AlreadyExists);
}
