//! An in-memory broker, for unit-testing handlers without NATS.
//!
//! It keeps the semantics the worker relies on (deduplication by id, nak with
//! a delay, delayed requests, revision-checked records, watches, dead
//! letters, cancellation signals) in one process. It has no ack
//! wait: a delivery dropped without being settled is requeued at once. It is
//! not a substitute for testing against a real nats-server.
//!
//! ```
//! use jetq::{memory::MemoryBroker, Args, Client, TaskError, Worker};
//! use std::time::Duration;
//!
//! async fn add(Args((a, b)): Args<(i64, i64)>) -> Result<i64, TaskError> {
//!     Ok(a + b)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> jetq::Result<()> {
//! let broker = MemoryBroker::new();
//! let stop = tokio_util::sync::CancellationToken::new();
//! let worker = Worker::builder(broker.clone()).task("add", add).build()?;
//! let running = tokio::spawn(worker.run_until(stop.clone().cancelled_owned()));
//!
//! let client = Client::new(broker);
//! let handle = client.task("add").args(&(2, 40)).publish().await?;
//! assert_eq!(handle.result::<i64>(Duration::from_secs(5)).await?, 42);
//!
//! stop.cancel();
//! running.await.unwrap()?;
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, Notify};

use crate::broker::{
    BoxFuture, BoxStream, Broker, ConsumeOptions, Consumer, Deliveries, Delivery, DeliveryInfo,
    Mail, OutgoingRequest, PublishAck, RecordEntry,
};
use crate::dead::DeadLetter;
use crate::error::{Error, ErrorKind, Result};
use crate::names;

/// A broker that lives in memory. Clones share the same queues and records.
#[derive(Debug, Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    notify: Notify,
    records: broadcast::Sender<(String, RecordEntry)>,
    cancels: broadcast::Sender<String>,
    /// (id, topic token) of every message sent to a mailbox.
    mail: broadcast::Sender<(String, String)>,
    max_payload: Option<usize>,
    record_reads: AtomicU64,
    record_writes: AtomicU64,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            records: broadcast::channel(1024).0,
            cancels: broadcast::channel(1024).0,
            mail: broadcast::channel(1024).0,
            max_payload: None,
            record_reads: AtomicU64::new(0),
            record_writes: AtomicU64::new(0),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    next_revision: u64,
    /// Number of the last dead letter stored ([`DeadLetter::dead_sequence`]).
    next_dead_seq: u64,
    queues: HashMap<String, VecDeque<Msg>>,
    ids: HashSet<String>,
    records: HashMap<String, RecordEntry>,
    /// Delayed requests not yet due: id -> sequence.
    delayed: HashMap<String, u64>,
    /// The same, with their queue and message, for an early wake-up.
    delayed_msgs: HashMap<String, (String, Msg)>,
    /// Workflow mailboxes by (id, topic token), oldest first.
    mailboxes: HashMap<(String, String), Vec<Mail>>,
    /// Sequence of the last message sent to any mailbox.
    mail_seq: u64,
    /// Idempotency keys of sends (`id.key`) and the sequence they got.
    mail_keys: HashMap<String, u64>,
    dead: Vec<DeadLetter>,
    /// Messages stored and not yet acknowledged or terminated, by sequence.
    stored: HashMap<u64, Bytes>,
}

#[derive(Debug, Clone)]
struct Msg {
    seq: u64,
    payload: Bytes,
    delivered: u64,
    task: String,
    dedup_key: String,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the data is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store a record if `check` accepts its current revision, and tell watchers.
    fn write_record(
        &self,
        id: &str,
        value: Bytes,
        check: impl FnOnce(Option<u64>) -> Result<()>,
    ) -> Result<u64> {
        names::validate_id(id)?;
        self.record_writes.fetch_add(1, Ordering::Relaxed);
        self.write_entry(id, value, check)
    }

