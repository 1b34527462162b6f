//! The record protocol of one attempt: claiming a request's record and writing it
//! with optimistic concurrency.

use super::*;
use std::sync::atomic::AtomicBool;

/// Writes one attempt's record with optimistic concurrency.
///
/// The claim (status `running`, this message's `seq`, the attempt number,
/// start time and worker) need not be written before the task runs: a quick
/// attempt writes its record once, claim and outcome together. The claim is
/// written on its own only when the attempt is still running after
/// `running_after`, when the task reports progress or metadata, and before a
/// request is failed (a dead letter always follows a claimed record). Until
/// then the attempt owns the record while the stored one is still the one it
/// read (same `seq` and attempt count, not terminal); afterwards while it is
/// the one it wrote.
pub(super) struct RecordWriter {
    pub(super) broker: Arc<dyn Broker>,
    /// The attempt's request, shared with its context: the id, where the
    /// ended record goes (`notify`) and the workflow to wake (`parent`).
    request: Arc<Request>,
    pub(super) state: Mutex<WriterState>,
    /// Set when a client cancelled the request while this attempt ran (its
    /// task's token fires with it): tells a cancellation from a shutdown.
    by_client: AtomicBool,
}

pub(super) struct WriterState {
    /// The record as this attempt means it: the claim applied. A claim
    /// that read no record leaves its identity (id, task, queue, parent)
    /// empty until a write or [`RecordWriter::current`] needs it
    /// ([`fill_identity`]): the request holds the same, and a quick
    /// `ignore_result` attempt never needs it.
    pub(super) record: Record,
    /// Revision of the stored record this attempt last read or wrote;
    /// `None` if there was none.
    pub(super) revision: Option<u64>,
    /// Whether the claim has been written.
    pub(super) claimed: bool,
    /// `seq` and `attempts` of the stored record while this attempt owns it.
    pub(super) base: (Option<u64>, u32),
    /// The claim, to apply again over a record re-read before it was written.
    pub(super) claim: ClaimStamp,
    /// The record as last written, encoded.
    pub(super) written: Option<Bytes>,
    /// Whether that write carried the record's tag for a producer that
    /// follows it (which then needs no message on its inbox).
    pub(super) tagged: bool,
    /// Whether a write was sent (it may have landed even if its answer was
    /// never seen).
    pub(super) attempted: bool,
}

/// What a claim writes into the record.
#[derive(Clone)]
pub(super) struct ClaimStamp {
    pub(super) seq: u64,
    pub(super) attempts: u32,
    pub(super) max_retries: u32,
    pub(super) started_at: OffsetDateTime,
    pub(super) worker: Arc<str>,
}

impl ClaimStamp {
    pub(super) fn apply(&self, record: &mut Record) {
        record.seq = Some(self.seq);
        record.attempts = self.attempts;
        record.max_retries = self.max_retries;
        record.status = Status::Running;
        record.started_at = Some(self.started_at);
        record.next_attempt_at = None;
        record.worker = Some(self.worker.to_string());
        record.waiting = None;
        record.resume = None;
    }
}

/// A record's identity: its id, task, queue and parent. No change an
/// attempt writes alters them, so a change is applied to a copy of the
/// record that borrows them for its encoding instead of copying them (four
/// allocations per write fewer); they move to the copy only once it is
/// written.
struct Identity {
    id: String,
    task: String,
    queue: String,
    parent: Option<String>,
}

impl Identity {
    fn take(record: &mut Record) -> Self {
        Identity {
            id: std::mem::take(&mut record.id),
            task: std::mem::take(&mut record.task),
            queue: std::mem::take(&mut record.queue),
            parent: record.parent.take(),
        }
    }

    fn put(self, record: &mut Record) {
        record.id = self.id;
        record.task = self.task;
        record.queue = self.queue;
        record.parent = self.parent;
    }
}

/// Give `record` the identity of `request` if it has none yet (see
/// [`WriterState::record`]; a record's id is never empty otherwise).
fn fill_identity(record: &mut Record, request: &Request) {
    if record.id.is_empty() {
        record.id.clone_from(&request.id);
        record.task.clone_from(&request.task);
        record.queue.clone_from(&request.queue);
        record.parent.clone_from(&request.parent);
    }
}

