//! The client's side of record notifications: one inbox per client, where
//! workers send the records of its requests once they end, dispatched to the
//! handles waiting for them.
//!
//! A handle registers its id before the request is published, so a record
//! that arrives before anyone waits is kept for the wait. Notifications are
//! best effort (core NATS): a wait also reads the record itself, after a
//! second without news and then less and less often, and at once when the
//! connection was re-established.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::{BoxStream, Broker, Followed, Notification};
use crate::record::{ErrorInfo, Status};

/// A client follows a request's republished record (besides its inbox)
/// while it waits on at most this many requests, this one included.
const FOLLOW_AT_MOST: usize = 4;

/// What the dispatcher reads of a record sent to the inbox, in one pass:
/// whose it is, its status, where its value is (not decoded until a wait
/// wants it, then into the caller's type) and its error. The other fields a
/// record must have are required, not decoded: what lacks them is no
/// record, and is ignored. (Decoding all of it here cost about 4% of a
/// producer and worker's CPU in the benchmark; reading the id and status
/// here and the rest again in the wait, about 2%.)
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "v")]
    _v: serde::de::IgnoredAny,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(rename = "task")]
    _task: serde::de::IgnoredAny,
    #[serde(rename = "queue")]
    _queue: serde::de::IgnoredAny,
    #[serde(rename = "enqueued_at")]
    _enqueued_at: serde::de::IgnoredAny,
    status: Status,
    #[serde(borrow, default)]
    value: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    error: Option<ErrorInfo>,
}

/// An ended record as it reached the inbox, with what a result needs of it
/// (read once, by the dispatcher); [`TaskHandle::wait`](crate::TaskHandle::wait)
/// decodes the whole record from `bytes`.
#[derive(Clone)]
pub(crate) struct Arrived {
    /// The record as it came.
    pub(crate) bytes: Bytes,
    /// Its status (terminal).
    pub(crate) status: Status,
    /// Where its value's JSON text is in `bytes`, if it has one.
    value: Option<std::ops::Range<usize>>,
    /// The error it ended with, if any.
    pub(crate) error: Option<ErrorInfo>,
}

impl Arrived {
    /// The value's JSON text, if the record has a value.
    pub(crate) fn value(&self) -> Option<&str> {
        let range = self.value.clone()?;
        std::str::from_utf8(self.bytes.get(range)?).ok()
    }
}

/// Read what arrived (on the inbox, or followed): the slot `owner` gives for
/// its id, and what a result needs of it; `None` if it is no ended record,
/// or `owner` has no slot for it.
fn arrive(
    bytes: Bytes,
    owner: impl FnOnce(&str) -> Option<Arc<Slot>>,
) -> Option<(Arc<Slot>, Arrived)> {
    let head = serde_json::from_slice::<Head<'_>>(&bytes).ok()?;
    if !head.status.is_terminal() {
        return None;
    }
    let slot = owner(&head.id)?;
    // The value borrows from `bytes`: keep its place in them.
    let value = match head.value {
        Some(raw) => Some(place(&bytes, raw.get())?),
        None => None,
    };
    let (status, error) = (head.status, head.error);
    let arrived = Arrived {
        bytes,
        status,
        value,
        error,
    };
    Some((slot, arrived))
}

/// Where `part`, a slice of `whole`, is in it.
fn place(whole: &[u8], part: &str) -> Option<std::ops::Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let range = start..start.checked_add(part.len())?;
    (range.end <= whole.len()).then_some(range)
}

/// The inbox of one client (shared by its clones).
pub(crate) struct Notifier {
    address: String,
    slots: Arc<Mutex<HashMap<Arc<str>, Arc<Slot>>>>,
    /// Whether a record's republished change has reached this client on a
    /// subscription to follow it: only then does it ask workers to tag the
    /// records it follows and leave its inbox out (see
    /// [`Registration::follow_works`]).
    follow_works: AtomicBool,
    /// Whether this client waits for what it follows: cleared when a
    /// followed request's handle is dropped without a wait (a producer that
    /// publishes and forgets would pay a subscription per request for
    /// nothing), set again by the next wait.
    follow_wanted: AtomicBool,
    _stop: DropGuard,
}

