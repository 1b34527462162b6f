//! Soak: many requests of the demo tasks (with random failures and panics)
//! through several `jetq-soak-worker` processes, while workers are killed
//! with SIGKILL at random moments, the nats-server restarts once, and a
//! hostile publisher sends messages no jetq client would. Then: every
//! request has exactly one terminal record, none is lost or stuck, and no
//! request that succeeded ran its final attempt twice, checked against an
//! audit trail that every handler execution leaves in its own JetStream
//! stream (see `src/bin/jetq-soak-worker.rs`); and every hostile message
//! ended as it must, without harming an honest request.
//!
//! Two tests, the same chaos (5 SIGKILLs, 1 server restart, hostile traffic):
//!
//! - `soak`, ignored by default: 10,000 requests (`JETQ_SOAK_REQUESTS`).
//!   Run it with `scripts/soak [REQUESTS]`, or
//!   `cargo test -p jetq-tests --test soak -- --ignored --nocapture`.
//! - `soak_quick`: 400 requests (and 40 hostile messages), a few seconds,
//!   part of the default run.
//!
//! The chaos fires at random points of progress (share of requests seen
//! terminal): kills between 5 % and 75 %, the restart between 25 % and 60 %.
//! Each killed worker is replaced at once.
//!
//! ## The mix (seeded, `JETQ_SOAK_SEED`)
//!
//! 25 % `demo.add`, 10 % `demo.sleep` (0-100 ms), 15 % `demo.fail` (times
//! 0-3), 2 % `demo.panic` (max retries 2), 2 % `demo.add` with arguments of
//! the wrong type, 46 % `soak.flaky` (fails with p = 0.20, panics with
//! q = 0.05, sleeps 0-20 ms; max retries 3). Workers: retry policy of 5
//! retries, backoff from 50 ms doubling to 500 ms with jitter; ack wait 2 s.
//!
//! ## Expected outcomes
//!
//! A panic is a retryable failure of kind `panic` (`core/src/handler.rs`);
//! arguments that do not decode are a permanent `invalid_args` failure raised
//! before the handler runs (`core/src/extract.rs`). So:
//!
//! - `demo.add`, `demo.sleep`, `demo.fail`: `succeeded`, with a + b, the
//!   milliseconds, the attempt number (above `times`);
//! - `demo.panic`: `failed`, kind `panic`, after 3 attempts;
//! - bad arguments: `failed`, kind `invalid_args`, 1 attempt, no execution;
//! - `soak.flaky`: `succeeded` with `{attempt, worker, exec}` naming the
//!   execution that produced it, or (0.25^4, about 0.4 %) `failed` with kind
//!   `error` or `panic` after 4 attempts;
//! - any of them may instead fail with "gave up after N attempts" when its
//!   last allowed attempt was cut short (its worker was killed, or its
//!   delivery was taken over after the restart): the record then counts
//!   max retries + 2 claims, and the last claim ran nothing.
//!
//! ## Invariants (a violation fails the test, with the record and its audit trail)
//!
//! - every id has a record and it is terminal; the record bucket holds
//!   exactly one key per request; no record was seen with two different
//!   terminal revisions; the task stream ends empty, nothing unacknowledged;
//! - no attempt (id, attempt number) was executed twice, and none above the
//!   record's `attempts`;
//! - a `succeeded` record: exactly one execution of its final attempt, which
//!   ended `success`, on the worker the record names, with the record's value;
//! - a `failed` record (other than "gave up"): exactly one execution of its
//!   final attempt, which ended as the error kind says (`fail` or `panic`);
//! - every execution has an end entry unless its worker was SIGKILLed (the
//!   surviving workers are stopped with SIGTERM before the audit is read, so
//!   handlers still running finish).
//!
//! - the bucket holds a record for every request and for no id other than
//!   those of the hostile publisher that must have one (below); a failed
//!   request has a dead letter of its error kind under its id, and no dead
//!   letter under an honest id is one of a refused message;
//! - no message of the task stream was delivered more than
//!   `delivery_budget(5) + 1` times (the consumer's advisories of terminated
//!   and negatively acknowledged messages carry the counts);
//! - no worker exits by itself (only the SIGKILLs end workers early), and
//!   the worker logs show no panic but those of the tasks that panic on
//!   purpose.
//!
//! Allowed, and counted in the figures (at-least-once delivery): an earlier
//! attempt that succeeded but did not count, because its worker was killed
//! before writing the record, or because its delivery was taken over when the
//! server restart outlasted the ack wait; the request then ran again under
//! the next attempt number.
//!
//! ## Hostile traffic (`soak/hostile.rs`)
//!
//! A second producer with plain async-nats on the same server sends
//! `JETQ_SOAK_HOSTILE_SHARE` percent as many messages as there are requests
//! (10 % by default: 40 in `soak_quick`, 1,000 in `soak`), spread over the
//! honest publishing (message `k` goes once `k / count` of the requests are
//! published) and riding out the server restart like the honest producer.
//! The mix is seeded (`JETQ_SOAK_HOSTILE_SEED`, by default derived from
//! `JETQ_SOAK_SEED`; it does not change the honest mix or the chaos). A
//! message that names an honest request only ever names one already
//! published (as an observer of the task subjects would). The kinds, and how
//! each must end (the task stream must drain in any case):
//!
//! | share | what | must end |
//! |---|---|---|
//! | 10 % | junk on a task subject: empty, random bytes, `{}`, an array, `null`, 300 levels of nesting, a truncated envelope, `{"id": <honest id>}` | dead letter `invalid-default-<seq>`, kind `invalid_request` |
//! | 8 % | an honest envelope with `v` 0, 2, 999, `"1"`, `null`, -1 or 1.5 | the same |
//! | 8 % | an honest envelope naming another queue, sent on another task's subject, or with an invalid task name | the same |
//! | 9 % | an honest envelope with a `Nats-Msg-Id` not its own (made up, another request's id or requeue key, a requeue key without a number) | the same, or dropped by the stream as a duplicate key |
//! | 9 % | a valid request of another task under an honest id that has a record (else junk is sent) | dropped: the request was taken (`id_conflict` if its record were `pending`) |
//! | 9 % | the honest envelope again, under a requeue key `<id>.requeue.<n>` or no `Nats-Msg-Id`, for an honest id that has a record (else junk is sent) | dropped as a duplicate |
//! | 5 % | a message with an honest request's own `Nats-Msg-Id` | dropped by the stream (duplicate key) |
//! | 12 % | a fake record on `jetq.records.<honest id>` (core NATS): `succeeded` or `failed` with revision 1 or 999999999999, garbage, a delete marker | nothing stored; no waiter believes it (below) |
//! | 7 % | its own request with `not_before` in 2500, 9999 or eleven years ahead | `failed`, `invalid_request`, with a dead letter |
//! | 7 % | its own request with `max_retries` `u32::MAX` (`demo.add`, or an unknown task), beyond `u32`, or -1 | `succeeded` with `max_retries` lowered to 10,000; `failed`/`unknown_task` without running; refused (`invalid_request`) |
//! | 6 % | its own request with metadata over `max_payload`, just under it (the record does not fit once claimed), of 64 KiB, or not an object | refused at publish; `failed`/`too_large` (after its task ran at most once per attempt) with the metadata dropped; `succeeded` with it; refused. At most 4 of each near-limit kind per run |
//! | 10 % | a record of its own written straight into the bucket (garbage, a fake `succeeded` one, one owned by another message, one worn out to `u32::MAX` attempts, one of a newer version), alone or followed by a request | left as written; with a request: `failed`/`corrupt_record` (or `succeeded` on a redelivery, when the attempt that replaced the garbage was cut short before it failed the request), left as written (the message dropped), `failed`/`abandoned`, `succeeded` keeping the unknown field |
//!
//! The first 8 hostile messages are fake `succeeded` records for 8 honest
//! requests (`demo.fail` failing twice or more) that a `Client::wait` has
//! followed since before they were published: each must return the stored
//! record, not the fake.
//!
//! For each message the test checks that ending against the server: the
//! dead letter under `invalid-default-<seq>` (and no record for any id in
//! the message), or the record and dead letter under its own id, or the
//! record left byte for byte as written; the handler ran exactly once for
//! those that succeed and never for those that fail; no hostile message was
//! delivered more than `delivery_budget(3) + 1` times; every `invalid-` dead
//! letter is one of a hostile message. Hostile ids start with `x-`; their
//! handler runs are left out of the honest checks.
//!
//! Not sent, because they harm an honest request by design and only NATS
//! permissions keep them out (`docs/guarantees.md`, Security): writes to
//! honest ids' keys; an honest request's `Nats-Msg-Id` taken before it is
//! published; records forged into a producer's inbox (`notify`); and any
//! request under an honest id before a worker has written that id's record.
//! A producer writes no `pending` record by default, so until then nothing
//! tells the honest message from another: a request of another task (or
//! with other arguments) under that id runs instead of it, and the same
//! request sent again may run as well, its first attempt twice (wire
//! format, Duplicates). Messages of the last kind therefore wait for the
//! record: the hostile publisher picks an honest id whose record it can
//! read.
//!
//! ## Environment (all optional)
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `JETQ_SOAK_REQUESTS` | 10000 | requests to publish (`soak` only) |
//! | `JETQ_SOAK_WORKERS` | 4 | worker processes running at once |
//! | `JETQ_SOAK_CONCURRENCY` | 16 | tasks each worker runs at once |
//! | `JETQ_SOAK_KILLS` | 5 | workers killed with SIGKILL (each replaced at once) |
//! | `JETQ_SOAK_RESTARTS` | 1 | nats-server restarts (same port and store) |
//! | `JETQ_SOAK_SERVER_SIGKILL` | 0 | `1`: stop the server with SIGKILL instead of SIGTERM |
//! | `JETQ_SOAK_DOWN_MS` | 1000 | how long the server stays down |
//! | `JETQ_SOAK_SEED` | time-based | seed of the mix and of the chaos schedule |
//! | `JETQ_SOAK_TIMEOUT_SECS` | 600 | overall bound; reaching it is a failure |
//! | `JETQ_SOAK_PUBLISH_CONCURRENCY` | 64 | publishes in flight |
//! | `JETQ_SOAK_LOG_DIR` | a temporary directory, kept on failure | worker logs |
//! | `JETQ_SOAK_WORKER_LOG` | `warn` | the workers' `RUST_LOG` |
//! | `JETQ_SOAK_HOSTILE_SHARE` | 10 | hostile messages, in percent of the requests (0: none) |
//! | `JETQ_SOAK_HOSTILE_SEED` | from `JETQ_SOAK_SEED` | seed of the hostile mix |

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use jetq::{Client, Record, Status};
use jetq_nats::NatsBroker;
use jetq_tests::NatsServer;
use serde::Deserialize;
use serde_json::{json, Value};

