//! The broker traits: what jetq needs from a message system and a record store.
//!
//! `jetq-nats` implements them on NATS JetStream; [`crate::memory::MemoryBroker`]
//! implements them in memory for unit tests. Everything here traffics in
//! bytes: the JSON encoding of requests and records is core's business, so
//! every broker speaks the same wire format.
//!
//! The traits are object-safe (futures are boxed) so workers and clients hold
//! an `Arc<dyn Broker>` and users never see a generic parameter for it.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;

use time::OffsetDateTime;

use crate::dead::DeadLetter;
use crate::error::Result;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A boxed, sendable stream.
pub type BoxStream<'a, T> = Pin<Box<dyn Stream<Item = T> + Send + 'a>>;
/// The deliveries of one pull.
pub type Deliveries = BoxStream<'static, Result<Box<dyn Delivery>>>;

/// A request on its way to the broker.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutgoingRequest {
    /// Request id; the broker uses it for deduplication (`Nats-Msg-Id`).
    pub id: String,
    /// Queue (validated).
    pub queue: String,
    /// Task name (validated).
    pub task: String,
    /// The encoded request envelope.
    pub payload: Bytes,
    /// Headers to send along (trace context and the like).
    pub headers: Vec<(String, String)>,
    /// Hold the request back until this time (a delayed request).
    pub not_before: Option<OffsetDateTime>,
    /// Deduplication key when it is not the id (a requeued dead letter is a
    /// new message for the same id).
    pub dedup_key: Option<String>,
}

impl OutgoingRequest {
    /// A request to publish.
    pub fn new(
        id: impl Into<String>,
        queue: impl Into<String>,
        task: impl Into<String>,
        payload: Bytes,
    ) -> Self {
        OutgoingRequest {
            id: id.into(),
            queue: queue.into(),
            task: task.into(),
            payload,
            headers: Vec::new(),
            not_before: None,
            dedup_key: None,
        }
    }

    /// The key the broker deduplicates on: [`dedup_key`](Self::dedup_key)
    /// if set, else the id.
    pub fn dedup_key(&self) -> &str {
        self.dedup_key.as_deref().unwrap_or(&self.id)
    }
}

/// What the broker said about a stored request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishAck {
    /// Position of the request in the broker's stream.
    pub sequence: u64,
    /// Whether a request with this id was already stored (within the broker's
    /// dedup window), so nothing new was stored. A publish retried after a
    /// lost acknowledgement reports its own first copy this way.
    pub duplicate: bool,
}

impl PublishAck {
    /// A publish acknowledgement.
    pub fn new(sequence: u64, duplicate: bool) -> Self {
        PublishAck {
            sequence,
            duplicate,
        }
    }
}

/// A stored record: its bytes and the revision to pass to an update.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordEntry {
    /// The encoded record.
    pub value: Bytes,
    /// Revision for optimistic concurrency.
    pub revision: u64,
}

impl RecordEntry {
    /// A record entry.
    pub fn new(value: Bytes, revision: u64) -> Self {
        RecordEntry { value, revision }
    }
}

/// How a worker consumes a queue. On brokers where the consumer is shared by
/// every worker of the queue (NATS), the last worker to start sets these.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumeOptions {
    /// Name of the worker, for the broker's bookkeeping.
    pub worker: String,
    /// Time a delivery may go unacknowledged before the broker redelivers it.
    pub ack_wait: Duration,
    /// Upper bound on deliveries of one message the broker should attempt.
    pub max_deliver: Option<i64>,
}

impl ConsumeOptions {
    /// Options with a worker name and the default ack wait (30 s).
    pub fn new(worker: impl Into<String>) -> Self {
        ConsumeOptions {
            worker: worker.into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
        }
    }

    /// Set the ack wait.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }
}

/// Facts about one delivery of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryInfo {
    /// Position of the message in the stream (the same on every redelivery).
    pub sequence: u64,
    /// How many times the broker has delivered it, this time included (1-based).
    pub delivered: u64,
}

impl DeliveryInfo {
    /// Delivery facts.
    pub fn new(sequence: u64, delivered: u64) -> Self {
        DeliveryInfo {
            sequence,
            delivered,
        }
    }
}

