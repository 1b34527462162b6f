//! The client: publish requests, read and wait for records.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::broker::{Broker, OutgoingRequest};
use crate::context::Context;
use crate::dead::DeadLetter;
use crate::error::{Error, ErrorKind, Result};
use crate::middleware::{Publish, PublishMiddleware, PublishNext};
use crate::names;
use crate::notify::{Arrived, Notifier, Registration};
use crate::record::{ErrorInfo, Record, Status};
use crate::request::Request;
use crate::workflow::WorkflowHandle;

/// Publishes requests and reads records. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    broker: Arc<dyn Broker>,
    pending_records: bool,
    /// The client's result inbox, opened at the first publish.
    notifier: Arc<tokio::sync::OnceCell<Option<Arc<Notifier>>>>,
    /// The publish chain, outermost first.
    middleware: Arc<[Arc<dyn PublishMiddleware>]>,
    /// The attempt publishing through this client (see [`Context::client`]).
    parent: Option<Context>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.broker)
            .field("pending_records", &self.pending_records)
            .field("middleware", &self.middleware.len())
            .field("parent", &self.parent.as_ref().map(|p| p.id().to_owned()))
            .finish()
    }
}

impl Client {
    /// A client on `broker`.
    pub fn new(broker: impl Broker) -> Self {
        Self::from_arc(Arc::new(broker))
    }

    /// A client on a shared broker.
    pub fn from_arc(broker: Arc<dyn Broker>) -> Self {
        Client {
            broker,
            pending_records: false,
            notifier: Arc::default(),
            middleware: Arc::new([]),
            parent: None,
        }
    }

    /// Add a publish middleware: it runs around every publish of this client
    /// (and of its clones made afterwards). The first added is the
    /// outermost. See [`middleware`](crate::middleware).
    pub fn middleware(mut self, middleware: impl PublishMiddleware) -> Self {
        let mut chain: Vec<Arc<dyn PublishMiddleware>> = self.middleware.iter().cloned().collect();
        chain.push(Arc::new(middleware));
        self.middleware = chain.into();
        self
    }

    /// This client publishing on behalf of `parent`, a running attempt: its
    /// requests name the parent's id (envelope field `parent`) and the
    /// publish chain sees the attempt ([`Publish::parent`]).
    pub(crate) fn child_of(&self, parent: Context) -> Self {
        Client {
            parent: Some(parent),
            ..self.clone()
        }
    }

    /// The attempt this client publishes for, if any.
    pub fn parent(&self) -> Option<&Context> {
        self.parent.as_ref()
    }

    pub(crate) fn publish_chain(&self) -> &[Arc<dyn PublishMiddleware>] {
        &self.middleware
    }

