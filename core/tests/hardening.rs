//! Core's fast tests of the hardening invariants on the in-memory broker:
//! no request is delivered without bound, and no message writes a record it
//! does not own. The same cases run against nats-server in
//! `tests/tests/hardening.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jetq::broker::{
    BoxFuture, BoxStream, Broker, ConsumeOptions, Consumer, Deliveries, Delivery, DeliveryInfo,
    OutgoingRequest, PublishAck, RecordEntry,
};
use jetq::memory::MemoryBroker;
use jetq::{
    Args, Client, DeadLetter, Error, ErrorKind, Record, Result, Retry, Status, TaskError, Worker,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

async fn add(Args((a, b)): Args<(i64, i64)>) -> std::result::Result<i64, TaskError> {
    Ok(a + b)
}

/// What the faulty broker breaks.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    /// Every record create or update fails like an unreachable server.
    record_writes: bool,
    /// Nak delays are ignored (a broker that cannot represent the time):
    /// the message comes back at once.
    nak_at_once: bool,
    /// Acknowledgements are lost: the message comes back at once.
    acks_lost: bool,
    /// A delivery dropped without being settled is kept (in
    /// [`FaultyBroker::left`]) instead of going back to the queue at once:
    /// as on a server, where it comes back only after its ack wait.
    keep_left: bool,
}

/// The in-memory broker with faults injected, and nak delays shortened a
/// hundredfold (so a test sees many redeliveries in little time).
#[derive(Debug, Clone)]
struct FaultyBroker {
    inner: MemoryBroker,
    faults: Faults,
    deliveries: Arc<AtomicUsize>,
    /// A dead letter stored just before the next one the worker stores (of
    /// another attempt at the same message, landing first).
    lands_first: Arc<std::sync::Mutex<Option<DeadLetter>>>,
    /// Deliveries the worker left unsettled (with `keep_left`).
    left: Left,
}

type Left = Arc<std::sync::Mutex<Vec<Box<dyn Delivery>>>>;

impl FaultyBroker {
    fn new(faults: Faults) -> Self {
        FaultyBroker {
            inner: MemoryBroker::new(),
            faults,
            deliveries: Arc::default(),
            lands_first: Arc::default(),
            left: Arc::default(),
        }
    }

    fn injected() -> Error {
        // Refused, not an outage: an outage is waited out (30 s) before the
        // request is released, which would only slow this test down.
        Error::new(
            ErrorKind::Config,
            "injected fault: record writes refused (as without permission)",
        )
    }
}

#[derive(Debug)]
struct FaultyConsumer(Box<dyn Consumer>, Faults, Arc<AtomicUsize>, Left);

#[derive(Debug)]
struct FaultyDelivery {
    inner: Option<Box<dyn Delivery>>,
    faults: Faults,
    settled: std::sync::atomic::AtomicBool,
    left: Left,
}

impl FaultyDelivery {
    fn inner(&self) -> &dyn Delivery {
        self.inner.as_deref().expect("taken only on drop")
    }

    fn settle(&self) {
        self.settled.store(true, Ordering::SeqCst);
    }
}

impl Drop for FaultyDelivery {
    fn drop(&mut self) {
        if self.faults.keep_left && !self.settled.load(Ordering::SeqCst) {
            if let Some(inner) = self.inner.take() {
                self.left.lock().unwrap().push(inner);
            }
        }
    }
}

impl Consumer for FaultyConsumer {
    fn pull(&mut self, max: usize, expires: Duration) -> BoxFuture<'_, Result<Deliveries>> {
        let faults = self.1;
        let count = Arc::clone(&self.2);
        let left = Arc::clone(&self.3);
        Box::pin(async move {
            let inner = self.0.pull(max, expires).await?;
            let wrapped = futures_util::StreamExt::map(inner, move |d| {
                count.fetch_add(1, Ordering::SeqCst);
                d.map(|d| {
                    Box::new(FaultyDelivery {
                        inner: Some(d),
                        faults,
                        settled: Default::default(),
                        left: Arc::clone(&left),
                    }) as Box<dyn Delivery>
                })
            });
            let stream: Deliveries = Box::pin(wrapped);
            Ok(stream)
        })
    }
}