/// `record` with `change` applied, as a new record holding `record`'s
/// [`Identity`] (until it is given back); `record` is left as it was but
/// for that. What the change does to the identity is undone.
fn changed(record: &mut Record, change: &(dyn Fn(&mut Record) + Send + Sync)) -> Record {
    let identity = Identity::take(record);
    let mut next = record.clone();
    change(&mut next);
    identity.put(&mut next);
    next
}

impl RecordWriter {
    /// A writer for an attempt whose claim of `record` is stored (at
    /// `revision`).
    fn stored(
        broker: Arc<dyn Broker>,
        request: &Arc<Request>,
        record: Record,
        revision: u64,
        claim: ClaimStamp,
    ) -> Self {
        let base = (record.seq, record.attempts);
        Self::new(broker, request, record, Some(revision), true, base, claim)
    }

    /// A writer for an attempt that claims `stored` (revision `revision`, or
    /// none stored): `claim` says what the attempt writes; `claimed` whether
    /// `record` (the claimed record) is already stored.
    pub(super) fn new(
        broker: Arc<dyn Broker>,
        request: &Arc<Request>,
        record: Record,
        revision: Option<u64>,
        claimed: bool,
        base: (Option<u64>, u32),
        claim: ClaimStamp,
    ) -> Self {
        RecordWriter {
            broker,
            request: Arc::clone(request),
            by_client: AtomicBool::new(false),
            state: Mutex::new(WriterState {
                record,
                revision,
                claimed,
                base,
                claim,
                written: None,
                tagged: false,
                attempted: false,
            }),
        }
    }

    /// The request id.
    pub(super) fn id(&self) -> &str {
        &self.request.id
    }

    /// Where the request asked its ended record to be sent.
    pub(super) fn notify(&self) -> Option<&str> {
        self.request.notify.as_deref()
    }

    /// The request whose task published this one: woken when this one
    /// ends, if it is a workflow waiting for it.
    pub(super) fn parent(&self) -> Option<&str> {
        self.request.parent.as_deref()
    }

    /// A client cancelled the request: say so (before the task's token
    /// fires).
    pub(super) fn cancel_by_client(&self) {
        self.by_client.store(true, Ordering::Release);
    }

    /// Whether a client cancelled the request while this attempt ran.
    pub(super) fn is_cancelled_by_client(&self) -> bool {
        self.by_client.load(Ordering::Acquire)
    }

    /// The record as last written, encoded, for the request's inbox: `None`
    /// if that write carried the record's tag for a producer that follows
    /// it (the broker's republish reaches the producer first; a message on
    /// the inbox as well would only cost it and the worker).
    pub(super) async fn written_for_inbox(&self) -> Option<Bytes> {
        let state = self.state.lock().await;
        match state.tagged {
            true => None,
            false => state.written.clone(),
        }
    }

    /// Whether the attempt has sent no write: its claim is not stored.
    pub(super) async fn sent_nothing(&self) -> bool {
        !self.state.lock().await.attempted
    }

    /// Whether the attempt found no record and has sent no write: nothing
    /// of it is stored.
    pub(super) async fn untouched(&self) -> bool {
        let state = self.state.lock().await;
        state.revision.is_none() && !state.attempted
    }

    /// The record as this attempt means it.
    pub(super) async fn current(&self) -> Record {
        let mut record = self.state.lock().await.record.clone();
        fill_identity(&mut record, &self.request);
        record
    }

    /// Whether `stored` is still the record this attempt owns.
    /// A record for another task or queue under the same id (written
    /// meanwhile, or never read: an `ignore_result` attempt) is never this
    /// attempt's.
    pub(super) fn still_owned(state: &WriterState, stored: &Record) -> bool {
        stored.seq == state.base.0
            && stored.attempts == state.base.1
            && !stored.status.is_terminal()
            && stored.task == state.record.task
            && stored.queue == state.record.queue
    }

    /// Whether `stored` is this attempt's own claim, written by a write
    /// whose future was dropped before it saw the answer (the `running`
    /// write races the task's end).
    pub(super) fn own_claim(claimed: bool, claim: &ClaimStamp, stored: &Record) -> bool {
        !claimed
            && stored.seq == Some(claim.seq)
            && stored.attempts == claim.attempts
            && stored.worker.as_deref() == Some(&*claim.worker)
            && !stored.status.is_terminal()
    }