    /// Store an entry of the record store (a record, a step, an event) if
    /// `check` accepts its current revision, and tell watchers.
    fn write_entry(
        &self,
        key: &str,
        value: Bytes,
        check: impl FnOnce(Option<u64>) -> Result<()>,
    ) -> Result<u64> {
        let mut st = self.lock();
        check(st.records.get(key).map(|e| e.revision))?;
        st.next_revision += 1;
        let entry = RecordEntry::new(value, st.next_revision);
        st.records.insert(key.to_owned(), entry.clone());
        let _ = self.records.send((key.to_owned(), entry));
        Ok(st.next_revision)
    }

    fn requeue(&self, queue: &str, msg: Msg) {
        self.lock()
            .queues
            .entry(queue.to_owned())
            .or_default()
            .push_back(msg);
        self.notify.notify_waiters();
    }
}

impl MemoryBroker {
    /// Watch an entry of the record store: its current value, then changes.
    fn watch_key(&self, id: String) -> BoxStream<'static, Result<RecordEntry>> {
        // Subscribe before reading, so no update falls in between.
        let rx = self.inner.records.subscribe();
        let current = self.inner.lock().records.get(&id).cloned();
        let inner = Arc::clone(&self.inner);
        let first = futures_util::stream::iter(current.map(Ok));
        let rest =
            futures_util::stream::unfold((rx, id, inner), |(mut rx, id, inner)| async move {
                loop {
                    match rx.recv().await {
                        Ok((key, entry)) if key == id => return Some((Ok(entry), (rx, id, inner))),
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let current = inner.lock().records.get(&id).cloned();
                            if let Some(entry) = current {
                                return Some((Ok(entry), (rx, id, inner)));
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
        Box::pin(futures_util::StreamExt::chain(first, rest))
    }

    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty broker that refuses messages larger than `max` bytes, like a
    /// NATS server's `max_payload`.
    pub fn with_max_payload(max: usize) -> Self {
        MemoryBroker {
            inner: Arc::new(Inner {
                max_payload: Some(max),
                ..Inner::default()
            }),
        }
    }

    /// Requests stored and not yet acknowledged or terminated: queued,
    /// delayed or being worked on, on any queue.
    pub fn unsettled(&self) -> usize {
        self.inner.lock().stored.len()
    }

    /// Requests waiting on `queue` (not counting those being worked on or
    /// delayed).
    pub fn queued(&self, queue: &str) -> usize {
        self.inner.lock().queues.get(queue).map_or(0, VecDeque::len)
    }

    /// Record reads so far (`get_record`), for tests that count operations.
    pub fn record_reads(&self) -> u64 {
        self.inner.record_reads.load(Ordering::Relaxed)
    }

    /// Record writes tried so far (creates and updates, refused ones too).
    pub fn record_writes(&self) -> u64 {
        self.inner.record_writes.load(Ordering::Relaxed)
    }
}

impl Broker for MemoryBroker {
    fn ensure_queue(&self, queue: &str) -> BoxFuture<'_, Result<()>> {
        let res = names::validate_queue(queue).map(|()| {
            self.inner
                .lock()
                .queues
                .entry(queue.to_owned())
                .or_default();
        });
        Box::pin(async move { res })
    }

    fn publish(&self, request: OutgoingRequest) -> BoxFuture<'_, Result<PublishAck>> {
        Box::pin(async move {
            names::validate_queue(&request.queue)?;
            names::validate_task(&request.task)?;
            names::validate_id(&request.id)?;
            if let Some(max) = self.inner.max_payload {
                if request.payload.len() > max {
                    return Err(Error::new(
                        ErrorKind::PayloadTooLarge,
                        format!(
                            "the request is {} bytes; the broker accepts at most {max}",
                            request.payload.len()
                        ),
                    ));
                }
            }
            let delay = request
                .not_before
                .map(|t| t - time::OffsetDateTime::now_utc())
                .filter(|d| d.is_positive())
                .and_then(|d| Duration::try_from(d).ok());
            let ack = {
                let mut st = self.inner.lock();
                if !st.ids.insert(request.dedup_key().to_owned()) {
                    PublishAck::new(st.next_seq, true)
                } else {
                    st.next_seq += 1;
                    let seq = st.next_seq;
                    st.stored.insert(seq, request.payload.clone());
                    let msg = Msg {
                        seq,
                        dedup_key: request.dedup_key().to_owned(),
                        payload: request.payload,
                        delivered: 0,
                        task: request.task.clone(),
                    };
                    match delay {
                        Some(delay) => {
                            st.delayed.insert(request.id.clone(), seq);
                            st.delayed_msgs
                                .insert(request.id.clone(), (request.queue.clone(), msg.clone()));
                            let inner = Arc::clone(&self.inner);
                            let (id, queue) = (request.id.clone(), request.queue.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let due = {
                                    let mut st = inner.lock();
                                    let due = st.delayed.get(&id) == Some(&seq)
                                        && st.delayed.remove(&id).is_some();
                                    if due {
                                        st.delayed_msgs.remove(&id);
                                    }
                                    due
                                };
                                if due {
                                    inner.requeue(&queue, msg);
                                }
                            });
                        }
                        None => st
                            .queues
                            .entry(request.queue.clone())
                            .or_default()
                            .push_back(msg),
                    }
                    PublishAck::new(seq, false)
                }
            };
            self.inner.notify.notify_waiters();
            Ok(ack)
        })
    }

    fn consume(
        &self,
        queue: &str,
        _options: ConsumeOptions,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>>> {
        let queue = queue.to_owned();
        Box::pin(async move {
            names::validate_queue(&queue)?;
            Ok(Box::new(MemoryConsumer {
                inner: Arc::clone(&self.inner),
                queue,
            }) as Box<dyn Consumer>)
        })
    }

    fn stored_request(&self, sequence: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        let found = self.inner.lock().stored.get(&sequence).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn get_record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<RecordEntry>>> {
        self.inner.record_reads.fetch_add(1, Ordering::Relaxed);
        let res = names::validate_id(id).map(|()| self.inner.lock().records.get(id).cloned());
        Box::pin(async move { res })
    }

    fn create_record<'a>(&'a self, id: &'a str, value: Bytes) -> BoxFuture<'a, Result<u64>> {
        let res = self.inner.write_record(id, value, |current| match current {
            None => Ok(()),
            Some(_) => Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("record `{id}` already exists"),
            )),
        });
        Box::pin(async move { res })
    }

    fn update_record<'a>(
        &'a self,
        id: &'a str,
        value: Bytes,
        revision: u64,
    ) -> BoxFuture<'a, Result<u64>> {
        let res = self.inner.write_record(id, value, |current| {
            if current == Some(revision) {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::Conflict,
                    format!("record `{id}` is at revision {current:?}, not {revision}"),
                ))
            }
        });
        Box::pin(async move { res })
    }

    fn delete_record<'a>(&'a self, id: &'a str, revision: u64) -> BoxFuture<'a, Result<()>> {
        let res = names::validate_id(id).and_then(|()| {
            let mut st = self.inner.lock();
            match st.records.get(id) {
                Some(e) if e.revision == revision => {
                    st.records.remove(id);
                    Ok(())
                }
                other => Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "record `{id}` is at revision {:?}, not {revision}",
                        other.map(|e| e.revision)
                    ),
                )),
            }
        });
        Box::pin(async move { res })
    }

    fn max_payload(&self) -> Option<usize> {
        self.inner.max_payload
    }

    fn remove_delayed(&self, id: &str) -> BoxFuture<'_, Result<bool>> {
        let res = names::validate_id(id).map(|()| {
            let mut st = self.inner.lock();
            st.delayed_msgs.remove(id);
            match st.delayed.remove(id) {
                Some(seq) => {
                    st.stored.remove(&seq);
                    true
                }
                None => false,
            }
        });
        Box::pin(async move { res })
    }

    fn put_dead_letter(&self, letter: DeadLetter) -> BoxFuture<'_, Result<()>> {
        let res = letter.validate().map(|()| {
            let mut st = self.inner.lock();
            // Like the NATS broker: the same message dead-lettered twice (a
            // worker died in between) is stored once.
            if !st
                .dead
                .iter()
                .any(|d| d.id == letter.id && d.sequence == letter.sequence)
            {
                st.next_dead_seq += 1;
                let mut letter = letter;
                letter.dead_sequence = Some(st.next_dead_seq);
                st.dead.push(letter);
            }
        });
        Box::pin(async move { res })
    }

    fn dead_letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>>> {
        let letters = self.inner.lock().dead.iter().take(limit).cloned().collect();
        Box::pin(async move { Ok(letters) })
    }

    fn get_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<Option<DeadLetter>>> {
        let res = names::validate_id(id).map(|()| {
            self.inner
                .lock()
                .dead
                .iter()
                .rev()
                .find(|d| d.id == id)
                .cloned()
        });
        Box::pin(async move { res })
    }

    fn remove_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<u64>> {
        let res = names::validate_id(id).map(|()| {
            let mut st = self.inner.lock();
            let before = st.dead.len();
            st.dead.retain(|d| d.id != id);
            (before - st.dead.len()) as u64
        });
        Box::pin(async move { res })
    }

    fn remove_dead_letters_through(
        &self,
        id: &str,
        dead_sequence: u64,
    ) -> BoxFuture<'_, Result<u64>> {
        let res = names::validate_id(id).map(|()| {
            let mut st = self.inner.lock();
            let before = st.dead.len();
            st.dead
                .retain(|d| d.id != id || d.dead_sequence.is_none_or(|s| s > dead_sequence));
            (before - st.dead.len()) as u64
        });
        Box::pin(async move { res })
    }

    fn signal_cancel(&self, id: &str) -> BoxFuture<'_, Result<()>> {
        let res = names::validate_id(id).map(|()| {
            let _ = self.inner.cancels.send(id.to_owned());
        });
        Box::pin(async move { res })
    }

    fn cancel_signals(&self) -> BoxFuture<'_, Result<BoxStream<'static, String>>> {
        let rx = self.inner.cancels.subscribe();
        Box::pin(async move {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(id) => return Some((id, rx)),
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            let stream: BoxStream<'static, String> = Box::pin(stream);
            Ok(stream)
        })
    }

    fn watch_record(
        &self,
        id: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RecordEntry>>>> {
        let res = names::validate_id(id).map(|()| self.watch_key(id.to_owned()));
        Box::pin(async move { res })
    }

    fn get_step(&self, id: &str, position: u32) -> BoxFuture<'_, Result<Option<Bytes>>> {
        let res = names::validate_id(id).map(|()| {
            self.inner
                .lock()
                .records
                .get(&step_key(id, position))
                .map(|e| e.value.clone())
        });
        Box::pin(async move { res })
    }

    fn create_step(&self, id: &str, position: u32, value: Bytes) -> BoxFuture<'_, Result<()>> {
        let res = names::validate_id(id).and_then(|()| {
            let key = step_key(id, position);
            self.inner
                .write_entry(&key, value, |current| match current {
                    None => Ok(()),
                    Some(_) => Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("step {position} of workflow `{id}` is already recorded"),
                    )),
                })
                .map(|_| ())
        });
        Box::pin(async move { res })
    }

    fn put_event(&self, id: &str, key: &str, value: Bytes) -> BoxFuture<'_, Result<u64>> {
        let res = event_key(id, key).and_then(|k| self.inner.write_entry(&k, value, |_| Ok(())));
        Box::pin(async move { res })
    }

    fn get_event(&self, id: &str, key: &str) -> BoxFuture<'_, Result<Option<RecordEntry>>> {
        let res = event_key(id, key).map(|k| self.inner.lock().records.get(&k).cloned());
        Box::pin(async move { res })
    }

    fn watch_event(
        &self,
        id: &str,
        key: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RecordEntry>>>> {
        let res = event_key(id, key).map(|k| self.watch_key(k));
        Box::pin(async move { res })
    }

    fn send_mail(
        &self,
        id: &str,
        topic: Option<&str>,
        payload: Bytes,
        key: Option<&str>,
    ) -> BoxFuture<'_, Result<u64>> {
        let res = (|| {
            names::validate_id(id)?;
            let token = names::topic_token(topic)?.to_owned();
            if let Some(key) = key {
                names::validate_key("idempotency key", key)?;
            }
            if let Some(max) = self.inner.max_payload {
                if payload.len() > max {
                    return Err(Error::new(
                        ErrorKind::PayloadTooLarge,
                        format!(
                            "the message is {} bytes; the broker accepts at most {max}",
                            payload.len()
                        ),
                    ));
                }
            }
            let mut st = self.inner.lock();
            let dedup = key.map(|k| format!("{id}.{k}"));
            if let Some(seq) = dedup.as_ref().and_then(|d| st.mail_keys.get(d)) {
                return Ok(*seq);
            }
            st.mail_seq += 1;
            let seq = st.mail_seq;
            if let Some(d) = dedup {
                st.mail_keys.insert(d, seq);
            }
            st.mailboxes
                .entry((id.to_owned(), token.clone()))
                .or_default()
                .push(Mail::new(seq, payload));
            let _ = self.inner.mail.send((id.to_owned(), token));
            Ok(seq)
        })();
        Box::pin(async move { res })
    }

    fn next_mail(
        &self,
        id: &str,
        topic: Option<&str>,
        from: u64,
    ) -> BoxFuture<'_, Result<Option<Mail>>> {
        let res = names::validate_id(id)
            .and_then(|()| names::topic_token(topic))
            .map(|token| {
                let st = self.inner.lock();
                st.mailboxes
                    .get(&(id.to_owned(), token.to_owned()))
                    .and_then(|mails| mails.iter().find(|m| m.sequence >= from).cloned())
            });
        Box::pin(async move { res })
    }

    fn watch_mail(
        &self,
        id: &str,
        topic: Option<&str>,
    ) -> BoxFuture<'_, Result<BoxStream<'static, ()>>> {
        let res = names::validate_id(id)
            .and_then(|()| names::topic_token(topic))
            .map(|token| {
                let rx = self.inner.mail.subscribe();
                let want = (id.to_owned(), token.to_owned());
                let stream =
                    futures_util::stream::unfold((rx, want), |(mut rx, want)| async move {
                        loop {
                            match rx.recv().await {
                                Ok(sent) if sent == want => return Some(((), (rx, want))),
                                Ok(_) => continue,
                                // Missed some: read the mailbox again.
                                Err(broadcast::error::RecvError::Lagged(_)) => {
                                    return Some(((), (rx, want)))
                                }
                                Err(broadcast::error::RecvError::Closed) => return None,
                            }
                        }
                    });
                Box::pin(stream) as BoxStream<'static, ()>
            });
        Box::pin(async move { res })
    }

    fn wake(&self, id: &str) -> BoxFuture<'_, Result<bool>> {
        let res = names::validate_id(id).map(|()| {
            let mut st = self.inner.lock();
            st.delayed.remove(id);
            st.delayed_msgs.remove(id)
        });
        Box::pin(async move {
            match res? {
                Some((queue, msg)) => {
                    self.inner.requeue(&queue, msg);
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    fn get_events(&self, id: &str) -> BoxFuture<'_, Result<Vec<(String, Bytes)>>> {
        let res = names::validate_id(id).map(|()| {
            let prefix = format!("{id}.event.");
            let st = self.inner.lock();
            let mut events: Vec<(String, Bytes)> = st
                .records
                .iter()
                .filter_map(|(k, e)| {
                    k.strip_prefix(&prefix)
                        .map(|key| (key.to_owned(), e.value.clone()))
                })
                .collect();
            events.sort_by(|a, b| a.0.cmp(&b.0));
            events
        });
        Box::pin(async move { res })
    }
}

/// Where the memory broker keeps step `position` of workflow `id` (beside
/// records, which never contain a `.`).
fn step_key(id: &str, position: u32) -> String {
    format!("{id}.step.{position}")
}

/// Where the memory broker keeps event `key` of workflow `id`.
fn event_key(id: &str, key: &str) -> Result<String> {
    names::validate_id(id)?;
    names::validate_key("event key", key)?;
    Ok(format!("{id}.event.{key}"))
}

#[derive(Debug)]
struct MemoryConsumer {
    inner: Arc<Inner>,
    queue: String,
}

impl Consumer for MemoryConsumer {
    fn pull(&mut self, max: usize, expires: Duration) -> BoxFuture<'_, Result<Deliveries>> {
        let inner = Arc::clone(&self.inner);
        let queue = self.queue.clone();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + expires;
            let stream = futures_util::stream::unfold(
                (inner, queue, max),
                move |(inner, queue, left)| async move {
                    if left == 0 {
                        return None;
                    }
                    loop {
                        let msg = {
                            let notified = inner.notify.notified();
                            tokio::pin!(notified);
                            notified.as_mut().enable();
                            let next = inner
                                .lock()
                                .queues
                                .get_mut(&queue)
                                .and_then(VecDeque::pop_front);
                            match next {
                                Some(msg) => msg,
                                None => {
                                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                                        return None;
                                    }
                                    continue;
                                }
                            }
                        };
                        let mut msg = msg;
                        msg.delivered += 1;
                        let delivery = MemoryDelivery {
                            inner: Arc::clone(&inner),
                            queue: queue.clone(),
                            msg,
                            settled: AtomicBool::new(false),
                        };
                        let item: Result<Box<dyn Delivery>> = Ok(Box::new(delivery));
                        return Some((item, (inner, queue, left - 1)));
                    }
                },
            );
            let stream: Deliveries = Box::pin(stream);
            Ok(stream)
        })
    }
}

