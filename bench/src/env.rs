//! What every run shares: the server, an admin connection, fresh names, and
//! the before/after probes that turn a run into figures.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use tokio::sync::Notify;

use crate::error::{fail, Context, Result};
use crate::monitor::{cpu_time, Monitor};

/// Timeout of one JetStream API request on the admin connection.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The server under test and what the runs share.
#[derive(Debug)]
pub(crate) struct Env {
    /// Client URL of the server.
    pub(crate) url: String,
    /// Its monitoring endpoint, when known.
    pub(crate) monitor: Option<Monitor>,
    /// Its process id, when the benchmark started it (for its CPU time).
    pub(crate) server_pid: Option<u32>,
    /// JetStream on the admin connection (stream info, clean-up).
    pub(crate) js: jetstream::Context,
    /// The server's version.
    pub(crate) server_version: String,
    /// Publishes (raw) or requests (jetq) in flight in a producer.
    pub(crate) window: usize,
    run_id: String,
    next: AtomicU32,
}

impl Env {
    /// Connect the admin connection to `url`.
    pub(crate) async fn connect(
        url: &str,
        monitor: Option<Monitor>,
        server_pid: Option<u32>,
        window: usize,
    ) -> Result<Env> {
        let client = async_nats::ConnectOptions::new()
            .name("jetq-bench-admin")
            .connect(url)
            .await
            .with_context(|| format!("cannot connect to NATS at {url}"))?;
        let server_version = client.server_info().version;
        let mut js = jetstream::new(client);
        js.set_timeout(ADMIN_TIMEOUT);
        // Short and unique per invocation, so runs against a shared server
        // do not meet another invocation's streams.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let run_id = format!("{:05x}", (std::process::id() ^ nanos) & 0xf_ffff);
        Ok(Env {
            url: url.to_owned(),
            monitor,
            server_pid,
            js,
            server_version,
            window: window.max(1),
            run_id,
            next: AtomicU32::new(1),
        })
    }

    /// A fresh lower-case name for one run of `kind` (letters and digits,
    /// at most 16 characters): a jetq prefix, or the base of raw names.
    pub(crate) fn fresh_name(&self, kind: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("b{}{n}{kind}", self.run_id)
    }

    /// Delete the named streams; missing ones are fine.
    pub(crate) async fn delete_streams(&self, names: &[String]) {
        for name in names {
            match self.js.delete_stream(name).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => eprintln!("warning: cannot delete stream {name}: {e}"),
            }
        }
    }

    /// Messages in stream `name` now.
    pub(crate) async fn stream_messages(&self, name: &str) -> Result<u64> {
        let stream = self
            .js
            .get_stream(name)
            .await
            .with_context(|| format!("cannot read stream {name}"))?;
        Ok(stream.cached_info().state.messages)
    }

    /// Messages ever written to the named streams (the sum of their last
    /// sequence numbers).
    async fn written(&self, streams: &[String]) -> Result<u64> {
        let mut total = 0;
        for name in streams {
            match self.js.get_stream(name).await {
                Ok(stream) => total += stream.cached_info().state.last_sequence,
                // A stream the run has not created (e.g. no dead letters).
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e).with_context(|| format!("cannot read stream {name}")),
            }
        }
        Ok(total)
    }

    /// Wait until stream `name` is empty (every request acknowledged), or
    /// fail after `timeout`.
    pub(crate) async fn wait_empty(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.stream_messages(name).await?;
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "stream {name} still holds {left} messages after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Read the counters before a run: messages of the `connections`,
    /// messages written to the `streams`, then CPU times (last, so that
    /// reading the others is not counted).
    pub(crate) async fn probe_before(
        &self,
        connections: &[String],
        streams: &[String],
    ) -> Result<Probe> {
        let msgs = self.connection_msgs(connections).await?;
        let stored = self.written(streams).await?;
        Ok(Probe {
            cpu: cpu_time(None),
            server_cpu: self.server_pid.and_then(|pid| cpu_time(Some(pid))),
            msgs,
            stored,
        })
    }

    /// Read the counters after a run: CPU times first.
    pub(crate) async fn probe_after(
        &self,
        connections: &[String],
        streams: &[String],
    ) -> Result<Probe> {
        let cpu = cpu_time(None);
        let server_cpu = self.server_pid.and_then(|pid| cpu_time(Some(pid)));
        Ok(Probe {
            cpu,
            server_cpu,
            msgs: self.connection_msgs(connections).await?,
            stored: self.written(streams).await?,
        })
    }

    async fn connection_msgs(&self, names: &[String]) -> Result<Option<Vec<u64>>> {
        match &self.monitor {
            Some(m) => Ok(Some(m.connection_msgs(names).await?)),
            None => Ok(None),
        }
    }
}

