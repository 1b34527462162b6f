//! The worker: pulls requests, runs their handlers, writes records, acks.

use std::any::{Any, TypeId};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::broker::{BoxFuture, Broker, ConsumeOptions, Consumer, Delivery};
use crate::context::{Context, ContextInner, RecordSink, Shared};
use crate::dead::DeadLetter;
use crate::error::{Error, ErrorKind, Result};
use crate::extract::{Requirements, ResourceCell};
use crate::handler::{call_catching, BlockingHandler, ErasedHandler, Handler};
use crate::names;
use crate::record::{ErrorInfo, Record, Status};
use crate::request::{Request, DEFAULT_QUEUE, MAX_DELAY, MAX_RETRIES_LIMIT};
use crate::retry::RetryPolicy;
use crate::task_error::{kinds, Retry, TaskError};

/// How long one pull waits for messages before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How long record writes are retried through a broker outage (a leader
/// election takes up to ~20 s) before the attempt is released.
const RECORD_WRITE_PATIENCE: Duration = Duration::from_secs(30);
/// Deliveries allowed beyond a request's attempts (`max_retries + 1`) before
/// the backstop ends it: room for releases after outages (each put back for
/// longer: a second per delivery so far, at most 30 s) and for early
/// deliveries put back until due.
pub const DELIVERY_SLACK: u64 = 10;
/// Deliveries a worker may have in each of its own stages (taken and having
/// their records read; having their outcomes written and settled), per task
/// slot. Tasks still run at most `concurrency` at once; the broker round
/// trips around them overlap, which is what a worker waits on with quick
/// tasks.
const PIPELINE_DEPTH: usize = 4;
/// How long an attempt runs before its record says `running`.
const DEFAULT_RUNNING_AFTER: Duration = Duration::from_millis(500);
/// How often a pulling worker reads its queue's ack wait back from the
/// broker (another worker may have changed it).
const ACK_WAIT_REFRESH: Duration = Duration::from_secs(5);

/// The most deliveries a message may have before the worker ends it,
/// whatever its state: `max_retries + 1 + DELIVERY_SLACK`.
pub fn delivery_budget(max_retries: u32) -> u64 {
    u64::from(max_retries) + 1 + DELIVERY_SLACK
}

/// How long to put a message back for when it could not be handled (the
/// record or dead letter could not be read or written): a second per
/// delivery so far, at most 30 s, so an outage is ridden out within the
/// delivery slack rather than burning it in seconds.
fn release_delay(delivered: u64) -> Duration {
    Duration::from_secs(delivered.clamp(1, 30))
}

/// A task registration: name, handler, queues and policy.
pub struct Task {
    name: String,
    queues: Vec<String>,
    handler: ErasedHandler,
    requirements: Requirements,
    retry: RetryPolicy,
    timeout: Option<Duration>,
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("name", &self.name)
            .field("queues", &self.queues)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Task {
    /// A task served by an async handler.
    pub fn new<H, P>(name: impl Into<String>, handler: H) -> Self
    where
        H: Handler<P>,
        P: 'static,
    {
        let mut requirements = Requirements::default();
        H::requirements(&mut requirements);
        let erased: ErasedHandler = Arc::new(move |ctx| handler.call(ctx));
        Self::from_parts(name.into(), erased, requirements)
    }

    /// A task served by a blocking handler, run off the async threads.
    pub fn blocking<H, P>(name: impl Into<String>, handler: H) -> Self
    where
        H: BlockingHandler<P>,
        P: 'static,
    {
        let mut requirements = Requirements::default();
        H::requirements(&mut requirements);
        let erased: ErasedHandler = Arc::new(move |ctx| BlockingHandler::call(&handler, ctx));
        Self::from_parts(name.into(), erased, requirements)
    }

    fn from_parts(name: String, handler: ErasedHandler, requirements: Requirements) -> Self {
        Task {
            name,
            queues: Vec::new(),
            handler,
            requirements,
            retry: RetryPolicy::default(),
            timeout: None,
        }
    }

    /// Serve the task on `queue` (may be called several times; default: the
    /// worker's default queue).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.push(queue.into());
        self
    }

    /// Retries allowed when the request does not say.
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.retry.max_retries = max_retries;
        self
    }

    /// The whole retry policy.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Fail an attempt (kind `timeout`, retryable) that runs longer than this.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

struct TaskEntry {
    handler: ErasedHandler,
    retry: RetryPolicy,
    timeout: Option<Duration>,
}

/// Builds a [`Worker`].
pub struct WorkerBuilder {
    broker: Arc<dyn Broker>,
    name: Option<String>,
    default_queue: String,
    tasks: Vec<Task>,
    shared: Shared,
    concurrency: usize,
    ack_wait: Duration,
    shutdown_timeout: Duration,
    running_after: Duration,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("name", &self.name)
            .field("default_queue", &self.default_queue)
            .field("tasks", &self.tasks)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl WorkerBuilder {
    /// Name the worker (default: `<host>-<pid>`); it appears in records.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The queue of tasks registered without one (default `default`).
    pub fn default_queue(mut self, queue: impl Into<String>) -> Self {
        self.default_queue = queue.into();
        self
    }

    /// Register an async task on the default queue.
    pub fn task<H, P>(self, name: impl Into<String>, handler: H) -> Self
    where
        H: Handler<P>,
        P: 'static,
    {
        self.register(Task::new(name, handler))
    }

    /// Register a blocking task on the default queue.
    pub fn blocking_task<H, P>(self, name: impl Into<String>, handler: H) -> Self
    where
        H: BlockingHandler<P>,
        P: 'static,
    {
        self.register(Task::blocking(name, handler))
    }

    /// Register a task with its options.
    pub fn register(mut self, task: Task) -> Self {
        self.tasks.push(task);
        self
    }

    /// Give the worker shared state, extracted with `State<T>`.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, state: T) -> Self {
        self.shared
            .states
            .insert(TypeId::of::<T>(), Box::new(state));
        self
    }