/// One delivered request, to be acknowledged exactly once.
pub trait Delivery: Send + Sync + Debug {
    /// The encoded request envelope.
    fn payload(&self) -> &[u8];
    /// Sequence and delivery count.
    fn info(&self) -> DeliveryInfo;
    /// Done: remove it from the queue.
    fn ack(&self) -> BoxFuture<'_, Result<()>>;
    /// Done, without waiting for the broker to confirm it: for a message
    /// whose outcome is already in its record (a lost acknowledgement only
    /// brings a redelivery, which the record drops). Defaults to [`ack`](Self::ack).
    fn ack_unconfirmed(&self) -> BoxFuture<'_, Result<()>> {
        self.ack()
    }
    /// Not done: deliver it again, after `delay` if given.
    fn nak(&self, delay: Option<Duration>) -> BoxFuture<'_, Result<()>>;
    /// Still working: reset the ack wait.
    fn in_progress(&self) -> BoxFuture<'_, Result<()>>;
    /// Never deliver it again; `reason` is for the broker's logs and advisories.
    fn term(&self, reason: &str) -> BoxFuture<'_, Result<()>>;
    /// The task name the broker routed this delivery by (NATS: the last
    /// tokens of its subject), if it routes by task. The worker refuses an
    /// envelope that names another task.
    fn routed_task(&self) -> Option<&str> {
        None
    }
    /// Whether the broker published this message itself when its delay
    /// ran out (NATS: a message schedule fired it; such a message carries
    /// no deduplication key).
    fn fired_by_schedule(&self) -> bool {
        false
    }
    /// The message's deduplication key (NATS: `Nats-Msg-Id`), if it has one.
    /// The worker refuses a message whose key belongs to another request.
    fn dedup_key(&self) -> Option<&str> {
        None
    }
}

/// A worker's subscription to one queue.
pub trait Consumer: Send + Debug {
    /// Pull up to `max` deliveries. The stream yields them as they arrive and
    /// ends when `max` were yielded or `expires` has passed.
    fn pull(&mut self, max: usize, expires: Duration) -> BoxFuture<'_, Result<Deliveries>>;

    /// The ack wait the broker applies to this queue now, read back from it
    /// (on NATS every worker of a queue shares one consumer, and the last one
    /// to start sets it). `None` if the broker has no ack wait. Workers send
    /// keep-alives by this value, not by their own setting.
    fn ack_wait(&mut self) -> BoxFuture<'_, Result<Option<Duration>>> {
        Box::pin(async { Ok(None) })
    }
}

/// What a client's notification inbox yields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Notification {
    /// The encoded record of an ended request, sent by the worker that
    /// ended it.
    Record(Bytes),
    /// Notifications may have been lost (the connection was re-established):
    /// waiters read their records again.
    Resync,
}

/// A client's private inbox for the records of its requests, from
/// [`Broker::notifications`].
#[non_exhaustive]
pub struct Notifications {
    /// The address to name in a request's `notify` field.
    pub address: String,
    /// The notifications, as they arrive; ends when the broker's connection
    /// closes.
    pub stream: BoxStream<'static, Notification>,
}

impl Notifications {
    /// An inbox at `address` yielding `stream`.
    pub fn new(address: impl Into<String>, stream: BoxStream<'static, Notification>) -> Self {
        Notifications {
            address: address.into(),
            stream,
        }
    }
}

/// A change of a record as the broker republished it, from
/// [`Broker::follow_record`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Followed {
    /// The record's bytes, as stored.
    pub record: Bytes,
    /// The tag its write carried ([`crate::tag::TAG_HEADER`]), if any.
    pub tag: Option<String>,
}

impl Followed {
    /// A republished change: the record's bytes and its write's tag.
    pub fn new(record: Bytes, tag: Option<String>) -> Self {
        Followed { record, tag }
    }
}

