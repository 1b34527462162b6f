//! The worker: pulls requests, runs their handlers, writes records, acks.
//!
//! Its parts, in the order a request meets them:
//! - `builder`: tasks and the [`WorkerBuilder`];
//! - this module: the running [`Worker`], its shared environment (`Env`),
//!   cancellation signals and shutdown;
//! - `pull`: one loop per queue taking deliveries against the worker's
//!   allowances and running one attempt each in the queue's driver (one
//!   task per queue for both);
//! - `attempt`: one delivery's life (checks, claim, the task, its outcome);
//! - `record`: the record protocol (claim, revision-checked writes);
//! - `settle`: writing the outcome and settling the message (ack, nak,
//!   term, dead letters).

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

use crate::broker::{BoxFuture, Broker, ConsumeOptions, Consumer, Delivery, RecordEntry};
use crate::client::Client;
use crate::context::{Context, ContextInner, RecordSink, Shared};
use crate::dead::DeadLetter;
use crate::error::{Error, ErrorKind, Result};
use crate::extract::{Requirements, ResourceCell};
use crate::handler::{BlockingHandler, ErasedHandler, Handler};
use crate::middleware::{run_attempt, Middleware, Outcome};
use crate::names;
use crate::record::{ErrorInfo, Record, Status};
use crate::request::{Request, DEFAULT_QUEUE, MAX_DELAY, MAX_RETRIES_LIMIT};
use crate::retry::RetryPolicy;
use crate::task_error::{kinds, Retry, Suspension, TaskError, WakeCheck};

mod attempt;
mod builder;
mod pull;
mod record;
mod settle;

use attempt::*;
use builder::*;
pub use builder::{Task, WorkerBuilder};
use pull::*;
use record::*;
use settle::*;

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
/// tasks, and the deeper the pipeline, the more messages share each socket
/// read and write on both sides (at concurrency 16, 8 deep: 0.64x raw, 16:
/// 0.67x, 32: 0.70x, the server's CPU per task 65 -> 58 us). How many are
/// read ahead also depends on how long tasks take: see [`READ_AHEAD_WORK`].
const PIPELINE_DEPTH: usize = 32;
/// The most deliveries in each stage beyond what the concurrency itself
/// needs: past a few hundred in flight, more only costs memory and CPU.
const PIPELINE_MAX: usize = 512;

/// Deliveries a worker of `concurrency` may have in each of its stages:
/// [`PIPELINE_DEPTH`] per task slot, at most [`PIPELINE_MAX`], never fewer
/// than the slots.
fn pipeline(concurrency: usize) -> usize {
    concurrency
        .saturating_mul(PIPELINE_DEPTH)
        .min(PIPELINE_MAX)
        .max(concurrency)
}
/// How long an attempt runs before its record says `running`.
const DEFAULT_RUNNING_AFTER: Duration = Duration::from_millis(500);
/// How often a pulling worker reads its queue's ack wait back from the
/// broker (another worker may have changed it).
const ACK_WAIT_REFRESH: Duration = Duration::from_secs(5);

/// Run one of jetq's own steps (an attempt's claim, concluding place,
/// outcome writes and acknowledgement; the pull loop; the hand-over of
/// deliveries to the driver) outside tokio's cooperative budget. The attempts of a queue share one task, and with it
/// one budget of 128 operations per poll: a few hundred attempts concluding
/// together would use it up, and each step refused for want of budget
/// would be woken and polled again (at concurrency 256 an attempt was
/// polled about 40 times, 6.4 at 16; now about 3). These steps are bounded (no loop over
/// ready resources), so they cannot hold the thread; the handler still runs
/// under the budget.
fn own<F: std::future::Future>(step: F) -> tokio::task::coop::Unconstrained<F> {
    tokio::task::coop::unconstrained(step)
}

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