    /// Give the worker a resource, built by `init` on first use and shared by
    /// every task it runs; extracted with `Resource<T>`.
    pub fn resource<T, F, Fut, E>(mut self, init: F) -> Self
    where
        T: Send + Sync + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        E: Into<TaskError> + 'static,
    {
        let init = Box::new(
            move || -> BoxFuture<'static, std::result::Result<T, TaskError>> {
                let fut = init();
                Box::pin(async move { fut.await.map_err(Into::into) })
            },
        );
        let cell: Arc<dyn Any + Send + Sync> = Arc::new(ResourceCell::new(init));
        self.shared.resources.insert(TypeId::of::<T>(), cell);
        self
    }

    /// How many tasks run at once (default 16). Around them the worker
    /// overlaps its own broker round trips: while tasks are quick (under
    /// 20 ms on average) it takes up to four times as many deliveries and
    /// reads their records ahead, and it writes up to four times as many
    /// outcomes at once; a task still starts only when one of these slots
    /// is free.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// How long a delivery may go unacknowledged before the broker gives it
    /// to another worker (default 30 s). Running tasks send keep-alives every
    /// third of it, so it bounds crash recovery, not task length.
    ///
    /// On NATS all workers of a queue share one consumer: this setting
    /// applies when the first worker creates it. A worker started later with
    /// another value says so at start and follows the queue's value (its
    /// keep-alives track the consumer's ack wait, read back every few
    /// seconds); change it on the consumer itself (`nats consumer edit`).
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait.max(Duration::from_millis(300));
        self
    }

    /// How long an attempt runs before its record says `running` (default
    /// 500 ms). A quicker attempt writes its record once, with its outcome:
    /// one write per attempt instead of two. Progress or metadata reported
    /// by the task, and a failure, write it at once.
    pub fn running_after(mut self, after: Duration) -> Self {
        self.running_after = after;
        self
    }

    /// How long running tasks may finish after shutdown begins (default 30 s);
    /// then they are stopped and released for immediate redelivery.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Check the registrations and build the worker: names must be valid,
    /// no task registered twice on a queue, every state and resource a
    /// handler asks for given.
    pub fn build(self) -> Result<Worker> {
        names::validate_queue(&self.default_queue)?;
        if self.tasks.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "the worker has no tasks; register one with `.task(name, handler)`",
            ));
        }
        let mut registry: HashMap<String, HashMap<String, Arc<TaskEntry>>> = HashMap::new();
        for task in self.tasks {
            names::validate_task(&task.name)?;
            for (id, ty) in &task.requirements.states {
                if !self.shared.states.contains_key(id) {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "task `{}` needs state {ty}; give it with `.state(...)`",
                            task.name
                        ),
                    ));
                }
            }
            for (id, ty) in &task.requirements.resources {
                if !self.shared.resources.contains_key(id) {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "task `{}` needs resource {ty}; give it with `.resource(...)`",
                            task.name
                        ),
                    ));
                }
            }
            let queues = if task.queues.is_empty() {
                vec![self.default_queue.clone()]
            } else {
                task.queues.clone()
            };
            let entry = Arc::new(TaskEntry {
                handler: task.handler,
                retry: task.retry,
                timeout: task.timeout,
            });
            for queue in queues {
                names::validate_queue(&queue)?;
                let tasks = registry.entry(queue.clone()).or_default();
                if tasks
                    .insert(task.name.clone(), Arc::clone(&entry))
                    .is_some()
                {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "task `{}` is registered twice on queue `{queue}`",
                            task.name
                        ),
                    ));
                }
            }
        }
        let name = self.name.unwrap_or_else(default_worker_name);
        Ok(Worker {
            env: Arc::new(Env {
                broker: self.broker,
                name,
                registry,
                shared: Arc::new(self.shared),
                ack_wait: self.ack_wait,
                running_after: self.running_after,
                concluding: Arc::new(Semaphore::new(self.concurrency * PIPELINE_DEPTH)),
                slots: Arc::new(Semaphore::new(self.concurrency)),
                task_micros: AtomicU64::new(u64::MAX),
                running: StdMutex::new(HashMap::new()),
                next_registration: AtomicU64::new(0),
                cancelled: StdMutex::new(RecentIds::default()),
            }),
            concurrency: self.concurrency,
            shutdown_timeout: self.shutdown_timeout,
        })
    }

    /// Build and run in the background; see [`Worker::spawn`].
    pub fn spawn(self) -> Result<RunningWorker> {
        Ok(self.build()?.spawn())
    }

    /// Build and run until SIGINT or SIGTERM; see [`Worker::run`].
    pub async fn run(self) -> Result<()> {
        self.build()?.run().await
    }

    /// Build and run until `signal` completes; see [`Worker::run_until`].
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> Result<()> {
        self.build()?.run_until(signal).await
    }
}

fn default_worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

struct Env {
    broker: Arc<dyn Broker>,
    name: String,
    registry: HashMap<String, HashMap<String, Arc<TaskEntry>>>,
    shared: Arc<Shared>,
    ack_wait: Duration,
    running_after: Duration,
    /// Attempts whose task has returned and whose outcome is being written
    /// and settled, at most [`PIPELINE_DEPTH`] per task slot.
    concluding: Arc<Semaphore>,
    /// Places for running tasks (the worker's concurrency). Deliveries are
    /// pulled against an allowance of their own, so that the next ones'
    /// records are read while these run.
    slots: Arc<Semaphore>,
    /// A moving average of how long tasks run, in microseconds.
    task_micros: AtomicU64,
    /// Running attempts by request id: the task's token and the flag that a
    /// client cancelled it.
    running: StdMutex<HashMap<String, Vec<RunningAttempt>>>,
    next_registration: AtomicU64,
    /// Ids whose cancel signal this worker saw lately: an `ignore_result`
    /// request among them reads its record before it runs.
    cancelled: StdMutex<RecentIds>,
}

/// The last [`RecentIds::CAPACITY`] ids seen, oldest forgotten first.
#[derive(Default)]
struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    const CAPACITY: usize = 10_000;

    fn insert(&mut self, id: &str) {
        if self.set.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            if self.order.len() > Self::CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
}

/// Tasks shorter than this on average let a worker read ahead.
const READ_AHEAD_BELOW: Duration = Duration::from_millis(20);

impl Env {
    /// Whether tasks have been quick enough to read the next deliveries'
    /// records while every slot is busy.
    fn read_ahead_ok(&self) -> bool {
        self.task_micros.load(Ordering::Relaxed) < duration_micros(READ_AHEAD_BELOW)
    }

    /// Count a task that ran for `took` into the average.
    fn task_took(&self, took: Duration) {
        let micros = duration_micros(took);
        let old = self.task_micros.load(Ordering::Relaxed);
        let new = if old == u64::MAX {
            micros
        } else {
            old - old / 8 + micros / 8
        };
        self.task_micros.store(new, Ordering::Relaxed);
    }

    /// Make a running attempt reachable by cancellation signals until the
    /// returned guard is dropped.
    fn register(
        self: &Arc<Self>,
        id: &str,
        cancel: &CancellationToken,
        by_client: &CancellationToken,
    ) -> Registration {
        let key = self.next_registration.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut running) = self.running.lock() {
            running.entry(id.to_owned()).or_default().push((
                key,
                cancel.clone(),
                by_client.clone(),
            ));
        }
        Registration {
            env: Arc::clone(self),
            id: id.to_owned(),
            key,
        }
    }

    /// A client cancelled request `id`: fire the tokens of its attempts
    /// here, and remember it for a delivery still to come.
    fn cancel_running(&self, id: &str) {
        if let Ok(mut cancelled) = self.cancelled.lock() {
            cancelled.insert(id);
        }
        if let Ok(running) = self.running.lock() {
            for (_, cancel, by_client) in running.get(id).into_iter().flatten() {
                info!(id, "cancelled by a client");
                by_client.cancel();
                cancel.cancel();
            }
        }
    }

    /// Whether this worker saw a cancel signal for `id` lately.
    fn cancelled_lately(&self, id: &str) -> bool {
        self.cancelled
            .lock()
            .map(|c| c.contains(id))
            .unwrap_or(true)
    }
}

/// A running attempt, reachable by cancellation signals: its registration
/// key, its task's token, and the flag that a client cancelled it.
type RunningAttempt = (u64, CancellationToken, CancellationToken);

/// Keeps a running attempt in [`Env::running`] while alive.
struct Registration {
    env: Arc<Env>,
    id: String,
    key: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut running) = self.env.running.lock() {
            if let Some(list) = running.get_mut(&self.id) {
                list.retain(|(key, _, _)| *key != self.key);
                if list.is_empty() {
                    running.remove(&self.id);
                }
            }
        }
    }
}