#[path = "soak/hostile.rs"]
mod hostile;

// ---------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone)]
struct Config {
    requests: usize,
    workers: usize,
    concurrency: usize,
    kills: usize,
    restarts: usize,
    server_sigkill: bool,
    down: Duration,
    seed: u64,
    timeout: Duration,
    publish_concurrency: usize,
    ack_wait_secs: f64,
    worker_log: String,
    /// Hostile messages, in percent of the requests.
    hostile_share: f64,
    hostile_seed: u64,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        _ => default,
    }
}

impl Config {
    fn from_env() -> Config {
        let time_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let seed = env_or("JETQ_SOAK_SEED", time_seed);
        Config {
            requests: env_or("JETQ_SOAK_REQUESTS", 10_000usize),
            workers: env_or("JETQ_SOAK_WORKERS", 4usize).max(1),
            concurrency: env_or("JETQ_SOAK_CONCURRENCY", 16usize).max(1),
            kills: env_or("JETQ_SOAK_KILLS", 5usize),
            restarts: env_or("JETQ_SOAK_RESTARTS", 1usize),
            server_sigkill: env_or("JETQ_SOAK_SERVER_SIGKILL", 0u8) == 1,
            down: Duration::from_millis(env_or("JETQ_SOAK_DOWN_MS", 1000u64)),
            seed,
            timeout: Duration::from_secs(env_or("JETQ_SOAK_TIMEOUT_SECS", 600u64)),
            publish_concurrency: env_or("JETQ_SOAK_PUBLISH_CONCURRENCY", 64usize).max(1),
            ack_wait_secs: 2.0,
            worker_log: std::env::var("JETQ_SOAK_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            hostile_share: env_or("JETQ_SOAK_HOSTILE_SHARE", 10.0f64).clamp(0.0, 1000.0),
            hostile_seed: env_or("JETQ_SOAK_HOSTILE_SEED", seed ^ 0x4057_11e5),
        }
    }

    /// Hostile messages to send alongside `requests` honest ones.
    fn hostile_count(&self, requests: usize) -> usize {
        (requests as f64 * self.hostile_share / 100.0).round() as usize
    }
}

// ---------------------------------------------------------------------------
// The request mix

/// Requests of `soak_quick`.
const QUICK_REQUESTS: usize = 400;
/// Honest requests followed by a waiter from before they are published
/// (when there is hostile traffic, which forges results for them).
const WAITERS: usize = 8;

/// Retries the worker's policy allows (`jetq-soak-worker --max-retries`).
const WORKER_MAX_RETRIES: u32 = 5;
/// Retries of `demo.panic` requests (they always end `failed`, kind `panic`).
const PANIC_MAX_RETRIES: u32 = 2;
/// Retries of `soak.flaky` requests.
const FLAKY_MAX_RETRIES: u32 = 3;
const FLAKY_P_FAIL: f64 = 0.20;
const FLAKY_P_PANIC: f64 = 0.05;
const FLAKY_MAX_SLEEP_MS: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// `demo.add`: succeeds with a + b.
    Add,
    /// `demo.sleep`: succeeds with the milliseconds slept.
    Sleep,
    /// `demo.fail {times}`: fails `times` times, then succeeds with the attempt number.
    Fail,
    /// `demo.panic`: panics every attempt; fails with kind `panic`.
    Panic,
    /// `demo.add` with arguments of the wrong type: fails at once, `invalid_args`.
    BadArgs,
    /// `soak.flaky`: random failures and panics; succeeds or exhausts its retries.
    Flaky,
}

impl Kind {
    fn task(self) -> &'static str {
        match self {
            Kind::Add | Kind::BadArgs => "demo.add",
            Kind::Sleep => "demo.sleep",
            Kind::Fail => "demo.fail",
            Kind::Panic => "demo.panic",
            Kind::Flaky => "soak.flaky",
        }
    }
}

#[derive(Debug, Clone)]
struct Planned {
    id: String,
    kind: Kind,
    args: Value,
    max_retries: Option<u32>,
}

/// Percentages of the mix, in order: add, sleep, fail, panic, bad args, flaky.
const MIX: [(Kind, u32); 6] = [
    (Kind::Add, 25),
    (Kind::Sleep, 10),
    (Kind::Fail, 15),
    (Kind::Panic, 2),
    (Kind::BadArgs, 2),
    (Kind::Flaky, 46),
];