impl Delivery for FaultyDelivery {
    fn payload(&self) -> &[u8] {
        self.inner().payload()
    }
    fn info(&self) -> DeliveryInfo {
        self.inner().info()
    }
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        self.settle();
        if self.faults.acks_lost {
            return self.inner().nak(None);
        }
        self.inner().ack()
    }
    fn nak(&self, delay: Option<Duration>) -> BoxFuture<'_, Result<()>> {
        self.settle();
        if self.faults.nak_at_once {
            self.inner().nak(None)
        } else {
            self.inner().nak(delay.map(|d| d / 100))
        }
    }
    fn in_progress(&self) -> BoxFuture<'_, Result<()>> {
        self.inner().in_progress()
    }
    fn term(&self, reason: &str) -> BoxFuture<'_, Result<()>> {
        self.settle();
        self.inner().term(reason)
    }
    fn routed_task(&self) -> Option<&str> {
        self.inner().routed_task()
    }
    fn dedup_key(&self) -> Option<&str> {
        self.inner().dedup_key()
    }
}

impl Broker for FaultyBroker {
    fn ensure_queue(&self, queue: &str) -> BoxFuture<'_, Result<()>> {
        self.inner.ensure_queue(queue)
    }
    fn publish(&self, request: OutgoingRequest) -> BoxFuture<'_, Result<PublishAck>> {
        self.inner.publish(request)
    }
    fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>>> {
        let queue = queue.to_owned();
        Box::pin(async move {
            let inner = self.inner.consume(&queue, options).await?;
            Ok(Box::new(FaultyConsumer(
                inner,
                self.faults,
                Arc::clone(&self.deliveries),
                Arc::clone(&self.left),
            )) as Box<dyn Consumer>)
        })
    }
    fn stored_request(&self, sequence: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        self.inner.stored_request(sequence)
    }
    fn get_record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<RecordEntry>>> {
        self.inner.get_record(id)
    }
    fn create_record<'a>(&'a self, id: &'a str, value: Bytes) -> BoxFuture<'a, Result<u64>> {
        if self.faults.record_writes {
            return Box::pin(async { Err(Self::injected()) });
        }
        self.inner.create_record(id, value)
    }
    fn update_record<'a>(
        &'a self,
        id: &'a str,
        value: Bytes,
        revision: u64,
    ) -> BoxFuture<'a, Result<u64>> {
        if self.faults.record_writes {
            return Box::pin(async { Err(Self::injected()) });
        }
        self.inner.update_record(id, value, revision)
    }
    fn delete_record<'a>(&'a self, id: &'a str, revision: u64) -> BoxFuture<'a, Result<()>> {
        self.inner.delete_record(id, revision)
    }
    fn remove_delayed(&self, id: &str) -> BoxFuture<'_, Result<bool>> {
        self.inner.remove_delayed(id)
    }
    fn put_dead_letter(&self, letter: DeadLetter) -> BoxFuture<'_, Result<()>> {
        let first = self.lands_first.lock().unwrap().take();
        Box::pin(async move {
            if let Some(first) = first {
                self.inner.put_dead_letter(first).await?;
            }
            self.inner.put_dead_letter(letter).await
        })
    }
    fn dead_letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>>> {
        self.inner.dead_letters(limit)
    }
    fn get_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<Option<DeadLetter>>> {
        self.inner.get_dead_letter(id)
    }
    fn remove_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<u64>> {
        self.inner.remove_dead_letter(id)
    }
    fn remove_dead_letters_through(
        &self,
        id: &str,
        dead_sequence: u64,
    ) -> BoxFuture<'_, Result<u64>> {
        self.inner.remove_dead_letters_through(id, dead_sequence)
    }
    fn signal_cancel(&self, id: &str) -> BoxFuture<'_, Result<()>> {
        self.inner.signal_cancel(id)
    }
    fn cancel_signals(&self) -> BoxFuture<'_, Result<BoxStream<'static, String>>> {
        self.inner.cancel_signals()
    }
    fn watch_record(
        &self,
        id: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RecordEntry>>>> {
        self.inner.watch_record(id)
    }
}