    /// Write a `pending` record for every request at publish (default: only
    /// for delayed requests). Without one, a request has no record until a
    /// worker takes it; [`TaskHandle::record`] reports it `pending` all the
    /// same, but other clients (`jetq get`) find nothing yet. The record
    /// costs a write, and a round trip before the publish, per request.
    pub fn pending_records(mut self, on: bool) -> Self {
        self.pending_records = on;
        self
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Start a request for `task`.
    pub fn task(&self, task: impl Into<String>) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            request: Box::new(Request::new(task)),
            error: None,
            notify: true,
            pending_record: false,
        }
    }

    /// Publish a prepared request; see [`RequestBuilder::publish`].
    pub async fn publish_request(&self, request: Request) -> Result<TaskHandle> {
        self.publish_with(Box::new(request), true, false).await
    }

    async fn publish_with(
        &self,
        // Boxed through the layers of a publish, whose futures each keep
        // their arguments: one pointer each rather than a copy.
        mut request: Box<Request>,
        notify: bool,
        pending_record: bool,
    ) -> Result<TaskHandle> {
        if let Some(parent) = &self.parent {
            request.parent = Some(parent.id().to_owned());
        }
        if self.middleware.is_empty() {
            return self
                .publish_unchained(request, notify, pending_record)
                .await;
        }
        let publish = Publish {
            request,
            parent: self.parent.clone(),
            notify,
            pending_record,
        };
        Box::pin(PublishNext::new(self.clone()).run(publish)).await
    }

    /// Publish, past the middleware chain.
    pub(crate) async fn publish_unchained(
        &self,
        mut request: Box<Request>,
        notify: bool,
        pending_record: bool,
    ) -> Result<TaskHandle> {
        request.validate()?;
        check_bounds(&request)?;
        let notify = notify && !request.ignore_result;
        // Registered before the publish, so that no result can come too early.
        let registration = match notify {
            true => self.register(&request.id).await,
            false => None,
        };
        let now = time::OffsetDateTime::now_utc();
        let delayed = request.not_before.is_some_and(|at| at > now);
        if let Some(r) = &registration {
            // Where the record is sent, and whether it is followed, are
            // this client's to say.
            request.notify = Some(r.notifier_address().to_owned());
            request.follow = false;
            // Waiting on few requests (one at a time, say): follow the
            // record's republished changes, which reach the client before
            // a message from the worker could (subscribed before the
            // publish, so that none is missed). Asked of the worker
            // (`follow`) once following has been seen to work.
            if !delayed && r.worth_following() {
                match self.broker.follow_record(&request.id).await {
                    Ok(Some(changes)) => {
                        r.follow(changes);
                        request.follow = r.follow_works();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(id = %request.id, error = %e, "cannot follow the record; the inbox will do");
                    }
                }
            }
        }
        let payload = Bytes::from(request.to_json()?);
        self.check_size(&request.id, payload.len())?;
        let pending_record = self.pending_records || pending_record;
        if !delayed && (!pending_record || request.ignore_result) {
            // No record before a worker takes the request: the broker's
            // dedup (`Nats-Msg-Id`) keeps a retried publish to one message,
            // and a worker drops a later message for an id whose record
            // another message owns, so the request still runs once.
            // Outside tokio's cooperative budget: a publish is bounded, and
            // a producer that keeps many in flight in one task (say, with
            // `buffer_unordered`) would otherwise have each refused a step
            // for want of budget, woken and polled again.
            // The handle keeps the envelope (a reference count), not the
            // request, whose names move to the broker's request uncopied.
            let queued = Queued {
                envelope: payload.clone(),
                ignore_result: request.ignore_result,
            };
            let id = handle_id(&request, registration.as_deref());
            let published = tokio::task::coop::unconstrained(
                self.broker.publish(outgoing_owned(request, payload)),
            )
            .await?;
            if published.duplicate {
                let request = Request::from_json(&queued.envelope)?;
                Box::pin(self.check_duplicate(&request, published.sequence)).await?;
            }
            return Ok(TaskHandle {
                client: self.clone(),
                id,
                queued: Some(queued),
                registration,
            });
        }
        // Boxed: this future lives in every publish's, which stays small.
        Box::pin(self.publish_recorded(request, payload, registration)).await
    }

    /// Publish `request` (encoded: `payload`) after writing its `pending`
    /// record: the path of delayed requests and of clients that keep
    /// pending records.
    async fn publish_recorded(
        &self,
        request: Box<Request>,
        payload: Bytes,
        registration: Option<Arc<Registration>>,
    ) -> Result<TaskHandle> {
        let handle = TaskHandle {
            client: self.clone(),
            id: handle_id(&request, registration.as_deref()),
            queued: None,
            registration,
        };
        // The pending record first, atomically: it is the idempotency check
        // that outlives the broker's dedup window.
        let pending = Bytes::from(Record::pending(&request).to_json()?);
        let mut not_before = request.not_before;
        let created = match self.broker.create_record(&request.id, pending).await {
            Ok(revision) => Some(revision),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                if let Some(entry) = self.broker.get_record(&request.id).await? {
                    let existing = Record::decode(&request.id, &entry.value)?;
                    if existing.status != Status::Pending {
                        // Already running, done or cancelled: the same
                        // request, not a new one.
                        return Ok(handle);
                    }
                    // Keep the first publish's due time.
                    not_before = existing.next_attempt_at;
                }
                // Still pending: an earlier publish may have failed after the
                // record was written. Publish again; the broker's dedup (and
                // the worker's ownership check) keep it to one run.
                None
            }
            Err(e) => return Err(e),
        };
        let mut outgoing = outgoing(&request, payload);
        outgoing.not_before = not_before;
        let published = match self.broker.publish(outgoing).await {
            Ok(ack) if ack.duplicate => {
                Box::pin(self.check_duplicate(&request, ack.sequence)).await
            }
            other => other.map(|_| ()),
        };
        if let Err(e) = published {
            // Leave no pending record behind for a request that was never stored.
            if let Some(revision) = created {
                if let Err(cleanup) = self.broker.delete_record(&request.id, revision).await {
                    tracing::warn!(id = %request.id, error = %cleanup, "cannot remove the pending record of a failed publish");
                }
            }
            return Err(e);
        }
        Ok(handle)
    }

    /// Register for the record of `id` in the client's inbox (opened on
    /// first use), if the broker has one.
    async fn register(&self, id: &str) -> Option<Arc<Registration>> {
        let notifier = self
            .notifier
            .get_or_init(|| Box::pin(Notifier::open(&self.broker)))
            .await
            .as_ref()?;
        Some(Arc::new(notifier.register(id)))
    }

    /// The broker took a publish of `id` for a duplicate of the message at
    /// `sequence`: make sure that message is this request (a retried publish,
    /// or the same id published twice), not another request squatting on its
    /// deduplication key, which would otherwise leave this one `pending` for ever.
    async fn check_duplicate(&self, request: &Request, sequence: u64) -> Result<()> {
        let (id, task, queue) = (
            request.id.as_str(),
            request.task.as_str(),
            request.queue.as_str(),
        );
        let squatted = |holder: String| {
            Error::new(
                ErrorKind::Conflict,
                format!(
                    "request `{id}` was not stored: the broker holds its deduplication key for message {sequence}, which is {holder}; publish it again with another id, or after the broker's duplicate window"
                ),
            )
        };
        if let Some(payload) = self.broker.stored_request(sequence).await? {
            let stored = serde_json::from_slice::<Map<String, Value>>(&payload).ok();
            let field = |k: &str| {
                stored
                    .as_ref()
                    .and_then(|m| m.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            return match (field("id"), field("task"), field("queue")) {
                (Some(h), Some(t), Some(q)) if h == id && t == task && q == queue => Ok(()),
                (Some(h), t, q) if h == id => Err(squatted(format!(
                    "a request of this id for task `{}` on queue `{}`",
                    names::escape(t.as_deref().unwrap_or("")),
                    names::escape(q.as_deref().unwrap_or(""))
                ))),
                (Some(h), _, _) => Err(squatted(format!("request `{}`", names::escape(&h)))),
                _ => Err(squatted("not a request of this id".to_owned())),
            };
        }
        // Consumed already: if it was this request, its record names it.
        match self.broker.get_record(id).await? {
            Some(entry) => {
                let record = Record::decode(id, &entry.value)?;
                if record.task == task
                    && record.queue == queue
                    && (record.seq == Some(sequence) || record.status != Status::Pending)
                {
                    Ok(())
                } else {
                    Err(squatted("gone, and was not this request".to_owned()))
                }
            }
            None => Err(squatted("gone, and was not this request".to_owned())),
        }
    }

    /// Refuse a request the broker would refuse, before anything is written.
    fn check_size(&self, id: &str, len: usize) -> Result<()> {
        match self.broker.max_payload() {
            Some(max) if len > max => Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "request `{id}` is {len} bytes encoded; the broker accepts at most {max} bytes (NATS max_payload); pass large data by reference (e.g. an object store key)"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Cancel request `id`. A request that has not started (pending, delayed
    /// or waiting to retry) is `cancelled` at once and never runs. A running
    /// one has its cancellation token fired on whatever worker runs it, and
    /// its record ends `cancelled` when the attempt ends, whatever the task
    /// returns; [`wait`](Self::wait) for it. Returns the record as this call
    /// left it: `cancelled`, `running` with `cancel_requested_at` set, or the
    /// terminal record of a request that had already finished (nothing to cancel).
    ///
    /// A request with no record yet (queued, or in the first moments of its
    /// first attempt, see [`WorkerBuilder::running_after`](crate::WorkerBuilder::running_after))
    /// gets a `cancelled` record with no task or queue: a worker drops it,
    /// and an attempt already running is told as above, its outcome
    /// discarded. An id nobody published gets such a record too (there is
    /// no way to tell it from a queued request without scanning the queue);
    /// a later publish of that id is then dropped as cancelled.
    pub async fn cancel(&self, id: &str) -> Result<Record> {
        names::validate_id(id)?;
        for _ in 0..32 {
            let Some(entry) = self.broker.get_record(id).await? else {
                // No record: queued (no worker has taken it, or one is
                // running it but has not written yet) or unknown. A
                // `cancelled` record stops it: a worker drops a request
                // whose record has ended, and a running attempt is told.
                let now = time::OffsetDateTime::now_utc();
                let record = Record::cancelled_unseen(id, now);
                let bytes = Bytes::from(record.to_json()?);
                match self.broker.create_record(id, bytes).await {
                    Ok(_) => {
                        self.after_cancel(id).await?;
                        return Ok(record);
                    }
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            };
            let mut record = Record::decode(id, &entry.value)?;
            if record.status.is_terminal() {
                return Ok(record);
            }
            let now = time::OffsetDateTime::now_utc();
            let running = record.status == Status::Running;
            if running {
                if record.cancel_requested_at.is_some() {
                    // Already asked: signal again, in case a worker missed it.
                    self.broker.signal_cancel(id).await?;
                    return Ok(record);
                }
                record.cancel_requested_at = Some(now);
            } else {
                record.mark_cancelled(now);
            }
            let bytes = Bytes::from(record.to_json()?);
            match self.broker.update_record(id, bytes, entry.revision).await {
                Ok(_) => {
                    if running {
                        self.broker.signal_cancel(id).await?;
                    } else {
                        self.after_cancel(id).await?;
                        if let Some(parent) = &record.parent {
                            crate::workflow::wake_parent(&*self.broker, parent, id).await;
                        }
                    }
                    return Ok(record);
                }
                Err(e) if e.kind() == ErrorKind::Conflict => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("record `{id}` keeps changing; cannot cancel it"),
        ))
    }

    /// A request not known to be running was marked `cancelled`: drop its
    /// delayed message if it has one, and tell the workers, since an attempt
    /// may be running without having written its record yet.
    async fn after_cancel(&self, id: &str) -> Result<()> {
        if let Err(e) = self.broker.remove_delayed(id).await {
            // Harmless: a worker drops a cancelled request it is given.
            tracing::debug!(id, error = %e, "cannot remove a delayed request");
        }
        self.broker.signal_cancel(id).await
    }

    /// Dead letters, oldest first, at most `limit`.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.broker.dead_letters(limit).await
    }

    /// The latest dead letter of request `id`, if any.
    pub async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        names::validate_id(id)?;
        self.broker.get_dead_letter(id).await
    }

    /// Publish a dead-lettered request again as a fresh request with the same
    /// id: its record is reset to `pending` (attempts from zero), and the
    /// dead letter is removed once the request is stored, with any older
    /// letters of the id; a newer one (the requeued request already died
    /// again) stays.
    /// [`ErrorKind::NotFound`] if there is no dead letter for `id`;
    /// [`ErrorKind::Conflict`] if the request is running or waiting again.
    pub async fn requeue(&self, id: &str) -> Result<TaskHandle> {
        names::validate_id(id)?;
        let Some(letter) = self.broker.get_dead_letter(id).await? else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no dead letter for id `{id}`"),
            ));
        };
        let mut request = letter.request()?;
        request.id = id.to_owned();
        request.enqueued_at = time::OffsetDateTime::now_utc();
        request.not_before = None;
        self.check_size(id, letter.payload.len())?;
        let fresh = Bytes::from(Record::pending(&request).to_json()?);
        let mut done = false;
        for _ in 0..32 {
            let written = match self.broker.get_record(id).await? {
                None => self.broker.create_record(id, fresh.clone()).await,
                Some(entry) => {
                    let current = Record::from_json(&entry.value)?;
                    if matches!(current.status, Status::Running | Status::Retrying)
                        || (current.status == Status::Pending && current.seq.is_some())
                    {
                        return Err(Error::new(
                            ErrorKind::Conflict,
                            format!(
                                "request `{id}` is {} again; requeue it once it has finished",
                                current.status
                            ),
                        ));
                    }
                    self.broker
                        .update_record(id, fresh.clone(), entry.revision)
                        .await
                }
            };
            match written {
                Ok(_) => {
                    done = true;
                    break;
                }
                Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        if !done {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("record `{id}` keeps changing; cannot requeue it"),
            ));
        }
        let mut outgoing = outgoing(&request, letter.payload.clone());
        // A new message for an old id: its own dedup key, so the broker does
        // not take it for the first publish (or an earlier requeue).
        outgoing.dedup_key = Some(format!("{id}.requeue.{}", letter.sequence));
        self.broker.publish(outgoing).await?;
        let removed = match letter.dead_sequence {
            Some(seq) => self.broker.remove_dead_letters_through(id, seq).await,
            // A broker that does not number its letters: remove them all.
            None => self.broker.remove_dead_letter(id).await,
        };
        if let Err(e) = removed {
            tracing::warn!(id, error = %e, "requeued, but cannot remove the dead letter");
        }
        Ok(TaskHandle {
            client: self.clone(),
            id: Arc::from(id),
            queued: None,
            registration: None,
        })
    }

    /// A handle on an existing request.
    pub fn handle(&self, id: impl Into<String>) -> TaskHandle {
        TaskHandle {
            client: self.clone(),
            id: Arc::from(id.into()),
            queued: None,
            registration: None,
        }
    }

    /// The record of request `id`; [`ErrorKind::NotFound`] if there is none.
    pub async fn record(&self, id: &str) -> Result<Record> {
        names::validate_id(id)?;
        match self.broker.get_record(id).await? {
            Some(entry) => Record::decode(id, &entry.value),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("no record for id `{id}`"),
            )),
        }
    }

    /// The metadata of request `id`, including what the task set.
    pub async fn metadata(&self, id: &str) -> Result<Map<String, Value>> {
        Ok(self.record(id).await?.metadata)
    }

    /// Start a request for workflow `name` (a task whose handler takes a
    /// [`WorkflowContext`](crate::workflow::WorkflowContext)): its `pending` record is
    /// written before it is published, so that [`retrieve_workflow`](Self::retrieve_workflow)
    /// finds it at once. Set its id (`.id(..)`) to start it once: a second
    /// start of the same id returns the existing run.
    pub fn workflow(&self, name: impl Into<String>) -> RequestBuilder {
        self.task(name).pending_record()
    }

    /// Start workflow `name` with `input`; returns once the run is durably
    /// stored (from then on it runs to completion, even if every worker
    /// restarts).
    pub async fn start_workflow<T: Serialize + ?Sized>(
        &self,
        name: &str,
        input: &T,
    ) -> Result<WorkflowHandle> {
        let handle = self.workflow(name).args(input).publish().await?;
        Ok(WorkflowHandle::new(handle))
    }

    /// A handle to the existing run `id`; [`ErrorKind::NotFound`] if there
    /// is none (yet: see [`retrieve_workflow_created`](Self::retrieve_workflow_created)).
    pub async fn retrieve_workflow(&self, id: &str) -> Result<WorkflowHandle> {
        self.record(id).await?;
        Ok(WorkflowHandle::new(self.handle(id)))
    }

    /// A handle to run `id` once it exists, waiting up to `timeout` for it to
    /// be started (watched, not polled); [`ErrorKind::Timeout`] if it was not.
    pub async fn retrieve_workflow_created(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<WorkflowHandle> {
        names::validate_id(id)?;
        let mut watch = self.broker.watch_record(id).await?;
        match tokio::time::timeout(timeout, watch.next()).await {
            Ok(Some(entry)) => {
                entry?;
                Ok(WorkflowHandle::new(self.handle(id)))
            }
            Ok(None) | Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("workflow `{id}` was not started within {timeout:?}"),
            )),
        }
    }

    /// Event `key` of workflow `id` (set with
    /// [`WorkflowContext::set_event`](crate::workflow::WorkflowContext::set_event)): at
    /// once if it is set, else the first value set within `timeout`
    /// (watched, not polled); `None` if none was set in time.
    pub async fn get_event<T: DeserializeOwned>(
        &self,
        id: &str,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<T>> {
        names::validate_id(id)?;
        names::validate_key("event key", key)?;
        let decode = |bytes: &[u8]| {
            serde_json::from_slice(bytes)
                .map(Some)
                .map_err(|e| Error::serialization(&format!("event `{key}` of workflow `{id}`"), e))
        };
        if let Some(entry) = self.broker.get_event(id, key).await? {
            return decode(&entry.value);
        }
        if timeout.is_zero() {
            return Ok(None);
        }
        let mut watch = self.broker.watch_event(id, key).await?;
        let entry = match tokio::time::timeout(timeout, watch.next()).await {
            Ok(Some(entry)) => entry?,
            Ok(None) | Err(_) => return Ok(None),
        };
        serde_json::from_slice(&entry.value)
            .map(Some)
            .map_err(|e| Error::serialization(&format!("event `{key}` of workflow `{id}`"), e))
    }

    /// The step log of workflow `id`: its checkpoints in order of position
    /// (empty if no step finished, or no such run).
    pub async fn steps(&self, id: &str) -> Result<Vec<crate::workflow::StepRecord>> {
        names::validate_id(id)?;
        let mut steps = Vec::new();
        for position in 0.. {
            let Some(bytes) = self.broker.get_step(id, position).await? else {
                break;
            };
            steps.push(serde_json::from_slice(&bytes).map_err(|e| {
                Error::serialization(
                    &format!("step {position} of workflow `{id}` is not a checkpoint"),
                    e,
                )
            })?);
        }
        Ok(steps)
    }

    /// Every event of workflow `id`, by key (an empty map if it set none).
    pub async fn get_events(&self, id: &str) -> Result<std::collections::BTreeMap<String, Value>> {
        names::validate_id(id)?;
        self.broker
            .get_events(id)
            .await?
            .into_iter()
            .map(|(key, bytes)| {
                serde_json::from_slice(&bytes)
                    .map(|v| (key.clone(), v))
                    .map_err(|e| {
                        Error::serialization(&format!("event `{key}` of workflow `{id}`"), e)
                    })
            })
            .collect()
    }

    /// Send `message` to workflow `id`, for a
    /// [`recv`](crate::workflow::WorkflowContext::recv) of the run to
    /// receive: `client.send(id, &msg).topic("payment").key("k").await`.
    /// Without a topic, it goes to the run's messages without one. The run
    /// must exist ([`ErrorKind::NotFound`] otherwise); a run suspended in a
    /// `recv` of that topic is woken at once. With an idempotency
    /// [`key`](SendBuilder::key), the same key sends once. Returns the
    /// message's sequence in the mailbox.
    pub fn send(&self, id: &str, message: impl Serialize) -> SendBuilder<'_> {
        SendBuilder {
            client: self,
            id: id.to_owned(),
            payload: serde_json::to_vec(&message)
                .map(Bytes::from)
                .map_err(|e| Error::serialization("encoding the message", e)),
            topic: None,
            key: None,
        }
    }

    async fn send_now(
        &self,
        id: &str,
        payload: Bytes,
        topic: Option<&str>,
        key: Option<&str>,
    ) -> Result<u64> {
        names::validate_id(id)?;
        names::topic_token(topic)?;
        if let Some(key) = key {
            names::validate_key("idempotency key", key)?;
        }
        if self.broker.get_record(id).await?.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no workflow `{id}` to send to"),
            ));
        }
        let seq = self.broker.send_mail(id, topic, payload, key).await?;
        // Read the record after sending: a run that suspends after this read
        // looks at its mailbox after writing `suspended`, so one of the two
        // sees the other.
        if let Some(entry) = self.broker.get_record(id).await? {
            let record = Record::decode(id, &entry.value)?;
            let waits_for = match topic {
                Some(t) => format!("recv:{t}"),
                None => "recv".to_owned(),
            };
            if record.status == Status::Suspended
                && record.waiting.as_deref() == Some(waits_for.as_str())
            {
                self.broker.wake(id).await?;
            }
        }
        Ok(seq)
    }

    /// Wait until request `id` has a terminal record (watching it, not
    /// polling) and return it, whatever its status.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Record> {
        self.watch_until_ended(id, timeout, None).await
    }

    /// [`wait`](Self::wait), the status before any record being `last`.
    async fn watch_until_ended(
        &self,
        id: &str,
        timeout: Duration,
        mut last: Option<Status>,
    ) -> Result<Record> {
        names::validate_id(id)?;
        let watch = async {
            let mut stream = self.broker.watch_record(id).await?;
            while let Some(entry) = stream.next().await {
                let record = Record::decode(id, &entry?.value)?;
                last = Some(record.status);
                if record.status.is_terminal() {
                    return Ok(record);
                }
            }
            Err(Error::new(
                ErrorKind::Broker,
                format!("the watch of record `{id}` ended"),
            ))
        };
        match tokio::time::timeout(timeout, watch).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(id, timeout, last)),
        }
    }
}

