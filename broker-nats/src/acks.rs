//! Acknowledged publishes, their answers taken from one subscription.
//!
//! Every request a producer publishes and every record a worker writes is a
//! JetStream publish waiting for its acknowledgement. async-nats' request
//! path does that with a future of about 1.2 KiB, and any future holding it
//! (the publish, the record write) is an allocation above 1 KiB. glibc
//! serves those outside its per-thread caches, and each such allocation
//! first consolidates its fast bins: with deliveries and writes in flight by
//! the hundred, that was about 6% of a worker's CPU. Here a publish is a
//! plain publish with a reply subject of our own (`<inbox>.<n>`), and one
//! task hands each acknowledgement to the publish waiting for it: the
//! futures stay small, and so do their allocations.
//!
//! A publish with no other in flight on the connection takes async-nats'
//! request path after all: its answer then reaches it straight from the
//! connection, without waking the hand-out task on the way (a hop on the
//! path of a lone request's result). Its larger future matters only under
//! load, when publishes are not alone.
//!
//! A reply subject whose answer came is used again by a later publish: the
//! server answers a publish once, so nothing else can arrive on it. (One
//! whose publish timed out or was dropped is never used again: its answer
//! may still come.) A subject used again is a reference count where a new
//! one is two allocations.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::client::PublishErrorKind as SendErrorKind;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::{Client, HeaderMap, Message, Request, RequestErrorKind, StatusCode, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::oneshot;

/// Publishes waiting for their answer, by the number in their reply subject.
type Waiting = Mutex<HashMap<u64, oneshot::Sender<Message>>>;

/// Counts a publish as in flight while alive.
struct InFlight<'a> {
    count: &'a AtomicUsize,
    /// No other publish was in flight when this one began.
    alone: bool,
}

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let before = count.fetch_add(1, Ordering::Relaxed);
        InFlight {
            count,
            alone: before == 0,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many answered reply subjects are kept for reuse: about as many as
/// publishes in flight at once.
const FREE_KEPT: usize = 4096;

/// A connection's acknowledged publishes; dropping the last handle ends its
/// task and subscription.
#[derive(Debug)]
pub(crate) struct Acks {
    client: Client,
    /// `<inbox>.`: a reply subject is this and the publish's number.
    prefix: String,
    next: AtomicU64,
    /// Publishes waiting for their answer now, either way.
    in_flight: AtomicUsize,
    /// Reply subjects whose answer came, free to be used again, with their
    /// numbers; at most [`FREE_KEPT`].
    free: Mutex<Vec<(u64, Subject)>>,
    waiting: Arc<Waiting>,
    /// Dropped with the handle: tells the task to end.
    _alive: oneshot::Sender<()>,
    /// The task: when it is gone (the runtime that started it ended),
    /// publishes take async-nats' own request path.
    task: tokio::task::JoinHandle<()>,
}

impl Acks {
    /// Subscribe to this connection's acknowledgements and start the task
    /// that hands them out, on the current runtime.
    pub(crate) async fn start(client: Client) -> Result<Acks, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let subscription = client.subscribe(format!("{inbox}.*")).await?;
        let waiting = Arc::new(Waiting::default());
        let (alive, ended) = oneshot::channel();
        let task = tokio::spawn(hand_out(subscription, Arc::downgrade(&waiting), ended));
        Ok(Acks {
            client,
            prefix: format!("{inbox}."),
            next: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            free: Mutex::new(Vec::new()),
            waiting,
            _alive: alive,
            task,
        })
    }

    /// A reply subject and its number: one answered before, or a new one.
    fn reply(&self) -> (u64, Subject) {
        if let Some(free) = self.free.lock().ok().and_then(|mut f| f.pop()) {
            return free;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut reply = String::with_capacity(self.prefix.len() + 20);
        reply.push_str(&self.prefix);
        let _ = write!(reply, "{n}");
        (n, Subject::from(reply))
    }

    /// The connection.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Publish to a stream and wait up to `timeout` (`None`: the
    /// connection's request timeout) for its acknowledgement; failures are
    /// of the kinds async-nats' JetStream publish reports.
    pub(crate) async fn request(
        &self,
        subject: Subject,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Message, PublishError> {
        let timeout = timeout.or(self.client.timeout());
        // The wait covers the publish too: a connection that is down queues
        // publishes until its channel is full, and then the send waits.
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let in_flight = InFlight::enter(&self.in_flight);
        // A publish with no other in flight goes through async-nats' own
        // request path, whose answer reaches it without the hand-out task's
        // wake-up (one in flight is all latency); under load the hand-out
        // serves them all. So does the fallback when the task is gone.
        if in_flight.alone || self.task.is_finished() {
            // Boxed: its future is large, and only this path pays for it.
            return Box::pin(request_alone(
                &self.client,
                subject,
                headers,
                payload,
                timeout,
            ))
            .await;
        }
        let (n, reply) = self.reply();
        let (answer, answered) = oneshot::channel();
        let mut pending = Pending {
            waiting: &self.waiting,
            n,
            answered: false,
        };
        pending.insert(answer);
        // Boxed: async-nats' publish future is 712 bytes; inline, it would
        // make this one and the futures holding it large allocations.
        let publish = Box::pin(self.client.publish_with_reply_and_headers(
            subject,
            reply.clone(),
            headers,
            payload,
        ));
        let published = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, publish)
                .await
                .map_err(|_| PublishError::new(PublishErrorKind::TimedOut))?,
            None => publish.await,
        };
        published.map_err(|err| {
            let kind = match err.kind() {
                SendErrorKind::MaxPayloadExceeded => PublishErrorKind::MaxPayloadExceeded,
                SendErrorKind::Send => PublishErrorKind::BrokenPipe,
                _ => PublishErrorKind::Other,
            };
            PublishError::with_source(kind, err)
        })?;
        let message = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, answered)
                .await
                .map_err(|_| PublishError::new(PublishErrorKind::TimedOut))?,
            None => answered.await,
        }
        // The task ended (the connection closed for good).
        .map_err(|_| PublishError::new(PublishErrorKind::BrokenPipe))?;
        // The task took it out of those waiting.
        pending.answered = true;
        // Answered: nothing more comes on this subject.
        if let Ok(mut free) = self.free.lock() {
            if free.len() < FREE_KEPT {
                free.push((n, reply));
            }
        }
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            // No stream listens on the subject.
            return Err(PublishError::new(PublishErrorKind::StreamNotFound));
        }
        Ok(message)
    }
}