    /// Write the claim if it is not written yet.
    pub(super) async fn ensure_claimed(&self) -> Result<()> {
        if self.state.lock().await.claimed {
            return Ok(());
        }
        self.apply(&|_| {}).await.map(|_| ())
    }

    /// Write `change` over the record; returns the status as written.
    pub(super) async fn apply(
        &self,
        change: &(dyn Fn(&mut Record) + Send + Sync),
    ) -> Result<Status> {
        let mut guard = self.state.lock().await;
        fill_identity(&mut guard.record, &self.request);
        let deadline = tokio::time::Instant::now() + RECORD_WRITE_PATIENCE;
        let mut pause = Duration::from_millis(50);
        loop {
            // Boxed: the futures around this one (one per task) stay small.
            // The change, encoded; the record keeps its identity while the
            // write is under way (this future may be dropped at any await).
            let mut next = Box::new(changed(&mut guard.record, change));
            let encoded = next.to_json();
            Identity::take(&mut next).put(&mut guard.record);
            let bytes = Bytes::from(encoded?);
            guard.attempted = true;
            // The write that ends the record of a request whose producer
            // follows it carries the record's tag.
            let tag = match (self.request.follow, self.notify()) {
                (true, Some(key)) if next.status.is_terminal() => crate::tag::tag(key, &bytes),
                _ => None,
            };
            let written = match (guard.revision, tag) {
                (revision, Some(tag)) => {
                    self.broker
                        .write_ended_record(self.id(), bytes.clone(), revision, &tag)
                        .await
                }
                (Some(revision), None) => self
                    .broker
                    .update_record(self.id(), bytes.clone(), revision)
                    .await
                    .map(|revision| (revision, false)),
                (None, None) => self
                    .broker
                    .create_record(self.id(), bytes.clone())
                    .await
                    .map(|revision| (revision, false)),
            };
            let failed = match written {
                Ok((revision, tagged)) => {
                    guard.tagged = tagged;
                    let status = next.status;
                    guard.base = (next.seq, next.attempts);
                    Identity::take(&mut guard.record).put(&mut next);
                    guard.record = *next;
                    guard.revision = Some(revision);
                    guard.claimed = true;
                    guard.written = Some(bytes);
                    return Ok(status);
                }
                Err(e) => e,
            };
            match failed {
                e if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {
                    let state = &mut *guard;
                    match self.broker.get_record(self.id()).await? {
                        None if !state.claimed && state.base == (None, 0) => {
                            state.revision = None;
                        }
                        None => {
                            return Err(Error::new(
                                ErrorKind::Conflict,
                                format!("record `{}` was deleted while its task ran", self.id()),
                            ));
                        }
                        Some(entry) => {
                            let mut stored = Record::decode(self.id(), &entry.value)?;
                            if Self::own_claim(state.claimed, &state.claim, &stored) {
                                state.claimed = true;
                                state.base = (stored.seq, stored.attempts);
                            } else if !Self::still_owned(state, &stored) {
                                return Err(Error::new(
                                    ErrorKind::Conflict,
                                    format!(
                                        "record `{}` was taken over by another attempt, or finished",
                                        self.id()
                                    ),
                                ));
                            }
                            // Changed by someone allowed to (a client asking to
                            // cancel, a pending record written late): keep that.
                            if !state.claimed {
                                state.claim.apply(&mut stored);
                            }
                            state.record = stored;
                            state.revision = Some(entry.revision);
                        }
                    }
                }
                // Only an outage is worth waiting out; a record that is too
                // large or cannot be encoded will not get better.
                e if matches!(e.kind(), ErrorKind::Broker | ErrorKind::Timeout)
                    && tokio::time::Instant::now() < deadline =>
                {
                    warn!(id = %self.id(), error = %e, "record write failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                e => return Err(e),
            }
        }
    }

    /// Read the record back: has a client asked to cancel, or has another
    /// attempt taken the request over?
    pub(super) async fn check(&self, broker: &Arc<dyn Broker>) -> Result<Watch> {
        let (base, claimed, claim) = {
            let guard = self.state.lock().await;
            (guard.base, guard.claimed, guard.claim.clone())
        };
        let Some(entry) = broker.get_record(self.id()).await? else {
            return Ok(if claimed || base != (None, 0) {
                Watch::Lost
            } else {
                Watch::Fine
            });
        };
        let current = Record::decode(self.id(), &entry.value)?;
        // Its own claim, from a write whose answer was dropped, is not lost.
        let own = Self::own_claim(claimed, &claim, &current);
        Ok(
            if !own && (current.seq != base.0 || current.attempts != base.1) {
                Watch::Lost
            } else if current.cancel_requested_at.is_some() || current.status == Status::Cancelled {
                Watch::CancelRequested
            } else {
                Watch::Fine
            },
        )
    }
}

/// What a running attempt finds when it reads its record back.
pub(super) enum Watch {
    Fine,
    CancelRequested,
    Lost,
}

impl RecordSink for RecordWriter {
    fn update(&self, change: Box<dyn Fn(&mut Record) + Send + Sync>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.apply(&*change).await.map(|_| ()) })
    }