impl Debug for Notifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifications")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The message system and record store behind jetq.
pub trait Broker: Send + Sync + Debug + 'static {
    /// Create whatever the queue needs (stream subjects, consumer), idempotently.
    fn ensure_queue(&self, queue: &str) -> BoxFuture<'_, Result<()>>;

    /// Store a request durably; return only once it is stored.
    fn publish(&self, request: OutgoingRequest) -> BoxFuture<'_, Result<PublishAck>>;

    /// Start consuming a queue.
    fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>>>;

    /// The encoded request stored at `sequence`, if it is still there (not
    /// yet consumed). A client told that its publish was a duplicate checks
    /// with it that the message holding its deduplication key is its own.
    fn stored_request(&self, sequence: u64) -> BoxFuture<'_, Result<Option<Bytes>>>;

    /// Read a record.
    fn get_record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<RecordEntry>>>;

    /// Create a record if none exists; fails with
    /// [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists) otherwise.
    fn create_record<'a>(&'a self, id: &'a str, value: Bytes) -> BoxFuture<'a, Result<u64>>;

    /// Replace a record if its revision is still `revision`; fails with
    /// [`ErrorKind::Conflict`](crate::ErrorKind::Conflict) otherwise.
    fn update_record<'a>(
        &'a self,
        id: &'a str,
        value: Bytes,
        revision: u64,
    ) -> BoxFuture<'a, Result<u64>>;

    /// Delete a record if its revision is still `revision` (a `pending`
    /// record whose publish failed); fails with
    /// [`ErrorKind::Conflict`](crate::ErrorKind::Conflict) otherwise.
    fn delete_record<'a>(&'a self, id: &'a str, revision: u64) -> BoxFuture<'a, Result<()>>;

    /// Open a private inbox for the records of this client's requests (one
    /// per client, shared by all its waits), if the broker has such a thing;
    /// `None` makes waits watch each record instead.
    fn notifications(&self) -> BoxFuture<'_, Result<Option<Notifications>>> {
        Box::pin(async { Ok(None) })
    }

    /// Send the encoded record of an ended request to the inbox its request
    /// named (`notify`). Best effort: a waiter that misses it reads the
    /// record. A broker refuses an address that is not an inbox (it must not
    /// become a way to publish anywhere); the default sends nothing.
    fn notify(&self, address: &str, record: Bytes) -> BoxFuture<'_, Result<()>> {
        let _ = (address, record);
        Box::pin(async { Ok(()) })
    }

    /// Follow record `id` as the broker republishes its changes, for a
    /// producer waiting on few requests: each change's bytes and the tag its
    /// write carried, as the broker stores them (NATS: a core subscription
    /// on `{prefix}.records.<id>`, ended when the stream is dropped). `None`
    /// if the broker does not republish records (the default). Anyone
    /// allowed to publish there can send anything: a producer takes only a
    /// change whose tag verifies ([`crate::tag`]).
    fn follow_record<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BoxStream<'static, Followed>>>> {
        let _ = id;
        Box::pin(async { Ok(None) })
    }

    /// [`create_record`](Self::create_record) (`revision` `None`) or
    /// [`update_record`](Self::update_record) of the write that ends a
    /// record whose producer follows it ([`follow_record`](Self::follow_record)),
    /// carrying `tag` ([`crate::tag::TAG_HEADER`]) with it, so that the
    /// republished change carries it too. Returns the new revision and
    /// whether the write carried the tag: if it did not, the worker sends
    /// the record to the producer's inbox as for any other request. The
    /// default writes it untagged: a broker that republishes nothing has no
    /// followers.
    fn write_ended_record<'a>(
        &'a self,
        id: &'a str,
        value: Bytes,
        revision: Option<u64>,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<(u64, bool)>> {
        let _ = tag;
        let written = match revision {
            None => self.create_record(id, value),
            Some(revision) => self.update_record(id, value, revision),
        };
        Box::pin(async move { written.await.map(|revision| (revision, false)) })
    }

    /// Send whatever the broker's connection still buffers (acknowledgements
    /// not waited for); a worker calls it before it stops.
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// The largest message the broker accepts, in bytes, if it has a limit.
    /// Clients refuse larger requests before anything is written.
    fn max_payload(&self) -> Option<usize> {
        None
    }

    /// Drop a delayed request that has not fired yet (it was cancelled).
    /// Returns whether one was dropped.
    fn remove_delayed(&self, id: &str) -> BoxFuture<'_, Result<bool>>;

    /// Store a dead letter durably, replacing none: an id may have several
    /// (it died, was requeued, died again).
    fn put_dead_letter(&self, letter: DeadLetter) -> BoxFuture<'_, Result<()>>;

    /// Dead letters, oldest first, at most `limit`.
    fn dead_letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>>>;

    /// The latest dead letter of request `id`.
    fn get_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<Option<DeadLetter>>>;

    /// Remove every dead letter of request `id`; returns how many.
    fn remove_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<u64>>;

    /// Remove the dead letters of request `id` up to the one stored at
    /// `dead_sequence` (its [`DeadLetter::dead_sequence`]), that one
    /// included; newer ones (the request died again meanwhile) stay. Returns
    /// how many were removed.
    fn remove_dead_letters_through(
        &self,
        id: &str,
        dead_sequence: u64,
    ) -> BoxFuture<'_, Result<u64>>;

    /// Tell every worker that request `id` is to be cancelled. Best effort
    /// and immediate; workers also find the request in the record.
    fn signal_cancel(&self, id: &str) -> BoxFuture<'_, Result<()>>;

    /// The ids of cancellation signals, as they arrive, for a worker.
    fn cancel_signals(&self) -> BoxFuture<'_, Result<BoxStream<'static, String>>>;

    /// Watch a record: the stream yields the current entry (if any) and then
    /// later ones, in revision order. Intermediate revisions may be coalesced
    /// (a slow watcher or a reconnect sees the latest state), but the latest
    /// state is always delivered, and an update made between the read of the
    /// current entry and the start of the watch is never missed.
    fn watch_record(
        &self,
        id: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RecordEntry>>>>;

    /// The checkpoint of step `position` of workflow `id`, if one was
    /// written. Workflows need this and the next four; the defaults say the
    /// broker does not support workflows.
    fn get_step(&self, id: &str, position: u32) -> BoxFuture<'_, Result<Option<Bytes>>> {
        let _ = (id, position);
        Box::pin(async { Err(no_workflows()) })
    }

    /// Write the checkpoint of step `position` of workflow `id` if none
    /// exists: exactly one writer wins; the others get
    /// [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists).
    fn create_step(&self, id: &str, position: u32, value: Bytes) -> BoxFuture<'_, Result<()>> {
        let _ = (id, position, value);
        Box::pin(async { Err(no_workflows()) })
    }

    /// Set event `key` of workflow `id` (an upsert); returns its revision.
    fn put_event(&self, id: &str, key: &str, value: Bytes) -> BoxFuture<'_, Result<u64>> {
        let _ = (id, key, value);
        Box::pin(async { Err(no_workflows()) })
    }

    /// Event `key` of workflow `id`, if set.
    fn get_event(&self, id: &str, key: &str) -> BoxFuture<'_, Result<Option<RecordEntry>>> {
        let _ = (id, key);
        Box::pin(async { Err(no_workflows()) })
    }

    /// Watch event `key` of workflow `id`, like [`watch_record`](Self::watch_record):
    /// its current value (if any), then every later one.
    fn watch_event(
        &self,
        id: &str,
        key: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RecordEntry>>>> {
        let _ = (id, key);
        Box::pin(async { Err(no_workflows()) })
    }

    /// Send `payload` to the mailbox of workflow `id` for `topic` (`None`:
    /// the mailbox of messages sent without a topic); returns its sequence
    /// in the mailbox. With `key`, a second send with the same key to the
    /// same id is dropped (the first one's sequence is returned).
    fn send_mail(
        &self,
        id: &str,
        topic: Option<&str>,
        payload: Bytes,
        key: Option<&str>,
    ) -> BoxFuture<'_, Result<u64>> {
        let _ = (id, topic, payload, key);
        Box::pin(async { Err(no_workflows()) })
    }

    /// The oldest message in the mailbox of workflow `id` for `topic` whose
    /// sequence is at least `from`.
    fn next_mail(
        &self,
        id: &str,
        topic: Option<&str>,
        from: u64,
    ) -> BoxFuture<'_, Result<Option<Mail>>> {
        let _ = (id, topic, from);
        Box::pin(async { Err(no_workflows()) })
    }

    /// A stream that yields (at least) once for every message sent to the
    /// mailbox of workflow `id` for `topic` from now on; a waiting `recv`
    /// reads the mailbox again when it yields.
    fn watch_mail(
        &self,
        id: &str,
        topic: Option<&str>,
    ) -> BoxFuture<'_, Result<BoxStream<'static, ()>>> {
        let _ = (id, topic);
        Box::pin(async { Err(no_workflows()) })
    }

    /// Fire the wake-up message of suspended workflow `id` now, instead of
    /// at its time (a message it waits for arrived). Returns whether there
    /// was one to fire.
    fn wake(&self, id: &str) -> BoxFuture<'_, Result<bool>> {
        let _ = id;
        Box::pin(async { Err(no_workflows()) })
    }

    /// Every event of workflow `id`, by key.
    fn get_events(&self, id: &str) -> BoxFuture<'_, Result<Vec<(String, Bytes)>>> {
        let _ = id;
        Box::pin(async { Err(no_workflows()) })
    }
}

/// A message in a workflow's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Mail {
    /// Its sequence in the mailbox store (increasing with the send order).
    pub sequence: u64,
    /// The message, as sent (JSON).
    pub payload: Bytes,
}

impl Mail {
    /// A message at `sequence`.
    pub fn new(sequence: u64, payload: Bytes) -> Self {
        Mail { sequence, payload }
    }
}

/// The error of a broker that does not implement the workflow store.
fn no_workflows() -> crate::Error {
    crate::Error::new(
        crate::ErrorKind::Config,
        "this broker does not support workflows (steps and events)",
    )
}