/// The error of a wait for `id` that ran out of time, the record last seen
/// being `last`.
fn timed_out(id: &str, timeout: Duration, last: Option<Status>) -> Error {
    Error::new(
        ErrorKind::Timeout,
        match last {
            Some(s) => format!("request `{id}` did not finish within {timeout:?} (status: {s})"),
            None => format!("request `{id}` did not finish within {timeout:?} (no record yet)"),
        },
    )
}

/// Refuse values a worker could not honour: more retries than
/// [`MAX_RETRIES_LIMIT`](crate::request::MAX_RETRIES_LIMIT), a due time
/// further ahead than [`MAX_DELAY`](crate::request::MAX_DELAY).
fn check_bounds(request: &Request) -> Result<()> {
    if let Some(n) = request.max_retries {
        if n > crate::request::MAX_RETRIES_LIMIT {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "max_retries {n} is more than jetq allows (at most {})",
                    crate::request::MAX_RETRIES_LIMIT
                ),
            ));
        }
    }
    request.check_due(time::OffsetDateTime::now_utc())
}

/// A message on its way to a workflow, from [`Client::send`]; await it to
/// send.
#[must_use = "a message is sent only when the builder is awaited"]
pub struct SendBuilder<'a> {
    client: &'a Client,
    id: String,
    payload: Result<Bytes>,
    topic: Option<String>,
    key: Option<String>,
}

