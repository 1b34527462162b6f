//! Hardening against a real nats-server: hostile messages published with
//! plain async-nats never harm another request, and inputs that used to make
//! a request loop for ever end with a clear terminal record (issue cases in
//! brackets). The in-memory versions are in `core/tests/hardening.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use jetq::broker::Broker;
use jetq::{Args, Client, DeadLetter, ErrorKind, Record, Status, TaskError, Worker};
use jetq_tests::{add, connect, server_and_broker, wait_for_dead_letter, NatsServer, WAIT};
use serde_json::json;
use tokio::sync::Notify;

const SUBJECT: &str = "jetq.tasks.default.demo.add";

fn envelope(id: &str, task: &str, extra: serde_json::Value) -> Bytes {
    let mut v = json!({
        "v": 1, "id": id, "task": task, "queue": "default",
        "args": {"a": 1, "b": 2}, "enqueued_at": "2026-01-01T00:00:00Z"
    });
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

async fn js(server: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(server.url()).await.unwrap())
}

/// Publish raw bytes to `subject`, with `Nats-Msg-Id` if given; the sequence.
async fn raw(js: &jetstream::Context, subject: &str, msg_id: Option<&str>, body: Bytes) -> u64 {
    let mut headers = HeaderMap::new();
    if let Some(id) = msg_id {
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
    }
    js.publish_with_headers(subject.to_owned(), headers, body)
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// Cases 6, 7, 9: a malformed envelope with another request's id, a valid
/// one for another task with that id, a message squatting on another id's
/// `Nats-Msg-Id`, envelopes for another queue or task than their subject,
/// and unknown versions: each is refused (dead-lettered under its own
/// sequence), no record is written, and the victim runs untouched.
#[tokio::test]
async fn hostile_messages_never_harm_another_request() {
    let (server, broker) = server_and_broker().await;
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .task("demo.other", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let victim = client
        .task("demo.add")
        .id("victim")
        .args(&json!({"a": 20, "b": 22}))
        .delay(Duration::from_secs(2))
        .publish()
        .await
        .unwrap();
    let before = broker.get_record("victim").await.unwrap().unwrap();
    let js = js(&server).await;
    let attacks = [
        // 6: junk naming the victim's id.
        (
            SUBJECT,
            None,
            Bytes::from_static(br#"{"id":"victim"}"#),
            "invalid_request",
        ),
        // 6: a valid request of another task with the victim's id.
        (
            "jetq.tasks.default.demo.other",
            Some("victim.requeue.77"),
            envelope("victim", "demo.other", json!({})),
            "id_conflict",
        ),
        // 7: squats on the Nats-Msg-Id of a request not yet published.
        (
            SUBJECT,
            Some("later"),
            envelope("squatter", "demo.add", json!({})),
            "invalid_request",
        ),
        // 9: another queue's request on this queue's subject.
        (
            SUBJECT,
            None,
            envelope("q-1", "demo.add", json!({"queue": "other"})),
            "invalid_request",
        ),
        // 9: another task's request on this task's subject.
        (
            SUBJECT,
            None,
            envelope("t-1", "demo.other", json!({})),
            "invalid_request",
        ),
        // 9: versions this worker does not understand.
        (
            SUBJECT,
            None,
            envelope("v-999", "demo.add", json!({"v": 999})),
            "invalid_request",
        ),
        (
            SUBJECT,
            None,
            envelope("v-0", "demo.add", json!({"v": 0})),
            "invalid_request",
        ),
    ];
    let mut expected = Vec::new();
    for (subject, msg_id, body, kind) in attacks {
        let seq = raw(&js, subject, msg_id, body).await;
        expected.push((DeadLetter::invalid_key("default", seq), kind));
    }
    for (key, kind) in &expected {
        let letter = wait_for_dead_letter(&broker, key).await;
        assert_eq!(&letter.error.kind, kind, "{letter:?}");
    }
    for id in ["squatter", "q-1", "t-1", "v-999", "v-0"] {
        assert_eq!(
            client.record(id).await.unwrap_err().kind(),
            ErrorKind::NotFound,
            "{id}"
        );
    }
    assert_eq!(broker.get_record("victim").await.unwrap().unwrap(), before);
    assert!(client.dead_letter("victim").await.unwrap().is_none());
    let r = victim.wait(WAIT).await.unwrap();
    assert_eq!((r.status, r.task.as_str()), (Status::Succeeded, "demo.add"));
    assert_eq!(r.value, Some(json!(42)));
    // 7: the squatted id's publish is told, and leaves no pending record.
    let e = client
        .task("demo.add")
        .id("later")
        .args(&json!({"a": 1, "b": 1}))
        .publish()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert_eq!(
        client.record("later").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(jetq_tests::stored_requests(&server).await, 0);
    worker.shutdown().await.unwrap();
}

#[derive(Clone, Default)]
struct Gate(Arc<Notify>, Arc<Notify>);

async fn gated(jetq::State(gate): jetq::State<Gate>) -> Result<String, TaskError> {
    gate.0.notify_one();
    gate.1.notified().await;
    Ok("real".to_owned())
}

/// Case 8: forged notifications on the record subject (a fake `succeeded`
/// record, one with a huge revision) do not fool a waiter: it reads the
/// stored record, and returns the real result when there is one.
#[tokio::test]
async fn forged_record_notifications_are_only_hints() {
    let (server, broker) = server_and_broker().await;
    let gate = Gate::default();
    let worker = Worker::builder(broker.clone())
        .state(gate.clone())
        .task("gated", gated)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client.task("gated").publish().await.unwrap();
    gate.0.notified().await;
    let waiting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.wait(WAIT).await }
    });
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut fake = handle.record().await.unwrap();
    fake.status = Status::Succeeded;
    fake.value = Some(json!("forged"));
    for revision in ["5", "999999999"] {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Sequence", revision);
        nats.publish_with_headers(
            format!("jetq.records.{}", handle.id()),
            headers,
            Bytes::from(fake.to_json().unwrap()),
        )
        .await
        .unwrap();
    }
    nats.flush().await.unwrap();
    // The waiter must still be waiting: the task has not finished.
    assert!(
        jetq_tests::still_running_after(&waiting, Duration::from_millis(500)).await,
        "the waiter believed a forged notification"
    );
    gate.1.notify_one();
    let r = waiting.await.unwrap().unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.value, Some(json!("real")));
    worker.shutdown().await.unwrap();
}

