//! Durable workflow functions (DBOS's style): a task whose handler takes a
//! [`WorkflowContext`] runs its work as named steps; each step's outcome is
//! checkpointed beside the request's record before the workflow moves on,
//! and an attempt that runs the workflow again (after a crash, a release, a
//! retry) gets every finished step's checkpoint back without running it.
//!
//! ```
//! use jetq::{Args, TaskError};
//! use jetq::workflow::WorkflowContext;
//!
//! async fn checkout(wf: WorkflowContext, Args(order): Args<String>) -> Result<String, TaskError> {
//!     let reservation: String = wf
//!         .step("reserve", async { Ok::<_, TaskError>(format!("r-{order}")) })
//!         .await?;
//!     wf.set_event("status", "reserved").await?;
//!     let receipt: String = wf
//!         .step("charge", async { Ok::<_, TaskError>(format!("paid {reservation}")) })
//!         .await?;
//!     wf.set_event("status", "paid").await?;
//!     Ok(receipt)
//! }
//! ```
//!
//! **What must be deterministic.** The workflow function is run again from
//! the top by every attempt, so the sequence of step names it asks for must
//! be the same each time, given the same input and the same step outcomes.
//! Anything that can differ between runs (time, randomness, I/O, reading
//! other records) belongs inside a step. A step whose name at position `n`
//! differs from the checkpoint at `n` (the code changed under a running
//! workflow) fails the run with kind `nondeterministic`.
//!
//! **Outcomes.** A step's value, or a permanent error, is checkpointed with a
//! write only one attempt can win: if a stale attempt and a new one race,
//! both continue with the first checkpoint. A retryable error is not
//! checkpointed: it fails the attempt, and the workflow's next attempt runs
//! the step again (the request's retry policy is the step's). Replayed
//! errors are permanent.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::client::TaskHandle;
use crate::context::Context;
use crate::error::ErrorKind;
use crate::extract::FromContext;
use crate::names;
use crate::record::ErrorInfo;
use crate::task_error::{kinds, Suspension, TaskError, WakeCheck};

mod chain;
pub use chain::{
    IntoNext, Next, StepHandler, Workflow, DEFAULT_MAX_STEPS, TOO_MANY_STEPS, UNKNOWN_STEP,
};

/// The error kind of a run whose code asks for another step than the one
/// checkpointed at the same position.
pub const NONDETERMINISTIC: &str = "nondeterministic";

/// Version of the step checkpoint written by this crate.
pub const STEP_VERSION: u32 = 1;

/// A step's checkpoint, as stored (see `docs/wire-format.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StepRecord {
    /// Checkpoint version (`1`).
    pub v: u32,
    /// The step's position in the run, from 0.
    pub position: u32,
    /// The step's name.
    pub name: String,
    /// The step's value, if it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// The step's permanent error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The attempt of the request that ran it.
    pub attempt: u32,
    /// When it was checkpointed.
    #[serde(with = "crate::rfc3339")]
    pub at: OffsetDateTime,
}

/// By default, a wait longer than this (a durable sleep, a `recv`, a
/// `join`) suspends the run: its worker slot and message are released, and
/// a wake-up message resumes it. Shorter waits are waited out in the
/// attempt. A worker sets its own with
/// [`WorkerBuilder::suspend_after`](crate::WorkerBuilder::suspend_after).
pub const SUSPEND_AFTER: Duration = Duration::from_secs(2);

/// The error kind of a `recv` whose message is not of the type asked for.
pub const INVALID_MESSAGE: &str = "invalid_message";

/// One attempt's progress through the run, shared by every
/// [`WorkflowContext`] handle of the attempt: the next step position, and
/// how far each mailbox was read (the sequence of the last message received,
/// by topic token), both rebuilt by replay.
#[derive(Clone, Default)]
struct Positions(Arc<RunState>);

#[derive(Default)]
struct RunState {
    next: AtomicU32,
    cursors: Mutex<HashMap<String, u64>>,
}

impl Positions {
    fn take(&self) -> u32 {
        self.0.next.fetch_add(1, Ordering::SeqCst)
    }

