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

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::client::TaskHandle;
use crate::context::Context;
use crate::error::ErrorKind;
use crate::extract::FromContext;
use crate::record::ErrorInfo;
use crate::task_error::{kinds, TaskError};

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
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// The next step position of one attempt, shared by every [`WorkflowContext`]
/// handle of the attempt.
#[derive(Clone, Default)]
struct Positions(Arc<AtomicU32>);

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
            .field("next_step", &self.positions.0.load(Ordering::Relaxed))
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
        if self.ctx.is_cancelled_by_client() {
            return Err(TaskError::permanent(format!(
                "workflow `{}` was cancelled before step `{name}`",
                self.id()
            ))
            .with_kind(kinds::CANCELLED));
        }
        let position = self.positions.0.fetch_add(1, Ordering::SeqCst);
        let broker = self.ctx.inner.client.broker();
        if let Some(stored) = broker
            .get_step(self.id(), position)
            .await
            .map_err(|e| unavailable(self.id(), position, &e))?
        {
            return self.replay(&stored, name, position);
        }
        let outcome = work.await.map_err(Into::into);
        let checkpoint = match &outcome {
            Ok(value) => Some(Ok(serde_json::to_value(value).map_err(|e| {
                TaskError::permanent(format!(
                    "step `{name}` returned a value that cannot be encoded as JSON: {e}"
                ))
            })?)),
            Err(e) if !e.is_retryable() => Some(Err(e.info())),
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
        match broker
            .create_step(self.id(), position, Bytes::from(bytes))
            .await
        {
            Ok(()) => outcome,
            // Another attempt of this workflow checkpointed the step first:
            // its outcome is the one, so that every attempt goes on alike.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                match broker
                    .get_step(self.id(), position)
                    .await
                    .map_err(|e| unavailable(self.id(), position, &e))?
                {
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
    /// `key` follows the id rule (letters, digits, `-`, `_`).
    pub async fn set_event(&self, key: &str, value: impl Serialize) -> Result<(), TaskError> {
        let bytes = serde_json::to_vec(&value).map_err(|e| {
            TaskError::permanent(format!("event `{key}` cannot be encoded as JSON: {e}"))
        })?;
        self.ctx
            .inner
            .client
            .broker()
            .put_event(self.id(), key, Bytes::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidName | ErrorKind::PayloadTooLarge | ErrorKind::Config => {
                    TaskError::permanent(e.to_string())
                }
                _ => TaskError::new(format!("cannot set event `{key}`: {e}")),
            })
    }
}

/// The error of a step whose checkpoint cannot be read or written: retryable
/// (an outage), unless the broker cannot hold workflows at all.
fn unavailable(id: &str, position: u32, e: &crate::Error) -> TaskError {
    let message = format!("the step log of workflow `{id}` (step {position}) is unavailable: {e}");
    match e.kind() {
        ErrorKind::Config | ErrorKind::InvalidName => TaskError::permanent(message),
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