/// What the waits for one id share.
#[derive(Default)]
pub(crate) struct Slot {
    /// Registrations alive for this id (guarded by the slots' lock).
    users: Mutex<usize>,
    /// The ended record, once notified, as it came: the dispatcher reads
    /// only its id and status; a wait decodes what it needs of it.
    record: Mutex<Option<Arrived>>,
    /// Set when notifications may have been lost.
    resync: AtomicBool,
    /// Wakes the waits.
    pub(crate) changed: Notify,
}

impl Slot {
    /// The ended record, if one was notified.
    pub(crate) fn record(&self) -> Option<Arrived> {
        self.record.lock().ok().and_then(|r| r.clone())
    }

    /// Drop the notified record (it could not be decoded): the waits read
    /// the stored one instead.
    pub(crate) fn forget(&self, record: &Arrived) {
        if let Ok(mut held) = self.record.lock() {
            if held.as_ref().is_some_and(|h| h.bytes == record.bytes) {
                *held = None;
            }
        }
    }

    /// Keep an ended record that arrived, and wake the waits.
    fn put(&self, arrived: Arrived) {
        if let Ok(mut held) = self.record.lock() {
            *held = Some(arrived);
        }
        self.changed.notify_waiters();
    }

    /// Whether the waits should read the record themselves (and clear it).
    pub(crate) fn take_resync(&self) -> bool {
        self.resync.swap(false, Ordering::AcqRel)
    }
}

/// Keeps a slot registered while a handle lives.
pub(crate) struct Registration {
    notifier: Arc<Notifier>,
    /// The request id (the slots' key, and the handle's).
    id: Arc<str>,
    pub(crate) slot: Arc<Slot>,
    /// The record's republished changes, while the request's producer
    /// follows them ([`Request::follow`](crate::request::Request::follow)).
    followed: Mutex<Option<BoxStream<'static, Followed>>>,
    /// Whether the client waited on at most [`FOLLOW_AT_MOST`] requests,
    /// this one included, when it was registered (counted under the same
    /// lock as the registration).
    few_waiting: bool,
    /// Whether this request was followed from its publish.
    following: AtomicBool,
    /// Whether a wait began for it.
    waited: AtomicBool,
}

impl Registration {
    /// Whether this request is worth following: the client waits on so few
    /// requests (a subscription each, and a tag for the worker to make),
    /// and it waits for those it follows.
    pub(crate) fn worth_following(&self) -> bool {
        self.few_waiting && self.notifier.follow_wanted.load(Ordering::Relaxed)
    }

    /// A wait for this request begins.
    pub(crate) fn waiting(&self) {
        self.waited.store(true, Ordering::Relaxed);
        self.notifier.follow_wanted.store(true, Ordering::Relaxed);
    }

    /// Whether following records works for this client: a change has
    /// arrived on such a subscription before. Until then a request is
    /// followed only to find that out (without `follow` in its envelope, so
    /// its worker still sends the record to the inbox): a subscription the
    /// server refuses, or a bucket that republishes nothing, never costs a
    /// result.
    pub(crate) fn follow_works(&self) -> bool {
        self.notifier.follow_works.load(Ordering::Relaxed)
    }

    /// Follow the record's republished changes (`stream`) until it ends.
    pub(crate) fn follow(&self, stream: BoxStream<'static, Followed>) {
        if let Ok(mut followed) = self.followed.lock() {
            *followed = Some(stream);
        }
        self.following.store(true, Ordering::Relaxed);
    }

