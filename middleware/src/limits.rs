//! Per-task limits on a worker: attempts running at once, attempts started
//! per period, and a default time limit for tasks that set none.
//!
//! ```
//! use std::time::Duration;
//! use jetq_middleware::limits::Limits;
//!
//! let limits = Limits::new()
//!     // at most 2 `images.resize` running at once on this worker
//!     .concurrency("images.resize", 2)
//!     // at most 10 `emails.send` started per second on this worker
//!     .rate("emails.send", 10, Duration::from_secs(1))
//!     // tasks without a timeout of their own stop after 5 minutes
//!     .default_timeout(Duration::from_secs(300));
//! # let _ = limits;
//! ```
//!
//! **Per worker.** Every limit here counts the attempts of one worker
//! process. What holds across all workers of a queue is the consumer's
//! `max_ack_pending` (at most that many requests of the queue handed out and
//! not yet settled, whichever worker holds them): a global cap for a task
//! type means a queue of its own.
//!
//! **Waiting, not releasing.** An attempt over a limit waits in the worker
//! until it may start: its message is kept alive by the worker's keep-alives
//! (it is not redelivered elsewhere) and it keeps its worker slot while it
//! waits. It is not released with a delay: a release counts as a delivery,
//! and a request released again and again would use up its delivery budget
//! and be abandoned. So a limited task that is often over its limit takes
//! slots from the worker's other tasks: give it a queue of its own, or a
//! worker concurrency well above the limit. The wait ends early if the
//! attempt is cancelled (a client's cancellation or shutdown): the attempt
//! then fails with kind `cancelled` (retryable, so a shutdown releases it).

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jetq::broker::BoxFuture;
use jetq::middleware::{Middleware, Next, Outcome};
use jetq::{Context, TaskError};
use tokio::sync::Semaphore;

/// The error kind of an attempt that ran longer than the default timeout
/// (the same as a task's own timeout).
pub const TIMEOUT: &str = jetq::task_error::kinds::TIMEOUT;

/// The error kind of an attempt cancelled while it waited for a limit.
pub const CANCELLED: &str = jetq::task_error::kinds::CANCELLED;

/// The limits of one task type.
#[derive(Default)]
struct TaskLimits {
    running: Option<(usize, Arc<Semaphore>)>,
    rate: Option<(u32, Duration, Arc<DefaultDirectRateLimiter>)>,
}

/// Per-task limits, as a worker middleware. See the [module](self) docs.
#[derive(Default)]
pub struct Limits {
    tasks: HashMap<String, TaskLimits>,
    default_timeout: Option<Duration>,
}

impl fmt::Debug for TaskLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskLimits")
            .field("running", &self.running.as_ref().map(|(n, _)| *n))
            .field("rate", &self.rate.as_ref().map(|(n, per, _)| (*n, *per)))
            .finish()
    }
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tasks: std::collections::BTreeMap<&String, &TaskLimits> = self.tasks.iter().collect();
        f.debug_struct("Limits")
            .field("tasks", &tasks)
            .field("default_timeout", &self.default_timeout)
            .finish()
    }
}

impl Limits {
    /// No limits yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `max` attempts of `task` running at once on this worker
    /// (`0` is taken as 1).
    pub fn concurrency(mut self, task: impl Into<String>, max: usize) -> Self {
        let max = max.max(1);
        self.tasks.entry(task.into()).or_default().running =
            Some((max, Arc::new(Semaphore::new(max))));
        self
    }

    /// At most `count` attempts of `task` started per `period` on this
    /// worker, spread evenly (a burst of up to `count` when idle). `0` is
    /// taken as 1; a zero period as a millisecond.
    pub fn rate(mut self, task: impl Into<String>, count: u32, period: Duration) -> Self {
        let burst = NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN);
        let period = period.max(Duration::from_millis(1));
        let each = (period / burst.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(each)
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        self.tasks.entry(task.into()).or_default().rate =
            Some((burst.get(), period, Arc::new(RateLimiter::direct(quota))));
        self
    }

    /// Stop attempts of tasks that set no timeout of their own
    /// ([`Task::timeout`](jetq::Task::timeout)) after `limit`: they fail with
    /// kind `timeout` and are retried per their policy, like a task's own.
    pub fn default_timeout(mut self, limit: Duration) -> Self {
        self.default_timeout = Some(limit);
        self
    }

    async fn run(&self, ctx: Context, next: Next) -> Outcome {
        let limits = self.tasks.get(ctx.task());
        let _running = match limits.and_then(|l| l.running.as_ref()) {
            Some((_, semaphore)) => {
                let acquire = Arc::clone(semaphore).acquire_owned();
                tokio::select! {
                    permit = acquire => permit.ok(),
                    _ = ctx.cancelled() => return Err(cancelled_while_waiting(&ctx, "a running slot")),
                }
            }
            None => None,
        };
        if let Some((_, _, limiter)) = limits.and_then(|l| l.rate.as_ref()) {
            tokio::select! {
                _ = limiter.until_ready() => {}
                _ = ctx.cancelled() => return Err(cancelled_while_waiting(&ctx, "its rate limit")),
            }
        }
        match (ctx.timeout(), self.default_timeout) {
            (None, Some(limit)) => match tokio::time::timeout(limit, next.run(ctx)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(TaskError::new(format!(
                    "the attempt ran longer than the default limit of {limit:?}"
                ))
                .with_kind(TIMEOUT)),
            },
            _ => next.run(ctx).await,
        }
    }
}

fn cancelled_while_waiting(ctx: &Context, what: &str) -> TaskError {
    TaskError::new(format!(
        "task `{}` was cancelled while it waited for {what}",
        ctx.task()
    ))
    .with_kind(CANCELLED)
}

impl Middleware for Limits {
    fn call<'a>(&'a self, ctx: Context, next: Next) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run(ctx, next))
    }
}