/// A server that accepts messages of at most `max` bytes.
fn small_server(max: usize) -> (NatsServer, tempfile::TempDir) {
    jetq_tests::server_with_config(&format!("max_payload: {max}\n"))
}

/// Cases 3 and 4: a dead letter that does not fit with its request is stored
/// without it (and says so); a record whose claimed form does not fit (the
/// pending one did) ends `failed`/`too_large` with its metadata dropped.
#[tokio::test]
async fn what_does_not_fit_ends_the_request_instead_of_looping() {
    const MAX: usize = 8192;
    let (server, _conf) = small_server(MAX);
    let broker = connect(&server).await;
    assert_eq!(broker.max_payload(), Some(MAX));
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());

    // 3: arguments of the wrong type, nearly as large as a message may be.
    let big = "x".repeat(MAX - 400);
    let h = client
        .task("demo.add")
        .args(&json!({"a": big, "b": 1}))
        .publish()
        .await
        .unwrap();
    let r = h.wait(WAIT).await.unwrap();
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.unwrap().kind, "invalid_args");
    let letter = client.dead_letter(h.id()).await.unwrap().unwrap();
    assert_eq!(letter.error.kind, "invalid_args");
    assert!(letter.payload_omitted.is_some_and(|n| n > MAX - 400));
    assert_eq!(
        letter.request().unwrap_err().kind(),
        ErrorKind::PayloadTooLarge
    );

    // 4: metadata sized so the pending record fits and the claimed one not.
    let mut pad = MAX - 700;
    let id = "fat-1";
    let pending_size = |pad: usize| {
        let mut req = jetq::Request::new("demo.add");
        req.id = id.to_owned();
        req.metadata.insert("pad".into(), json!("y".repeat(pad)));
        Record::pending(&req).to_json().unwrap().len()
    };
    // Leave room for the KV headers of the create (about 60 bytes).
    while pending_size(pad + 1) <= MAX - 80 {
        pad += 1;
    }
    let h = client
        .task("demo.add")
        .id(id)
        .args(&json!({"a": 1, "b": 2}))
        .metadata("pad", "y".repeat(pad))
        .publish()
        .await
        .unwrap();
    let r = h.wait(WAIT).await.unwrap();
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert_eq!(r.error.as_ref().unwrap().kind, "too_large");
    assert!(r.metadata.is_empty());
    assert_eq!(r.attempts, 1);
    assert_eq!(jetq_tests::stored_requests(&server).await, 0);
    worker.shutdown().await.unwrap();
}