fn plan(cfg: &Config, rng: &mut fastrand::Rng) -> Vec<Planned> {
    (0..cfg.requests)
        .map(|i| {
            let mut roll = rng.u32(0..100);
            let mut kind = Kind::Flaky;
            for (k, share) in MIX {
                if roll < share {
                    kind = k;
                    break;
                }
                roll -= share;
            }
            let (args, max_retries) = match kind {
                Kind::Add => (
                    json!({"a": rng.i64(-1_000_000..1_000_000), "b": rng.i64(-1_000_000..1_000_000)}),
                    None,
                ),
                Kind::BadArgs => (json!({"a": "not a number", "b": 1}), None),
                Kind::Sleep => (json!({"ms": rng.u64(0..=100)}), None),
                Kind::Fail => (json!({"times": rng.u32(0..=3)}), None),
                Kind::Panic => (Value::Null, Some(PANIC_MAX_RETRIES)),
                Kind::Flaky => (
                    json!({"p_fail": FLAKY_P_FAIL, "p_panic": FLAKY_P_PANIC, "max_sleep_ms": FLAKY_MAX_SLEEP_MS}),
                    Some(FLAKY_MAX_RETRIES),
                ),
            };
            Planned {
                id: format!("r{i:05}-{}", format!("{kind:?}").to_lowercase()),
                kind,
                args,
                max_retries,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Worker processes

struct WorkerProcess {
    name: String,
    child: Child,
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone)]
struct KillEvent {
    at: Duration,
    worker: String,
    progress: usize,
}

#[derive(Debug, Clone)]
struct RestartEvent {
    at: Duration,
    /// When the server was up again (ready), since the start.
    back_at: Duration,
    progress: usize,
}

struct Fleet {
    url: String,
    log_dir: PathBuf,
    cfg: Config,
    started: usize,
    live: Vec<WorkerProcess>,
}

impl Fleet {
    fn spawn(&mut self) -> String {
        self.started += 1;
        let name = format!("soak-w{}", self.started);
        let log = std::fs::File::create(self.log_dir.join(format!("{name}.log")))
            .unwrap_or_else(|e| panic!("cannot create the log of {name}: {e}"));
        let child = Command::new(env!("CARGO_BIN_EXE_jetq-soak-worker"))
            .args(["--nats", &self.url, "--name", &name])
            .args(["--concurrency", &self.cfg.concurrency.to_string()])
            .args(["--ack-wait", &self.cfg.ack_wait_secs.to_string()])
            .args(["--max-retries", &WORKER_MAX_RETRIES.to_string()])
            .args(["--backoff-ms", "50", "--backoff-max-ms", "500"])
            .env("RUST_LOG", &self.cfg.worker_log)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start jetq-soak-worker: {e}"));
        self.live.push(WorkerProcess {
            name: name.clone(),
            child,
        });
        name
    }

    /// Stop every live worker with SIGTERM (graceful shutdown: running
    /// handlers finish) and wait for them; returns those that did not exit
    /// cleanly within `patience`, with why.
    fn stop_all(&mut self, patience: Duration) -> Vec<String> {
        let mut trouble = Vec::new();
        // A worker that is gone before it is told to stop crashed (or quit)
        // by itself: only the deliberate SIGKILLs may end a worker early.
        for w in &mut self.live {
            if let Ok(Some(status)) = w.child.try_wait() {
                trouble.push(format!(
                    "{} had exited by itself ({status}) before the end",
                    w.name
                ));
            }
        }
        for w in &self.live {
            let _ = Command::new("kill")
                .args(["-TERM", &w.child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + patience;
        for mut w in self.live.drain(..) {
            loop {
                match w.child.try_wait() {
                    Ok(Some(status)) if status.success() => break,
                    Ok(Some(status)) => {
                        trouble.push(format!("{} exited with {status}", w.name));
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        trouble.push(format!("{} did not stop within {patience:?}", w.name));
                        break;
                    }
                }
            }
        }
        trouble
    }

    /// SIGKILL a random live worker; returns its name.
    fn kill_one(&mut self, rng: &mut fastrand::Rng) -> String {
        let i = rng.usize(0..self.live.len());
        let mut victim = self.live.swap_remove(i);
        victim.child.kill().unwrap(); // SIGKILL on Unix
        let _ = victim.child.wait();
        victim.name.clone()
    }
}

// ---------------------------------------------------------------------------
// Watching records go terminal (one wildcard subscription)

#[derive(Default)]
struct Progress {
    /// First time each id was seen terminal.
    terminal_at: HashMap<String, Instant>,
    /// Distinct revisions seen with a terminal status, per id.
    terminal_revisions: HashMap<String, HashSet<u64>>,
    last_change: Option<Instant>,
}

#[derive(Deserialize)]
struct RecordHead {
    id: String,
    status: Status,
}

impl Progress {
    fn note(&mut self, id: &str, revision: u64) {
        let now = Instant::now();
        self.terminal_revisions
            .entry(id.to_owned())
            .or_default()
            .insert(revision);
        if !self.terminal_at.contains_key(id) {
            self.terminal_at.insert(id.to_owned(), now);
            self.last_change = Some(now);
        }
    }
}

/// Follow every committed record change of the honest requests (one
/// subscription to `jetq.records.>`); after each reconnection, read back the
/// records not yet seen terminal, since changes committed while the
/// connection was down are not delivered. The hostile publisher's forged
/// notifications on the same subject are left out: it registers each
/// payload before sending it, and no record the server republishes is
/// byte for byte one of them (they name the worker `forger`).
async fn follow_records(
    broker: NatsBroker,
    ids: Arc<Vec<String>>,
    progress: Arc<Mutex<Progress>>,
    forged: hostile::Forged,
) {
    let honest: HashSet<String> = ids.iter().cloned().collect();
    let nats = broker.client().clone();
    let mut sub = nats.subscribe("jetq.records.>").await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut was_connected = true;
    loop {
        tokio::select! {
            message = sub.next() => {
                let Some(message) = message else { return };
                if forged.lock().unwrap().contains(&message.payload) {
                    continue;
                }
                let Ok(head) = serde_json::from_slice::<RecordHead>(&message.payload) else {
                    continue;
                };
                if !honest.contains(&head.id) {
                    continue;
                }
                if head.status.is_terminal() {
                    let revision = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    progress.lock().unwrap().note(&head.id, revision);
                }
            }
            _ = tick.tick() => {
                let connected = nats.connection_state() == async_nats::connection::State::Connected;
                if connected && !was_connected {
                    tokio::spawn(read_back(broker.clone(), Arc::clone(&ids), Arc::clone(&progress)));
                }
                was_connected = connected;
            }
        }
    }
}

async fn read_back(broker: NatsBroker, ids: Arc<Vec<String>>, progress: Arc<Mutex<Progress>>) {
    use jetq::broker::Broker;
    let unseen: Vec<String> = {
        let p = progress.lock().unwrap();
        ids.iter()
            .filter(|id| !p.terminal_at.contains_key(*id))
            .cloned()
            .collect()
    };
    futures_util::stream::iter(unseen)
        .for_each_concurrent(32, |id| {
            let broker = broker.clone();
            let progress = Arc::clone(&progress);
            async move {
                if let Ok(Some(entry)) = broker.get_record(&id).await {
                    if let Ok(head) = serde_json::from_slice::<RecordHead>(&entry.value) {
                        if head.status.is_terminal() {
                            progress.lock().unwrap().note(&head.id, entry.revision);
                        }
                    }
                }
            }
        })
        .await;
}

fn seen_terminal(progress: &Mutex<Progress>) -> usize {
    progress.lock().unwrap().terminal_at.len()
}

// ---------------------------------------------------------------------------
// The audit trail

const AUDIT_STREAM: &str = "SOAK_AUDIT";
const AUDIT_SUBJECT: &str = "soak.audit";

#[derive(Debug, Clone, Deserialize)]
struct AuditEntry {
    id: String,
    attempt: u32,
    worker: String,
    exec: String,
    phase: String,
    at_ms: i64,
    #[serde(default)]
    detail: Value,
}

/// One execution of a handler, from its audit entries.
#[derive(Debug, Clone, Default)]
struct Exec {
    id: String,
    exec: String,
    attempt: u32,
    worker: String,
    started: bool,
    /// `success`, `fail` or `panic`, if it ended.
    end: Option<String>,
    detail: Value,
    start_ms: i64,
    end_ms: Option<i64>,
}

async fn read_audit(js: &jetstream::Context) -> (Vec<AuditEntry>, u64) {
    let stream = js.get_stream(AUDIT_STREAM).await.unwrap();
    let total = stream.get_info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut entries = Vec::with_capacity(total as usize);
    let mut undecodable = 0u64;
    while (entries.len() as u64 + undecodable) < total {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("reading the audit stream stalled")
            .expect("the audit stream ended")
            .unwrap();
        match serde_json::from_slice::<AuditEntry>(&message.payload) {
            Ok(e) => entries.push(e),
            Err(_) => undecodable += 1,
        }
    }
    (entries, undecodable)
}

// ---------------------------------------------------------------------------
// Publishing

struct Published {
    /// Publish calls that failed and were retried (same id).
    retries: u64,
    elapsed: Duration,
}

async fn publish_all(
    client: &Client,
    plans: &[Planned],
    concurrency: usize,
    marks: &hostile::Published,
) -> Published {
    let started = Instant::now();
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    futures_util::stream::iter(plans.iter().enumerate())
        .map(|(i, p)| {
            let retries = Arc::clone(&retries);
            async move {
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let mut builder = client.task(p.kind.task()).id(&p.id).args_json(p.args.clone());
                    if let Some(n) = p.max_retries {
                        builder = builder.max_retries(n);
                    }
                    match builder.publish().await {
                        Ok(_) => return marks.mark(i),
                        Err(e) if Instant::now() < deadline => {
                            let earlier =
                                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if earlier < 3 {
                                eprintln!("publish of {} failed (retrying; only the first 3 are shown): {e}", p.id);
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("cannot publish {} for 120 s: {e}", p.id),
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect::<()>()
        .await;
    marks.finish();
    Published {
        retries: retries.load(std::sync::atomic::Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

// ---------------------------------------------------------------------------
// Chaos: kills and restarts at random points of progress

#[derive(Debug, Clone, Copy)]
enum Chaos {
    Kill,
    Restart,
}

struct ChaosLog {
    kills: Vec<KillEvent>,
    restarts: Vec<RestartEvent>,
    pending: Vec<(f64, Chaos)>,
}

/// Fires every event when the share of requests seen terminal reaches its
/// point (plus up to 200 ms), until all fired or `done` is cancelled. A
/// restart runs in the background, so kills go on while the server is down.
#[allow(clippy::too_many_arguments)]
async fn run_chaos(
    mut schedule: Vec<(f64, Chaos)>,
    server: NatsServer,
    mut fleet: Fleet,
    mut rng: fastrand::Rng,
    progress: Arc<Mutex<Progress>>,
    total: usize,
    t0: Instant,
    cfg: Config,
    done: tokio_util::sync::CancellationToken,
) -> (NatsServer, Fleet, ChaosLog) {
    type Restarting = tokio::task::JoinHandle<(NatsServer, RestartEvent)>;
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));
    schedule.reverse();
    let mut log = ChaosLog {
        kills: Vec::new(),
        restarts: Vec::new(),
        pending: Vec::new(),
    };
    let mut server = Some(server);
    let mut restarting: Option<Restarting> = None;
    while let Some(&(point, what)) = schedule.last() {
        let seen = seen_terminal(&progress);
        if (seen as f64) < point * total as f64 {
            tokio::select! {
                _ = done.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
            }
        }
        schedule.pop();
        tokio::time::sleep(Duration::from_millis(rng.u64(0..200))).await;
        match what {
            Chaos::Kill => {
                let at = t0.elapsed();
                let worker = fleet.kill_one(&mut rng);
                let replacement = fleet.spawn();
                eprintln!(
                    "[{:7.2}s] SIGKILL {worker} at {seen}/{total} terminal; started {replacement}",
                    at.as_secs_f64()
                );
                log.kills.push(KillEvent {
                    at,
                    worker,
                    progress: seen,
                });
            }
            Chaos::Restart => {
                if let Some(r) = restarting.take() {
                    let (s, event) = r.await.unwrap();
                    server = Some(s);
                    log.restarts.push(event);
                }
                let mut s = server.take().expect("the server is not restarting");
                let (down, sigkill) = (cfg.down, cfg.server_sigkill);
                restarting = Some(tokio::task::spawn_blocking(move || {
                    let at = t0.elapsed();
                    eprintln!(
                        "[{:7.2}s] stopping nats-server ({}) at {seen}/{total} terminal",
                        at.as_secs_f64(),
                        if sigkill { "SIGKILL" } else { "SIGTERM" }
                    );
                    if sigkill {
                        s.kill();
                    } else {
                        s.stop();
                    }
                    std::thread::sleep(down);
                    s.restart();
                    let back_at = t0.elapsed();
                    eprintln!(
                        "[{:7.2}s] nats-server is back (down {:.2}s)",
                        back_at.as_secs_f64(),
                        (back_at - at).as_secs_f64()
                    );
                    let event = RestartEvent {
                        at,
                        back_at,
                        progress: seen,
                    };
                    (s, event)
                }));
            }
        }
    }
    if let Some(r) = restarting.take() {
        let (s, event) = r.await.unwrap();
        server = Some(s);
        log.restarts.push(event);
    }
    log.pending = schedule;
    (server.expect("the server is back"), fleet, log)
}

// ---------------------------------------------------------------------------
// The test

/// The soak as the project's issue asks for it: 10,000 requests by default
/// (`JETQ_SOAK_REQUESTS`), five SIGKILLs, one server restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with scripts/soak, or cargo test -p jetq-tests --test soak -- --ignored --nocapture"]
async fn soak() {
    run_soak(Config::from_env()).await;
}

/// The same chaos on a few hundred requests (a few seconds), in the default
/// test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_quick() {
    let mut cfg = Config::from_env();
    cfg.requests = QUICK_REQUESTS;
    run_soak(cfg).await;
}

async fn run_soak(cfg: Config) {
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let plans = plan(&cfg, &mut rng);
    let n = plans.len();
    let mut kinds: BTreeMap<Kind, usize> = BTreeMap::new();
    for p in &plans {
        *kinds.entry(p.kind).or_default() += 1;
    }
    eprintln!(
        "soak: {n} requests, {} workers x {} concurrency, {} kills, {} server restarts, seed {}",
        cfg.workers, cfg.concurrency, cfg.kills, cfg.restarts, cfg.seed
    );
    eprintln!("mix: {kinds:?}");
    let hostile_count = cfg.hostile_count(n);
    eprintln!(
        "hostile: {hostile_count} messages ({}% of the requests), seed {}",
        cfg.hostile_share, cfg.hostile_seed
    );

    let log_dir = match std::env::var_os("JETQ_SOAK_LOG_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).unwrap();
            LogDir::Kept(dir)
        }
        None => LogDir::Temp(
            tempfile::Builder::new()
                .prefix("jetq-soak-")
                .tempdir()
                .unwrap(),
        ),
    };

    let server = NatsServer::start();
    let url = server.url();
    let broker = NatsBroker::connect(&url).await.unwrap();
    let nats = broker.client().clone();
    let js = jetstream::new(nats.clone());
    js.create_stream(jetstream::stream::Config {
        name: AUDIT_STREAM.to_owned(),
        subjects: vec![format!("{AUDIT_SUBJECT}.>")],
        storage: jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();

    let progress = Arc::new(Mutex::new(Progress::default()));
    let ids: Arc<Vec<String>> = Arc::new(plans.iter().map(|p| p.id.clone()).collect());
    let forged: hostile::Forged = Arc::default();
    let follower = tokio::spawn(follow_records(
        broker.clone(),
        ids,
        Arc::clone(&progress),
        Arc::clone(&forged),
    ));
    let deliveries: Arc<Mutex<HashMap<u64, hostile::Deliveries>>> = Arc::default();
    let advisories = follow_advisories(&url, Arc::clone(&deliveries)).await;
    // Let the subscription reach the server before anything can finish.
    nats.flush().await.unwrap();

    let mut fleet = Fleet {
        url: url.clone(),
        log_dir: log_dir.path().to_owned(),
        cfg: cfg.clone(),
        started: 0,
        live: Vec::new(),
    };
    for _ in 0..cfg.workers {
        fleet.spawn();
    }

    let mut schedule: Vec<(f64, Chaos)> = (0..cfg.kills)
        .map(|_| (0.05 + rng.f64() * 0.70, Chaos::Kill))
        .collect();
    schedule.extend((0..cfg.restarts).map(|_| (0.25 + rng.f64() * 0.35, Chaos::Restart)));

    let client = Client::new(broker.clone());
    // Waiters on a few honest requests from before they are published; the
    // hostile publisher forges a `succeeded` notification for each first
    // thing. None may believe it: each must return the stored record.
    let waiter_ids: Vec<String> = if hostile_count == 0 {
        Vec::new()
    } else {
        plans
            .iter()
            .filter(|p| p.kind == Kind::Fail && p.args["times"].as_u64() >= Some(2))
            .chain(plans.iter().filter(|p| p.kind == Kind::Sleep))
            .take(WAITERS)
            .map(|p| p.id.clone())
            .collect()
    };
    let waiters: Vec<(String, tokio::task::JoinHandle<jetq::Result<Record>>)> = waiter_ids
        .iter()
        .map(|id| {
            let (client, id2, timeout) = (client.clone(), id.clone(), cfg.timeout);
            let waiting = tokio::spawn(async move { client.wait(&id2, timeout).await });
            (id.clone(), waiting)
        })
        .collect();
    let plans_shared = Arc::new(plans.clone());
    let marks = Arc::new(hostile::Published::new(n));
    let hostile_task = tokio::spawn(hostile::run(hostile::Hostile {
        url: url.clone(),
        seed: cfg.hostile_seed,
        count: hostile_count,
        plans: Arc::clone(&plans_shared),
        published: Arc::clone(&marks),
        forged: Arc::clone(&forged),
        waiters: waiter_ids.clone(),
    }));
    let t0 = Instant::now();
    let t0_utc = jetq::time::OffsetDateTime::now_utc();
    let done = tokio_util::sync::CancellationToken::new();
    let chaos = tokio::spawn(run_chaos(
        schedule,
        server,
        fleet,
        fastrand::Rng::with_seed(cfg.seed ^ 0x5eed),
        Arc::clone(&progress),
        n,
        t0,
        cfg.clone(),
        done.clone(),
    ));

    let published = publish_all(&client, &plans, cfg.publish_concurrency, &marks).await;
    eprintln!(
        "[{:7.2}s] published {n} requests in {:.2}s ({} publish retries)",
        t0.elapsed().as_secs_f64(),
        published.elapsed.as_secs_f64(),
        published.retries
    );
    let hostile_report = hostile_task.await.unwrap();
    eprintln!(
        "[{:7.2}s] hostile publisher done: {} messages in {:.2}s",
        t0.elapsed().as_secs_f64(),
        hostile_report.sent.len(),
        hostile_report.elapsed.as_secs_f64()
    );

    let deadline = t0 + cfg.timeout;
    let stall = Duration::from_secs(30);
    // Follow the records until the chaos schedule is done (every point is
    // below 1, so it completes once enough records are seen terminal); then
    // `Client::wait` takes over. A long stall, or the deadline, ends it too
    // (the schedule then reports what did not fire).
    while !chaos.is_finished() && Instant::now() < deadline {
        let last = progress.lock().unwrap().last_change.unwrap_or(t0);
        if last.elapsed() > stall {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unseen: Vec<String> = {
        let p = progress.lock().unwrap();
        plans
            .iter()
            .filter(|pl| !p.terminal_at.contains_key(&pl.id))
            .map(|pl| pl.id.clone())
            .collect()
    };
    let waited_for = unseen.len();
    let not_terminal: Vec<(String, String)> = futures_util::stream::iter(unseen)
        .map(|id| {
            let client = client.clone();
            async move {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(5));
                match client.wait(&id, left).await {
                    Ok(_) => None,
                    Err(e) => Some((id, e.to_string())),
                }
            }
        })
        .buffer_unordered(256)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    let all_terminal_at = t0.elapsed();
    done.cancel();
    let (server, fleet, chaos_log) = chaos.await.unwrap();
    eprintln!(
        "[{:7.2}s] waiting done ({waited_for} ids waited for individually, {} not terminal)",
        all_terminal_at.as_secs_f64(),
        not_terminal.len()
    );

    // Read every record back.
    let records: HashMap<String, Record> = futures_util::stream::iter(plans.iter())
        .map(|p| {
            let client = client.clone();
            async move { (p.id.clone(), client.record(&p.id).await) }
        })
        .buffer_unordered(128)
        .filter_map(|(id, r)| async move { r.ok().map(|r| (id, r)) })
        .collect()
        .await;

    // The hostile publisher's own requests end too (their records are
    // checked with the rest of what it sent, below).
    let hostile_waits = hostile::ids_to_wait_for(&hostile_report.sent);
    let hostile_not_terminal: Vec<(String, String)> = futures_util::stream::iter(hostile_waits)
        .map(|id| {
            let client = client.clone();
            async move {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(5));
                match client.wait(&id, left).await {
                    Ok(_) => None,
                    Err(e) => Some((id, e.to_string())),
                }
            }
        })
        .buffer_unordered(64)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    // The waiters returned the stored record, not a forged one.
    let mut waiter_problems = Vec::new();
    for (id, waiting) in waiters {
        let stored = records.get(&id);
        match waiting.await.unwrap() {
            Ok(r) if Some(&r) == stored => {}
            Ok(r) => waiter_problems.push(format!(
                "{id}: a waiter returned {} but the stored record is {}",
                serde_json::to_string(&r).unwrap_or_default(),
                stored.map_or("(none)".to_owned(), |r| serde_json::to_string(r)
                    .unwrap_or_default())
            )),
            Err(e) => waiter_problems.push(format!("{id}: a waiter failed: {e}")),
        }
    }

    // Nothing may stay in the task stream once every record is terminal
    // (a killed worker's unacknowledged message comes back after the ack wait
    // and is dropped as a duplicate).
    let drain_started = Instant::now();
    let mut tasks_left = u64::MAX;
    let mut ack_pending = 0usize;
    while drain_started.elapsed() < Duration::from_secs(30) {
        let mut stream = js.get_stream("JETQ_TASKS").await.unwrap();
        tasks_left = stream.info().await.unwrap().state.messages;
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("jetq-default").await.unwrap();
        let info = consumer.info().await.unwrap();
        ack_pending = info.num_ack_pending;
        if tasks_left == 0 && ack_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_after = drain_started.elapsed();
    // What is left, if anything: enough to tell a message the consumer
    // still owes from one it counts as acknowledged.
    let mut leftover = String::new();
    // Every message left lies at or below the consumer's acknowledgement
    // floor, and the consumer owes nothing: acknowledged, yet not removed
    // from the work queue. nats-server can leave such a message behind when
    // it is stopped as the acknowledgement arrives (its consumer state keeps
    // the acknowledgement, the stream not the removal); it is never
    // delivered again.
    let mut stranded_below_floor = false;
    if tasks_left != 0 || ack_pending != 0 {
        let mut stream = js.get_stream("JETQ_TASKS").await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("jetq-default").await.unwrap();
        let c = consumer.info().await.unwrap().clone();
        stranded_below_floor = c.num_ack_pending == 0
            && c.num_pending == 0
            && state.last_sequence <= c.ack_floor.stream_sequence;
        let _ = write!(
            leftover,
            "stream first {} last {}; consumer delivered {} ack floor {} pending {} redelivered {} waiting {}",
            state.first_sequence,
            state.last_sequence,
            c.delivered.stream_sequence,
            c.ack_floor.stream_sequence,
            c.num_pending,
            c.num_redelivered,
            c.num_waiting
        );
        let mut seq = state.first_sequence;
        let mut shown = 0;
        while shown < 5 && seq <= state.last_sequence {
            if let Ok(m) = stream.get_raw_message(seq).await {
                let key = m
                    .headers
                    .get("Nats-Msg-Id")
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let body = String::from_utf8_lossy(&m.payload);
                let _ = write!(
                    leftover,
                    "; seq {seq} on {} key {key:?}: {}",
                    m.subject,
                    body.chars().take(200).collect::<String>()
                );
                shown += 1;
            }
            seq += 1;
        }
    }
    let kv_keys = js
        .get_stream("KV_JETQ_RESULTS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages;
    // Every key of the bucket, and every dead letter (oldest first).
    let kv = js.get_key_value("JETQ_RESULTS").await.unwrap();
    let keys: HashSet<String> = kv.keys().await.unwrap().map(|k| k.unwrap()).collect().await;
    let mut letters: HashMap<String, Vec<jetq::DeadLetter>> = HashMap::new();
    for letter in client.dead_letters(usize::MAX).await.unwrap() {
        letters.entry(letter.id.clone()).or_default().push(letter);
    }

    // Stop the workers gracefully: an execution still running (one whose
    // delivery another worker took over) finishes and writes its audit entry.
    let mut fleet = fleet;
    let stop_started = Instant::now();
    let stop_trouble = tokio::task::spawn_blocking(move || {
        let trouble = fleet.stop_all(Duration::from_secs(60));
        (fleet, trouble)
    })
    .await
    .unwrap();
    let (fleet, stop_trouble) = stop_trouble;
    let stopped_in = stop_started.elapsed();

    let (entries, undecodable) = read_audit(&js).await;
    follower.abort();
    advisories.abort();
    let worker_errors = count_log_lines(log_dir.path(), " ERROR ");
    let worker_warnings = count_log_lines(log_dir.path(), " WARN ");
    let panics = count_panics(log_dir.path());

    // Handler runs of the hostile publisher's own requests are checked with
    // them; the honest trail is checked as before.
    let (hostile_entries, entries): (Vec<AuditEntry>, Vec<AuditEntry>) = entries
        .into_iter()
        .partition(|e| e.id.starts_with(hostile::PREFIX));
    let mut hostile_runs: HashMap<String, Vec<hostile::Run>> = HashMap::new();
    let mut ended: HashMap<&str, Option<String>> = HashMap::new();
    for e in &hostile_entries {
        let end = ended.entry(e.exec.as_str()).or_default();
        if e.phase != "start" {
            *end = Some(e.phase.clone());
        }
    }
    for e in hostile_entries.iter().filter(|e| e.phase == "start") {
        hostile_runs
            .entry(e.id.clone())
            .or_default()
            .push(hostile::Run {
                attempt: e.attempt,
                end: ended.get(e.exec.as_str()).cloned().flatten(),
            });
    }

    let verdict = verify(
        &plans,
        &records,
        &entries,
        &chaos_log,
        &progress.lock().unwrap(),
        (t0_utc.unix_timestamp_nanos() / 1_000_000) as i64,
    );
    let latest_letters: HashMap<String, jetq::DeadLetter> = letters
        .iter()
        .filter_map(|(k, v)| v.last().map(|l| (k.clone(), l.clone())))
        .collect();
    let deliveries = deliveries.lock().unwrap().clone();
    let findings = hostile::verify(
        &hostile_report.sent,
        &kv,
        &latest_letters,
        &deliveries,
        &hostile_runs,
        WORKER_MAX_RETRIES,
    )
    .await;
    let honest_letters = check_honest_letters(&plans, &records, &letters);
    let mut delivery_problems = Vec::new();
    let most_deliveries = deliveries.values().map(|d| d.most()).max().unwrap_or(0);
    let bound = jetq::worker::delivery_budget(WORKER_MAX_RETRIES) + 1;
    for (seq, d) in &deliveries {
        if d.most() > bound {
            delivery_problems.push(format!(
                "task-stream message {seq} was delivered {} times, more than any request may be ({bound}): {d:?}",
                d.most()
            ));
        }
    }
    // The bucket holds a key per honest request and per hostile id that
    // must have a record; no other (no message wrote a record it does not own).
    let mut expected_keys: HashSet<String> = plans.iter().map(|p| p.id.clone()).collect();
    expected_keys.extend(hostile::expected_keys(&hostile_report.sent));
    let mut missing: Vec<&String> = expected_keys.difference(&keys).collect();
    let mut stray: Vec<&String> = keys.difference(&expected_keys).collect();
    missing.sort();
    stray.sort();

    // ----- Figures
    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "\n===== jetq soak: figures =====").unwrap();
    writeln!(
        w,
        "requests {n} (seed {}); workers {} x concurrency {}; ack wait {}s; retry backoff 50-500 ms",
        cfg.seed, cfg.workers, cfg.concurrency, cfg.ack_wait_secs
    )
    .unwrap();
    writeln!(w, "mix: {}", fmt_counts(&kinds)).unwrap();
    let last_finish = records
        .values()
        .filter_map(|r| r.finished_at)
        .max()
        .map(|t| (t - t0_utc).as_seconds_f64())
        .unwrap_or(f64::NAN);
    writeln!(
        w,
        "publish: {n} in {:.2}s = {:.0}/s, {} publish calls retried",
        published.elapsed.as_secs_f64(),
        n as f64 / published.elapsed.as_secs_f64(),
        published.retries
    )
    .unwrap();
    writeln!(
        w,
        "wall: last record finished at {last_finish:.2}s = {:.0} requests/s, {:.0} executions/s; waiting ended at {:.2}s",
        n as f64 / last_finish,
        verdict.execs as f64 / last_finish,
        all_terminal_at.as_secs_f64()
    )
    .unwrap();
    writeln!(w, "outcomes: {}", fmt_counts(&verdict.outcomes)).unwrap();
    writeln!(
        w,
        "attempts per request (record.attempts): {}",
        fmt_counts(&verdict.attempts_hist)
    )
    .unwrap();
    writeln!(
        w,
        "executions (audited handler runs): {} = {} success + {} fail + {} panic + {} cut short by a SIGKILL",
        verdict.execs, verdict.exec_success, verdict.exec_fail, verdict.exec_panic, verdict.exec_cut
    )
    .unwrap();
    writeln!(
        w,
        "claims that ran no handler: {} invalid arguments, {} claims that gave up, {} where the worker died or lost the server between claim and handler",
        verdict.claims_invalid_args, verdict.claims_gave_up, verdict.claims_lost
    )
    .unwrap();
    writeln!(
        w,
        "re-executions: {} successes that were not the final attempt (ran again: {} by a killed worker, {} by a live worker whose delivery was taken over)",
        verdict.superseded_success,
        verdict.superseded_success_killed,
        verdict.superseded_success - verdict.superseded_success_killed
    )
    .unwrap();
    for k in &chaos_log.kills {
        let cut = verdict.cut_by_worker.get(&k.worker).copied().unwrap_or(0);
        writeln!(
            w,
            "kill: {} at {:.2}s ({} of {n} terminal): {cut} executions cut short, redelivered",
            k.worker,
            k.at.as_secs_f64(),
            k.progress
        )
        .unwrap();
    }
    // Completion times (the records' `finished_at`), in seconds since the start.
    let mut finished: Vec<f64> = records
        .values()
        .filter_map(|r| r.finished_at)
        .map(|t| (t - t0_utc).as_seconds_f64())
        .collect();
    finished.sort_by(f64::total_cmp);
    let in_window =
        |from: f64, to: f64| finished.iter().filter(|t| **t >= from && **t < to).count();
    for r in &chaos_log.restarts {
        let (at, back) = (r.at.as_secs_f64(), r.back_at.as_secs_f64());
        let first = finished.iter().find(|t| **t >= back).map(|t| t - back);
        let before = at.min(3.0);
        writeln!(
            w,
            "server restart at {at:.2}s ({} of {n} terminal), down {:.2}s (stop, {:.1}s pause, start until ready); first record finished {} after it was back; completions/s: {:.0} in the {before:.0} s before the stop, {:.0} in the 3 s after it was back",
            r.progress,
            back - at,
            cfg.down.as_secs_f64(),
            first.map_or("never".to_owned(), |s| format!("{s:.2}s")),
            in_window(at - before, at) as f64 / before.max(0.001),
            in_window(back, back + 3.0) as f64 / 3.0,
        )
        .unwrap();
    }
    let seconds = finished.last().map_or(0, |t| t.ceil() as usize);
    let timeline: Vec<String> = (0..seconds)
        .map(|s| in_window(s as f64, s as f64 + 1.0).to_string())
        .collect();
    writeln!(w, "completions per second: {}", timeline.join(" ")).unwrap();
    writeln!(
        w,
        "task stream after the run: {tasks_left} messages, {ack_pending} unacknowledged (drained {:.1}s after the last record); record bucket keys: {kv_keys}",
        drained_after.as_secs_f64()
    )
    .unwrap();
    writeln!(
        w,
        "graceful stop of the {} remaining workers (SIGTERM) took {:.2}s",
        cfg.workers,
        stopped_in.as_secs_f64()
    )
    .unwrap();
    writeln!(
        w,
        "terminal records seen while running (subscription, read-back after reconnecting): {} of {n}; ids with more than one terminal write seen: {}",
        verdict.terminal_seen, verdict.multi_terminal
    )
    .unwrap();
    writeln!(
        w,
        "audit: {} entries ({undecodable} undecodable, {} duplicate entries); worker logs: {worker_errors} ERROR and {worker_warnings} WARN lines; workers started {}",
        entries.len(),
        verdict.duplicate_entries,
        fleet.started
    )
    .unwrap();
    writeln!(
        w,
        "worker panics: {} on purpose (demo.panic, soak.flaky), {} others",
        panics.deliberate,
        panics.other.len()
    )
    .unwrap();
    writeln!(
        w,
        "deliveries (from the consumer's advisories): at most {most_deliveries} for any message; {} messages terminated, {} negative acknowledgements",
        deliveries.values().filter(|d| d.terminated.is_some()).count(),
        deliveries.values().map(|d| d.naks).sum::<u64>()
    )
    .unwrap();
    let hostile_sent = &hostile_report.sent;
    let mut by_attack: BTreeMap<String, usize> = BTreeMap::new();
    for x in hostile_sent {
        *by_attack.entry(format!("{:?}", x.attack)).or_default() += 1;
    }
    writeln!(
        w,
        "hostile: {} messages ({}% of the requests, seed {}) sent in {:.2}s: {}",
        hostile_sent.len(),
        cfg.hostile_share,
        cfg.hostile_seed,
        hostile_report.elapsed.as_secs_f64(),
        by_attack
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    writeln!(
        w,
        "hostile endings: {}",
        findings
            .endings
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ")
    )
    .unwrap();
    writeln!(
        w,
        "hostile: most deliveries of one message {} ({}); {} copies stored twice by a retried publish; {} of {} forged notifications reached a request not finished yet; {} waiters of honest requests, {} of them wrong",
        findings.max_deliveries,
        if findings.max_deliveries_of.is_empty() { "-" } else { &findings.max_deliveries_of },
        findings.extra_copies,
        hostile_report.forged_early,
        hostile_sent.iter().filter(|x| x.attack == hostile::Attack::ForgedNotice).count(),
        waiter_ids.len(),
        waiter_problems.len()
    )
    .unwrap();
    writeln!(
        w,
        "record bucket: {} keys = {n} honest + {} hostile ids with a record ({} missing, {} stray); dead letters: {} ids",
        keys.len(),
        expected_keys.len() - n,
        missing.len(),
        stray.len(),
        letters.len()
    )
    .unwrap();
    for note in verdict.notable.iter().chain(&honest_letters.notes).take(20) {
        writeln!(w, "note: {note}").unwrap();
    }
    print!("{out}");

    // ----- Verdict
    let mut problems = verdict.problems;
    for (id, e) in &not_terminal {
        problems.push(format!("{id}: not terminal at the deadline: {e}"));
    }
    for t in &stop_trouble {
        problems.push(format!("graceful stop at the end: {t}"));
    }
    for id in &missing {
        problems.push(format!("{id}: no record in the bucket"));
    }
    for id in &stray {
        problems.push(format!(
            "{id}: a record in the bucket that no message may write"
        ));
    }
    problems.extend(honest_letters.problems);
    problems.extend(findings.problems);
    problems.extend(delivery_problems);
    problems.extend(waiter_problems);
    for (id, e) in &hostile_not_terminal {
        problems.push(format!("{id} (hostile): not terminal at the deadline: {e}"));
    }
    for p in &panics.other {
        problems.push(format!(
            "a worker panicked outside a task that panics on purpose: {p}"
        ));
    }
    if tasks_left != 0 && stranded_below_floor && !chaos_log.restarts.is_empty() {
        // Not jetq's to fix: the request ended and its message was
        // acknowledged; the server, restarted, kept the message.
        println!(
            "note: {tasks_left} acknowledged messages stranded in the task stream by the server's restart (at or below the consumer's acknowledgement floor, never delivered again): {leftover}"
        );
    } else if tasks_left != 0 || ack_pending != 0 {
        problems.push(format!(
            "the task stream still holds {tasks_left} messages ({ack_pending} unacknowledged) 30 s after every record was terminal: {leftover}"
        ));
    }
    if chaos_log.kills.len() != cfg.kills || chaos_log.restarts.len() != cfg.restarts {
        problems.push(format!(
            "the chaos schedule did not complete: {} of {} kills, {} of {} restarts (not fired: {:?})",
            chaos_log.kills.len(),
            cfg.kills,
            chaos_log.restarts.len(),
            cfg.restarts,
            chaos_log.pending
        ));
    }
    drop(fleet);
    drop(server);
    if problems.is_empty() {
        println!("===== soak passed: every request has exactly one terminal record, none lost, no final attempt ran twice =====");
        return;
    }
    let kept = log_dir.keep();
    let mut report = format!(
        "soak failed with {} problems (seed {}; worker logs in {}):\n",
        problems.len(),
        cfg.seed,
        kept.display()
    );
    for p in problems.iter().take(40) {
        report.push_str("  - ");
        report.push_str(p);
        report.push('\n');
    }
    if problems.len() > 40 {
        let _ = writeln!(report, "  ... and {} more", problems.len() - 40);
    }
    panic!("{report}");
}

enum LogDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl LogDir {
    fn path(&self) -> &Path {
        match self {
            LogDir::Temp(t) => t.path(),
            LogDir::Kept(p) => p,
        }
    }

    fn keep(self) -> PathBuf {
        match self {
            LogDir::Temp(t) => t.keep(),
            LogDir::Kept(p) => p,
        }
    }
}

fn count_log_lines(dir: &Path, needle: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .map(|text| text.lines().filter(|l| l.contains(needle)).count())
                .sum()
        })
        .unwrap_or(0)
}

fn fmt_counts<K: std::fmt::Debug>(counts: &BTreeMap<K, usize>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k:?}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Verification

#[derive(Default)]
struct Verdict {
    problems: Vec<String>,
    outcomes: BTreeMap<String, usize>,
    attempts_hist: BTreeMap<u32, usize>,
    execs: usize,
    exec_success: usize,
    exec_fail: usize,
    exec_panic: usize,
    exec_cut: usize,
    cut_by_worker: HashMap<String, usize>,
    /// Claims (attempts counted in a record) that ran no handler: the
    /// arguments did not decode; the extra claim that gives up; the worker
    /// died or lost the server between its claim and the handler's start.
    claims_invalid_args: usize,
    claims_gave_up: usize,
    claims_lost: usize,
    superseded_success: usize,
    superseded_success_killed: usize,
    duplicate_entries: usize,
    terminal_seen: usize,
    multi_terminal: usize,
    /// Explained but unusual histories, shown with the figures.
    notable: Vec<String>,
}

fn verify(
    plans: &[Planned],
    records: &HashMap<String, Record>,
    entries: &[AuditEntry],
    chaos: &ChaosLog,
    progress: &Progress,
    t0_ms: i64,
) -> Verdict {
    let mut v = Verdict::default();
    let killed: HashSet<&str> = chaos.kills.iter().map(|k| k.worker.as_str()).collect();

    // Executions from the audit entries.
    let mut execs: HashMap<String, Exec> = HashMap::new();
    let mut seen_entries: HashSet<(String, String)> = HashSet::new();
    for e in entries {
        if !seen_entries.insert((e.exec.clone(), e.phase.clone())) {
            v.duplicate_entries += 1;
            continue;
        }
        let x = execs.entry(e.exec.clone()).or_insert_with(|| Exec {
            id: e.id.clone(),
            exec: e.exec.clone(),
            attempt: e.attempt,
            worker: e.worker.clone(),
            ..Default::default()
        });
        if e.phase == "start" {
            x.started = true;
            x.start_ms = e.at_ms;
        } else {
            x.end = Some(e.phase.clone());
            x.end_ms = Some(e.at_ms);
            x.detail = e.detail.clone();
        }
    }
    let mut by_id: HashMap<&str, Vec<&Exec>> = HashMap::new();
    let mut bad_execs: HashMap<&str, Vec<String>> = HashMap::new();
    for x in execs.values() {
        by_id.entry(x.id.as_str()).or_default().push(x);
        v.execs += 1;
        match x.end.as_deref() {
            Some("success") => v.exec_success += 1,
            Some("fail") => v.exec_fail += 1,
            Some("panic") => v.exec_panic += 1,
            _ => {
                v.exec_cut += 1;
                *v.cut_by_worker.entry(x.worker.clone()).or_default() += 1;
            }
        }
        if !x.started {
            bad_execs.entry(x.id.as_str()).or_default().push(format!(
                "execution {} (attempt {}) on {} has an end entry but no start entry",
                x.exec, x.attempt, x.worker
            ));
        }
        if x.end.is_none() && !killed.contains(x.worker.as_str()) {
            bad_execs.entry(x.id.as_str()).or_default().push(format!(
                "execution {} (attempt {}) on {} never ended, yet that worker was not killed (it was stopped gracefully at the end)",
                x.exec, x.attempt, x.worker
            ));
        }
    }
    let planned: HashSet<&str> = plans.iter().map(|p| p.id.as_str()).collect();
    for id in by_id.keys() {
        if !planned.contains(id) {
            v.problems.push(format!(
                "{id}: audit entries for an id that was never published"
            ));
        }
    }

    for p in plans {
        let id = p.id.as_str();
        let mut mine: Vec<&Exec> = by_id.get(id).cloned().unwrap_or_default();
        mine.sort_by_key(|x| (x.attempt, x.start_ms));
        let trail = || {
            mine.iter()
                .map(|x| {
                    let at = |ms: i64| format!("{:.2}s", (ms - t0_ms) as f64 / 1000.0);
                    format!(
                        "attempt {} on {} {}..{} -> {}",
                        x.attempt,
                        x.worker,
                        at(x.start_ms),
                        x.end_ms.map_or("?".to_owned(), at),
                        x.end.as_deref().unwrap_or("(no end)")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let Some(r) = records.get(id) else {
            for why in bad_execs.get(id).into_iter().flatten() {
                v.problems.push(format!("{id}: {why}"));
            }
            v.problems
                .push(format!("{id}: no record (lost); audit: [{}]", trail()));
            continue;
        };
        let show = || serde_json::to_string(r).unwrap_or_default();
        for why in bad_execs.get(id).into_iter().flatten() {
            v.problems
                .push(format!("{id}: {why}: {}; audit: [{}]", show(), trail()));
        }
        *v.attempts_hist.entry(r.attempts).or_default() += 1;
        let outcome = match (&r.status, &r.error) {
            (Status::Failed, Some(e)) if e.message.starts_with("gave up") => {
                "failed (gave up)".to_owned()
            }
            (Status::Failed, Some(e)) => format!("failed ({})", e.kind),
            (s, _) => s.to_string(),
        };
        *v.outcomes
            .entry(format!("{:?} {outcome}", p.kind))
            .or_default() += 1;
        if !r.status.is_terminal() {
            v.problems.push(format!(
                "{id}: record is not terminal: {}; audit: [{}]",
                show(),
                trail()
            ));
            continue;
        }

        // No attempt executed twice.
        let mut per_attempt: BTreeMap<u32, usize> = BTreeMap::new();
        for x in &mine {
            *per_attempt.entry(x.attempt).or_default() += 1;
            if x.attempt > r.attempts || x.attempt == 0 {
                v.problems.push(format!(
                    "{id}: an execution of attempt {} but the record says {} attempts: {}; audit: [{}]",
                    x.attempt,
                    r.attempts,
                    show(),
                    trail()
                ));
            }
        }
        for (attempt, count) in &per_attempt {
            if *count > 1 {
                v.problems.push(format!(
                    "{id}: attempt {attempt} was executed {count} times: {}; audit: [{}]",
                    show(),
                    trail()
                ));
            }
        }
        let gave_up = r
            .error
            .as_ref()
            .is_some_and(|e| e.message.starts_with("gave up"));
        let executed: HashSet<u32> = mine.iter().map(|x| x.attempt).collect();
        for a in (1..=r.attempts).filter(|a| !executed.contains(a)) {
            if p.kind == Kind::BadArgs {
                v.claims_invalid_args += 1;
            } else if gave_up && a == r.attempts {
                v.claims_gave_up += 1;
            } else {
                v.claims_lost += 1;
            }
        }
        for x in mine
            .iter()
            .filter(|x| x.end.as_deref() == Some("success") && x.attempt != r.attempts)
        {
            v.superseded_success += 1;
            if killed.contains(x.worker.as_str()) {
                v.superseded_success_killed += 1;
            } else {
                v.notable.push(format!(
                    "{id}: attempt {} succeeded on live worker {} but did not count: {}; audit: [{}]",
                    x.attempt,
                    x.worker,
                    show(),
                    trail()
                ));
            }
        }
        let finals: Vec<&&Exec> = mine.iter().filter(|x| x.attempt == r.attempts).collect();

        match r.status {
            Status::Succeeded => {
                let successes: Vec<&&Exec> = finals
                    .iter()
                    .copied()
                    .filter(|x| x.end.as_deref() == Some("success"))
                    .collect();
                if successes.len() != 1 || finals.len() != 1 {
                    v.problems.push(format!(
                        "{id}: succeeded at attempt {} but the audit has {} executions of that attempt ({} successes): {}; audit: [{}]",
                        r.attempts,
                        finals.len(),
                        successes.len(),
                        show(),
                        trail()
                    ));
                    continue;
                }
                let x = successes[0];
                if r.worker.as_deref() != Some(x.worker.as_str()) {
                    v.problems.push(format!(
                        "{id}: the record names worker {:?} but attempt {} succeeded on {}: {}",
                        r.worker,
                        r.attempts,
                        x.worker,
                        show()
                    ));
                }
                let value = r.value.clone().unwrap_or(Value::Null);
                let expected = match p.kind {
                    Kind::Add => Some(json!(
                        p.args["a"].as_i64().unwrap() + p.args["b"].as_i64().unwrap()
                    )),
                    Kind::Sleep => Some(p.args["ms"].clone()),
                    Kind::Fail => {
                        let times = p.args["times"].as_u64().unwrap() as u32;
                        if r.attempts <= times {
                            v.problems.push(format!(
                                "{id}: demo.fail {{times: {times}}} succeeded at attempt {}: {}",
                                r.attempts,
                                show()
                            ));
                        }
                        Some(json!(r.attempts))
                    }
                    Kind::Flaky => {
                        Some(json!({"attempt": r.attempts, "worker": x.worker, "exec": x.exec}))
                    }
                    Kind::Panic | Kind::BadArgs => {
                        v.problems.push(format!(
                            "{id}: {:?} cannot succeed, yet it did: {}",
                            p.kind,
                            show()
                        ));
                        None
                    }
                };
                if let Some(expected) = expected {
                    if value != expected || x.detail != expected {
                        v.problems.push(format!(
                            "{id}: value {value} (audited {}) but expected {expected}: {}",
                            x.detail,
                            show()
                        ));
                    }
                }
            }
            Status::Failed => {
                let err = r.error.clone().unwrap_or(jetq::ErrorInfo {
                    kind: "(none)".into(),
                    message: String::new(),
                });
                let max_attempts = r.max_retries + 1;
                if gave_up {
                    v.notable
                        .push(format!("{id} gave up: {}; audit: [{}]", show(), trail()));
                    // Every allowed attempt was claimed, and the delivery came
                    // back once more: the last worker died (or its delivery
                    // was taken over); the extra claim runs nothing.
                    if r.attempts != max_attempts + 1 {
                        v.problems.push(format!(
                            "{id}: gave up after {} attempts, but {max_attempts} were allowed: {}; audit: [{}]",
                            r.attempts,
                            show(),
                            trail()
                        ));
                    }
                    if !finals.is_empty() {
                        v.problems.push(format!(
                            "{id}: gave up at attempt {}, yet that attempt ran: {}; audit: [{}]",
                            r.attempts,
                            show(),
                            trail()
                        ));
                    }
                    continue;
                }
                match p.kind {
                    Kind::BadArgs => {
                        if err.kind != "invalid_args" || !mine.is_empty() {
                            v.problems.push(format!(
                                "{id}: expected a failure of kind invalid_args without any execution: {}; audit: [{}]",
                                show(),
                                trail()
                            ));
                        }
                    }
                    Kind::Panic | Kind::Flaky => {
                        let want = if err.kind == "panic" { "panic" } else { "fail" };
                        let ok_kind = err.kind == "panic" || err.kind == "error";
                        let ok_final = finals.len() == 1
                            && finals[0].end.as_deref() == Some(want)
                            && r.worker.as_deref() == Some(finals[0].worker.as_str());
                        let ok_attempts = r.attempts == max_attempts
                            && (p.kind == Kind::Flaky || err.kind == "panic");
                        if !(ok_kind && ok_final && ok_attempts) {
                            v.problems.push(format!(
                                "{id}: expected a failure after {max_attempts} attempts whose last one ended `{want}` once: {}; audit: [{}]",
                                show(),
                                trail()
                            ));
                        }
                    }
                    Kind::Add | Kind::Sleep | Kind::Fail => {
                        v.problems.push(format!(
                            "{id}: {:?} should have succeeded: {}; audit: [{}]",
                            p.kind,
                            show(),
                            trail()
                        ));
                    }
                }
            }
            _ => v
                .problems
                .push(format!("{id}: unexpected terminal status: {}", show())),
        }
    }

    v.terminal_seen = progress.terminal_at.len();
    for (id, revisions) in &progress.terminal_revisions {
        if revisions.len() > 1 {
            v.multi_terminal += 1;
            v.problems.push(format!(
                "{id}: {} distinct terminal writes were seen (revisions {revisions:?}); a terminal record must never change",
                revisions.len()
            ));
        }
    }
    v
}

/// Follow the queue consumer's advisories (terminated and negatively
/// acknowledged messages, with their delivery counts) into `out`, by task
/// stream sequence. Returns once the subscription is registered.
async fn follow_advisories(
    url: &str,
    out: Arc<Mutex<HashMap<u64, hostile::Deliveries>>>,
) -> tokio::task::JoinHandle<()> {
    let nats = async_nats::connect(url).await.unwrap();
    let mut sub = nats
        .subscribe("$JS.EVENT.ADVISORY.CONSUMER.*.JETQ_TASKS.jetq-default")
        .await
        .unwrap();
    nats.flush().await.unwrap();
    tokio::spawn(async move {
        let _keep = nats;
        while let Some(message) = sub.next().await {
            let Ok(v) = serde_json::from_slice::<Value>(&message.payload) else {
                continue;
            };
            let (Some(seq), Some(delivered)) = (v["stream_seq"].as_u64(), v["deliveries"].as_u64())
            else {
                continue;
            };
            let mut out = out.lock().unwrap();
            let d = out.entry(seq).or_default();
            let subject = message.subject.as_str();
            if subject.contains(".MSG_TERMINATED.") {
                d.terminated = Some(d.terminated.unwrap_or(0).max(delivered));
            } else if subject.contains(".MSG_NAKED.") {
                d.naks += 1;
                d.max_nak_delivery = d.max_nak_delivery.max(delivered);
            }
        }
    })
}

/// Panics in the worker logs: those of the tasks that panic on purpose,
/// and the others (each with its message), which must not happen.
struct Panics {
    deliberate: usize,
    other: Vec<String>,
}

fn count_panics(dir: &Path) -> Panics {
    let mut panics = Panics {
        deliberate: 0,
        other: Vec::new(),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return panics;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.contains(" panicked at ") {
                continue;
            }
            let message = lines.get(i + 1).copied().unwrap_or_default();
            if message.contains("panics on purpose") {
                panics.deliberate += 1;
            } else {
                panics.other.push(format!(
                    "{}: {line} {message}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    panics
}

/// What the dead letters under honest ids say.
struct HonestLetters {
    problems: Vec<String>,
    notes: Vec<String>,
}

/// Dead letters under honest ids: a failed request has one of its
/// record's kind; a refused message is never filed under the id it names
/// (those go to `invalid-<queue>-<sequence>`), so no letter under an
/// honest id has a kind only a refused message gets.
fn check_honest_letters(
    plans: &[Planned],
    records: &HashMap<String, Record>,
    letters: &HashMap<String, Vec<jetq::DeadLetter>>,
) -> HonestLetters {
    let mut out = HonestLetters {
        problems: Vec::new(),
        notes: Vec::new(),
    };
    for p in plans {
        let mine = letters.get(&p.id).map(Vec::as_slice).unwrap_or_default();
        for l in mine {
            if matches!(l.error.kind.as_str(), "invalid_request" | "id_conflict") {
                out.problems.push(format!(
                    "{}: a dead letter of a refused message under an honest id: {}: {}",
                    p.id, l.error.kind, l.error.message
                ));
            }
        }
        let Some(r) = records.get(&p.id) else {
            continue;
        };
        let kind = r.error.as_ref().map(|e| e.kind.as_str());
        match r.status {
            Status::Failed if !mine.iter().any(|l| Some(l.error.kind.as_str()) == kind) => {
                out.problems.push(format!(
                    "{}: failed ({kind:?}) without a dead letter of that kind (letters: {:?})",
                    p.id,
                    mine.iter().map(|l| &l.error.kind).collect::<Vec<_>>()
                ))
            }
            Status::Succeeded if !mine.is_empty() => out.notes.push(format!(
                "{}: succeeded, yet has dead letters (an attempt that failed after its delivery was taken over?): {:?}",
                p.id,
                mine.iter()
                    .map(|l| (&l.error.kind, l.attempts, l.sequence, &l.worker))
                    .collect::<Vec<_>>()
            )),
            _ => {}
        }
    }
    out
}