/// A publish through async-nats' request path.
async fn request_alone(
    client: &Client,
    subject: Subject,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Option<Duration>,
) -> Result<Message, PublishError> {
    let request = Request::new()
        .headers(headers)
        .payload(payload)
        .timeout(timeout);
    client.send_request(subject, request).await.map_err(|err| {
        let kind = match err.kind() {
            RequestErrorKind::TimedOut => PublishErrorKind::TimedOut,
            // No stream listens on the subject.
            RequestErrorKind::NoResponders => PublishErrorKind::StreamNotFound,
            RequestErrorKind::MaxPayloadExceeded => PublishErrorKind::MaxPayloadExceeded,
            // The connection's channel closed, or the answer was lost.
            RequestErrorKind::Other => PublishErrorKind::BrokenPipe,
            _ => PublishErrorKind::Other,
        };
        PublishError::with_source(kind, err)
    })
}

/// A publish's place among those waiting, removed when it is dropped
/// (answered, timed out or abandoned).
struct Pending<'a> {
    waiting: &'a Waiting,
    n: u64,
    /// Answered: the task removed it already.
    answered: bool,
}

impl Pending<'_> {
    fn insert(&self, answer: oneshot::Sender<Message>) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(self.n, answer);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&self.n);
        }
    }
}

/// Hand each acknowledgement to the publish waiting for it, until the
/// handle is dropped or the connection closes for good.
async fn hand_out(
    mut subscription: async_nats::Subscriber,
    waiting: Weak<Waiting>,
    mut ended: oneshot::Receiver<()>,
) {
    loop {
        let message = tokio::select! {
            message = subscription.next() => match message {
                Some(message) => message,
                None => return,
            },
            _ = &mut ended => break,
        };
        let Some(n) = reply_number(&message) else {
            continue;
        };
        let Some(waiting) = waiting.upgrade() else {
            break;
        };
        let answer = waiting.lock().ok().and_then(|mut w| w.remove(&n));
        if let Some(answer) = answer {
            // Gone: it stopped waiting (timed out or dropped).
            let _ = answer.send(message);
        }
    }
    let _ = subscription.unsubscribe().await;
}

/// The number a reply subject of ours ends with (`<inbox>.<n>`).
pub(crate) fn reply_number(message: &Message) -> Option<u64> {
    message.subject.rsplit('.').next()?.parse().ok()
}