#[derive(Debug)]
struct MemoryDelivery {
    inner: Arc<Inner>,
    queue: String,
    msg: Msg,
    settled: AtomicBool,
}

impl MemoryDelivery {
    fn settle(&self) -> bool {
        !self.settled.swap(true, Ordering::SeqCst)
    }

    /// Settled for good (acked or terminated): the message is gone.
    fn remove(&self) {
        if self.settle() {
            self.inner.lock().stored.remove(&self.msg.seq);
        }
    }
}

impl Delivery for MemoryDelivery {
    fn payload(&self) -> &[u8] {
        &self.msg.payload
    }

    fn info(&self) -> DeliveryInfo {
        DeliveryInfo::new(self.msg.seq, self.msg.delivered)
    }

    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        self.remove();
        Box::pin(async { Ok(()) })
    }

    fn nak(&self, delay: Option<Duration>) -> BoxFuture<'_, Result<()>> {
        if self.settle() {
            let inner = Arc::clone(&self.inner);
            let queue = self.queue.clone();
            let msg = self.msg.clone();
            match delay {
                Some(d) if !d.is_zero() => {
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        inner.requeue(&queue, msg);
                    });
                }
                _ => inner.requeue(&queue, msg),
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn in_progress(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn term(&self, _reason: &str) -> BoxFuture<'_, Result<()>> {
        self.remove();
        Box::pin(async { Ok(()) })
    }

    fn routed_task(&self) -> Option<&str> {
        Some(&self.msg.task)
    }

    fn dedup_key(&self) -> Option<&str> {
        Some(&self.msg.dedup_key)
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        if self.settle() {
            self.inner.requeue(&self.queue, self.msg.clone());
        }
    }
}