impl fmt::Debug for SendBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendBuilder")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("key", &self.key)
            .finish()
    }
}

impl<'a> SendBuilder<'a> {
    /// The topic a `recv` of the run waits on (letters, digits, `-`, `_`).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// An idempotency key: a second send with the same key to the same run
    /// is dropped (on NATS within the mailbox's duplicate window, a day by
    /// default).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

impl<'a> std::future::IntoFuture for SendBuilder<'a> {
    type Output = Result<u64>;
    type IntoFuture = crate::broker::BoxFuture<'a, Result<u64>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let payload = self.payload?;
            self.client
                .send_now(
                    &self.id,
                    payload,
                    self.topic.as_deref(),
                    self.key.as_deref(),
                )
                .await
        })
    }
}

/// A handle's id: its registration's, if it has one (no copy).
fn handle_id(request: &Request, registration: Option<&Registration>) -> Arc<str> {
    match registration {
        Some(r) => Arc::clone(r.id()),
        None => Arc::from(request.id.as_str()),
    }
}

/// [`outgoing`], moving the request's names rather than copying them.
fn outgoing_owned(request: Box<Request>, payload: Bytes) -> OutgoingRequest {
    let Request {
        id,
        queue,
        task,
        headers,
        ..
    } = *request;
    let mut outgoing = OutgoingRequest::new(id, queue, task, payload);
    outgoing.headers = headers.into_iter().collect();
    outgoing
}