struct Env {
    broker: Arc<dyn Broker>,
    /// The client tasks publish children with.
    client: Client,
    /// The worker's name, shared by every attempt's claim and context.
    name: Arc<str>,
    registry: HashMap<String, HashMap<String, Arc<TaskEntry>>>,
    shared: Arc<Shared>,
    ack_wait: Duration,
    running_after: Duration,
    suspend_after: Duration,
    /// Attempts whose task has returned and whose outcome is being written
    /// and settled, as many as [`pipeline`] allows.
    concluding: Arc<Semaphore>,
    /// Places for running tasks (the worker's concurrency). Deliveries are
    /// pulled against an allowance of their own, so that the next ones'
    /// records are read while these run.
    slots: Arc<Semaphore>,
    /// A moving average of how long tasks run, in microseconds.
    task_micros: AtomicU64,
    /// The worker's concurrency (the slots' number).
    concurrency: usize,
    /// Running attempts by registration key. Keyed by the key rather than
    /// the request id, so that registering one allocates nothing; a cancel
    /// signal (rare) looks through them all.
    running: StdMutex<HashMap<u64, RunningAttempt>>,
    next_registration: AtomicU64,
    /// Ids whose cancel signal this worker saw lately: an `ignore_result`
    /// request among them reads its record before it runs.
    cancelled: StdMutex<RecentIds>,
    /// Stream sequences of the messages this worker has an attempt for.
    live: StdMutex<HashSet<u64>>,
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

/// How many deliveries a worker of `concurrency` reading ahead may hold in
/// all, when its tasks take `average_micros` on average: as many per slot
/// as [`READ_AHEAD_WORK`] takes, at most [`PIPELINE_DEPTH`] (and the
/// pipeline's limit), at least one.
fn read_ahead_limit(concurrency: usize, average_micros: u64) -> usize {
    let per_slot =
        (duration_micros(READ_AHEAD_WORK) / average_micros.max(1)).clamp(1, PIPELINE_DEPTH as u64);
    concurrency
        .saturating_mul(usize::try_from(per_slot).unwrap_or(1))
        .min(pipeline(concurrency))
}

/// Tasks shorter than this on average let a worker read ahead.
const READ_AHEAD_BELOW: Duration = Duration::from_millis(10);
/// How much work (at the average task's length) a worker reading ahead may
/// hold per task slot, work that another worker could have run: 32
/// deliveries per slot of tasks under 2.5 ms, 8 at 10 ms.
const READ_AHEAD_WORK: Duration = Duration::from_millis(80);

impl Env {
    /// Whether tasks have been quick enough to read the next deliveries'
    /// records while every slot is busy.
    fn read_ahead_ok(&self) -> bool {
        self.task_micros.load(Ordering::Relaxed) < duration_micros(READ_AHEAD_BELOW)
    }

    /// How many deliveries this worker may hold reading ahead, in all.
    fn read_ahead_limit(&self) -> usize {
        read_ahead_limit(self.concurrency, self.task_micros.load(Ordering::Relaxed))
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
        writer: &Arc<RecordWriter>,
        cancel: &CancellationToken,
    ) -> Registration {
        let key = self.next_registration.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut running) = self.running.lock() {
            running.insert(key, (Arc::clone(writer), cancel.clone()));
        }
        Registration {
            env: Arc::clone(self),
            key,
        }
    }