    fn cancelled_by_client(&self) -> bool {
        self.is_cancelled_by_client()
    }
}

/// What became of one delivery.
pub(super) enum Claim {
    /// This attempt owns the record. (The writers are shared already: the
    /// attempt's future, which holds a claim, stays small.)
    Run(Arc<RecordWriter>, u32),
    /// A duplicate, finished or cancelled request: acknowledge and drop.
    Skip(&'static str),
    /// Another delivery of the same message owns it now: neither run nor
    /// settle this one.
    Leave(&'static str),
    /// The request has used up its attempts (its workers died each time).
    GiveUp(Arc<RecordWriter>, u32),
    /// This attempt owns the record but the request cannot run (its record
    /// was corrupt or too large, ...): fail it with this error.
    Fail(Arc<RecordWriter>, TaskError),
    /// The id is another request's (another task or queue): refuse the
    /// message without touching the record.
    NotOwner(String),
    /// This message's request already failed, but the worker that failed it
    /// stopped before dead-lettering and terminating it: finish that.
    Bury(Box<Record>),
    /// The worker running this message dead-lettered it and stopped before
    /// it could fail the record; the record is failed now: terminate.
    Terminate,
}

/// Write `record` as request `id`'s: a create if there was none (`revision`
/// `None`), else an update of `revision`. Returns the new revision.
pub(super) async fn put_record(
    env: &Env,
    id: &str,
    record: &Record,
    revision: Option<u64>,
) -> Result<u64> {
    let bytes = Bytes::from(record.to_json()?);
    match revision {
        None => env.broker.create_record(id, bytes).await,
        Some(rev) => env.broker.update_record(id, bytes, rev).await,
    }
}

/// Whether the record of `request` is owned by the message at `seq`: it
/// names that message, or no message yet and the same task and queue (the
/// `pending` record its producer wrote).
pub(super) fn owns(record: &Record, request: &Request, seq: u64) -> bool {
    match record.seq {
        Some(s) => s == seq,
        None => record.task == request.task && record.queue == request.queue,
    }
}

/// Why a message may not be run as the request its envelope describes, if
/// so: it came for another queue or task than its envelope names, or its
/// deduplication key belongs to another request.
pub(super) fn check_routing(
    request: &Request,
    queue: &str,
    delivery: &dyn Delivery,
) -> std::result::Result<(), String> {
    if request.queue != queue {
        return Err(format!(
            "the envelope of request `{}` names queue `{}` but came on queue `{queue}`",
            request.id, request.queue
        ));
    }
    if let Some(task) = delivery.routed_task() {
        if task != request.task {
            return Err(format!(
                "the envelope of request `{}` names task `{}` but was published for task `{task}`",
                request.id, request.task
            ));
        }
    }
    if let Some(key) = delivery.dedup_key() {
        if !request.owns_dedup_key(key) {
            return Err(format!(
                "the message of request `{}` carries the deduplication key (Nats-Msg-Id) `{}`, which belongs to another request",
                request.id,
                names::escape(key)
            ));
        }
    }
    Ok(())
}

/// Whether `delivery` may create the record of `request`: its
/// deduplication key is the id, or it has none because the broker's
/// schedule fired it.
pub(super) fn may_start_record(delivery: &dyn Delivery, request: &Request) -> bool {
    match delivery.dedup_key() {
        Some(k) => k == request.id,
        None => delivery.fired_by_schedule(),
    }
}

/// The stored record of request `id`, if it can be read and decoded.
pub(super) async fn stored_record(env: &Env, id: &str) -> Option<Record> {
    let entry = env.broker.get_record(id).await.ok()??;
    Record::decode(id, &entry.value).ok()
}

/// Whether request `id` was cancelled (or otherwise ended) before it was due.
pub(super) async fn ended_before_due(env: &Env, id: &str) -> bool {
    stored_record(env, id)
        .await
        .is_some_and(|r| r.status.is_terminal() || r.cancel_requested_at.is_some())
}

/// Take ownership of the request's record for this attempt.
///
/// A first delivery claims lazily: nothing is written before the task runs,
/// and the claim goes out with the first write of the attempt (see
/// [`RecordWriter`]). A redelivery (a retry, or its worker died) writes its
/// claim first, so that every attempt that may have run is counted.
pub(super) async fn claim(
    env: &Env,
    request: &Arc<Request>,
    delivery: &dyn Delivery,
    max_retries: u32,
) -> Result<Claim> {
    let existing = env.broker.get_record(&request.id).await?;
    // Most deliveries are a fresh request's first: no record yet, and this
    // message may start one. Its claim is the one the loop below would make
    // (a pending record, claimed lazily), without the loop's future: that
    // one holds records across its writes, more than 1 KiB, which glibc's
    // allocator serves slowly.
    if existing.is_none() && first_of_its_own(request, delivery) {
        return Ok(unread_claim(env, request, delivery, max_retries));
    }
    Box::pin(claim_read(env, request, delivery, max_retries, existing)).await
}

/// [`claim`] from the record entry just read (`existing`), reading it again
/// after each conflicting write.
async fn claim_read(
    env: &Env,
    request: &Arc<Request>,
    delivery: &dyn Delivery,
    max_retries: u32,
    existing: Option<RecordEntry>,
) -> Result<Claim> {
    let info = delivery.info();
    let seq = info.sequence;
    let mut fail: Option<TaskError> = None;
    let mut first = Some(existing);
    for _ in 0..16 {
        let existing = match first.take() {
            Some(existing) => existing,
            None => env.broker.get_record(&request.id).await?,
        };
        let (mut record, revision) = match existing {
            None if request.resume.is_some() => {
                return Ok(Claim::Skip(
                    "a wake-up message for a workflow that has no record",
                ));
            }
            // Only the message stored under the id (`Nats-Msg-Id`), or one
            // the broker's schedule fired, may start a record: a requeued
            // message's record was reset before it was published, and a
            // message without its id as key could be anyone's.
            None if !may_start_record(delivery, request) => {
                return Ok(Claim::NotOwner(format!(
                    "request `{}` has no record, and this message may not start one: its deduplication key (Nats-Msg-Id) is {}, not the id",
                    request.id,
                    match delivery.dedup_key() {
                        Some(k) => format!("`{}`", names::escape(k)),
                        None => "missing".to_owned(),
                    }
                )));
            }
            None => (Record::pending(request), None),
            Some(entry) => match Record::decode(&request.id, &entry.value) {
                Ok(record) => (record, Some(entry.revision)),
                Err(e) => {
                    // Not a record at all: replace it with a fresh one and
                    // fail the request, naming the problem, instead of
                    // looping on it.
                    warn!(error = %e, "the stored record is not a jetq record; failing the request");
                    fail = Some(
                        TaskError::permanent(format!("{}; the request cannot run", e.message()))
                            .with_kind(kinds::CORRUPT_RECORD),
                    );
                    (Record::pending(request), Some(entry.revision))
                }
            },
        };
        if record.status.is_terminal() {
            if record.status == Status::Failed && record.seq == Some(seq) {
                return Ok(Claim::Bury(Box::new(record)));
            }
            return Ok(Claim::Skip(
                "the request has already finished or was cancelled",
            ));
        }
        // A wake-up message that already owns the record (its attempt failed
        // and it was put back, was released, or its worker died, possibly
        // in the middle of suspending again) is that request's message like
        // any other: the path below counts and claims it.
        if let Some(token) = request.resume.as_ref().filter(|_| record.seq != Some(seq)) {
            if record.status != Status::Suspended || record.resume.as_deref() != Some(token) {
                return Ok(Claim::Skip(
                    "a stale wake-up message: the workflow was resumed or taken over already",
                ));
            }
            if record.task != request.task || record.queue != request.queue {
                return Ok(Claim::NotOwner(format!(
                    "a wake-up message for request `{}` names task `{}` on queue `{}`, but the request is for task `{}` on queue `{}`",
                    request.id,
                    request.task,
                    request.queue,
                    names::escape(&record.task),
                    names::escape(&record.queue)
                )));
            }
            // The message with the record's token takes the run over. A
            // resumption is not an attempt; a redelivered one is (its first
            // delivery's worker died).
            let stamp = ClaimStamp {
                seq,
                attempts: record
                    .attempts
                    .saturating_add(u32::from(info.delivered > 1)),
                max_retries,
                started_at: OffsetDateTime::now_utc(),
                worker: env.name.clone(),
            };
            stamp.apply(&mut record);
            let attempt = record.attempts;
            match put_record(env, &request.id, &record, revision).await {
                Ok(rev) => {
                    let writer = Arc::new(RecordWriter::stored(
                        Arc::clone(&env.broker),
                        request,
                        record,
                        rev,
                        stamp,
                    ));
                    return Ok(if u64::from(attempt) > u64::from(max_retries) + 1 {
                        Claim::GiveUp(writer, attempt)
                    } else {
                        Claim::Run(writer, attempt)
                    });
                }
                Err(e) if e.kind() == ErrorKind::Conflict => continue,
                Err(e) => return Err(e),
            }
        }
        if record.seq.is_some_and(|s| s != seq) {
            return Ok(Claim::Skip(
                "another message owns this request (a duplicate)",
            ));
        }
        if !owns(&record, request, seq) {
            return Ok(Claim::NotOwner(format!(
                "request id `{}` is taken by a request for task `{}` on queue `{}`; this message is for task `{}` on queue `{}`",
                request.id,
                names::escape(&record.task),
                names::escape(&record.queue),
                request.task,
                request.queue
            )));
        }
        if record.seq == Some(seq) && record.status == Status::Running {
            // Redelivered while its record says running: did the worker that
            // ran it dead-letter it before it stopped?
            if let Some(letter) = Box::pin(own_dead_letter(env, &request.id, seq)).await? {
                record.status = Status::Failed;
                record.finished_at = Some(letter.died_at);
                record.next_attempt_at = None;
                Verdict::of(&letter).apply(&mut record);
                if let Some(rev) = revision {
                    match put_record(env, &request.id, &record, Some(rev)).await {
                        Ok(_) => return Ok(Claim::Terminate),
                        Err(e) if e.kind() == ErrorKind::Conflict => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        // A first delivery finds the record claimed by this very message: a
        // later delivery of it has been here, so this one is stale (it sat
        // in this worker's read-ahead, its record read held up by an
        // outage, while the server delivered the message again). Running it
        // would run an attempt the record does not count, alongside the one
        // that does. Leave the message to that delivery. (Should the
        // server's count have been reset, this delivery is the live one:
        // left alone, it comes back after the ack wait, counted.)
        if info.delivered <= 1 && record.seq == Some(seq) {
            return Ok(Claim::Leave(
                "a stale delivery: a later delivery of this message claimed the record",
            ));
        }
        let cancelled = record.cancel_requested_at.is_some();
        // A redelivery whose record this message never claimed: its first
        // delivery ran (lazily, writing nothing) and its worker died, or its
        // outcome could not be written. Count that attempt too. (A delayed
        // request delivered early and put back is the exception.)
        let unseen = info.delivered > 1
            && record.seq != Some(seq)
            && !(request.not_before.is_some() && record.status == Status::Pending);
        // A give-up is claimed as the attempt after the last allowed one
        // and runs nothing: a delivery that finds it (its worker died
        // before failing the request) gives up again, counting no more. (A
        // count already past that, written by someone else, is kept.)
        let stamp = ClaimStamp {
            seq,
            attempts: record
                .attempts
                .saturating_add(if unseen { 2 } else { 1 })
                .min(max_retries.saturating_add(2).max(record.attempts)),
            max_retries,
            started_at: OffsetDateTime::now_utc(),
            worker: env.name.clone(),
        };
        let over = u64::from(stamp.attempts) > u64::from(max_retries) + 1;
        if !cancelled && fail.is_none() && info.delivered <= 1 && !over {
            return Ok(lazy_claim(env, request, record, revision, stamp));
        }
        if cancelled {
            // Its worker died after a client asked to cancel it.
            record.mark_cancelled(OffsetDateTime::now_utc());
            record.seq = Some(seq);
        } else {
            stamp.apply(&mut record);
        }
        let attempt = record.attempts;
        // A request that cannot run is written `failed` at once (its dead
        // letter follows): if this attempt is cut short, the redelivery
        // finishes burying it instead of running it.
        let failing = |record: &mut Record, err: &TaskError| {
            record.status = Status::Failed;
            record.error = Some(err.info());
            record.finished_at = Some(OffsetDateTime::now_utc());
        };
        if let Some(err) = &fail {
            failing(&mut record, err);
        }
        let mut written = put_record(env, &request.id, &record, revision).await;
        if matches!(&written, Err(e) if e.kind() == ErrorKind::PayloadTooLarge) {
            // The claimed record (start time, worker, sequence) does not fit
            // where the pending one did: drop what makes it large and fail
            // the request with a record that fits.
            let size = record.to_json().map(|b| b.len()).unwrap_or(0);
            record.metadata = Map::new();
            record.extra = Map::new();
            record.progress = None;
            record.value = None;
            record.error = None;
            if fail.is_none() {
                fail = Some(
                    TaskError::permanent(format!(
                        "the request's record ({size} bytes with its metadata) does not fit in the record store{}; its metadata was dropped",
                        env.broker
                            .max_payload()
                            .map(|m| format!(" (at most {m} bytes)"))
                            .unwrap_or_default()
                    ))
                    .with_kind(kinds::TOO_LARGE),
                );
            }
            if let Some(err) = &fail {
                failing(&mut record, err);
            }
            written = put_record(env, &request.id, &record, revision).await;
        }
        match written {
            Ok(_) if cancelled => return Ok(Claim::Skip("cancelled by a client")),
            Ok(rev) => {
                let writer = Arc::new(RecordWriter::stored(
                    Arc::clone(&env.broker),
                    request,
                    record,
                    rev,
                    stamp,
                ));
                return Ok(if let Some(err) = fail {
                    Claim::Fail(writer, err)
                } else if u64::from(attempt) > u64::from(max_retries) + 1 {
                    Claim::GiveUp(writer, attempt)
                } else {
                    Claim::Run(writer, attempt)
                });
            }
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {
                fail = None;
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::new(
        ErrorKind::Conflict,
        format!("record `{}` keeps changing; cannot claim it", request.id),
    ))
}

/// Request `id`'s dead letter, if the message at `seq` left it (its worker
/// stopped before failing the record, or another attempt at it
/// dead-lettered it first).
pub(super) async fn own_dead_letter(env: &Env, id: &str, seq: u64) -> Result<Option<DeadLetter>> {
    Ok(env
        .broker
        .get_dead_letter(id)
        .await?
        .filter(|letter| letter.sequence == seq))
}

/// What a `failed` record takes from its message's dead letter: the reason,
/// and the attempt and worker that failed it. The letter is stored first
/// and never replaced, so when two attempts at one message fail it at once
/// (one was taken over while its write was on its way), the record says
/// what the letter says, not what the later claim would.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Verdict {
    pub(super) error: ErrorInfo,
    pub(super) attempts: u32,
    pub(super) worker: String,
}

impl Verdict {
    pub(super) fn of(letter: &DeadLetter) -> Self {
        Verdict {
            error: letter.error.clone(),
            attempts: letter.attempts,
            worker: letter.worker.clone(),
        }
    }

    /// Write the verdict into a record being failed (a letter that does
    /// not name its attempt count or worker leaves the record's).
    pub(super) fn apply(&self, record: &mut Record) {
        record.error = Some(self.error.clone());
        if self.attempts > 0 {
            record.attempts = self.attempts;
        }
        if !self.worker.is_empty() {
            record.worker = Some(self.worker.clone());
        }
    }
}

/// Claim `record` (stored at `revision`, or none) for a quick attempt that
/// writes it only when it must (see [`RecordWriter`]).
pub(super) fn lazy_claim(
    env: &Env,
    request: &Arc<Request>,
    mut record: Record,
    revision: Option<u64>,
    stamp: ClaimStamp,
) -> Claim {
    let base = (record.seq, record.attempts);
    stamp.apply(&mut record);
    let attempt = stamp.attempts;
    let writer = RecordWriter::new(
        Arc::clone(&env.broker),
        request,
        record,
        revision,
        false,
        base,
        stamp,
    );
    Claim::Run(Arc::new(writer), attempt)
}

/// Whether `request`, just delivered, may run without reading its record
/// first: an `ignore_result` or `start_unchecked` request at its first
/// delivery, stored under its own id, not delayed (a delayed request has a
/// pending record) and not cancelled lately as far as this worker heard. It
/// is taken to have no record; if it has one after all (a cancellation, a
/// pending record, an earlier request's), the first write finds it and the
/// attempt builds on it or yields to it.
pub(super) fn runs_unread(env: &Env, request: &Request, delivery: &dyn Delivery) -> bool {
    (request.ignore_result || request.start_unchecked)
        && request.not_before.is_none()
        && first_of_its_own(request, delivery)
        && !env.cancelled_lately(&request.id)
}

/// Whether `delivery` is the first of a message that may start the record
/// of `request` (not a wake-up): with no record, its claim is a fresh one.
fn first_of_its_own(request: &Request, delivery: &dyn Delivery) -> bool {
    request.resume.is_none()
        && delivery.info().delivered <= 1
        && may_start_record(delivery, request)
}

/// Put back (nak, for redelivery at once) a delivery this worker never ran,
/// first writing down that its message owns the request (`seq`, attempts
/// unchanged) if nothing claimed it yet, so that the next delivery, counted
/// again by the server, does not count an attempt that may have run unseen
/// (see [`claim`]). `request`: the delivery's, if already decoded.
///
/// The mark is made only for a message that may start the record (stored
/// under the id), into a record that is missing or `pending` for the same
/// task and queue; anything else, or a failed write, is left as it is (the
/// next delivery then counts one attempt more than ran, as for a worker
/// that died).
pub(super) async fn put_back_unrun(env: &Env, delivery: &dyn Delivery, request: Option<&Request>) {
    let decoded;
    let request = match request {
        Some(r) => Some(r),
        None => {
            decoded = Request::from_json(delivery.payload()).ok();
            decoded.as_ref()
        }
    };
    if let Some(request) = request {
        mark_unrun(env, delivery, request).await;
    }
    if let Err(e) = delivery.nak(None).await {
        warn!(error = %e, "cannot put back a delivery that has not run; it comes back after the ack wait");
    }
}

/// The mark of [`put_back_unrun`].
async fn mark_unrun(env: &Env, delivery: &dyn Delivery, request: &Request) {
    let seq = delivery.info().sequence;
    if request.resume.is_some()
        || request.not_before.is_some()
        || !may_start_record(delivery, request)
    {
        return;
    }
    let id = &request.id;
    let (mut record, revision) = match env.broker.get_record(id).await {
        Ok(None) => (Record::pending(request), None),
        Ok(Some(entry)) => match Record::decode(id, &entry.value) {
            Ok(r) if r.status == Status::Pending && r.seq.is_none() && owns(&r, request, seq) => {
                (r, Some(entry.revision))
            }
            _ => return,
        },
        Err(_) => return,
    };
    record.seq = Some(seq);
    if let Err(e) = put_record(env, id, &record, revision).await {
        debug!(id = %id, error = %e, "cannot mark a released delivery's record; its next delivery counts one attempt more");
    }
}

/// The claim of a request that [`runs_unread`].
pub(super) fn unread_claim(
    env: &Env,
    request: &Arc<Request>,
    delivery: &dyn Delivery,
    max_retries: u32,
) -> Claim {
    let stamp = ClaimStamp {
        seq: delivery.info().sequence,
        attempts: 1,
        max_retries,
        started_at: OffsetDateTime::now_utc(),
        worker: env.name.clone(),
    };
    lazy_claim(env, request, Record::pending_unnamed(request), None, stamp)
}