/// Whether `err` says the stream does not exist.
fn is_not_found(err: &GetStreamError) -> bool {
    matches!(err.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// Counters read before or after a run.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    cpu: Option<Duration>,
    server_cpu: Option<Duration>,
    /// Protocol messages of each connection.
    msgs: Option<Vec<u64>>,
    stored: u64,
}

/// What one timed run did.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// Tasks in the timed part.
    pub(crate) tasks: u64,
    /// Wall time of the timed part.
    pub(crate) elapsed: Duration,
    /// CPU time of this process (producer and worker) in the run.
    pub(crate) cpu: Option<Duration>,
    /// CPU time of the server in the run.
    pub(crate) server_cpu: Option<Duration>,
    /// Protocol messages of each connection (producer, worker).
    pub(crate) msgs: Option<Vec<u64>>,
    /// Messages written to the run's streams.
    pub(crate) stored: u64,
}

impl Sample {
    /// The run from `before` to `after`: `tasks` in `elapsed`.
    pub(crate) fn new(tasks: u64, elapsed: Duration, before: Probe, after: Probe) -> Sample {
        let delta = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        Sample {
            tasks,
            elapsed,
            cpu: delta(before.cpu, after.cpu),
            server_cpu: delta(before.server_cpu, after.server_cpu),
            msgs: match (before.msgs, after.msgs) {
                (Some(a), Some(b)) if a.len() == b.len() => Some(
                    a.iter()
                        .zip(&b)
                        .map(|(a, b)| b.saturating_sub(*a))
                        .collect(),
                ),
                _ => None,
            },
            stored: after.stored.saturating_sub(before.stored),
        }
    }

    /// Tasks per second.
    pub(crate) fn per_s(&self) -> f64 {
        self.tasks as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn per_task(&self, total: f64) -> f64 {
        total / (self.tasks.max(1) as f64)
    }

    /// CPU microseconds of this process per task.
    pub(crate) fn cpu_us_per_task(&self) -> Option<f64> {
        self.cpu.map(|d| self.per_task(d.as_secs_f64() * 1e6))
    }

    /// CPU microseconds of the server per task.
    pub(crate) fn server_cpu_us_per_task(&self) -> Option<f64> {
        self.server_cpu
            .map(|d| self.per_task(d.as_secs_f64() * 1e6))
    }

    /// Protocol messages per task, of all connections.
    pub(crate) fn msgs_per_task(&self) -> Option<f64> {
        let total: u64 = self.msgs.as_ref()?.iter().sum();
        Some(self.per_task(total as f64))
    }

    /// Protocol messages per task of connection `i` (0: producer, 1: worker).
    pub(crate) fn connection_msgs_per_task(&self, i: usize) -> Option<f64> {
        let count = *self.msgs.as_ref()?.get(i)?;
        Some(self.per_task(count as f64))
    }

    /// Stored messages per task.
    pub(crate) fn stored_per_task(&self) -> f64 {
        self.per_task(self.stored as f64)
    }
}

/// Counts finished tasks; wakes whoever waits for a total.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    count: AtomicU64,
    changed: Notify,
}

impl Counter {
    /// One more.
    pub(crate) fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Wait until the count reaches `target`.
    pub(crate) async fn wait_for(&self, target: u64) {
        loop {
            let changed = self.changed.notified();
            if self.count.load(Ordering::Relaxed) >= target {
                return;
            }
            changed.await;
        }
    }
}

/// How long a run of `tasks` may take before the benchmark gives up.
pub(crate) fn run_timeout(tasks: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(5) * u32::try_from(tasks).unwrap_or(u32::MAX)
}