    /// Mark message `sequence` as having an attempt here until the guard
    /// is dropped; `None` if it already has one (the server delivered it
    /// again while that attempt runs).
    fn take_live(self: &Arc<Self>, sequence: u64) -> Option<Live> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.insert(sequence).then(|| Live {
            env: Arc::clone(self),
            sequence,
        })
    }

    /// The worker is shutting down: fire every running attempt's token. (An
    /// attempt's token is not a child of the worker's stop token: a child
    /// token per attempt took a lock on the parent shared by all attempts,
    /// contended between the runtime's threads.)
    fn cancel_all_running(&self) {
        if let Ok(running) = self.running.lock() {
            for (_, cancel) in running.values() {
                cancel.cancel();
            }
        }
    }

    /// A client cancelled request `id`: fire the tokens of its attempts
    /// here, and remember it for a delivery still to come.
    fn cancel_running(&self, id: &str) {
        if let Ok(mut cancelled) = self.cancelled.lock() {
            cancelled.insert(id);
        }
        if let Ok(running) = self.running.lock() {
            for (writer, cancel) in running.values().filter(|(w, _)| w.id() == id) {
                info!(id, "cancelled by a client");
                writer.cancel_by_client();
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

/// A message with an attempt on this worker, from [`Env::take_live`].
struct Live {
    env: Arc<Env>,
    sequence: u64,
}

impl Drop for Live {
    fn drop(&mut self) {
        let mut live = self.env.live.lock().unwrap_or_else(|p| p.into_inner());
        live.remove(&self.sequence);
    }
}

/// A running attempt, reachable by cancellation signals: its record's
/// writer (the request id, the flag that a client cancelled it) and its
/// task's token.
type RunningAttempt = (Arc<RecordWriter>, CancellationToken);

/// Keeps a running attempt in [`Env::running`] while alive.
struct Registration {
    env: Arc<Env>,
    key: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut running) = self.env.running.lock() {
            running.remove(&self.key);
        }
    }
}

/// A worker: serves registered tasks on their queues until shut down.
///
/// The attempts of a queue start inside one task of the worker's (its
/// driver), so that the broker operations of attempts woken together leave
/// in one socket write. An attempt whose handler keeps computing between
/// its awaits (about a millisecond of it in all) moves to a tokio task of
/// its own and runs beside the others on another thread. A handler that
/// blocks its thread without awaiting holds up the attempts of its driver
/// until it returns: register blocking work with
/// [`Task::blocking`](crate::Task::blocking).
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
            suspend_after: crate::workflow::SUSPEND_AFTER,
            middleware: Vec::new(),
            client: None,
            refused: Vec::new(),
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
        let permits = Arc::new(Semaphore::new(pipeline(self.concurrency)));
        let tracker = TaskTracker::new();
        let mut loops = Vec::new();
        for queue in self.queues() {
            // Consume first: the consumer is created with this worker's
            // settings if it does not exist yet (an existing one keeps its own).
            let options =
                ConsumeOptions::new(self.env.name.to_string()).ack_wait(self.env.ack_wait);
            let mut consumer = self.env.broker.consume(&queue, options).await?;
            self.env.broker.ensure_queue(&queue).await?;
            let ack_wait =
                Arc::new(SharedAckWait::read(&queue, &mut *consumer, self.env.ack_wait).await);
            let (pulling, pulled) = tokio::sync::oneshot::channel();
            let server = QueueServer {
                queue,
                consumer,
                ack_wait,
                env: Arc::clone(&self.env),
                permits: Arc::clone(&permits),
                tracker: tracker.clone(),
                stop: stop.clone(),
                hard_stop: hard_stop.clone(),
            };
            tracker.spawn(serve_queue(server, pulling));
            loops.push(pulled);
        }
        let listener = tokio::spawn(cancel_listener(Arc::clone(&self.env), stop.clone()));
        info!(worker = %self.env.name, queues = ?self.queues(), concurrency = self.concurrency, "worker started");
        signal.await;
        info!(worker = %self.env.name, "shutting down: no new tasks; waiting for running ones");
        stop.cancel();
        self.env.cancel_all_running();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker reading ahead holds at most about [`READ_AHEAD_WORK`] of
    /// work per slot: the whole pipeline for quick tasks, less and less as
    /// they get longer, never none.
    #[test]
    fn read_ahead_holds_about_the_same_work_whatever_the_task_length() {
        // Quick tasks: the pipeline, 32 per slot.
        assert_eq!(read_ahead_limit(16, 50), 512);
        assert_eq!(read_ahead_limit(2, 0), 64);
        // 2.5 ms and below: still 32 per slot; 5 ms: 16; 10 ms: 8.
        assert_eq!(read_ahead_limit(16, 2_500), 512);
        assert_eq!(read_ahead_limit(16, 5_000), 256);
        assert_eq!(read_ahead_limit(16, 10_000), 128);
        // Never more than the pipeline allows, never fewer than one per slot.
        assert_eq!(read_ahead_limit(256, 50), PIPELINE_MAX);
        assert_eq!(read_ahead_limit(4, u64::MAX), 4);
    }
}