/// A raw envelope of `task` with id `id`, as a foreign producer writes it.
fn envelope(id: &str, task: &str, extra: serde_json::Value) -> Bytes {
    let mut v = json!({
        "v": 1, "id": id, "task": task, "queue": "default",
        "args": [1, 2], "enqueued_at": "2026-01-01T00:00:00Z"
    });
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

/// A message with dedup key `key` for `task` on the default queue.
fn message(key: &str, task: &str, body: Bytes) -> OutgoingRequest {
    OutgoingRequest::new(key, "default", task, body)
}

/// Publish a raw `demo.add` envelope for `id` (with `extra` fields), as a
/// foreign producer would, keyed by its id.
async fn publish_envelope(broker: &dyn Broker, id: &str, extra: serde_json::Value) {
    broker
        .publish(message(id, "demo.add", envelope(id, "demo.add", extra)))
        .await
        .unwrap();
}

/// Publish `body` (request `id` of `task`, keyed by its id) and store the
/// `running` record that a later delivery of the same message wrote: its
/// claim of `attempts` on worker `worker` (the message's sequence as its
/// `seq`), with `extra` fields. Returns the message's sequence and the
/// record's revision.
async fn publish_claimed_by_another(
    broker: &MemoryBroker,
    (id, task, body): (&str, &str, Bytes),
    attempts: u32,
    worker: &str,
    extra: serde_json::Value,
) -> (u64, u64) {
    let ack = broker.publish(message(id, task, body)).await.unwrap();
    let mut running = json!({
        "v": 1, "id": id, "task": task, "queue": "default",
        "status": "running", "attempts": attempts,
        "enqueued_at": "2026-01-01T00:00:00Z", "started_at": "2026-01-01T00:00:01Z",
        "worker": worker, "seq": ack.sequence
    });
    if let (Some(m), Some(e)) = (running.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    let revision = broker
        .create_record(id, Bytes::from(serde_json::to_vec(&running).unwrap()))
        .await
        .unwrap();
    (ack.sequence, revision)
}

/// Wait until the dead letter `key` exists (the in-memory broker has no
/// dead-letter watch; its writes are synchronous, so this settles fast).
async fn dead_letter(broker: &dyn Broker, key: &str) -> DeadLetter {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(l) = broker.get_dead_letter(key).await.unwrap() {
            return l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter {key} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait until nothing is queued or in flight on `default`.
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

/// The backstop: with every record write failing, the normal path can never
/// end the request (it cannot claim, so it releases the message again and
/// again). After max_retries + 1 + DELIVERY_SLACK deliveries it is ended all
/// the same: dead-lettered as abandoned and removed from the queue.
#[tokio::test]
async fn a_request_whose_record_cannot_be_written_ends_within_its_delivery_budget() {
    let broker = FaultyBroker::new(Faults {
        record_writes: true,
        ..Faults::default()
    });
    let w = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    publish_envelope(&broker, "stuck-1", json!({"max_retries": 1})).await;
    let letter = dead_letter(&broker, "stuck-1").await;
    assert_eq!(letter.error.kind, "abandoned");
    assert!(letter.error.message.contains("delivered"), "{letter:?}");
    drained(&broker.inner).await;
    let budget = jetq::worker::delivery_budget(1);
    assert_eq!(
        broker.deliveries.load(Ordering::SeqCst) as u64,
        budget + 1,
        "delivered exactly once past its budget"
    );
    // No record could be written, and none was.
    assert!(broker.get_record("stuck-1").await.unwrap().is_none());
    w.shutdown().await.unwrap();
}

/// A finished request whose message keeps coming back (its acknowledgements
/// are lost) is ended by the backstop without a dead letter and with its
/// record left as it is.
#[tokio::test]
async fn the_backstop_leaves_a_finished_request_alone() {
    let broker = FaultyBroker::new(Faults {
        acks_lost: true,
        ..Faults::default()
    });
    let w = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let h = client
        .task("demo.add")
        .args(&(1, 2))
        .max_retries(0)
        .publish()
        .await
        .unwrap();
    assert_eq!(h.result::<i64>(WAIT).await.unwrap(), 3);
    drained(&broker.inner).await;
    assert_eq!(
        broker.deliveries.load(Ordering::SeqCst) as u64,
        jetq::worker::delivery_budget(0) + 1
    );
    assert!(client.dead_letters(10).await.unwrap().is_empty());
    let r = client.record(h.id()).await.unwrap();
    assert_eq!((r.status, r.attempts), (Status::Succeeded, 1));
    w.shutdown().await.unwrap();
}

/// A request not yet due, delivered early (a producer that bypassed the
/// broker's delay) and put back until due, is dropped at its next early
/// delivery once it is cancelled, instead of coming back until it is due.
#[tokio::test]
async fn a_cancelled_request_that_is_not_due_is_dropped_at_its_next_delivery() {
    let broker = FaultyBroker::new(Faults::default());
    let w = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    // Due in 100 s: put back for 100 s, which this broker shortens to 1 s.
    let due = jetq::time::OffsetDateTime::now_utc() + Duration::from_secs(100);
    let handle = client
        .task("demo.add")
        .args(&(1, 2))
        .not_before(due)
        .publish()
        .await
        .unwrap();
    let mut req = jetq::Request::new("demo.add");
    req.id = handle.id().to_owned();
    req.set_args(&json!([1, 2])).unwrap();
    req.not_before = Some(due);
    let mut early = OutgoingRequest::new(
        handle.id(),
        "default",
        "demo.add",
        Bytes::from(req.to_json().unwrap()),
    );
    early.dedup_key = Some(format!("{}.requeue.1", handle.id()));
    broker.publish(early).await.unwrap();
    while broker.deliveries.load(Ordering::SeqCst) < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        client.cancel(handle.id()).await.unwrap().status,
        Status::Cancelled
    );
    drained(&broker.inner).await;
    assert_eq!(broker.deliveries.load(Ordering::SeqCst), 2);
    assert_eq!(
        client.record(handle.id()).await.unwrap().status,
        Status::Cancelled
    );
    w.shutdown().await.unwrap();
}

/// Counters at their limits: a stored record with `attempts` at u32::MAX and
/// a request asking for u32::MAX retries end cleanly (no overflow panic).
#[tokio::test]
async fn counters_at_their_limits_end_without_overflow() {
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    // A record worn out by a foreign writer.
    let mut req = jetq::Request::new("demo.add");
    req.id = "worn-1".into();
    let mut rec = Record::pending(&req);
    rec.attempts = u32::MAX;
    rec.seq = Some(1);
    rec.status = Status::Running;
    broker
        .create_record("worn-1", Bytes::from(rec.to_json().unwrap()))
        .await
        .unwrap();
    publish_envelope(&broker, "worn-1", json!({})).await;
    let r = client.wait("worn-1", WAIT).await.unwrap();
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.unwrap().kind, "abandoned");
    assert_eq!(r.attempts, u32::MAX);
    // u32::MAX retries from a foreign producer: lowered to the limit.
    publish_envelope(&broker, "greedy-1", json!({"max_retries": u32::MAX})).await;
    let r = client.wait("greedy-1", WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.max_retries, jetq::request::MAX_RETRIES_LIMIT);
    // ... and refused at publish.
    let e = client
        .task("demo.add")
        .max_retries(u32::MAX)
        .publish()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    w.shutdown().await.unwrap();
}

/// A task asking to be retried after an absurd delay is retried after the
/// longest delay jetq supports, with no overflow.
#[tokio::test]
async fn a_huge_retry_delay_is_clamped() {
    async fn later() -> std::result::Result<(), TaskError> {
        Err(TaskError::new("later").with_retry(Retry::After(Duration::MAX)))
    }
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .task("later", later)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let h = client.task("later").publish().await.unwrap();
    let mut watch = broker.watch_record(h.id()).await.unwrap();
    let r = loop {
        let e = futures_util::StreamExt::next(&mut watch)
            .await
            .unwrap()
            .unwrap();
        let r = Record::from_json(&e.value).unwrap();
        if r.status == Status::Retrying {
            break r;
        }
    };
    let ahead = r.next_attempt_at.unwrap() - jetq::time::OffsetDateTime::now_utc();
    assert!(ahead > jetq::time::Duration::days(3000), "{ahead}");
    // Far-future delays are refused at publish.
    let e = client
        .task("later")
        .delay(jetq::request::MAX_DELAY + Duration::from_secs(86_400))
        .publish()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    w.shutdown().await.unwrap();
}

/// Messages that speak for another request, task or queue are refused
/// without touching any record: a malformed envelope with another request's
/// id, a valid one for another task with that id, one whose dedup key is
/// another id's, one on another task's subject, one of an unknown version.
#[tokio::test]
async fn hostile_messages_never_touch_another_requests_record() {
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .task("demo.add", add)
        .task("demo.other", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    // The victim: delayed, so its record is pending while the attacks run.
    let victim = client
        .task("demo.add")
        .id("victim")
        .args(&(20, 22))
        .delay(Duration::from_millis(400))
        .publish()
        .await
        .unwrap();
    let before = broker.get_record("victim").await.unwrap().unwrap();
    let attacks: Vec<(OutgoingRequest, &str)> = vec![
        (
            message("x1", "demo.add", Bytes::from_static(br#"{"id":"victim"}"#)),
            "invalid_request",
        ),
        (
            message(
                "x2",
                "demo.other",
                envelope("victim", "demo.other", json!({})),
            ),
            "id_conflict",
        ),
        (
            message(
                "x3",
                "demo.add",
                envelope("squatter", "demo.add", json!({})),
            ),
            "invalid_request",
        ),
        (
            message("x4", "demo.add", envelope("x4", "demo.other", json!({}))),
            "invalid_request",
        ),
        (
            message(
                "x5",
                "demo.add",
                envelope("x5", "demo.add", json!({"v": 999})),
            ),
            "invalid_request",
        ),
    ];
    let mut keys = Vec::new();
    for (mut msg, kind) in attacks {
        // x3 squats on the dedup key of `squatter-real`.
        if msg.id == "x3" {
            msg.dedup_key = Some("squatter-real".into());
        }
        // x2 is a new message for the victim's id (as after the dedup window).
        if msg.id == "x2" {
            msg.dedup_key = Some("victim.requeue.99".into());
        }
        let ack = broker.publish(msg).await.unwrap();
        keys.push((DeadLetter::invalid_key("default", ack.sequence), kind));
    }
    for (key, kind) in &keys {
        let letter = dead_letter(&broker, key).await;
        assert_eq!(&letter.error.kind, kind, "{letter:?}");
    }
    // None of them wrote a record, and the victim's is as it was.
    for id in ["squatter", "x4", "x5"] {
        assert!(broker.get_record(id).await.unwrap().is_none(), "{id}");
    }
    assert_eq!(broker.get_record("victim").await.unwrap().unwrap(), before);
    assert!(broker.get_dead_letter("victim").await.unwrap().is_none());
    // The victim runs when due, with its own value.
    assert_eq!(victim.result::<i64>(WAIT).await.unwrap(), 42);
    // The squatted id: its publish is told, not left pending for ever.
    let e = client
        .task("demo.add")
        .id("squatter-real")
        .publish()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(broker.get_record("squatter-real").await.unwrap().is_none());
    w.shutdown().await.unwrap();
}

/// Stored records this version cannot read: an unknown status is treated as
/// not terminal (the request runs, unknown fields survive); bytes that are
/// not JSON fail the request with a clear error naming the id.
#[tokio::test]
async fn records_from_elsewhere_do_not_make_a_request_loop() {
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let future = json!({
        "v": 2, "id": "future-1", "task": "demo.add", "queue": "default",
        "status": "paused", "metadata": {}, "attempts": 0, "max_retries": 3,
        "enqueued_at": "2026-01-01T00:00:00Z", "shiny": {"new": true}
    });
    broker
        .create_record("future-1", Bytes::from(future.to_string()))
        .await
        .unwrap();
    broker
        .create_record("garbage-1", Bytes::from_static(b"\x00garbage"))
        .await
        .unwrap();
    for id in ["future-1", "garbage-1"] {
        publish_envelope(&broker, id, json!({})).await;
    }
    let r = client.wait("future-1", WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.extra.get("shiny"), Some(&json!({"new": true})));
    let r = client.wait("garbage-1", WAIT).await.unwrap();
    assert_eq!(r.status, Status::Failed);
    let err = r.error.unwrap();
    assert_eq!(err.kind, "corrupt_record");
    assert!(err.message.contains("garbage-1"), "{}", err.message);
    dead_letter(&broker, "garbage-1").await;
    // A client reading a corrupt record is told which one.
    broker
        .create_record("garbage-2", Bytes::from_static(b"not json"))
        .await
        .unwrap();
    let e = client.record("garbage-2").await.unwrap_err();
    assert!(e.to_string().contains("garbage-2"), "{e}");
    w.shutdown().await.unwrap();
}

/// Two attempts at one message fail it at once: the last allowed attempt
/// failed (its dead letter landed) while the server, its ack wait passed,
/// delivered the message again and another worker claimed it past its
/// attempts and gave up. The dead letter is stored once, the first one; the
/// record must say what it says: the reason, and the attempt and worker
/// that failed the request, not the claim that ran nothing.
#[tokio::test]
async fn a_request_failed_by_two_attempts_at_once_records_what_its_dead_letter_says() {
    let broker = FaultyBroker::new(Faults::default());
    let body = envelope("race-1", "demo.add", json!({"max_retries": 1}));
    // The last allowed attempt's claim (attempt 2 of 2), on another worker.
    let (sequence, _) = publish_claimed_by_another(
        &broker.inner,
        ("race-1", "demo.add", body.clone()),
        2,
        "w-old",
        json!({"max_retries": 1,
               "error": {"kind": "panic", "message": "the task panicked: attempt 1"}}),
    )
    .await;
    // Its failure's dead letter lands after this worker's claim read the
    // record (and found no letter), before this worker stores its own.
    let mut theirs = DeadLetter::new(
        "race-1",
        "default",
        "demo.add",
        jetq::ErrorInfo::new("panic", "the task panicked: attempt 2"),
        body,
    );
    theirs.attempts = 2;
    theirs.worker = "w-old".into();
    theirs.sequence = sequence;
    *broker.lands_first.lock().unwrap() = Some(theirs.clone());

    let w = Worker::builder(broker.clone())
        .name("w-new")
        .task("demo.add", add)
        .spawn()
        .unwrap();
    drained(&broker.inner).await;
    let letter = dead_letter(&broker, "race-1").await;
    assert_eq!(
        letter.error, theirs.error,
        "the first letter stays: {letter:?}"
    );
    let entry = broker.get_record("race-1").await.unwrap().unwrap();
    let record = Record::decode("race-1", &entry.value).unwrap();
    assert_eq!(record.status, Status::Failed, "{record:?}");
    assert_eq!(record.error.as_ref(), Some(&theirs.error), "{record:?}");
    assert_eq!(record.attempts, 2, "the attempt that failed it: {record:?}");
    assert_eq!(record.worker.as_deref(), Some("w-old"), "{record:?}");
    w.shutdown().await.unwrap();
}

/// A give-up's worker dies between its claim and the failed record: every
/// allowed attempt was claimed, the delivery after them claimed the give-up
/// (one past the last allowed, running nothing), and its worker died. The
/// next delivery gives up again without counting another attempt.
#[tokio::test]
async fn a_give_up_whose_worker_died_is_not_counted_twice() {
    let broker = FaultyBroker::new(Faults::default());
    let body = envelope("gone-1", "demo.add", json!({"max_retries": 2}));
    // 3 attempts allowed; the give-up claimed as the 4th, by a dead worker.
    publish_claimed_by_another(
        &broker.inner,
        ("gone-1", "demo.add", body),
        4,
        "w-dead",
        json!({"max_retries": 2,
               "error": {"kind": "panic", "message": "the task panicked: attempt 3"}}),
    )
    .await;
    let w = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let letter = dead_letter(&broker, "gone-1").await;
    assert_eq!(letter.error.kind, "abandoned", "{letter:?}");
    drained(&broker.inner).await;
    let entry = broker.get_record("gone-1").await.unwrap().unwrap();
    let record = Record::decode("gone-1", &entry.value).unwrap();
    assert_eq!(record.status, Status::Failed, "{record:?}");
    assert_eq!(record.attempts, 4, "the give-up counted once: {record:?}");
    let error = record.error.unwrap();
    assert!(
        error.message.starts_with("gave up after 3 attempts"),
        "{}",
        error.message
    );
    w.shutdown().await.unwrap();
}

/// A stale delivery: a worker holds a message's first delivery (read ahead,
/// its record read held up by an outage) while the server, the ack wait
/// past, delivered the message again and that delivery claimed the record
/// and runs. When the stale one finally reads the record, the message's
/// own claim is there: it must neither run the task (an attempt the record
/// does not count, beside the one that does) nor settle the message.
#[tokio::test]
async fn a_stale_first_delivery_leaves_the_message_to_the_delivery_that_claimed_it() {
    let broker = FaultyBroker::new(Faults {
        keep_left: true,
        ..Faults::default()
    });
    // The later delivery's claim: attempt 2 runs on another worker.
    let body = envelope("stale-1", "demo.count", json!({"args": null}));
    let (_, revision) = publish_claimed_by_another(
        &broker.inner,
        ("stale-1", "demo.count", body),
        2,
        "w-live",
        json!({"max_retries": 3}),
    )
    .await;

    let runs = Arc::new(AtomicUsize::new(0));
    async fn count(
        jetq::State(runs): jetq::State<Arc<AtomicUsize>>,
    ) -> std::result::Result<(), TaskError> {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    let w = Worker::builder(broker.clone())
        .state(Arc::clone(&runs))
        .task("demo.count", count)
        .spawn()
        .unwrap();
    // Either the worker leaves the delivery, or (the bug) runs the task.
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.left.lock().unwrap().is_empty() && runs.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delivery was neither left nor run"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the stale delivery ran the task"
    );
    assert_eq!(broker.left.lock().unwrap().len(), 1, "left unsettled");
    let entry = broker.get_record("stale-1").await.unwrap().unwrap();
    assert_eq!(entry.revision, revision, "the record was not touched");
    w.shutdown().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}