/// The broker's view of `request`, encoded as `payload`.
fn outgoing(request: &Request, payload: Bytes) -> OutgoingRequest {
    let mut outgoing = OutgoingRequest::new(
        request.id.clone(),
        request.queue.clone(),
        request.task.clone(),
        payload,
    );
    outgoing.headers = request
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    outgoing
}

/// Builds one request; [`publish`](Self::publish) sends it.
#[derive(Debug)]
#[must_use = "a request is sent only by `.publish().await`"]
pub struct RequestBuilder {
    client: Client,
    request: Box<Request>,
    error: Option<Error>,
    notify: bool,
    pending_record: bool,
}

impl RequestBuilder {
    /// The task's arguments.
    pub fn args<T: Serialize + ?Sized>(mut self, args: &T) -> Self {
        if let Err(e) = self.request.set_args(args) {
            self.error = Some(e);
        }
        self
    }

    /// The task's arguments as a JSON value.
    pub fn args_json(self, args: Value) -> Self {
        self.args(&args)
    }

    /// The task's arguments as JSON text, published as they are.
    pub fn args_raw(mut self, args: Box<serde_json::value::RawValue>) -> Self {
        self.request.args = args;
        self
    }

    /// Add one metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => {
                self.request.metadata.insert(key.into(), v);
            }
            Err(e) => self.error = Some(Error::serialization("encoding metadata", e)),
        }
        self
    }

    /// Merge a metadata object.
    pub fn metadata_map(mut self, map: Map<String, Value>) -> Self {
        self.request.metadata.extend(map);
        self
    }

    /// Use `id` as the request id: an idempotency key. Publishing the same id
    /// again returns a handle to the same request and runs it once.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.request.id = id.into();
        self
    }

    /// The queue (default `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.request.queue = queue.into();
        self
    }

    /// Retries allowed after the first attempt (default: the task's policy).
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.request.max_retries = Some(max_retries);
        self
    }

    /// Run no sooner than `delay` from now. The request is stored at once
    /// (durable across worker and broker restarts) and holds no worker slot
    /// while it waits; its record is `pending` with `next_attempt_at` set.
    /// At most [`MAX_DELAY`](crate::request::MAX_DELAY) (about ten years);
    /// a longer one is refused at publish.
    pub fn delay(mut self, delay: Duration) -> Self {
        let now = time::OffsetDateTime::now_utc();
        match time::Duration::try_from(delay)
            .ok()
            .filter(|_| delay <= crate::request::MAX_DELAY)
            .and_then(|d| now.checked_add(d))
        {
            Some(at) => self.request.not_before = Some(at),
            None => self.error = Some(crate::request::delay_too_long(delay)),
        }
        self
    }

    /// Run no sooner than `at` (a time in the past means now); see
    /// [`delay`](Self::delay).
    pub fn not_before(mut self, at: time::OffsetDateTime) -> Self {
        self.request.not_before = Some(at);
        self
    }

    /// A header propagated to the task (trace context, auth).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.headers.insert(name.into(), value.into());
        self
    }

    /// Whether the worker sends the record to this client's inbox when the
    /// request ends, for [`TaskHandle::wait`] (default `true`). Turn it off
    /// for requests nobody waits for through their handle: two messages
    /// fewer per request. A wait then watches the record instead.
    pub fn notify(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// Nobody will read this request's result: a worker that runs it
    /// successfully at its first delivery writes no record, so it costs
    /// one stored message (the request) instead of two, and no record
    /// read. Failures, retries and cancellations are still recorded (and
    /// dead-lettered); a duplicate published after the broker's dedup window
    /// runs again, and a cancellation reaches it only through the workers'
    /// cancel signals. Implies [`notify(false)`](Self::notify); the
    /// handle's [`wait`](TaskHandle::wait) and [`result`](TaskHandle::result)
    /// refuse with [`ErrorKind::Config`]. Like Celery's `ignore_result`.
    pub fn ignore_result(mut self) -> Self {
        self.request.ignore_result = true;
        self.notify = false;
        self
    }

    /// Start this request without the record read that comes before a
    /// task runs: one server round trip less between the publish and the
    /// result (about a sixth of a lone request's latency, see
    /// `docs/performance.md`). The price is [`ignore_result`]'s: a worker
    /// does not look for a cancellation made while the request was queued
    /// (only the workers' cancel signals reach it), nor for an earlier
    /// request under the same id beyond the broker's dedup window, so the
    /// task runs at least once rather than once. Its outcome is recorded
    /// as usual and can be waited on; it is never written over a record
    /// another message owns or one that was cancelled. For tasks that may
    /// run twice (reads, idempotent writes) whose callers wait for them.
    ///
    /// [`ignore_result`]: Self::ignore_result
    pub fn start_unchecked(mut self) -> Self {
        self.request.start_unchecked = true;
        self
    }

    /// Write this request's `pending` record before publishing it (as
    /// [`Client::pending_records`] does for every request): other clients
    /// find the request by id at once, and a message for another task under
    /// its id is refused. Workflows are started this way.
    pub fn pending_record(mut self) -> Self {
        self.pending_record = true;
        self
    }

    /// The request as it stands.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Publish. Returns once the broker has stored the request durably.
    /// Names are checked first: an invalid id, queue or task name is refused
    /// with [`ErrorKind::InvalidName`] and nothing is sent.
    pub async fn publish(self) -> Result<TaskHandle> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.client
            .publish_with(self.request, self.notify, self.pending_record)
            .await
    }
}