    fn cursor(&self, token: &str) -> u64 {
        self.0
            .cursors
            .lock()
            .map(|c| c.get(token).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn advance(&self, token: &str, seq: u64) {
        if let Ok(mut c) = self.0.cursors.lock() {
            let at = c.entry(token.to_owned()).or_insert(0);
            *at = (*at).max(seq);
        }
    }
}

/// The checkpoint of a wait's deadline (`sleep`, a `recv`'s timeout).
#[derive(Serialize, Deserialize)]
struct Deadline {
    #[serde(with = "crate::rfc3339")]
    until: OffsetDateTime,
}

/// A child request started by a workflow ([`WorkflowContext::start_child`]):
/// its id derives from the parent's id and the step's position, so a replay
/// never starts it twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Child {
    id: String,
}

impl Child {
    /// The child's request id (`<parent id>-c<position>`).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The checkpoint of a `join`: the child's final status and its value or
/// error (`status` absent: the join timed out).
#[derive(Serialize, Deserialize)]
struct Joined {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<crate::record::Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorInfo>,
}

/// The checkpoint of a `recv`: the message received and its mailbox
/// sequence, or neither (timed out).
#[derive(Serialize, Deserialize)]
struct Received {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<Value>,
}

/// A workflow run's handle, as a handler parameter: steps, events, its id.
/// See the [module](self) docs.
#[derive(Clone)]
pub struct WorkflowContext {
    ctx: Context,
    positions: Positions,
}

impl std::fmt::Debug for WorkflowContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowContext")
            .field("id", &self.id())
            .field("next_step", &self.positions.0.next.load(Ordering::Relaxed))
            .finish()
    }
}

impl FromContext for WorkflowContext {
    async fn from_context(ctx: &Context) -> Result<Self, TaskError> {
        let positions = match ctx.extension::<Positions>() {
            Some(p) => p,
            None => {
                let p = Positions::default();
                ctx.insert_extension(p.clone());
                p
            }
        };
        Ok(WorkflowContext {
            ctx: ctx.clone(),
            positions,
        })
    }
}

impl WorkflowContext {
    /// The workflow's id: its request id.
    pub fn id(&self) -> &str {
        self.ctx.id()
    }

    /// The workflow's id (DBOS's name for [`id`](Self::id)).
    pub fn workflow_id(&self) -> &str {
        self.ctx.id()
    }

    /// The attempt's context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Run `work` as the next step, named `name`, once: if this step was
    /// checkpointed by an earlier attempt, its outcome is returned without
    /// running `work`. A client's cancellation stops the workflow here
    /// (before the step), with kind `cancelled`.
    pub async fn step<T, E, F>(&self, name: &str, work: F) -> Result<T, TaskError>
    where
        T: Serialize + DeserializeOwned,
        E: Into<TaskError>,
        F: Future<Output = Result<T, E>>,
    {
        self.check_cancelled(name)?;
        let position = self.positions.take();
        if let Some(stored) = self.checkpoint(position).await? {
            return self.replay(&stored, name, position);
        }
        let outcome = work.await.map_err(Into::into);
        self.record(position, name, outcome).await
    }