/// A worker: serves registered tasks on their queues until shut down.
pub struct Worker {
    env: Arc<Env>,
    concurrency: usize,
    shutdown_timeout: Duration,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.env.name)
            .field("queues", &self.queues())
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl Worker {
    /// Start building a worker on `broker`.
    pub fn builder(broker: impl Broker) -> WorkerBuilder {
        Self::builder_arc(Arc::new(broker))
    }

    /// Start building a worker on a shared broker.
    pub fn builder_arc(broker: Arc<dyn Broker>) -> WorkerBuilder {
        WorkerBuilder {
            broker,
            name: None,
            default_queue: DEFAULT_QUEUE.to_owned(),
            tasks: Vec::new(),
            shared: Shared::default(),
            concurrency: 16,
            ack_wait: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            running_after: DEFAULT_RUNNING_AFTER,
        }
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.env.name
    }

    /// The queues it serves.
    pub fn queues(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.env.registry.keys().collect();
        set.into_iter().cloned().collect()
    }

    /// Run in the background on the current tokio runtime until
    /// [`RunningWorker::shutdown`]; for embedding a worker in a program or a test.
    pub fn spawn(self) -> RunningWorker {
        let stop = CancellationToken::new();
        let join = tokio::spawn(self.run_until(stop.clone().cancelled_owned()));
        RunningWorker { stop, join }
    }

    /// Run until SIGINT or SIGTERM, then shut down gracefully.
    pub async fn run(self) -> Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Run until `signal` completes, then shut down gracefully: stop pulling,
    /// fire the tasks' cancellation tokens, let running tasks finish within
    /// the shutdown timeout, and release the rest for immediate redelivery.
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> Result<()> {
        let stop = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        // Deliveries taken and having their records read: reading ahead is
        // bounded by this (and only happens while tasks are quick).
        let permits = Arc::new(Semaphore::new(self.concurrency * PIPELINE_DEPTH));
        let tracker = TaskTracker::new();
        let mut loops = Vec::new();
        for queue in self.queues() {
            // Consume first: the consumer is created with this worker's
            // settings if it does not exist yet (an existing one keeps its own).
            let options = ConsumeOptions::new(self.env.name.clone()).ack_wait(self.env.ack_wait);
            let mut consumer = self.env.broker.consume(&queue, options).await?;
            self.env.broker.ensure_queue(&queue).await?;
            let ack_wait =
                Arc::new(SharedAckWait::read(&queue, &mut *consumer, self.env.ack_wait).await);
            loops.push(tokio::spawn(pull_loop(
                queue,
                consumer,
                ack_wait,
                Arc::clone(&self.env),
                Arc::clone(&permits),
                tracker.clone(),
                stop.clone(),
                hard_stop.clone(),
            )));
        }
        let listener = tokio::spawn(cancel_listener(Arc::clone(&self.env), stop.clone()));
        info!(worker = %self.env.name, queues = ?self.queues(), concurrency = self.concurrency, "worker started");
        signal.await;
        info!(worker = %self.env.name, "shutting down: no new tasks; waiting for running ones");
        stop.cancel();
        for l in loops {
            let _ = l.await;
        }
        tracker.close();
        if tokio::time::timeout(self.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(worker = %self.env.name, "shutdown timeout passed; releasing unfinished tasks for redelivery");
            hard_stop.cancel();
            tracker.wait().await;
        }
        listener.abort();
        if let Err(e) = self.env.broker.flush().await {
            warn!(worker = %self.env.name, error = %e, "cannot flush the last acknowledgements; their requests may be delivered again (and dropped)");
        }
        info!(worker = %self.env.name, "worker stopped");
        Ok(())
    }
}

/// A worker running in the background, from [`Worker::spawn`].
#[derive(Debug)]
pub struct RunningWorker {
    stop: CancellationToken,
    join: tokio::task::JoinHandle<Result<()>>,
}

impl RunningWorker {
    /// Shut the worker down gracefully and wait for it; returns its result.
    pub async fn shutdown(self) -> Result<()> {
        self.stop.cancel();
        self.join.await.map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("the worker task panicked or was aborted: {e}"),
            )
        })?
    }

    /// Whether the worker has stopped (by itself, e.g. on a start-up error).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Fire the tokens of running attempts that clients cancel. Signals are best