/// A request published without a record, as its handle keeps it.
#[derive(Debug, Clone)]
struct Queued {
    /// The envelope as published: the `pending` record is made from it.
    envelope: Bytes,
    /// Published with `ignore_result`: no record to wait for.
    ignore_result: bool,
}

/// A published request: its id, and ways to read its record.
#[derive(Debug, Clone)]
pub struct TaskHandle {
    client: Client,
    id: Arc<str>,
    /// A request this handle published without writing its record: what
    /// [`record`](Self::record) reports (`pending`) until a worker writes one.
    queued: Option<Queued>,
    /// Its place in the client's result inbox, if it published the request.
    registration: Option<Arc<Registration>>,
}

impl TaskHandle {
    /// The request id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current record. A request this handle published is `pending`
    /// until a worker writes its record.
    pub async fn record(&self) -> Result<Record> {
        match self.client.record(&self.id).await {
            Err(e) if e.kind() == ErrorKind::NotFound => match &self.queued {
                Some(queued) => Ok(Record::pending(&Request::from_json(&queued.envelope)?)),
                None => Err(e),
            },
            other => other,
        }
    }

    /// The current status.
    pub async fn status(&self) -> Result<Status> {
        Ok(self.record().await?.status)
    }

    /// The current metadata, including what the task set.
    pub async fn metadata(&self) -> Result<Map<String, Value>> {
        self.client.metadata(&self.id).await
    }