    /// Run a step that retries by its own policy, inside this attempt: `work`
    /// makes the step's future, and a retryable error runs it again after
    /// the policy's delay, up to `policy.max_retries` times (a shutdown or a
    /// cancellation stops the retrying). The outcome is checkpointed as
    /// with [`step`](Self::step); the last error, if still retryable, fails
    /// the attempt and the workflow's own retry policy takes over.
    pub async fn step_retrying<T, E, F, Fut>(
        &self,
        name: &str,
        policy: &crate::RetryPolicy,
        mut work: F,
    ) -> Result<T, TaskError>
    where
        T: Serialize + DeserializeOwned,
        E: Into<TaskError>,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let ctx = &self.ctx;
        self.step(name, async move {
            let mut retry = 0u32;
            loop {
                match work().await.map_err(Into::into) {
                    Err(e) if e.is_retryable() && !e.is_suspension() && retry < policy.max_retries => {
                        retry += 1;
                        let delay = match e.retry() {
                            crate::Retry::After(d) => d,
                            _ => policy.delay(retry),
                        };
                        tracing::debug!(step = name, retry, error = %e, "step failed; retrying in {delay:?}");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = ctx.cancelled() => return Err(e),
                        }
                    }
                    other => return other,
                }
            }
        })
        .await
    }

    /// The deadline of wait `name` ending `timeout` from its first run
    /// (checkpointed as step `deadline:<name>`, so a replay keeps it), once
    /// the run is known not to be cancelled.
    async fn wait_deadline(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<OffsetDateTime, TaskError> {
        let deadline: Deadline = self
            .step(&format!("deadline:{name}"), async move {
                Ok::<_, TaskError>(Deadline {
                    until: after(timeout),
                })
            })
            .await?;
        self.check_cancelled(name)?;
        Ok(deadline.until)
    }

    /// Stop at a step boundary if a client cancelled the run.
    fn check_cancelled(&self, name: &str) -> Result<(), TaskError> {
        if self.ctx.is_cancelled_by_client() {
            return Err(TaskError::permanent(format!(
                "workflow `{}` was cancelled before step `{name}`",
                self.id()
            ))
            .with_kind(kinds::CANCELLED));
        }
        Ok(())
    }

    /// The checkpoint at `position`, if written.
    async fn checkpoint(&self, position: u32) -> Result<Option<Bytes>, TaskError> {
        self.ctx
            .inner
            .client
            .broker()
            .get_step(self.id(), position)
            .await
            .map_err(|e| unavailable(self.id(), position, &e))
    }

    /// Checkpoint `outcome` as step `position`, named `name`, unless it is a
    /// retryable error (the next attempt runs the step again) or a
    /// suspension; if another attempt checkpointed the step first, its
    /// outcome is the one returned.
    async fn record<T>(
        &self,
        position: u32,
        name: &str,
        outcome: Result<T, TaskError>,
    ) -> Result<T, TaskError>
    where
        T: Serialize + DeserializeOwned,
    {
        let checkpoint = match &outcome {
            Ok(value) => Some(Ok(serde_json::to_value(value).map_err(|e| {
                TaskError::permanent(format!(
                    "step `{name}` returned a value that cannot be encoded as JSON: {e}"
                ))
            })?)),
            Err(e) if !e.is_retryable() && !e.is_suspension() => Some(Err(e.info())),
            // Not checkpointed: the next attempt runs the step again.
            Err(_) => None,
        };
        let Some(checkpoint) = checkpoint else {
            return outcome;
        };
        let (value, error) = match checkpoint {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        let record = StepRecord {
            v: STEP_VERSION,
            position,
            name: name.to_owned(),
            value,
            error,
            attempt: self.ctx.attempt(),
            at: OffsetDateTime::now_utc(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| {
            TaskError::permanent(format!("step `{name}` cannot be checkpointed: {e}"))
        })?;
        let broker = self.ctx.inner.client.broker();
        match broker
            .create_step(self.id(), position, Bytes::from(bytes))
            .await
        {
            Ok(()) => outcome,
            // Another attempt of this workflow checkpointed the step first:
            // its outcome is the one, so that every attempt goes on alike.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                match self.checkpoint(position).await? {
                    Some(stored) => self.replay(&stored, name, position),
                    None => Err(TaskError::new(format!(
                        "step {position} of workflow `{}` was recorded and then vanished",
                        self.id()
                    ))),
                }
            }
            Err(e) if e.kind() == ErrorKind::PayloadTooLarge => Err(TaskError::permanent(format!(
                "the outcome of step `{name}` is too large to checkpoint: {e}"
            ))
            .with_kind(kinds::TOO_LARGE)),
            Err(e) => Err(unavailable(self.id(), position, &e)),
        }
    }

    /// Sleep durably for `duration`: the wake-up time is checkpointed first
    /// (as step `sleep`), so a run resumed after a crash waits only for the
    /// time left. A sleep longer than the worker's `suspend_after` (default
    /// [`SUSPEND_AFTER`]) suspends the run: it
    /// holds no worker slot meanwhile, and any worker resumes it when due.
    pub async fn sleep(&self, duration: Duration) -> Result<(), TaskError> {
        let deadline: Deadline = self
            .step("sleep", async move {
                Ok::<_, TaskError>(Deadline {
                    until: after(duration),
                })
            })
            .await?;
        let until = deadline.until;
        loop {
            let Some(left) = left_until(until) else {
                return Ok(());
            };
            if left > self.ctx.inner.suspend_after {
                return Err(TaskError::suspend(Suspension {
                    until,
                    waiting: "sleep".to_owned(),
                    check: None,
                }));
            }
            tokio::select! {
                _ = tokio::time::sleep(left) => {}
                _ = self.ctx.cancelled() => return Err(self.interrupted("sleep")),
            }
        }
    }

    /// Receive the oldest message sent to this run for `topic` (`None`: the
    /// messages sent without a topic) that no earlier `recv` of the run
    /// received, waiting up to `timeout` for one; `None` on timeout. The
    /// outcome, a timeout included, is checkpointed (as steps
    /// `deadline:recv:<topic>` and `recv:<topic>`), so a message is received
    /// exactly once across crashes. A wait longer than the worker's `suspend_after`
    /// suspends the run; a message sent to it wakes it at once. A message
    /// that does not decode as `T` fails the run (kind `invalid_message`).
    pub async fn recv<T: DeserializeOwned>(
        &self,
        topic: Option<&str>,
        timeout: Duration,
    ) -> Result<Option<T>, TaskError> {
        let token = names::topic_token(topic)
            .map_err(|e| TaskError::permanent(e.to_string()).with_kind(kinds::INVALID_ARGS))?;
        let name = match topic {
            Some(t) => format!("recv:{t}"),
            None => "recv".to_owned(),
        };
        let until = self.wait_deadline(&name, timeout).await?;
        let position = self.positions.take();
        let received: Received = match self.checkpoint(position).await? {
            Some(stored) => self.replay(&stored, &name, position)?,
            None => {
                self.wait_for_mail(position, &name, topic, token, until)
                    .await?
            }
        };
        if let Some(seq) = received.seq {
            self.positions.advance(token, seq);
        }
        match received.message {
            None => Ok(None),
            Some(message) => T::deserialize(message).map(Some).map_err(|e| {
                TaskError::permanent(format!(
                    "the message workflow `{}` received on {name} is not of the type it expects: {e}",
                    self.id()
                ))
                .with_kind(INVALID_MESSAGE)
            }),
        }
    }

    /// Wait for the next message of the mailbox until `until`, then
    /// checkpoint what came (or the timeout) at `position`.
    async fn wait_for_mail(
        &self,
        position: u32,
        name: &str,
        topic: Option<&str>,
        token: &str,
        until: OffsetDateTime,
    ) -> Result<Received, TaskError> {
        let broker = self.ctx.inner.client.broker();
        let id = self.id();
        let from = self.positions.cursor(token).saturating_add(1);
        let mail_error = |e: crate::Error| {
            broker_failure(
                format!("the mailbox of workflow `{id}` is unavailable: {e}"),
                &e,
            )
        };
        loop {
            // Watch first, then read: a message sent in between is not missed.
            let mut sent = broker.watch_mail(id, topic).await.map_err(mail_error)?;
            if let Some(mail) = broker
                .next_mail(id, topic, from)
                .await
                .map_err(mail_error)?
            {
                let message: Value = serde_json::from_slice(&mail.payload).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&mail.payload).into_owned())
                });
                let received = Received {
                    seq: Some(mail.sequence),
                    message: Some(message),
                };
                return self.record(position, name, Ok(received)).await;
            }
            let Some(left) = left_until(until) else {
                let timed_out = Received {
                    seq: None,
                    message: None,
                };
                return self.record(position, name, Ok(timed_out)).await;
            };
            if left > self.ctx.inner.suspend_after {
                return Err(TaskError::suspend(Suspension {
                    until,
                    waiting: name.to_owned(),
                    check: Some(WakeCheck::Mail {
                        id: id.to_owned(),
                        topic: topic.map(str::to_owned),
                        from,
                    }),
                }));
            }
            tokio::select! {
                _ = futures_util::StreamExt::next(&mut sent) => {}
                _ = tokio::time::sleep(left) => {}
                _ = self.ctx.cancelled() => return Err(self.interrupted(name)),
            }
        }
    }

    /// Start child request `task` with `args` as a step (named
    /// `start:<task>`): its id is `<this run's id>-c<position>`, so a replay
    /// returns the same child instead of starting another; it inherits this
    /// run's metadata and (through the producer middleware) its trace and
    /// auth context, and names this run as its `parent`. A child may be a
    /// task or a workflow. Await it with [`join`](Self::join).
    pub async fn start_child(&self, task: &str, args: impl Serialize) -> Result<Child, TaskError> {
        self.start_child_inner(None, task, args).await
    }

    /// [`start_child`](Self::start_child) on queue `queue`.
    pub async fn start_child_on(
        &self,
        queue: &str,
        task: &str,
        args: impl Serialize,
    ) -> Result<Child, TaskError> {
        self.start_child_inner(Some(queue), task, args).await
    }

    async fn start_child_inner(
        &self,
        queue: Option<&str>,
        task: &str,
        args: impl Serialize,
    ) -> Result<Child, TaskError> {
        let name = format!("start:{task}");
        self.check_cancelled(&name)?;
        let position = self.positions.take();
        if let Some(stored) = self.checkpoint(position).await? {
            return self.replay(&stored, &name, position);
        }
        let id = format!("{}-c{position}", self.id());
        let started = async {
            names::validate_id(&id).map_err(|e| {
                TaskError::permanent(format!(
                    "cannot derive a child id from `{}`: {e}",
                    self.id()
                ))
            })?;
            let mut request = self.ctx.client().task(task);
            if let Some(queue) = queue {
                request = request.queue(queue);
            }
            request
                .id(&id)
                .args(&args)
                .metadata_map(self.ctx.metadata().clone())
                .pending_record()
                .publish()
                .await
                .map_err(|e| broker_failure(format!("cannot start child `{task}`: {e}"), &e))?;
            Ok::<_, TaskError>(Child { id: id.clone() })
        };
        let outcome = started.await;
        self.record(position, &name, outcome).await
    }

    /// Wait for `child` to end, up to `timeout`, and return its value: a
    /// child that failed or was cancelled gives a permanent error with the
    /// child's error kind; no end in time gives a permanent error of kind
    /// `timeout`. The deadline and the outcome are checkpointed (steps
    /// `deadline:join:<child id>` and `join:<child id>`). A wait longer than
    /// the worker's `suspend_after` suspends this run; the child's end wakes it.
    pub async fn join<T: DeserializeOwned>(
        &self,
        child: &Child,
        timeout: Duration,
    ) -> Result<T, TaskError> {
        let name = format!("join:{}", child.id);
        let until = self.wait_deadline(&name, timeout).await?;
        let position = self.positions.take();
        let joined: Joined = match self.checkpoint(position).await? {
            Some(stored) => self.replay(&stored, &name, position)?,
            None => {
                self.wait_for_child(position, &name, &child.id, until)
                    .await?
            }
        };
        match (joined.status, joined.error) {
            (Some(crate::record::Status::Succeeded), _) => {
                T::deserialize(joined.value.unwrap_or(Value::Null)).map_err(|e| {
                    TaskError::permanent(format!(
                        "child `{}` returned a value of another type than expected: {e}",
                        child.id
                    ))
                    .with_kind(kinds::INVALID_ARGS)
                })
            }
            (None, _) => Err(TaskError::permanent(format!(
                "child `{}` did not end within the time given",
                child.id
            ))
            .with_kind(kinds::TIMEOUT)),
            (Some(status), error) => {
                let (kind, message) = match error {
                    Some(e) => (e.kind, e.message),
                    None => (kinds::ERROR.to_owned(), String::new()),
                };
                Err(
                    TaskError::permanent(format!("child `{}` ended {status}: {message}", child.id))
                        .with_kind(kind),
                )
            }
        }
    }

    /// Wait for child `child` to end until `until`, then checkpoint its
    /// outcome (or the timeout) at `position`.
    async fn wait_for_child(
        &self,
        position: u32,
        name: &str,
        child: &str,
        until: OffsetDateTime,
    ) -> Result<Joined, TaskError> {
        let broker = self.ctx.inner.client.broker();
        let failure = |e: crate::Error| TaskError::new(format!("cannot read child `{child}`: {e}"));
        let ended = |bytes: &[u8]| -> Result<Option<Joined>, TaskError> {
            let record = crate::Record::decode(child, bytes).map_err(failure)?;
            Ok(record.status.is_terminal().then_some(Joined {
                status: Some(record.status),
                value: record.value,
                error: record.error,
            }))
        };
        if let Some(entry) = broker.get_record(child).await.map_err(failure)? {
            if let Some(joined) = ended(&entry.value)? {
                return self.record(position, name, Ok(joined)).await;
            }
        }
        let timed_out = || Joined {
            status: None,
            value: None,
            error: None,
        };
        let Some(left) = left_until(until) else {
            return self.record(position, name, Ok(timed_out())).await;
        };
        if left > self.ctx.inner.suspend_after {
            return Err(TaskError::suspend(Suspension {
                until,
                waiting: name.to_owned(),
                check: Some(WakeCheck::Child {
                    child: child.to_owned(),
                }),
            }));
        }
        // A short wait: follow the child's record (its current value, then
        // every change) until it ends or the time is up.
        let mut watch = broker.watch_record(child).await.map_err(failure)?;
        let deadline = tokio::time::Instant::now() + left;
        loop {
            tokio::select! {
                item = futures_util::StreamExt::next(&mut watch) => match item {
                    Some(Ok(entry)) => {
                        if let Some(joined) = ended(&entry.value)? {
                            return self.record(position, name, Ok(joined)).await;
                        }
                    }
                    Some(Err(e)) => return Err(failure(e)),
                    None => return Err(TaskError::new(format!("the watch of child `{child}` ended"))),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return self.record(position, name, Ok(timed_out())).await;
                }
                _ = self.ctx.cancelled() => return Err(self.interrupted(name)),
            }
        }
    }

    /// The error of a wait cut short by a cancellation or a shutdown.
    fn interrupted(&self, name: &str) -> TaskError {
        if self.ctx.is_cancelled_by_client() {
            TaskError::permanent(format!(
                "workflow `{}` was cancelled during {name}",
                self.id()
            ))
            .with_kind(kinds::CANCELLED)
        } else {
            TaskError::new(format!(
                "workflow `{}` was interrupted during {name}",
                self.id()
            ))
            .with_kind(kinds::INTERRUPTED)
        }
    }

    /// The checkpointed outcome of step `position`, which the code now calls
    /// `name`.
    fn replay<T: DeserializeOwned>(
        &self,
        stored: &[u8],
        name: &str,
        position: u32,
    ) -> Result<T, TaskError> {
        let record: StepRecord = serde_json::from_slice(stored).map_err(|e| {
            TaskError::permanent(format!(
                "the checkpoint of step {position} of workflow `{}` is not readable: {e}",
                self.id()
            ))
            .with_kind(kinds::CORRUPT_RECORD)
        })?;
        if record.name != name {
            return Err(TaskError::permanent(format!(
                "workflow `{}` asks for step `{name}` at position {position}, but step `{}` ran there; the workflow's code changed while it ran",
                self.id(),
                crate::names::escape(&record.name)
            ))
            .with_kind(NONDETERMINISTIC));
        }
        match (record.value, record.error) {
            (_, Some(error)) => {
                Err(TaskError::permanent(error.message).with_kind(error.kind.as_str()))
            }
            (value, None) => T::deserialize(value.unwrap_or(Value::Null)).map_err(|e| {
                TaskError::permanent(format!(
                    "the checkpoint of step `{name}` does not match the type the code expects: {e}"
                ))
                .with_kind(NONDETERMINISTIC)
            }),
        }
    }

    /// Set event `key` of this workflow to `value` (an upsert): readable
    /// from outside at once with [`Client::get_event`](crate::Client::get_event).
    /// `key` follows the id rule (letters, digits, `-`, `_`). Setting an
    /// event is a step (named `set_event:<key>`): a replay does not set it
    /// again, so an observer never sees an event go back to an older value.
    pub async fn set_event(&self, key: &str, value: impl Serialize) -> Result<(), TaskError> {
        let bytes = serde_json::to_vec(&value).map_err(|e| {
            TaskError::permanent(format!("event `{key}` cannot be encoded as JSON: {e}"))
        })?;
        let broker = self.ctx.inner.client.broker();
        self.step(&format!("set_event:{key}"), async {
            broker
                .put_event(self.id(), key, Bytes::from(bytes))
                .await
                .map(|_| ())
                .map_err(|e| broker_failure(format!("cannot set event `{key}`: {e}"), &e))
        })
        .await
    }
}