/// effort; a running attempt also finds the cancellation in its record.
async fn cancel_listener(env: Arc<Env>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let signals = tokio::select! {
            _ = stop.cancelled() => return,
            s = env.broker.cancel_signals() => s,
        };
        match signals {
            Ok(mut signals) => {
                backoff = Duration::from_millis(100);
                loop {
                    let id = tokio::select! {
                        _ = stop.cancelled() => return,
                        id = signals.next() => id,
                    };
                    match id {
                        Some(id) => env.cancel_running(&id),
                        None => break,
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot listen for cancellations; retrying in {backoff:?}"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {},
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A queue's ack wait as the broker applies it, in milliseconds, shared by
/// the queue's pull loop (which reads it back now and then) and its running
/// attempts (whose keep-alives follow it).
struct SharedAckWait(AtomicU64);

impl SharedAckWait {
    /// The queue's ack wait as the broker has it, else `own` (this worker's
    /// setting). A broker applying another one says so when consuming.
    async fn read(queue: &str, consumer: &mut dyn Consumer, own: Duration) -> Self {
        let actual = match consumer.ack_wait().await {
            Ok(actual) => actual,
            Err(e) => {
                debug!(queue, error = %e, "cannot read the queue's ack wait back");
                None
            }
        };
        SharedAckWait(AtomicU64::new(duration_ms(actual.unwrap_or(own))))
    }

    fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed).max(1))
    }

    /// Read the queue's ack wait back from the broker; say so when it changed.
    async fn refresh(&self, queue: &str, consumer: &mut dyn Consumer) {
        match consumer.ack_wait().await {
            Ok(Some(actual)) => {
                let before = self.0.swap(duration_ms(actual), Ordering::Relaxed);
                if before != duration_ms(actual) {
                    warn!(
                        queue,
                        "the queue's ack wait changed from {:?} to {actual:?} (on the broker); keep-alives follow it",
                        Duration::from_millis(before)
                    );
                }
            }
            Ok(None) => {}
            Err(e) => debug!(queue, error = %e, "cannot read the queue's ack wait back"),
        }
    }
}

fn duration_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[allow(clippy::too_many_arguments)]
async fn pull_loop(
    queue: String,
    mut consumer: Box<dyn Consumer>,
    ack_wait: Arc<SharedAckWait>,
    env: Arc<Env>,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: CancellationToken,
    hard_stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut refreshed = tokio::time::Instant::now();
    loop {
        if refreshed.elapsed() >= ACK_WAIT_REFRESH {
            ack_wait.refresh(&queue, &mut *consumer).await;
            refreshed = tokio::time::Instant::now();
        }
        // Wait for at least one free slot, then take all free slots.
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let mut held = first;
        let extra = permits.available_permits();
        if extra > 0 {
            if let Ok(more) = Arc::clone(&permits).try_acquire_many_owned(extra as u32) {
                held.merge(more);
            }
        }
        // Reading ahead (taking deliveries and reading their records while
        // every task slot is busy) only while tasks are quick: a delivery
        // must not wait here for a slot that a long task holds while
        // another worker could run it.
        // Not reading ahead: take only as many as there are task slots, and
        // reserve those slots now (a delivery taken but not yet in its slot
        // must not count as a free one).
        let mut reserved: Option<tokio::sync::OwnedSemaphorePermit> = None;
        if !env.read_ahead_ok() {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                p = Arc::clone(&env.slots).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let mut slots = first;
            let more = env
                .slots
                .available_permits()
                .min(held.num_permits().saturating_sub(1));
            if more > 0 {
                if let Ok(m) = Arc::clone(&env.slots).try_acquire_many_owned(more as u32) {
                    slots.merge(m);
                }
            }
            if held.num_permits() > slots.num_permits() {
                drop(held.split(held.num_permits() - slots.num_permits()));
            }
            reserved = Some(slots);
        }
        let want = held.num_permits();
        let pulled = tokio::select! {
            _ = stop.cancelled() => return,
            s = consumer.pull(want, PULL_EXPIRES) => s,
        };
        let mut stream = match pulled {
            Ok(s) => {
                backoff = Duration::from_millis(100);
                s
            }
            Err(e) => {
                warn!(queue = %queue, error = %e, "pull failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {},
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                None => break,
                Some(Ok(delivery)) => {
                    let Some(permit) = held.split(1) else {
                        // The broker sent more than asked for: release it at once.
                        let _ = delivery.nak(None).await;
                        continue;
                    };
                    let slot = reserved.as_mut().and_then(|s| s.split(1));
                    let env = Arc::clone(&env);
                    let queue = queue.clone();
                    let stop = stop.clone();
                    let hard_stop = hard_stop.clone();
                    let ack_wait = Arc::clone(&ack_wait);
                    tracker.spawn(process(
                        env,
                        queue,
                        delivery,
                        Taken {
                            reading: permit,
                            slot,
                        },
                        ack_wait,
                        stop,
                        hard_stop,
                    ));
                }
                Some(Err(e)) => {
                    debug!(queue = %queue, error = %e, "pull ended with an error");
                    break;
                }
            }
        }
    }
}

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
struct RecordWriter {
    broker: Arc<dyn Broker>,
    id: String,
    state: Mutex<WriterState>,
    /// Where the request asked its ended record to be sent.
    notify: Option<String>,
}

struct WriterState {
    /// The record as this attempt means it: the claim applied.
    record: Record,
    /// Revision of the stored record this attempt last read or wrote;
    /// `None` if there was none.
    revision: Option<u64>,
    /// Whether the claim has been written.
    claimed: bool,
    /// `seq` and `attempts` of the stored record while this attempt owns it.
    base: (Option<u64>, u32),
    /// The claim, to apply again over a record re-read before it was written.
    claim: ClaimStamp,
    /// The record as last written, encoded.
    written: Option<Bytes>,
    /// Whether a write was sent (it may have landed even if its answer was
    /// never seen).
    attempted: bool,
}

/// What a claim writes into the record.
#[derive(Clone)]
struct ClaimStamp {
    seq: u64,
    attempts: u32,
    max_retries: u32,
    started_at: OffsetDateTime,
    worker: String,
}

impl ClaimStamp {
    fn apply(&self, record: &mut Record) {
        record.seq = Some(self.seq);
        record.attempts = self.attempts;
        record.max_retries = self.max_retries;
        record.status = Status::Running;
        record.started_at = Some(self.started_at);
        record.next_attempt_at = None;
        record.worker = Some(self.worker.clone());
    }
}

impl RecordWriter {
    /// A writer for an attempt that claims `stored` (revision `revision`, or
    /// none stored): `claim` says what the attempt writes; `claimed` whether
    /// `record` (the claimed record) is already stored.
    fn new(
        broker: Arc<dyn Broker>,
        request: &Request,
        record: Record,
        revision: Option<u64>,
        claimed: bool,
        base: (Option<u64>, u32),
        claim: ClaimStamp,
    ) -> Self {
        RecordWriter {
            broker,
            id: request.id.clone(),
            notify: request.notify.clone(),
            state: Mutex::new(WriterState {
                record,
                revision,
                claimed,
                base,
                claim,
                written: None,
                attempted: false,
            }),
        }
    }

    /// The record as last written, encoded.
    async fn written(&self) -> Option<Bytes> {
        self.state.lock().await.written.clone()
    }

    /// Whether the attempt found no record and has sent no write: nothing
    /// of it is stored.
    async fn untouched(&self) -> bool {
        let state = self.state.lock().await;
        state.revision.is_none() && !state.attempted
    }

    /// The record as this attempt means it.
    async fn current(&self) -> Record {
        self.state.lock().await.record.clone()
    }

    /// Whether `stored` is still the record this attempt owns.
    fn still_owned(state: &WriterState, stored: &Record) -> bool {
        stored.seq == state.base.0
            && stored.attempts == state.base.1
            && !stored.status.is_terminal()
    }

    /// Whether `stored` is this attempt's own claim, written by a write
    /// whose future was dropped before it saw the answer (the `running`
    /// write races the task's end).
    fn own_claim(claimed: bool, claim: &ClaimStamp, stored: &Record) -> bool {
        !claimed
            && stored.seq == Some(claim.seq)
            && stored.attempts == claim.attempts
            && stored.worker.as_deref() == Some(claim.worker.as_str())
            && !stored.status.is_terminal()
    }

    /// Write the claim if it is not written yet.
    async fn ensure_claimed(&self) -> Result<()> {
        if self.state.lock().await.claimed {
            return Ok(());
        }
        self.apply(&|_| {}).await.map(|_| ())
    }

    /// Write `change` over the record; returns the status as written.
    async fn apply(&self, change: &(dyn Fn(&mut Record) + Send + Sync)) -> Result<Status> {
        let mut guard = self.state.lock().await;
        let deadline = tokio::time::Instant::now() + RECORD_WRITE_PATIENCE;
        let mut pause = Duration::from_millis(50);
        loop {
            let mut next = guard.record.clone();
            change(&mut next);
            let bytes = Bytes::from(next.to_json()?);
            guard.attempted = true;
            let written = match guard.revision {
                Some(revision) => {
                    self.broker
                        .update_record(&self.id, bytes.clone(), revision)
                        .await
                }
                None => self.broker.create_record(&self.id, bytes.clone()).await,
            };
            match written {
                Ok(revision) => {
                    let status = next.status;
                    guard.base = (next.seq, next.attempts);
                    guard.record = next;
                    guard.revision = Some(revision);
                    guard.claimed = true;
                    guard.written = Some(bytes);
                    return Ok(status);
                }
                Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {
                    let state = &mut *guard;
                    match self.broker.get_record(&self.id).await? {
                        None if !state.claimed && state.base == (None, 0) => {
                            state.revision = None;
                        }
                        None => {
                            return Err(Error::new(
                                ErrorKind::Conflict,
                                format!("record `{}` was deleted while its task ran", self.id),
                            ));
                        }
                        Some(entry) => {
                            let mut stored = Record::decode(&self.id, &entry.value)?;
                            if Self::own_claim(state.claimed, &state.claim, &stored) {
                                state.claimed = true;
                                state.base = (stored.seq, stored.attempts);
                            } else if !Self::still_owned(state, &stored) {
                                return Err(Error::new(
                                    ErrorKind::Conflict,
                                    format!(
                                        "record `{}` was taken over by another attempt, or finished",
                                        self.id
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
                Err(e)
                    if matches!(e.kind(), ErrorKind::Broker | ErrorKind::Timeout)
                        && tokio::time::Instant::now() < deadline =>
                {
                    warn!(id = %self.id, error = %e, "record write failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Read the record back: has a client asked to cancel, or has another
    /// attempt taken the request over?
    async fn check(&self, broker: &Arc<dyn Broker>) -> Result<Watch> {
        let (base, claimed, claim) = {
            let guard = self.state.lock().await;
            (guard.base, guard.claimed, guard.claim.clone())
        };
        let Some(entry) = broker.get_record(&self.id).await? else {
            return Ok(if claimed || base != (None, 0) {
                Watch::Lost
            } else {
                Watch::Fine
            });
        };
        let current = Record::decode(&self.id, &entry.value)?;
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
enum Watch {
    Fine,
    CancelRequested,
    Lost,
}

impl RecordSink for RecordWriter {
    fn update(&self, change: Box<dyn Fn(&mut Record) + Send + Sync>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.apply(&*change).await.map(|_| ()) })
    }
}

/// What became of one delivery.
enum Claim {
    /// This attempt owns the record.
    Run(RecordWriter, u32),
    /// A duplicate, finished or cancelled request: acknowledge and drop.
    Skip(&'static str),
    /// The request has used up its attempts (its workers died each time).
    GiveUp(RecordWriter, u32),
    /// This attempt owns the record but the request cannot run (its record
    /// was corrupt or too large, ...): fail it with this error.
    Fail(RecordWriter, TaskError),
    /// The id is another request's (another task or queue): refuse the
    /// message without touching the record.
    NotOwner(String),
    /// This message's request already failed, but the worker that failed it
    /// stopped before dead-lettering and terminating it: finish that.
    Bury(Record),
    /// The worker running this message dead-lettered it and stopped before
    /// it could fail the record; the record is failed now: terminate.
    Terminate,
}

/// A request held back until this long before its due time is put back.
const EARLY_TOLERANCE: Duration = Duration::from_millis(500);

/// A delivery's places in the worker: among those taken (`reading`), and its
/// task slot if it was reserved when it was pulled (not reading ahead).
struct Taken {
    reading: tokio::sync::OwnedSemaphorePermit,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// One delivery's life: check it, claim its record, run the task, write the
/// outcome and settle the message. It moves through three allowances, each
/// as large as the worker's concurrency: `reading` (pulled, its record
/// read), a task slot ([`Env::slots`], while the task runs) and
/// [`Env::concluding`] (its outcome written and the message settled), so
/// that one delivery's record is read and another's outcome written while a
/// third runs.
async fn process(
    env: Arc<Env>,
    queue: String,
    delivery: Box<dyn Delivery>,
    taken: Taken,
    ack_wait: Arc<SharedAckWait>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
) {
    let info = delivery.info();
    let request = match Request::from_json(delivery.payload()) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("invalid request envelope: {e}");
            return poison(&env, &queue, &*delivery, kinds::INVALID_REQUEST, reason).await;
        }
    };
    // A message must not speak for another request, task or queue: refuse
    // it without touching any record.
    if let Err(reason) = check_routing(&request, &queue, &*delivery) {
        return poison(&env, &queue, &*delivery, kinds::INVALID_REQUEST, reason).await;
    }
    let span = info_span!("jetq.task", task = %request.task, id = %request.id, queue = %queue, seq = info.sequence);
    async move {
        let entry = env
            .registry
            .get(&queue)
            .and_then(|tasks| tasks.get(&request.task))
            .cloned();
        let max_retries = request
            .max_retries
            .or(entry.as_ref().map(|e| e.retry.max_retries))
            .unwrap_or(crate::request::DEFAULT_MAX_RETRIES)
            .min(MAX_RETRIES_LIMIT);
        // The backstop: whatever keeps this message coming back, it ends here.
        let budget = delivery_budget(max_retries);
        if info.delivered > budget {
            return abandon(&env, &queue, &*delivery, &request, budget).await;
        }
        let now = OffsetDateTime::now_utc();
        // A due time no broker can hold: fail it (below, once claimed).
        let refuse = request.check_due(now).err().map(|e| {
            TaskError::permanent(format!("not_before: {}", e.message()))
                .with_kind(kinds::INVALID_REQUEST)
        });
        if let (Some(due), None) = (request.not_before, &refuse) {
            if let Ok(early) = Duration::try_from(due - now) {
                // Delivered before it is due (a producer that bypassed the
                // schedule, or clocks apart): put it back until then, no
                // attempt counted; unless it was cancelled meanwhile.
                if early > EARLY_TOLERANCE {
                    if ended_before_due(&env, &request.id).await {
                        debug!("cancelled or finished before it was due; dropping it");
                        if let Err(e) = delivery.ack().await {
                            warn!(error = %e, "cannot acknowledge a dropped delivery");
                        }
                    } else {
                        debug!("not due for {early:?}; putting it back");
                        if let Err(e) = delivery.nak(Some(early)).await {
                            warn!(error = %e, "cannot put back a request that is not due");
                        }
                    }
                    return;
                }
            }
        }
        let claimed = if runs_unread(&env, &request, &*delivery) {
            Ok(unread_claim(&env, &request, &*delivery, max_retries))
        } else {
            claim(&env, &request, &*delivery, max_retries).await
        };
        let claim = match claimed {
            Ok(c) => c,
            Err(e) => {
                let delay = release_delay(info.delivered);
                warn!(error = %e, "cannot claim the record; releasing the request for {delay:?}");
                let _ = delivery.nak(Some(delay)).await;
                return;
            }
        };
        let (writer, attempt) = match claim {
            Claim::Skip(why) => {
                debug!("dropping delivery: {why}");
                if let Err(e) = delivery.ack().await {
                    warn!(error = %e, "cannot acknowledge a dropped delivery");
                }
                return;
            }
            Claim::NotOwner(reason) => {
                return poison(&env, &queue, &*delivery, kinds::ID_CONFLICT, reason).await;
            }
            Claim::Bury(record) => {
                bury(&env, &*delivery, &record).await;
                return;
            }
            Claim::Terminate => {
                if let Err(e) = delivery.term("jetq: failed (dead-lettered)").await {
                    warn!(error = %e, "cannot terminate a dead-lettered request");
                }
                return;
            }
            Claim::Fail(writer, err) => {
                finish_failed(&env, &writer, &*delivery, &err).await;
                return;
            }
            Claim::GiveUp(writer, attempt) => {
                let last = writer.current().await.error;
                let last = match last {
                    Some(e) => format!("; the last error reported: {}: {}", e.kind, e.message),
                    None => String::new(),
                };
                let err = TaskError::permanent(format!(
                    "gave up after {} attempts: the last one did not report back within the ack wait (its worker stopped, died or lost its connection to NATS){last}",
                    attempt.saturating_sub(1)
                ))
                .with_kind(kinds::ABANDONED);
                finish_failed(&env, &writer, &*delivery, &err).await;
                return;
            }
            Claim::Run(writer, attempt) => (writer, attempt),
        };
        if let Some(err) = refuse {
            finish_failed(&env, &writer, &*delivery, &err).await;
            return;
        }
        let Some(entry) = entry else {
            let registered: Vec<&String> = env
                .registry
                .get(&queue)
                .map(|t| t.keys().collect::<BTreeSet<_>>().into_iter().collect())
                .unwrap_or_default();
            let err = TaskError::permanent(format!(
                "task `{}` is not registered on queue `{queue}` (registered: {})",
                request.task,
                registered
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .with_kind(kinds::UNKNOWN_TASK);
            finish_failed(&env, &writer, &*delivery, &err).await;
            return;
        };

        let writer = Arc::new(writer);
        // `cancel` is the task's token: it fires on shutdown (a child of
        // `stop`), on a client's cancellation and when the attempt lost its
        // record; `by_client` tells the first two apart.
        let cancel = stop.child_token();
        let by_client = CancellationToken::new();
        let _registration = env.register(&request.id, &cancel, &by_client);
        let id = request.id.clone();
        // A place to run: at once, unless the worker read ahead while every
        // slot was busy; the delivery is kept alive meanwhile.
        let Taken { reading, slot } = taken;
        let slot = match slot.or_else(|| Arc::clone(&env.slots).try_acquire_owned().ok()) {
            Some(slot) => slot,
            None => {
                let wait = Arc::clone(&env.slots).acquire_owned();
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        s = &mut wait => match s {
                            Ok(slot) => break slot,
                            Err(_) => return,
                        },
                        _ = tokio::time::sleep(ack_wait.get() / 3) => {
                            if let Err(e) = delivery.in_progress().await {
                                debug!(error = %e, "keep-alive failed");
                            }
                        }
                    }
                }
            }
        };
        drop(reading);
        if by_client.is_cancelled() {
            // Cancelled while it waited for a slot: it does not start.
            let now = OffsetDateTime::now_utc();
            let change = |r: &mut Record| r.mark_cancelled(now);
            conclude(&env, &writer, &*delivery, &change, Settle::Ack).await;
            return;
        }
        let ignore_result = request.ignore_result;
        let ctx = Context {
            inner: Arc::new(ContextInner {
                request,
                attempt,
                max_retries,
                worker: env.name.clone(),
                cancel: cancel.clone(),
                shared: Arc::clone(&env.shared),
                sink: Arc::clone(&writer) as Arc<dyn RecordSink>,
            }),
        };
        debug!(attempt, "running");
        let run = async {
            match entry.timeout {
                Some(limit) => {
                    match tokio::time::timeout(limit, call_catching(&entry.handler, ctx)).await {
                        Ok(r) => r,
                        Err(_) => Err(TaskError::new(format!(
                            "the attempt ran longer than its {limit:?} limit"
                        ))
                        .with_kind(kinds::TIMEOUT)),
                    }
                }
                None => call_catching(&entry.handler, ctx).await,
            }
        };
        // Keep the delivery alive, and look at the record now and then: a
        // cancellation whose signal this worker missed, or another attempt
        // that took the request over, stops this one.
        let keepalive = async {
            loop {
                // A third of the queue's ack wait as the broker applies it now
                // (another worker of the queue may have changed it).
                tokio::time::sleep(ack_wait.get() / 3).await;
                if let Err(e) = delivery.in_progress().await {
                    debug!(error = %e, "keep-alive failed");
                }
                if cancel.is_cancelled() {
                    continue;
                }
                match writer.check(&env.broker).await {
                    Ok(Watch::Fine) => {}
                    Ok(Watch::CancelRequested) => {
                        info!("cancelled by a client (seen in the record)");
                        by_client.cancel();
                        cancel.cancel();
                    }
                    Ok(Watch::Lost) => {
                        warn!("another attempt took this request over; stopping this one");
                        cancel.cancel();
                    }
                    Err(e) => debug!(id = %id, error = %e, "cannot re-read the record"),
                }
            }
        };
        // A slow attempt says `running` (its claim, written on its own).
        let mark_running = async {
            tokio::time::sleep(env.running_after).await;
            match writer.ensure_claimed().await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Conflict => {
                    warn!(error = %e, "another attempt took this request over, or it was cancelled; stopping this one");
                    if let Ok(Watch::CancelRequested) = writer.check(&env.broker).await {
                        by_client.cancel();
                    }
                    cancel.cancel();
                }
                Err(e) => debug!(id = %id, error = %e, "cannot write the running record yet"),
            }
            std::future::pending::<()>().await
        };
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            r = run => Some(r),
            _ = keepalive => None,
            _ = mark_running => None,
            _ = hard_stop.cancelled() => None,
        };
        env.task_took(started.elapsed());
        // The task is done with its slot; the outcome's writes hold a place
        // of their own.
        let _concluding = Arc::clone(&env.concluding).acquire_owned().await;
        drop(slot);
        if by_client.is_cancelled() {
            info!(attempt, "attempt ended after a cancellation");
            let now = OffsetDateTime::now_utc();
            let change = |r: &mut Record| r.mark_cancelled(now);
            conclude(&env, &writer, &*delivery, &change, Settle::Ack).await;
            return;
        }
        match outcome {
            // Nobody reads its result and nothing of this attempt is stored:
            // the acknowledgement is all there is to write.
            Some(Ok(_)) if ignore_result && writer.untouched().await => {
                if let Err(e) = delivery.ack_unconfirmed().await {
                    warn!(error = %e, "acknowledgement failed; the request may run again");
                }
            }
            Some(Ok(value)) => {
                let now = OffsetDateTime::now_utc();
                let change = |r: &mut Record| {
                    r.status = Status::Succeeded;
                    r.value = Some(value.clone());
                    r.error = None;
                    r.finished_at = Some(now);
                    r.next_attempt_at = None;
                };
                conclude(&env, &writer, &*delivery, &change, Settle::Ack).await;
            }
            // Shutting down: a task that stopped early (or could not finish in
            // time) goes back for immediate redelivery instead of counting as a
            // failure. A permanent error still fails it: another worker could not do better.
            Some(Err(ref e)) if cancel.is_cancelled() && e.is_retryable() => {
                release(&env, &writer, &*delivery).await
            }
            None => release(&env, &writer, &*delivery).await,
            Some(Err(err)) => {
                let retry_no = attempt; // retries done after this attempt
                if err.is_retryable() && retry_no <= max_retries {
                    let delay = match err.retry() {
                        Retry::After(d) => d,
                        _ => entry.retry.delay(retry_no),
                    }
                    .min(MAX_DELAY);
                    let now = OffsetDateTime::now_utc();
                    let due = time::Duration::try_from(delay)
                        .ok()
                        .and_then(|d| now.checked_add(d))
                        .unwrap_or(now);
                    let info = err.info();
                    info!(attempt, error = %err, "attempt failed; retrying in {delay:?}");
                    let change = |r: &mut Record| {
                        r.status = Status::Retrying;
                        r.error = Some(info.clone());
                        r.next_attempt_at = Some(due);
                    };
                    conclude(&env, &writer, &*delivery, &change, Settle::Nak(delay)).await;
                } else {
                    finish_failed(&env, &writer, &*delivery, &err).await;
                }
            }
        }
    }
    .instrument(span)
    .await
}

#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Nak(Duration),
    Term,
}

/// Write the attempt's outcome, then settle the message: `how` once the
/// record is written (a `failed` record is dead-lettered before the message
/// is terminated); a cancellation found in the record wins over `change`.
/// If the record cannot be written, the message is released so the request
/// runs again later; if another attempt took it over, the message is left to it.
async fn conclude(
    env: &Env,
    writer: &RecordWriter,
    delivery: &dyn Delivery,
    change: &(dyn Fn(&mut Record) + Send + Sync),
    how: Settle,
) {
    let now = OffsetDateTime::now_utc();
    let guarded = |r: &mut Record| {
        if r.cancel_requested_at.is_some() {
            r.mark_cancelled(now)
        } else {
            change(r)
        }
    };
    let mut how = how;
    let written = match writer.apply(&guarded).await {
        Err(e) if e.kind() == ErrorKind::PayloadTooLarge => {
            // The value (or metadata) cannot be stored: fail with a record
            // that fits rather than retrying something that never will.
            let message = format!("the task's outcome does not fit in a record: {e}");
            warn!("{message}");
            let error = ErrorInfo::new(kinds::TOO_LARGE, message);
            let current = writer.current().await;
            let letter = dead_letter_of(env, delivery, &current, error.clone());
            if !store_dead_letter(env, delivery, letter).await {
                return;
            }
            how = Settle::Term;
            let shrink = |r: &mut Record| {
                r.status = Status::Failed;
                r.value = None;
                r.progress = None;
                r.error = Some(error.clone());
                r.finished_at = Some(now);
                r.next_attempt_at = None;
            };
            match writer.apply(&shrink).await {
                // Still too large: the metadata too (a claim written with the
                // outcome carries it for the first time).
                Err(e) if e.kind() == ErrorKind::PayloadTooLarge => {
                    let error = ErrorInfo::new(
                        kinds::TOO_LARGE,
                        format!("{}; its metadata was dropped", error.message),
                    );
                    let smaller = |r: &mut Record| {
                        shrink(r);
                        r.error = Some(error.clone());
                        r.metadata = Map::new();
                        r.extra = Map::new();
                    };
                    writer.apply(&smaller).await
                }
                other => other,
            }
        }
        other => other,
    };
    if let (Ok(status), Some(address)) = (&written, &writer.notify) {
        if status.is_terminal() {
            if let Some(bytes) = writer.written().await {
                if let Err(e) = env.broker.notify(address, bytes).await {
                    debug!(error = %e, "cannot send the record to the producer's inbox");
                }
            }
        }
    }
    // `Term` means the dead letter is already stored (finish_failed, or the
    // too-large path above); only a failure is written with it.
    let result = match written {
        Ok(Status::Failed) => delivery.term("jetq: failed").await,
        Ok(status) => match how {
            // Cancelled while being failed: it is no dead letter after all.
            Settle::Term => {
                if let Err(e) = env.broker.remove_dead_letter(&writer.id).await {
                    warn!(error = %e, "cannot remove the dead letter of a cancelled request");
                }
                delivery.ack().await
            }
            Settle::Nak(d) if status == Status::Retrying => delivery.nak(Some(d)).await,
            // The record decides: a lost acknowledgement only brings a
            // redelivery that the record drops, so it is not waited for.
            Settle::Nak(_) | Settle::Ack => delivery.ack_unconfirmed().await,
        },
        Err(e) => return not_written(env, writer, delivery, e).await,
    };
    if let Err(e) = result {
        warn!(error = %e, "acknowledgement failed; the request may run again");
    }
}

/// The attempt's record could not be written: another attempt took it over
/// or it ended (cancelled, or a duplicate finished it): leave the message to
/// the record's owner, or drop it if the request has ended; else (an
/// outage) release the message for another attempt.
async fn not_written(env: &Env, writer: &RecordWriter, delivery: &dyn Delivery, e: Error) {
    let result = if e.kind() == ErrorKind::Conflict {
        if stored_record(env, &writer.id)
            .await
            .is_some_and(|r| r.status.is_terminal())
        {
            debug!(error = %e, "the request ended meanwhile; dropping this delivery");
            if let Err(e) = delivery.ack().await {
                warn!(error = %e, "cannot acknowledge a dropped delivery");
            }
            return;
        }
        warn!(error = %e, "leaving the message to the attempt that owns the record");
        Ok(())
    } else {
        let delay = release_delay(delivery.info().delivered);
        error!(error = %e, "cannot write the record; releasing the request for another attempt in {delay:?}");
        delivery.nak(Some(delay)).await
    };
    if let Err(e) = result {
        warn!(error = %e, "acknowledgement failed; the request may run again");
    }
}

async fn finish_failed(env: &Env, writer: &RecordWriter, delivery: &dyn Delivery, err: &TaskError) {
    warn!(error = %err, "request failed");
    // A claimed record first: a worker that dies after the dead letter
    // leaves a `running` record naming this message, which the next delivery
    // fails from the dead letter (see `claim`).
    if let Err(e) = writer.ensure_claimed().await {
        return not_written(env, writer, delivery, e).await;
    }
    // An attempt taken over meanwhile (its worker was presumed dead) must
    // not leave a dead letter for a request another attempt runs.
    if let Ok(Watch::Lost) = writer.check(&env.broker).await {
        let lost = Error::new(
            ErrorKind::Conflict,
            format!("record `{}` was taken over by another attempt", writer.id),
        );
        return not_written(env, writer, delivery, lost).await;
    }
    let now = OffsetDateTime::now_utc();
    let info = err.info();
    // The dead letter first: once a client sees the record `failed`, the
    // dead letter is there. A worker dying in between leaves a `running`
    // record that the next delivery fails from the dead letter (see `claim`).
    let current = writer.current().await;
    if current.cancel_requested_at.is_none() {
        let mut letter = dead_letter_of(env, delivery, &current, info.clone());
        letter.died_at = now;
        if !store_dead_letter(env, delivery, letter).await {
            return;
        }
    }
    let change = |r: &mut Record| {
        r.status = Status::Failed;
        r.error = Some(info.clone());
        r.finished_at = Some(now);
        r.next_attempt_at = None;
    };
    conclude(env, writer, delivery, &change, Settle::Term).await;
}

/// The dead letter of the request `record` describes, delivered as `delivery`.
fn dead_letter_of(
    env: &Env,
    delivery: &dyn Delivery,
    record: &Record,
    error: ErrorInfo,
) -> DeadLetter {
    let mut letter = letter_for(
        env,
        delivery,
        record.id.clone(),
        &record.queue,
        record.task.clone(),
        error,
    );
    letter.attempts = record.attempts;
    letter.died_at = record.finished_at.unwrap_or_else(OffsetDateTime::now_utc);
    letter
}

/// The dead letter of the message `delivery`, under `key`, written by this worker.
fn letter_for(
    env: &Env,
    delivery: &dyn Delivery,
    key: String,
    queue: &str,
    task: String,
    error: ErrorInfo,
) -> DeadLetter {
    let mut letter = DeadLetter::new(
        key,
        queue,
        task,
        error,
        Bytes::copy_from_slice(delivery.payload()),
    );
    letter.worker = env.name.clone();
    letter.sequence = delivery.info().sequence;
    letter
}

/// Write `record` as request `id`'s: a create if there was none (`revision`
/// `None`), else an update of `revision`. Returns the new revision.
async fn put_record(env: &Env, id: &str, record: &Record, revision: Option<u64>) -> Result<u64> {
    let bytes = Bytes::from(record.to_json()?);
    match revision {
        None => env.broker.create_record(id, bytes).await,
        Some(rev) => env.broker.update_record(id, bytes, rev).await,
    }
}

/// Dead-letter a failed request's message, then terminate it. If the dead
/// letter cannot be stored the message is released instead, to be buried by
/// a later delivery: it must not vanish without a trace.
async fn bury(env: &Env, delivery: &dyn Delivery, record: &Record) {
    let error = record
        .error
        .clone()
        .unwrap_or_else(|| ErrorInfo::new(kinds::ERROR, "failed"));
    let letter = dead_letter_of(env, delivery, record, error);
    bury_letter(env, delivery, letter).await;
}

async fn bury_letter(env: &Env, delivery: &dyn Delivery, letter: DeadLetter) {
    let reason = format!("jetq: {}: {}", letter.error.kind, letter.error.message);
    if store_dead_letter(env, delivery, letter).await {
        if let Err(e) = delivery.term(&reason).await {
            warn!(error = %e, "cannot terminate a dead-lettered message; it will be buried again");
        }
    }
}

/// Store a dead letter; if that fails, release the message (to be failed
/// again by a later delivery: it must not vanish without a trace) and
/// return false.
async fn store_dead_letter(env: &Env, delivery: &dyn Delivery, letter: DeadLetter) -> bool {
    let id = letter.id.clone();
    match env.broker.put_dead_letter(letter).await {
        Ok(()) => true,
        Err(e) => {
            let delay = release_delay(delivery.info().delivered);
            error!(id = %id, error = %e, "cannot store the dead letter; releasing the request to try again in {delay:?}");
            if let Err(e) = delivery.nak(Some(delay)).await {
                warn!(id = %id, error = %e, "cannot release the request");
            }
            false
        }
    }
}

/// Give the request back for immediate redelivery (worker shutting down).
async fn release(env: &Env, writer: &RecordWriter, delivery: &dyn Delivery) {
    let info = ErrorInfo::new(
        kinds::INTERRUPTED,
        format!(
            "worker `{}` shut down during the attempt; released for redelivery",
            env.name
        ),
    );
    let change = |r: &mut Record| {
        r.status = Status::Retrying;
        r.error = Some(info.clone());
        r.next_attempt_at = Some(OffsetDateTime::now_utc());
    };
    conclude(env, writer, delivery, &change, Settle::Nak(Duration::ZERO)).await;
}

/// Whether the record of `request` is owned by the message at `seq`: it
/// names that message, or no message yet and the same task and queue (the
/// `pending` record its producer wrote).
fn owns(record: &Record, request: &Request, seq: u64) -> bool {
    match record.seq {
        Some(s) => s == seq,
        None => record.task == request.task && record.queue == request.queue,
    }
}

/// Why a message may not be run as the request its envelope describes, if
/// so: it came for another queue or task than its envelope names, or its
/// deduplication key belongs to another request.
fn check_routing(
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
fn may_start_record(delivery: &dyn Delivery, request: &Request) -> bool {
    match delivery.dedup_key() {
        Some(k) => k == request.id,
        None => delivery.fired_by_schedule(),
    }
}

/// The stored record of request `id`, if it can be read and decoded.
async fn stored_record(env: &Env, id: &str) -> Option<Record> {
    let entry = env.broker.get_record(id).await.ok()??;
    Record::decode(id, &entry.value).ok()
}

/// Whether request `id` was cancelled (or otherwise ended) before it was due.
async fn ended_before_due(env: &Env, id: &str) -> bool {
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
async fn claim(
    env: &Env,
    request: &Request,
    delivery: &dyn Delivery,
    max_retries: u32,
) -> Result<Claim> {
    let info = delivery.info();
    let seq = info.sequence;
    let mut fail: Option<TaskError> = None;
    for _ in 0..16 {
        let existing = env.broker.get_record(&request.id).await?;
        let (mut record, revision) = match existing {
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
                return Ok(Claim::Bury(record));
            }
            return Ok(Claim::Skip(
                "the request has already finished or was cancelled",
            ));
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
            if let Some(letter) = env.broker.get_dead_letter(&request.id).await? {
                if letter.sequence == seq {
                    record.status = Status::Failed;
                    record.error = Some(letter.error);
                    record.finished_at = Some(letter.died_at);
                    record.next_attempt_at = None;
                    if let Some(rev) = revision {
                        match put_record(env, &request.id, &record, Some(rev)).await {
                            Ok(_) => return Ok(Claim::Terminate),
                            Err(e) if e.kind() == ErrorKind::Conflict => continue,
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
        let cancelled = record.cancel_requested_at.is_some();
        // A redelivery whose record this message never claimed: its first
        // delivery ran (lazily, writing nothing) and its worker died, or its
        // outcome could not be written. Count that attempt too. (A delayed
        // request delivered early and put back is the exception.)
        let unseen = info.delivered > 1
            && record.seq != Some(seq)
            && !(request.not_before.is_some() && record.status == Status::Pending);
        let stamp = ClaimStamp {
            seq,
            attempts: record.attempts.saturating_add(if unseen { 2 } else { 1 }),
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
                let base = (record.seq, record.attempts);
                let writer = RecordWriter::new(
                    Arc::clone(&env.broker),
                    request,
                    record,
                    Some(rev),
                    true,
                    base,
                    stamp,
                );
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

/// Claim `record` (stored at `revision`, or none) for a quick attempt that
/// writes it only when it must (see [`RecordWriter`]).
fn lazy_claim(
    env: &Env,
    request: &Request,
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
    Claim::Run(writer, attempt)
}

/// Whether `request`, just delivered, may run without reading its record
/// first: an `ignore_result` request at its first delivery, stored under its
/// own id, not delayed (a delayed request has a pending record) and not
/// cancelled lately as far as this worker heard. It is taken to have no
/// record; if it has one after all (a cancellation), the first write finds
/// it and the attempt yields to it.
fn runs_unread(env: &Env, request: &Request, delivery: &dyn Delivery) -> bool {
    request.ignore_result
        && delivery.info().delivered <= 1
        && request.not_before.is_none()
        && may_start_record(delivery, request)
        && !env.cancelled_lately(&request.id)
}

/// The claim of a request that [`runs_unread`].
fn unread_claim(env: &Env, request: &Request, delivery: &dyn Delivery, max_retries: u32) -> Claim {
    let stamp = ClaimStamp {
        seq: delivery.info().sequence,
        attempts: 1,
        max_retries,
        started_at: OffsetDateTime::now_utc(),
        worker: env.name.clone(),
    };
    lazy_claim(env, request, Record::pending(request), None, stamp)
}

/// A message that may not run: its envelope cannot be decoded, or it speaks
/// for a request, task or queue it does not belong to. It is dead-lettered
/// under its own key (`invalid-<queue>-<sequence>`) and terminated; no
/// record is written, since the message owns none (an id in it may be
/// another request's).
async fn poison(env: &Env, queue: &str, delivery: &dyn Delivery, kind: &str, reason: String) {
    let loose: Option<serde_json::Map<String, Value>> =
        serde_json::from_slice(delivery.payload()).ok();
    let field = |k: &str| {
        loose
            .as_ref()
            .and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let claimed = field("id").filter(|id| names::validate_id(id).is_ok());
    let task = field("task")
        .filter(|t| names::validate_task(t).is_ok())
        .unwrap_or_default();
    let info = delivery.info();
    let reason = match &claimed {
        Some(id) if !reason.contains(id.as_str()) => format!("{reason} (claims id `{id}`)"),
        _ => reason,
    };
    warn!(queue, seq = info.sequence, "refusing a message: {reason}");
    let letter = letter_for(
        env,
        delivery,
        DeadLetter::invalid_key(queue, info.sequence),
        queue,
        task,
        ErrorInfo::new(kind, reason.clone()),
    );
    // Past the budget a message ends even if its dead letter cannot be stored.
    let give_up = info.delivered > delivery_budget(crate::request::DEFAULT_MAX_RETRIES);
    if !give_up && !store_dead_letter(env, delivery, letter).await {
        return;
    }
    if let Err(e) = delivery.term(&format!("jetq: {kind}: {reason}")).await {
        warn!(error = %e, "cannot terminate a refused message");
    }
}

/// The backstop: a message delivered more often than its request's budget
/// allows, whatever the reason (a record or dead letter that cannot be read
/// or written, a bug), is ended: its record failed (`abandoned`) where this
/// message owns it, a dead letter stored where possible, the message
/// terminated even if neither could be written.
async fn abandon(env: &Env, queue: &str, delivery: &dyn Delivery, request: &Request, budget: u64) {
    let info = delivery.info();
    let existing = env.broker.get_record(&request.id).await.ok().flatten();
    // The record as this message will write it, if it owns it: none yet or
    // not a record at all (nobody owns that) gives a fresh one. A request
    // that has finished (a duplicate, or only the acknowledgement kept
    // getting lost) is neither dead-lettered nor rewritten: the message goes.
    let (owned, finished) = match &existing {
        None => (Some(Record::pending(request)), false),
        Some(entry) => match Record::decode(&request.id, &entry.value) {
            Ok(record) if record.status.is_terminal() => (None, true),
            Ok(record) if owns(&record, request, info.sequence) => (Some(record), false),
            Ok(_) => (None, false),
            Err(_) => (Some(Record::pending(request)), false),
        },
    };
    if !finished {
        let last = owned
            .as_ref()
            .and_then(|r| r.error.as_ref())
            .map(|e| format!("; the last error reported: {}: {}", e.kind, e.message))
            .unwrap_or_default();
        let message = format!(
            "delivered {} times, more than the {budget} its retries allow (max_retries + 1 + {DELIVERY_SLACK}); ended so that it cannot loop{last}",
            info.delivered
        );
        error!(id = %request.id, "{message}");
        let error = ErrorInfo::new(kinds::ABANDONED, message);
        let key = match owned {
            Some(_) => request.id.clone(),
            None => DeadLetter::invalid_key(queue, info.sequence),
        };
        let mut letter = letter_for(
            env,
            delivery,
            key,
            queue,
            request.task.clone(),
            error.clone(),
        );
        letter.attempts = owned.as_ref().map_or(0, |r| r.attempts);
        if let Err(e) = env.broker.put_dead_letter(letter).await {
            warn!(error = %e, "cannot store the dead letter of an abandoned request");
        }
        if let Some(mut record) = owned {
            record.status = Status::Failed;
            record.error = Some(error);
            record.seq = Some(info.sequence);
            record.finished_at = Some(OffsetDateTime::now_utc());
            record.next_attempt_at = None;
            record.worker = Some(env.name.clone());
            let revision = existing.as_ref().map(|e| e.revision);
            if let Err(e) = put_record(env, &request.id, &record, revision).await {
                warn!(error = %e, "cannot write the failed record of an abandoned request");
            }
        }
    }
    if let Err(e) = delivery.term("jetq: abandoned: delivered too often").await {
        warn!(error = %e, "cannot terminate an abandoned request");
    }
}