/// Case 3: a worker whose dead-letter stream cannot exist (another stream
/// captures its subjects) refuses to start, saying why, instead of looping
/// at the first failure.
#[tokio::test]
async fn a_worker_that_could_not_store_dead_letters_does_not_start() {
    let (server, broker) = server_and_broker().await;
    js(&server)
        .await
        .create_stream(jetstream::stream::Config {
            name: "SOMEONE_ELSE".into(),
            subjects: vec!["jetq.dead.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let err = tokio::time::timeout(WAIT, worker.shutdown())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("another stream"), "{err}");
}

/// Cases 1, 2, 5: a due time centuries ahead, a stored record with attempts
/// at u32::MAX, a stored record that is not JSON, and one of a future
/// version: each request ends with a clear record (or runs), none loops.
#[tokio::test]
async fn values_at_their_limits_and_foreign_records_end_cleanly() {
    let (server, broker) = server_and_broker().await;
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    broker.ensure_queue("default").await.unwrap();
    let js = js(&server).await;
    let kv = js.get_key_value("JETQ_RESULTS").await.unwrap();

    // 1: refused at publish; failed by the worker when published raw.
    let e = client
        .task("demo.add")
        .delay(Duration::from_secs(10_000_000_000))
        .publish()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    raw(
        &js,
        SUBJECT,
        Some("far-1"),
        envelope(
            "far-1",
            "demo.add",
            json!({"not_before": "2500-01-01T00:00:00Z"}),
        ),
    )
    .await;
    // 2: a record worn out to u32::MAX attempts.
    let mut req = jetq::Request::new("demo.add");
    req.id = "worn-1".into();
    let mut worn = Record::pending(&req);
    worn.attempts = u32::MAX;
    kv.put("worn-1", worn.to_json().unwrap().into())
        .await
        .unwrap();
    raw(
        &js,
        SUBJECT,
        Some("worn-1"),
        envelope("worn-1", "demo.add", json!({})),
    )
    .await;
    // 5: garbage, and a record of a future version with an unknown status.
    kv.put("junk-1", Bytes::from_static(b"\x01\x02 not json"))
        .await
        .unwrap();
    raw(
        &js,
        SUBJECT,
        Some("junk-1"),
        envelope("junk-1", "demo.add", json!({})),
    )
    .await;
    let future = json!({
        "v": 2, "id": "next-1", "task": "demo.add", "queue": "default",
        "status": "paused", "attempts": 0, "max_retries": 3,
        "enqueued_at": "2026-01-01T00:00:00Z", "shiny": [1, 2]
    });
    kv.put("next-1", future.to_string().into()).await.unwrap();
    raw(
        &js,
        SUBJECT,
        Some("next-1"),
        envelope("next-1", "demo.add", json!({})),
    )
    .await;

    let r = client.wait("far-1", WAIT).await.unwrap();
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.unwrap().kind, "invalid_request");
    let r = client.wait("worn-1", WAIT).await.unwrap();
    assert_eq!((r.status, r.attempts), (Status::Failed, u32::MAX));
    assert_eq!(r.error.unwrap().kind, "abandoned");
    let r = client.wait("junk-1", WAIT).await.unwrap();
    assert_eq!(r.status, Status::Failed);
    let err = r.error.unwrap();
    assert_eq!(err.kind, "corrupt_record");
    assert!(err.message.contains("junk-1"), "{}", err.message);
    let r = client.wait("next-1", WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.extra.get("shiny"), Some(&json!([1, 2])));
    // Reading a record that is not JSON names it.
    kv.put("junk-2", Bytes::from_static(b"nope")).await.unwrap();
    let e = client.record("junk-2").await.unwrap_err();
    assert!(e.to_string().contains("junk-2"), "{e}");
    assert_eq!(jetq_tests::stored_requests(&server).await, 0);
    worker.shutdown().await.unwrap();
}

async fn slow(Args(ms): Args<u64>) -> Result<u64, TaskError> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(ms)
}

/// Case 10: a worker started with a much shorter ack wait does not change
/// the queue's, so the running tasks of the others are not taken over.
#[tokio::test]
async fn a_worker_with_another_ack_wait_does_not_change_the_queues() {
    let (server, broker) = server_and_broker().await;
    let first = Worker::builder(broker.clone())
        .name("first")
        .ack_wait(Duration::from_secs(3))
        .concurrency(1)
        .task("slow", slow)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let h = client.task("slow").args(&2500).publish().await.unwrap();
    jetq_tests::wait_for_record(&broker, h.id(), |r| r.status == Status::Running).await;
    let other_broker = connect(&server).await;
    let second = Worker::builder(other_broker)
        .name("second")
        .ack_wait(Duration::from_millis(300))
        .task("slow", slow)
        .spawn()
        .unwrap();
    let r = h.wait(WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.attempts, 1, "the running task was taken over: {r:?}");
    assert_eq!(r.worker.as_deref(), Some("first"));
    second.shutdown().await.unwrap();
    first.shutdown().await.unwrap();
}