    /// Wait for the terminal record, whatever its status.
    pub async fn wait(&self, timeout: Duration) -> Result<Record> {
        self.wait_then(
            timeout,
            |arrived| Record::decode(&self.id, &arrived.bytes).ok(),
            |record| record,
        )
        .await
    }

    /// Wait for the terminal record: `notified` makes what the caller wants
    /// of one sent to the client's inbox (`None` if it cannot: it is then
    /// dropped, and the stored one read), `read` of one read or watched.
    async fn wait_then<R>(
        &self,
        timeout: Duration,
        notified: impl Fn(&Arrived) -> Option<R>,
        read: impl Fn(Record) -> R,
    ) -> Result<R> {
        if self.queued.as_ref().is_some_and(|r| r.ignore_result) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "request `{}` was published with `ignore_result`: its success leaves no record to wait for",
                    self.id
                ),
            ));
        }
        let Some(registration) = &self.registration else {
            let queued = self.queued.as_ref().map(|_| Status::Pending);
            return self
                .client
                .watch_until_ended(&self.id, timeout, queued)
                .await
                .map(read);
        };
        // The worker that ends the request sends its record to the client's
        // inbox; the record is also read now and then, in case that was lost.
        registration.waiting();
        let slot = &registration.slot;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_secs(1);
        let mut next_read = tokio::time::Instant::now() + pause;
        let mut last = self.queued.as_ref().map(|_| Status::Pending);
        loop {
            let changed = slot.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let mut read_now = false;
            if let Some(record) = slot.record() {
                match notified(&record) {
                    Some(ended) => return Ok(ended),
                    None => {
                        tracing::debug!(id = %self.id, "the record sent to the inbox is not one; reading the stored one");
                        slot.forget(&record);
                        read_now = true;
                    }
                }
            }
            let read_now =
                read_now || slot.take_resync() || tokio::time::Instant::now() >= next_read;
            if read_now {
                match self.client.record(&self.id).await {
                    Ok(record) if record.status.is_terminal() => return Ok(read(record)),
                    Ok(record) => last = Some(record.status),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    // A record that is not one will not get better.
                    Err(e) if e.kind() == ErrorKind::Serialization => return Err(e),
                    // An outage (the server restarting, say) is waited out.
                    Err(e) => {
                        tracing::debug!(id = %self.id, error = %e, "cannot read the record; will retry");
                    }
                }
                pause = (pause * 2).min(Duration::from_secs(30));
                next_read = tokio::time::Instant::now() + pause;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(timed_out(&self.id, timeout, last));
            }
            tokio::select! {
                _ = &mut changed => {}
                change = registration.next_followed() => registration.take_followed(change),
                _ = tokio::time::sleep_until(next_read.min(deadline)) => {}
            }
        }
    }

    /// Wait for the task's value. A `failed` request gives
    /// [`ErrorKind::TaskFailed`], a `cancelled` one [`ErrorKind::Cancelled`],
    /// no result in time [`ErrorKind::Timeout`].
    pub async fn result<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T> {
        self.wait_then(
            timeout,
            |arrived| {
                Some(self.outcome(arrived.status, arrived.error.as_ref(), || {
                    Record::raw_value_as(arrived.value())
                }))
            },
            |record| self.outcome(record.status, record.error.as_ref(), || record.value_as()),
        )
        .await?
    }

    /// The value of a terminal record (`value`, decoded), or the error it
    /// ended with.
    fn outcome<T>(
        &self,
        status: Status,
        error: Option<&ErrorInfo>,
        value: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        match status {
            Status::Succeeded => value(),
            Status::Cancelled => Err(Error::new(
                ErrorKind::Cancelled,
                format!("request `{}` was cancelled", self.id),
            )),
            _ => {
                let why = error
                    .map(|e| format!("{}: {}", e.kind, e.message))
                    .unwrap_or_else(|| "no reason recorded".to_owned());
                Err(Error::new(
                    ErrorKind::TaskFailed,
                    format!("request `{}` failed: {why}", self.id),
                ))
            }
        }
    }
}