    /// The next republished change of the followed record; never ready if
    /// it is not followed (or no longer).
    pub(crate) fn next_followed(&self) -> impl Future<Output = Followed> + '_ {
        std::future::poll_fn(move |cx| {
            let Ok(mut followed) = self.followed.lock() else {
                return Poll::Pending;
            };
            let Some(stream) = followed.as_mut() else {
                return Poll::Pending;
            };
            match stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(change)) => Poll::Ready(change),
                Poll::Ready(None) => {
                    *followed = None;
                    Poll::Pending
                }
                Poll::Pending => Poll::Pending,
            }
        })
    }

    /// Take a republished change of the followed record if it is this
    /// request's ended record and its tag verifies (keyed by this client's
    /// inbox address, which the request named): it is kept for the waits
    /// as if the inbox had it, and following ends. Anything else is ignored.
    pub(crate) fn take_followed(&self, change: Followed) {
        // Something arrived: following works for this client.
        self.notifier.follow_works.store(true, Ordering::Relaxed);
        let Some(tag) = change.tag.as_deref() else {
            return;
        };
        if !crate::tag::verify(self.notifier.address(), &change.record, tag) {
            tracing::debug!(id = %self.id, "ignoring a republished record whose tag does not verify");
            return;
        }
        let owner = |id: &str| (id == &*self.id).then(|| Arc::clone(&self.slot));
        if let Some((slot, arrived)) = arrive(change.record, owner) {
            slot.put(arrived);
            if let Ok(mut followed) = self.followed.lock() {
                *followed = None;
            }
        }
    }

    /// The request id registered.
    pub(crate) fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// The address of the inbox this registration is in.
    pub(crate) fn notifier_address(&self) -> &str {
        self.notifier.address()
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.following.load(Ordering::Relaxed) && !self.waited.load(Ordering::Relaxed) {
            // Followed for nothing: follow no more until a wait begins.
            self.notifier.follow_wanted.store(false, Ordering::Relaxed);
        }
        if let Ok(mut slots) = self.notifier.slots.lock() {
            let last = match self.slot.users.lock() {
                Ok(mut users) => {
                    *users = users.saturating_sub(1);
                    *users == 0
                }
                Err(_) => true,
            };
            if last {
                slots.remove(&self.id);
            }
        }
    }
}

impl Notifier {
    /// Open the broker's inbox, if it has one, and start dispatching.
    pub(crate) async fn open(broker: &Arc<dyn Broker>) -> Option<Arc<Notifier>> {
        let inbox = match broker.notifications().await {
            Ok(Some(inbox)) => inbox,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open an inbox for results; waits will watch each record");
                return None;
            }
        };
        let slots: Arc<Mutex<HashMap<Arc<str>, Arc<Slot>>>> = Arc::default();
        let stop = CancellationToken::new();
        tokio::spawn(dispatch(inbox.stream, Arc::clone(&slots), stop.clone()));
        Some(Arc::new(Notifier {
            address: inbox.address,
            slots,
            follow_works: AtomicBool::new(false),
            follow_wanted: AtomicBool::new(true),
            _stop: stop.drop_guard(),
        }))
    }

    /// The address requests name in `notify`.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// Register interest in the record of `id`.
    pub(crate) fn register(self: &Arc<Self>, id: &str) -> Registration {
        let id: Arc<str> = Arc::from(id);
        let (slot, few_waiting) = match self.slots.lock() {
            Ok(mut slots) => {
                let slot = Arc::clone(slots.entry(Arc::clone(&id)).or_default());
                if let Ok(mut users) = slot.users.lock() {
                    *users += 1;
                }
                (slot, slots.len() <= FOLLOW_AT_MOST)
            }
            Err(_) => (Arc::default(), false),
        };
        Registration {
            notifier: Arc::clone(self),
            id,
            slot,
            few_waiting,
            followed: Mutex::new(None),
            following: AtomicBool::new(false),
            waited: AtomicBool::new(false),
        }
    }
}

async fn dispatch(
    mut stream: crate::broker::BoxStream<'static, Notification>,
    slots: Arc<Mutex<HashMap<Arc<str>, Arc<Slot>>>>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            n = stream.next() => n,
        };
        match next {
            Some(Notification::Record(bytes)) => {
                let owner = |id: &str| slots.lock().ok().and_then(|s| s.get(id).cloned());
                match arrive(bytes, owner) {
                    Some((slot, arrived)) => slot.put(arrived),
                    None => tracing::trace!(
                        "ignoring a notification that is no ended record of a request waited for"
                    ),
                }
            }
            Some(Notification::Resync) => resync_all(&slots),
            None => {
                // The connection closed for good: waits fall back to reading.
                resync_all(&slots);
                return;
            }
        }
    }
}

/// Tell every wait to read its record itself: notifications may be lost.
fn resync_all(slots: &Mutex<HashMap<Arc<str>, Arc<Slot>>>) {
    let all: Vec<Arc<Slot>> = slots
        .lock()
        .map(|s| s.values().cloned().collect())
        .unwrap_or_default();
    for slot in all {
        slot.resync.store(true, Ordering::Release);
        slot.changed.notify_waiters();
    }
}