/// Child request `child` ended: wake `parent` if it is a workflow suspended
/// in a `join` of it (its worker, or a client that cancelled a child that
/// never ran). Best effort: the parent wakes at its join's timeout otherwise.
/// Only a child that `start_child` started (id `<parent>-c<n>`) can be
/// joined, so other children of a task cost no record read.
pub(crate) async fn wake_parent(broker: &dyn crate::broker::Broker, parent: &str, child: &str) {
    let derived = child
        .strip_prefix(parent)
        .and_then(|rest| rest.strip_prefix("-c"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !derived {
        return;
    }
    let joining = match broker.get_record(parent).await {
        Ok(Some(entry)) => crate::Record::decode(parent, &entry.value).is_ok_and(|r| {
            r.status == crate::Status::Suspended
                && r.waiting.as_deref() == Some(format!("join:{child}").as_str())
        }),
        _ => false,
    };
    if joining {
        tracing::debug!(parent, "waking the workflow that waits for this child");
        if let Err(e) = broker.wake(parent).await {
            tracing::warn!(parent, error = %e, "cannot wake the workflow that waits for this child");
        }
    }
}

/// The time `duration` from now.
fn after(duration: Duration) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    time::Duration::try_from(duration)
        .ok()
        .and_then(|d| now.checked_add(d))
        .unwrap_or(now)
}

/// The time left until `until`, if any.
fn left_until(until: OffsetDateTime) -> Option<Duration> {
    Duration::try_from(until - OffsetDateTime::now_utc())
        .ok()
        .filter(|d| !d.is_zero())
}

/// The error of a step whose checkpoint cannot be read or written: retryable
/// (an outage), unless the broker cannot hold workflows at all.
fn unavailable(id: &str, position: u32, e: &crate::Error) -> TaskError {
    broker_failure(
        format!("the step log of workflow `{id}` (step {position}) is unavailable: {e}"),
        e,
    )
}

/// The task error of a broker call that failed with `e`, saying `message`:
/// permanent when no later attempt can do better (the broker cannot hold
/// workflows, a name or a value it refuses), else retryable (an outage).
fn broker_failure(message: String, e: &crate::Error) -> TaskError {
    match e.kind() {
        ErrorKind::Config
        | ErrorKind::InvalidName
        | ErrorKind::PayloadTooLarge
        | ErrorKind::Serialization => TaskError::permanent(message),
        _ => TaskError::new(message),
    }
}

/// A started workflow run, from
/// [`Client::start_workflow`](crate::Client::start_workflow) or
/// [`Client::retrieve_workflow`](crate::Client::retrieve_workflow).
#[derive(Debug, Clone)]
pub struct WorkflowHandle {
    handle: TaskHandle,
}

impl WorkflowHandle {
    pub(crate) fn new(handle: TaskHandle) -> Self {
        WorkflowHandle { handle }
    }

    /// The run's id.
    pub fn workflow_id(&self) -> &str {
        self.handle.id()
    }

    /// The run's record.
    pub async fn record(&self) -> crate::Result<crate::Record> {
        self.handle.record().await
    }

    /// The run's status.
    pub async fn status(&self) -> crate::Result<crate::Status> {
        self.handle.status().await
    }

    /// Wait for the run's value; see [`TaskHandle::result`].
    pub async fn result<T: DeserializeOwned>(
        &self,
        timeout: std::time::Duration,
    ) -> crate::Result<T> {
        self.handle.result(timeout).await
    }

    /// The run as a task handle.
    pub fn task_handle(&self) -> &TaskHandle {
        &self.handle
    }
}
