//! The hostile publisher of the soak (`tests/tests/soak.rs`): a second
//! producer with plain async-nats on the same server that sends, while the
//! honest producer publishes, a seeded mix of messages no jetq client sends.
//! Every message is written down with how it must end; [`verify`] checks
//! that against the server once the run is over. The mix and the expected
//! endings are listed in the module documentation of `soak.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use jetq::{DeadLetter, Record, Status};
use serde_json::{json, Value};

use crate::Planned;

/// Every id the hostile publisher owns starts with this (honest ids start with `r`).
pub(crate) const PREFIX: &str = "x-";

/// What one hostile message tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Attack {
    /// Bytes that are not a request envelope, some naming an honest id.
    Junk,
    /// An honest request's envelope with `v` other than 1.
    BadVersion,
    /// An honest request's envelope whose queue or task is not its subject's.
    Misrouted,
    /// An honest request's envelope with a `Nats-Msg-Id` that is not its own.
    ForgedKey,
    /// A valid request of another task under an honest id that has a record.
    OtherTask,
    /// An honest request's envelope again, under a requeue key or none,
    /// once that request has a record.
    Replay,
    /// A message carrying an honest request's `Nats-Msg-Id`, after it was published.
    SquatKey,
    /// A fake record on `jetq.records.<honest id>` (core NATS).
    ForgedNotice,
    /// A request of its own due more than ten years ahead.
    FarFuture,
    /// A request of its own with `max_retries` at or beyond `u32::MAX`.
    HugeRetries,
    /// A request of its own with large or malformed metadata.
    Oversized,
    /// A record of its own written straight into the bucket, with or without a request.
    ForeignRecord,
}

/// Shares of the mix, in percent.
const MIX: [(Attack, u32); 12] = [
    (Attack::Junk, 10),
    (Attack::BadVersion, 8),
    (Attack::Misrouted, 8),
    (Attack::ForgedKey, 9),
    (Attack::OtherTask, 9),
    (Attack::Replay, 9),
    (Attack::SquatKey, 5),
    (Attack::ForgedNotice, 12),
    (Attack::FarFuture, 7),
    (Attack::HugeRetries, 7),
    (Attack::Oversized, 6),
    (Attack::ForeignRecord, 10),
];

/// Messages of nearly `max_payload` bytes sent at most, per kind (they are
/// slow to move around in a debug build).
const MAX_NEAR_LIMIT: usize = 4;

/// How a hostile message must end.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expect {
    /// A worker refuses it: dead letter `invalid-default-<seq>` of this
    /// kind, and no record is written for any id in it.
    Refused(&'static str),
    /// Another task's request under an honest id: dropped as a duplicate
    /// once that request was taken (refused, `id_conflict`, while its
    /// record is `pending`).
    Conflict,
    /// The honest request's own envelope again: dropped as a duplicate, or
    /// run as that very request (its outcome is checked with the honest ones).
    Duplicate,
    /// Its own request: the record ends with this status and error kind
    /// (and, when failed, a dead letter of that kind under its id).
    Ends {
        status: Status,
        kind: Option<&'static str>,
        value: Option<Value>,
        check: Check,
        ran: Ran,
    },
    /// Its own record stays exactly as written; the message is dropped.
    Untouched,
    /// Nothing reaches the task stream: refused at publish, dropped by the
    /// stream's deduplication, core NATS only, or a record write alone.
    Nothing,
}

/// How often the handler of an [`Expect::Ends`] request runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Ran {
    /// Never: the request fails before its task runs.
    Never,
    /// Its final attempt once, successfully.
    Once,
    /// No attempt twice (its outcome is found not to fit afterwards).
    AtMostOnce,
}

/// A further check on the record of an [`Expect::Ends`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Check {
    None,
    /// `max_retries` as the worker lowered it.
    MaxRetries(u32),
    /// The metadata was dropped (too large once claimed).
    NoMetadata,
    /// The metadata holds `pad` of this many bytes.
    MetadataPad(usize),
    /// `attempts` as written.
    Attempts(u32),
    /// A field of a newer version, kept.
    Extra(&'static str),
    /// The worker that found the record corrupt replaces it before it fails
    /// the request; if its attempt is cut short in between (a SIGKILL, the
    /// server restart), the redelivery finds a sound record and runs the
    /// task: then `succeeded` with this value after more than one attempt,
    /// its final attempt run once, is allowed too.
    CutShortRuns(i64),
}

/// How the publish of a hostile message went.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Stored in the task stream at this sequence.
    Stored(u64),
    /// The stream took it for a duplicate and stored nothing.
    Deduplicated,
    /// The client or server refused it, with this error.
    Refused(String),
    /// Published with core NATS (not stored).
    Core,
    /// Only a record was written.
    KvOnly,
}

/// One hostile message as sent.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) attack: Attack,
    pub(crate) variant: &'static str,
    pub(crate) subject: String,
    pub(crate) msg_id: Option<String>,
    pub(crate) payload: Bytes,
    /// The honest request it names, if any.
    pub(crate) target: Option<String>,
    /// Its own id, if it has one.
    pub(crate) own: Option<String>,
    /// The record written straight into the bucket under `own`, if any.
    pub(crate) kv: Option<Bytes>,
    pub(crate) outcome: Outcome,
    /// The publish failed at least once and was sent again: a copy may be
    /// stored twice (when it carries no `Nats-Msg-Id`).
    pub(crate) retried: bool,
    pub(crate) expect: Expect,
}

impl Sent {
    fn describe(&self) -> String {
        format!(
            "{:?}/{} on {} (Nats-Msg-Id {}, id {}, names {})",
            self.attack,
            self.variant,
            self.subject,
            self.msg_id.as_deref().unwrap_or("-"),
            self.own.as_deref().unwrap_or("-"),
            self.target.as_deref().unwrap_or("-")
        )
    }
}

/// Honest requests as the honest producer publishes them.
pub(crate) struct Published {
    done: Vec<AtomicBool>,
    count: AtomicUsize,
    finished: AtomicBool,
}

impl Published {
    pub(crate) fn new(n: usize) -> Published {
        Published {
            done: (0..n).map(|_| AtomicBool::new(false)).collect(),
            count: AtomicUsize::new(0),
            finished: AtomicBool::new(false),
        }
    }

    pub(crate) fn mark(&self, i: usize) {
        if !self.done[i].swap(true, Ordering::SeqCst) {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(crate) fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    fn is(&self, i: usize) -> bool {
        self.done[i].load(Ordering::SeqCst)
    }
}

/// Payloads of the forged record notifications, registered before they are
/// sent, so that the soak's own observer can tell them from the server's.
pub(crate) type Forged = Arc<Mutex<HashSet<Bytes>>>;

/// The hostile publisher's inputs.
pub(crate) struct Hostile {
    pub(crate) url: String,
    pub(crate) seed: u64,
    pub(crate) count: usize,
    pub(crate) plans: Arc<Vec<Planned>>,
    pub(crate) published: Arc<Published>,
    pub(crate) forged: Forged,
    /// Honest ids a waiter follows from the start: each gets a forged
    /// `succeeded` notification first thing.
    pub(crate) waiters: Vec<String>,
}

/// What the hostile publisher did.
pub(crate) struct Report {
    pub(crate) sent: Vec<Sent>,
    /// Forged notifications that reached a waiter's request before it finished.
    pub(crate) forged_early: usize,
    pub(crate) elapsed: Duration,
}

const QUEUE: &str = "default";
const TASKS: [&str; 4] = ["demo.add", "demo.sleep", "demo.fail", "soak.flaky"];
const PUBLISH_PATIENCE: Duration = Duration::from_secs(120);
/// Honest requests tried for one that has a record already.
const RECORD_TRIES: usize = 8;
/// Hostile messages on their way at once.
const CONCURRENCY: usize = 8;

fn now_text() -> String {
    jetq::time::OffsetDateTime::now_utc()
        .format(&jetq::time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn bytes_of(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap())
}

/// The envelope an honest producer would send for `p`.
fn envelope_of(p: &Planned) -> Value {
    let mut v = json!({
        "v": 1, "id": p.id, "task": p.kind.task(), "queue": QUEUE,
        "args": p.args, "metadata": {}, "enqueued_at": now_text(),
    });
    if let Some(n) = p.max_retries {
        v["max_retries"] = json!(n);
    }
    v
}

fn subject_of(task: &str) -> String {
    format!("jetq.tasks.{QUEUE}.{task}")
}

/// A record as jetq writes it, for writing straight into the bucket.
fn record_json(id: &str, status: &str, extra: Value) -> Value {
    let mut v = json!({
        "v": 1, "id": id, "task": "demo.add", "queue": QUEUE, "status": status,
        "value": null, "error": null, "metadata": {}, "progress": null,
        "attempts": 0, "max_retries": 3, "enqueued_at": now_text(),
        "started_at": null, "finished_at": null, "next_attempt_at": null, "worker": null,
    });
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    v
}

/// What sends one hostile message: the connection and what all share, and
/// the message's own random numbers.
#[derive(Clone)]
struct Sender {
    nats: async_nats::Client,
    js: jetstream::Context,
    kv: Arc<tokio::sync::OnceCell<jetstream::kv::Store>>,
    honest_ids: Arc<HashSet<String>>,
    rng: fastrand::Rng,
    near_limit: Arc<Mutex<HashMap<&'static str, usize>>>,
    max_payload: usize,
}

impl Sender {
    /// The sender of message `k`, with random numbers of its own (so the
    /// mix depends on the seed alone, whatever order the messages go in).
    fn fork(&self, seed: u64, k: usize) -> Sender {
        let mut s = self.clone();
        s.rng = fastrand::Rng::with_seed(seed ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        s
    }

    /// The record bucket, once it exists.
    async fn bucket(&self) -> Option<&jetstream::kv::Store> {
        self.kv
            .get_or_try_init(|| self.js.get_key_value("JETQ_RESULTS"))
            .await
            .ok()
    }

    /// A JetStream publish, retried through a server restart. `own_key`:
    /// the `Nats-Msg-Id` is this message's alone, so a duplicate can only be
    /// an earlier try of it that was stored although its publish failed.
    async fn publish(
        &self,
        subject: &str,
        msg_id: Option<&str>,
        own_key: bool,
        payload: Bytes,
    ) -> (Outcome, bool) {
        let deadline = Instant::now() + PUBLISH_PATIENCE;
        let mut retried = false;
        loop {
            let mut headers = HeaderMap::new();
            if let Some(id) = msg_id {
                headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
            }
            let sent = match self
                .js
                .publish_with_headers(subject.to_owned(), headers, payload.clone())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(ack) if ack.duplicate && !own_key => return (Outcome::Deduplicated, retried),
                Ok(ack) => return (Outcome::Stored(ack.sequence), retried),
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return (Outcome::Refused(e.to_string()), retried)
                }
                Err(e) if e.to_string().contains("maximum payload") => {
                    return (Outcome::Refused(e.to_string()), retried)
                }
                Err(_) if Instant::now() < deadline => {
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    panic!("hostile publish to {subject} failed for {PUBLISH_PATIENCE:?}: {e}")
                }
            }
        }
    }

    /// Write `value` as the record of `id` without any revision check.
    async fn put_record(&self, id: &str, value: Bytes) {
        let (outcome, _) = self
            .publish(&format!("$KV.JETQ_RESULTS.{id}"), None, true, value)
            .await;
        assert!(
            matches!(outcome, Outcome::Stored(_)),
            "hostile record write of {id}: {outcome:?}"
        );
    }

    /// Whether request `id` has a record now.
    async fn has_record(&self, id: &str) -> bool {
        match self.bucket().await {
            Some(kv) => matches!(kv.entry(id).await, Ok(Some(_))),
            None => false,
        }
    }

    fn near_limit_left(&self, what: &'static str) -> bool {
        let mut counts = self.near_limit.lock().unwrap();
        let n = counts.entry(what).or_default();
        *n += 1;
        *n <= MAX_NEAR_LIMIT
    }
}

/// Wait until honest request `i` is published; false if publishing ended without it.
async fn published(p: &Published, i: usize) -> bool {
    loop {
        if p.is(i) {
            return true;
        }
        if p.finished.load(Ordering::SeqCst) {
            return p.is(i);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Send the hostile mix, paced by the honest producer: message `k` of
/// `count` goes once `k / count` of the honest requests are published.
pub(crate) async fn run(h: Hostile) -> Report {
    let started = Instant::now();
    if h.plans.is_empty() || h.count == 0 {
        return Report {
            sent: Vec::new(),
            forged_early: 0,
            elapsed: started.elapsed(),
        };
    }
    let nats = async_nats::connect(&h.url).await.unwrap();
    let max_payload = nats.server_info().max_payload;
    let base = Sender {
        js: jetstream::new(nats.clone()),
        kv: Arc::default(),
        honest_ids: Arc::new(h.plans.iter().map(|p| p.id.clone()).collect()),
        nats,
        rng: fastrand::Rng::with_seed(h.seed),
        near_limit: Arc::default(),
        max_payload,
    };
    let n = h.plans.len();
    let index: HashMap<&str, usize> = h
        .plans
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id.as_str(), i))
        .collect();
    let (h, base, index) = (&h, &base, &index);
    // A few messages at a time (each waits for its publish acknowledgement).
    let done: Vec<(Sent, bool)> = futures_util::stream::iter(0..h.count)
        .map(|k| async move {
            let mut s = base.fork(h.seed, k);
            // Pace: the k-th message once its share of honest requests is out.
            let due = ((k + 1) * n).div_ceil(h.count).min(n);
            while h.published.count() < due && !h.published.finished.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // The first messages forge a result for each waiter's request.
            if let Some(id) = h.waiters.get(k) {
                let i = index[id.as_str()];
                if published(&h.published, i).await {
                    return forge_notice(&mut s, h, &h.plans[i], Some(0)).await;
                }
            }
            let mut roll = s.rng.u32(0..100);
            let mut attack = Attack::ForeignRecord;
            for (a, share) in MIX {
                if roll < share {
                    attack = a;
                    break;
                }
                roll -= share;
            }
            // An honest request already published, chosen among the first
            // `due`. Another task's request, or the same request again, go
            // under an honest id only once a worker has written that
            // request's record: before that nothing tells them from the
            // honest message, and a worker runs whichever comes first, or
            // both (wire format, Duplicates; see the soak's module
            // documentation). A few requests are tried; if none has a
            // record yet, junk goes instead.
            let needs_record = matches!(attack, Attack::OtherTask | Attack::Replay);
            let mut target = None;
            for _ in 0..if needs_record { RECORD_TRIES } else { 1 } {
                let mut i = s.rng.usize(0..due.max(1));
                if !published(&h.published, i).await {
                    i = (0..n).find(|&j| h.published.is(j)).unwrap_or(0);
                }
                if !needs_record || s.has_record(&h.plans[i].id).await {
                    target = Some(h.plans[i].clone());
                    break;
                }
            }
            let target = match target {
                Some(t) => t,
                None => {
                    attack = Attack::Junk;
                    h.plans[s.rng.usize(0..due.max(1))].clone()
                }
            };
            let own = format!("{PREFIX}{k:05}");
            match attack {
                Attack::ForgedNotice => forge_notice(&mut s, h, &target, None).await,
                _ => (send(&mut s, h, attack, &target, &own, k).await, false),
            }
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    let _ = base.nats.flush().await;
    let forged_early = done.iter().filter(|(_, early)| *early).count();
    Report {
        sent: done.into_iter().map(|(x, _)| x).collect(),
        forged_early,
        elapsed: started.elapsed(),
    }
}

/// A forged notification on `jetq.records.<target>`: a fake terminal
/// record, one with a huge revision, garbage, or a delete marker. Returns
/// it, and whether the target had not finished when it went out.
async fn forge_notice(
    s: &mut Sender,
    h: &Hostile,
    target: &Planned,
    variant: Option<u32>,
) -> (Sent, bool) {
    let id = target.id.as_str();
    let fake = |status: &str, value: Value| {
        let mut r = record_json(
            id,
            status,
            json!({
                "task": target.kind.task(), "value": value, "attempts": 1,
                "worker": "forger", "finished_at": now_text(),
            }),
        );
        if status == "failed" {
            r["error"] = json!({"kind": "error", "message": "forged"});
        }
        bytes_of(&r)
    };
    let (variant, revision, payload, delete) = match variant.unwrap_or_else(|| s.rng.u32(0..4)) {
        0 => (
            "fake succeeded",
            "1",
            fake("succeeded", json!("forged")),
            false,
        ),
        1 => (
            "fake failed, huge revision",
            "999999999999",
            fake("failed", Value::Null),
            false,
        ),
        2 => (
            "garbage",
            "7",
            Bytes::from_static(b"\x00\xffnot a record"),
            false,
        ),
        _ => ("delete marker", "3", Bytes::new(), true),
    };
    let early = match s.bucket().await {
        Some(kv) => match kv.entry(id).await {
            Ok(Some(e)) => Record::from_json(&e.value).is_ok_and(|r| !r.status.is_terminal()),
            Ok(None) => true,
            Err(_) => false,
        },
        None => false,
    };
    h.forged.lock().unwrap().insert(payload.clone());
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_SEQUENCE, revision);
    if delete {
        headers.insert("KV-Operation", "DEL");
    }
    let subject = format!("jetq.records.{id}");
    // Core NATS: a publish while the server is down waits in the client's
    // buffer (or is lost); either way nothing is stored.
    let _ = s
        .nats
        .publish_with_headers(subject.clone(), headers, payload.clone())
        .await;
    let x = Sent {
        attack: Attack::ForgedNotice,
        variant,
        subject,
        msg_id: None,
        payload,
        target: Some(id.to_owned()),
        own: None,
        kv: None,
        outcome: Outcome::Core,
        retried: false,
        expect: Expect::Nothing,
    };
    (x, early)
}

/// Build, send and write down one hostile message of `attack`.
async fn send(
    s: &mut Sender,
    h: &Hostile,
    attack: Attack,
    target: &Planned,
    own: &str,
    k: usize,
) -> Sent {
    let x_id = target.id.as_str();
    let x_task = target.kind.task();
    let requeue_key = format!("{x_id}.requeue.{}", 900_000_000 + k);
    // Another honest request, published already (else a made-up id).
    let other_honest = {
        let i = s.rng.usize(0..h.plans.len());
        if h.published.is(i) && h.plans[i].id != x_id {
            h.plans[i].id.clone()
        } else {
            format!("r{k}-nobody")
        }
    };
    // Defaults, overridden below.
    let mut subject = subject_of(x_task);
    let mut msg_id: Option<String> = None;
    let mut target_id = Some(x_id.to_owned());
    let mut own_id: Option<String> = None;
    let mut kv: Option<Bytes> = None;
    let payload: Bytes;
    let expect: Expect;
    let variant: &'static str;
    match attack {
        Attack::Junk => {
            let choice = s.rng.u32(0..8);
            let text = envelope_of(target).to_string();
            (variant, payload) = match choice {
                0 => ("empty", Bytes::new()),
                1 => (
                    "random bytes",
                    Bytes::from((0..64).map(|_| s.rng.u8(..)).collect::<Vec<_>>()),
                ),
                2 => ("empty object", Bytes::from_static(b"{}")),
                3 => ("array", Bytes::from_static(b"[1,2,3]")),
                4 => ("only an honest id", bytes_of(&json!({"id": x_id}))),
                5 => (
                    "truncated envelope",
                    Bytes::from(text[..text.len() / 2].to_owned()),
                ),
                6 => ("null", Bytes::from_static(b"null")),
                _ => (
                    "nested 300 deep",
                    Bytes::from(format!("{}{}", "[".repeat(300), "]".repeat(300))),
                ),
            };
            msg_id = choice.is_multiple_of(2).then(|| requeue_key.clone());
            expect = Expect::Refused("invalid_request");
        }
        Attack::BadVersion => {
            let mut v = envelope_of(target);
            let bad = [
                json!(0),
                json!(2),
                json!(999),
                json!("1"),
                Value::Null,
                json!(-1),
                json!(1.5),
            ];
            v["v"] = bad[s.rng.usize(0..bad.len())].clone();
            variant = "v is not 1";
            payload = bytes_of(&v);
            msg_id = s.rng.bool().then(|| requeue_key.clone());
            expect = Expect::Refused("invalid_request");
        }
        Attack::Misrouted => {
            let mut v = envelope_of(target);
            match s.rng.u32(0..3) {
                0 => {
                    variant = "another queue in the envelope";
                    v["queue"] = json!("other");
                }
                1 => {
                    variant = "another task's subject";
                    let other = TASKS.iter().find(|t| **t != x_task).copied().unwrap();
                    subject = subject_of(other);
                }
                _ => {
                    variant = "invalid task name in the envelope";
                    v["task"] = json!("demo..add");
                }
            }
            payload = bytes_of(&v);
            msg_id = s.rng.bool().then(|| requeue_key.clone());
            expect = Expect::Refused("invalid_request");
        }
        Attack::ForgedKey => {
            payload = bytes_of(&envelope_of(target));
            (variant, msg_id) = match s.rng.u32(0..4) {
                0 => ("a made-up key", Some(format!("evil-{k}"))),
                1 => (
                    "another request's requeue key",
                    Some(format!("{other_honest}.requeue.{k}")),
                ),
                2 => ("another request's key", Some(other_honest.clone())),
                _ => (
                    "a requeue key without a number",
                    Some(format!("{x_id}.requeue.{k}x")),
                ),
            };
            // The stream drops it if the key is another request's already
            // seen; otherwise a worker refuses it.
            expect = Expect::Refused("invalid_request");
        }
        Attack::OtherTask => {
            let others: Vec<&str> = TASKS.iter().copied().filter(|t| *t != x_task).collect();
            let task = others[s.rng.usize(0..others.len())];
            subject = subject_of(task);
            let mut v = envelope_of(target);
            v["task"] = json!(task);
            v["args"] = json!({"a": 1, "b": 2});
            payload = bytes_of(&v);
            variant = "another task under an honest id";
            msg_id = s.rng.bool().then(|| requeue_key.clone());
            expect = Expect::Conflict;
        }
        Attack::Replay => {
            payload = bytes_of(&envelope_of(target));
            variant = if s.rng.bool() {
                msg_id = Some(requeue_key.clone());
                "the same request under a requeue key"
            } else {
                "the same request without Nats-Msg-Id"
            };
            expect = Expect::Duplicate;
        }
        Attack::SquatKey => {
            msg_id = Some(x_id.to_owned());
            if s.rng.bool() {
                variant = "the same request with its own key";
                payload = bytes_of(&envelope_of(target));
                expect = Expect::Duplicate;
            } else {
                variant = "another id with the honest key";
                own_id = Some(own.to_owned());
                let mut v = envelope_of(target);
                v["id"] = json!(own);
                payload = bytes_of(&v);
                expect = Expect::Refused("invalid_request");
            }
        }
        Attack::FarFuture => {
            target_id = None;
            own_id = Some(own.to_owned());
            msg_id = Some(own.to_owned());
            subject = subject_of("demo.add");
            let eleven_years =
                jetq::time::OffsetDateTime::now_utc() + jetq::time::Duration::days(11 * 366);
            let at = match s.rng.u32(0..3) {
                0 => "2500-01-01T00:00:00Z".to_owned(),
                1 => "9999-12-31T23:59:59Z".to_owned(),
                _ => eleven_years
                    .format(&jetq::time::format_description::well_known::Rfc3339)
                    .unwrap(),
            };
            variant = "not_before beyond ten years";
            payload = bytes_of(&json!({
                "v": 1, "id": own, "task": "demo.add", "queue": QUEUE, "args": {"a": 1, "b": 2},
                "enqueued_at": now_text(), "not_before": at,
            }));
            expect = Expect::Ends {
                status: Status::Failed,
                kind: Some("invalid_request"),
                value: None,
                check: Check::None,
                ran: Ran::Never,
            };
        }
        Attack::HugeRetries => {
            target_id = None;
            own_id = Some(own.to_owned());
            msg_id = Some(own.to_owned());
            let (a, b) = (s.rng.i64(-1000..1000), s.rng.i64(-1000..1000));
            let base = |task: &str, retries: Value| {
                json!({
                    "v": 1, "id": own, "task": task, "queue": QUEUE, "args": {"a": a, "b": b},
                    "enqueued_at": now_text(), "max_retries": retries,
                })
            };
            match s.rng.u32(0..4) {
                0 => {
                    variant = "u32::MAX retries of a task that succeeds";
                    subject = subject_of("demo.add");
                    payload = bytes_of(&base("demo.add", json!(u32::MAX)));
                    expect = Expect::Ends {
                        status: Status::Succeeded,
                        kind: None,
                        value: Some(json!(a + b)),
                        check: Check::MaxRetries(jetq::request::MAX_RETRIES_LIMIT),
                        ran: Ran::Once,
                    };
                }
                1 => {
                    variant = "u32::MAX retries of an unknown task";
                    subject = subject_of("x.unknown");
                    payload = bytes_of(&base("x.unknown", json!(u32::MAX)));
                    expect = Expect::Ends {
                        status: Status::Failed,
                        kind: Some("unknown_task"),
                        value: None,
                        check: Check::None,
                        ran: Ran::Never,
                    };
                }
                2 => {
                    variant = "retries beyond u32";
                    subject = subject_of("demo.add");
                    payload = bytes_of(&base("demo.add", json!(99_999_999_999u64)));
                    expect = Expect::Refused("invalid_request");
                }
                _ => {
                    variant = "negative retries";
                    subject = subject_of("demo.add");
                    payload = bytes_of(&base("demo.add", json!(-1)));
                    expect = Expect::Refused("invalid_request");
                }
            }
        }
        Attack::Oversized => {
            target_id = None;
            own_id = Some(own.to_owned());
            msg_id = Some(own.to_owned());
            subject = subject_of("demo.add");
            let with_pad = |pad: Value| {
                json!({
                    "v": 1, "id": own, "task": "demo.add", "queue": QUEUE, "args": {"a": 2, "b": 3},
                    "metadata": {"pad": pad}, "enqueued_at": now_text(),
                })
            };
            let mut choice = s.rng.u32(0..4);
            if choice == 0 && !s.near_limit_left("too large to publish") {
                choice = 2;
            }
            if choice == 1 && !s.near_limit_left("too large for a record") {
                choice = 3;
            }
            match choice {
                0 => {
                    variant = "too large to publish";
                    payload = bytes_of(&with_pad(json!("p".repeat(s.max_payload))));
                    expect = Expect::Nothing;
                }
                1 => {
                    variant = "fits as a request, not as a record";
                    let overhead = bytes_of(&with_pad(json!(""))).len();
                    // Room for the Nats-Msg-Id header; the claimed record
                    // (status, times, worker, sequence) is larger still.
                    let pad = s.max_payload - overhead - 128;
                    payload = bytes_of(&with_pad(json!("p".repeat(pad))));
                    let record = record_json(
                        own,
                        "running",
                        json!({"metadata": {"pad": "p".repeat(pad)}}),
                    );
                    assert!(
                        bytes_of(&record).len() > s.max_payload,
                        "the oversized record must not fit"
                    );
                    expect = Expect::Ends {
                        status: Status::Failed,
                        kind: Some("too_large"),
                        value: None,
                        check: Check::NoMetadata,
                        ran: Ran::AtMostOnce,
                    };
                }
                2 => {
                    variant = "metadata that is not an object";
                    let mut v = with_pad(json!(null));
                    v["metadata"] = json!("m".repeat(4096));
                    payload = bytes_of(&v);
                    expect = Expect::Refused("invalid_request");
                }
                _ => {
                    variant = "64 KiB of metadata";
                    payload = bytes_of(&with_pad(json!("p".repeat(65_536))));
                    expect = Expect::Ends {
                        status: Status::Succeeded,
                        kind: None,
                        value: Some(json!(5)),
                        check: Check::MetadataPad(65_536),
                        ran: Ran::Once,
                    };
                }
            }
        }
        Attack::ForeignRecord => {
            target_id = None;
            own_id = Some(own.to_owned());
            subject = subject_of("demo.add");
            let request = bytes_of(&json!({
                "v": 1, "id": own, "task": "demo.add", "queue": QUEUE, "args": {"a": 20, "b": 22},
                "enqueued_at": now_text(),
            }));
            let fake_done = bytes_of(&record_json(
                own,
                "succeeded",
                json!({"value": "fake", "attempts": 1, "worker": "forger", "finished_at": now_text()}),
            ));
            let garbage = Bytes::from_static(b"\x01\x02 garbage, not a record");
            let (v, record, with_request, e) = match s.rng.u32(0..7) {
                0 => ("garbage alone", garbage, false, Expect::Nothing),
                1 => (
                    "a fake terminal record alone",
                    fake_done,
                    false,
                    Expect::Nothing,
                ),
                2 => (
                    "garbage, then a request",
                    garbage,
                    true,
                    Expect::Ends {
                        status: Status::Failed,
                        kind: Some("corrupt_record"),
                        value: None,
                        check: Check::CutShortRuns(42),
                        ran: Ran::Never,
                    },
                ),
                3 => (
                    "a fake terminal record, then a request",
                    fake_done,
                    true,
                    Expect::Untouched,
                ),
                4 => (
                    "a record owned by another message, then a request",
                    bytes_of(&record_json(
                        own,
                        "running",
                        json!({"attempts": 1, "seq": 999_999_999u64, "worker": "forger"}),
                    )),
                    true,
                    Expect::Untouched,
                ),
                5 => (
                    "a record worn out to u32::MAX attempts, then a request",
                    bytes_of(&record_json(own, "pending", json!({"attempts": u32::MAX}))),
                    true,
                    Expect::Ends {
                        status: Status::Failed,
                        kind: Some("abandoned"),
                        value: None,
                        check: Check::Attempts(u32::MAX),
                        ran: Ran::Never,
                    },
                ),
                _ => (
                    "a record of a newer version, then a request",
                    bytes_of(&record_json(
                        own,
                        "paused",
                        json!({"v": 2, "shiny": [1, 2]}),
                    )),
                    true,
                    Expect::Ends {
                        status: Status::Succeeded,
                        kind: None,
                        value: Some(json!(42)),
                        check: Check::Extra("shiny"),
                        ran: Ran::Once,
                    },
                ),
            };
            variant = v;
            s.put_record(own, record.clone()).await;
            kv = Some(record);
            expect = e;
            if !with_request {
                return Sent {
                    attack,
                    variant,
                    subject: format!("$KV.JETQ_RESULTS.{own}"),
                    msg_id: None,
                    payload: Bytes::new(),
                    target: None,
                    own: own_id,
                    kv,
                    outcome: Outcome::KvOnly,
                    retried: false,
                    expect,
                };
            }
            msg_id = Some(own.to_owned());
            payload = request;
        }
        Attack::ForgedNotice => unreachable!("sent by forge_notice"),
    }
    // An honest request's key is not this message's alone; every other key
    // used here (made up, its own id, a requeue key with its number) is.
    let own_key = msg_id
        .as_deref()
        .is_some_and(|key| !s.honest_ids.contains(key));
    let (outcome, retried) = s
        .publish(&subject, msg_id.as_deref(), own_key, payload.clone())
        .await;
    let expect = match outcome {
        Outcome::Deduplicated => Expect::Nothing,
        _ => expect,
    };
    Sent {
        attack,
        variant,
        subject,
        msg_id,
        payload,
        target: target_id,
        own: own_id,
        kv,
        outcome,
        retried,
        expect,
    }
}

/// Ids of the hostile publisher's own that must have a record at the end.
pub(crate) fn expected_keys(sent: &[Sent]) -> HashSet<String> {
    sent.iter()
        .filter(|x| {
            x.kv.is_some()
                || matches!(
                    (&x.expect, &x.outcome),
                    (Expect::Ends { .. }, Outcome::Stored(_))
                )
        })
        .filter_map(|x| x.own.clone())
        .collect()
}

/// Ids whose record must reach a terminal status before the checks.
pub(crate) fn ids_to_wait_for(sent: &[Sent]) -> Vec<String> {
    sent.iter()
        .filter(|x| matches!(x.expect, Expect::Ends { .. }))
        .filter_map(|x| x.own.clone())
        .collect()
}

/// What the server says about deliveries of one task-stream message
/// (from the consumer's advisories).
#[derive(Debug, Default, Clone)]
pub(crate) struct Deliveries {
    /// Deliveries counted when the message was terminated.
    pub(crate) terminated: Option<u64>,
    /// Negative acknowledgements, and the highest delivery count among them.
    pub(crate) naks: u64,
    pub(crate) max_nak_delivery: u64,
}

impl Deliveries {
    pub(crate) fn most(&self) -> u64 {
        self.terminated.unwrap_or(0).max(self.max_nak_delivery)
    }
}

/// One handler execution of a hostile id, from the audit trail.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) attempt: u32,
    pub(crate) end: Option<String>,
}

/// What the checks found.
#[derive(Default)]
pub(crate) struct Findings {
    pub(crate) problems: Vec<String>,
    /// Endings seen, by attack.
    pub(crate) endings: BTreeMap<String, usize>,
    /// Most deliveries of a hostile message, and the message.
    pub(crate) max_deliveries: u64,
    pub(crate) max_deliveries_of: String,
    /// Dead letters of copies stored twice by a retried publish.
    pub(crate) extra_copies: usize,
}

/// The most deliveries a hostile message may see: the backstop ends a
/// refused message after `delivery_budget(default retries)` deliveries.
pub(crate) fn delivery_bound(expect: &Expect, worker_max_retries: u32) -> u64 {
    match expect {
        Expect::Refused(_) | Expect::Conflict => {
            jetq::worker::delivery_budget(jetq::request::DEFAULT_MAX_RETRIES) + 1
        }
        _ => jetq::worker::delivery_budget(worker_max_retries) + 1,
    }
}

/// Check every hostile message against how it ended.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn verify(
    sent: &[Sent],
    kv: &jetstream::kv::Store,
    letters: &HashMap<String, DeadLetter>,
    deliveries: &HashMap<u64, Deliveries>,
    runs: &HashMap<String, Vec<Run>>,
    worker_max_retries: u32,
) -> Findings {
    let mut f = Findings::default();
    let note = |f: &mut Findings, x: &Sent, how: &str| {
        *f.endings
            .entry(format!("{:?}: {how}", x.attack))
            .or_default() += 1;
    };
    let stored: HashSet<u64> = sent
        .iter()
        .filter_map(|x| match x.outcome {
            Outcome::Stored(seq) => Some(seq),
            _ => None,
        })
        .collect();
    for x in sent {
        let what = x.describe();
        // Deliveries are bounded (the task stream draining is checked by the soak).
        if let Outcome::Stored(seq) = x.outcome {
            if let Some(d) = deliveries.get(&seq) {
                let bound = delivery_bound(&x.expect, worker_max_retries);
                if d.most() > f.max_deliveries {
                    f.max_deliveries = d.most();
                    f.max_deliveries_of = format!("{what}, sequence {seq}");
                }
                if d.most() > bound {
                    f.problems.push(format!(
                        "{what}: delivered {} times (more than {bound}): {d:?}",
                        d.most()
                    ));
                }
            }
        }
        let invalid_letter = match x.outcome {
            Outcome::Stored(seq) => letters.get(&DeadLetter::invalid_key(QUEUE, seq)),
            _ => None,
        };
        match (&x.expect, &x.outcome) {
            (Expect::Nothing, Outcome::Refused(e)) => {
                if !e.contains("payload") {
                    f.problems.push(format!(
                        "{what}: refused at publish for another reason: {e}"
                    ));
                }
                note(&mut f, x, "refused at publish");
            }
            (Expect::Nothing, Outcome::Deduplicated) => {
                note(&mut f, x, "dropped by the stream (duplicate key)")
            }
            (Expect::Nothing, Outcome::Core) => note(&mut f, x, "core NATS only"),
            (Expect::Nothing, Outcome::KvOnly) => {
                check_untouched(&mut f, kv, x, &what).await;
                note(&mut f, x, "record left as written");
            }
            (Expect::Refused(kind), Outcome::Stored(seq)) => match invalid_letter {
                Some(l) if l.error.kind == *kind && l.sequence == *seq => {
                    note(&mut f, x, &format!("dead letter ({kind})"))
                }
                Some(l) => f.problems.push(format!(
                    "{what}: dead letter of kind {} (sequence {}), expected {kind}: {}",
                    l.error.kind, l.sequence, l.error.message
                )),
                None => f.problems.push(format!(
                    "{what}: stored at sequence {seq} but no dead letter invalid-default-{seq}"
                )),
            },
            (Expect::Conflict, Outcome::Stored(_)) => match invalid_letter {
                Some(l) if l.error.kind == "id_conflict" => {
                    note(&mut f, x, "dead letter (id_conflict)")
                }
                Some(l) => f.problems.push(format!(
                    "{what}: dead letter of kind {}, expected id_conflict: {}",
                    l.error.kind, l.error.message
                )),
                None => note(&mut f, x, "dropped: the honest request was already taken"),
            },
            (Expect::Duplicate, Outcome::Stored(seq)) => match invalid_letter {
                Some(l) => f.problems.push(format!(
                    "{what}: an identical request was dead-lettered ({}: {})",
                    l.error.kind, l.error.message
                )),
                None => {
                    // Its outcome is the honest request's, checked with those.
                    let owner = match x.target.as_deref() {
                        Some(id) => kv.entry(id).await.ok().flatten(),
                        None => None,
                    }
                    .and_then(|e| Record::from_json(&e.value).ok())
                    .and_then(|r| r.seq);
                    if owner == Some(*seq) {
                        note(
                            &mut f,
                            x,
                            "ran as the honest request (its record names this message)",
                        )
                    } else {
                        note(&mut f, x, "dropped as a duplicate")
                    }
                }
            },
            (
                Expect::Ends {
                    status,
                    kind,
                    value,
                    check,
                    ran,
                },
                Outcome::Stored(_),
            ) => {
                let own = x.own.as_deref().unwrap_or_default();
                let r = match kv.entry(own).await {
                    Ok(Some(e)) => match Record::from_json(&e.value) {
                        Ok(r) => r,
                        Err(err) => {
                            f.problems
                                .push(format!("{what}: its record does not decode: {err}"));
                            continue;
                        }
                    },
                    other => {
                        f.problems.push(format!("{what}: no record ({other:?})"));
                        continue;
                    }
                };
                let shown = serde_json::to_string(&r).unwrap_or_default();
                let shown = if shown.len() > 600 {
                    format!("{}...", &shown[..600])
                } else {
                    shown
                };
                let got_kind = r.error.as_ref().map(|e| e.kind.as_str());
                let mine = runs.get(own).cloned().unwrap_or_default();
                if let Check::CutShortRuns(v) = check {
                    let once = mine
                        .iter()
                        .filter(|e| e.attempt == r.attempts && e.end.as_deref() == Some("success"))
                        .count()
                        == 1;
                    if r.status == Status::Succeeded
                        && r.attempts >= 2
                        && r.value == Some(json!(v))
                        && once
                    {
                        note(
                            &mut f,
                            x,
                            "succeeded: the failure was cut short, the redelivery ran it",
                        );
                        continue;
                    }
                }
                if r.status != *status || (*status == Status::Failed && got_kind != *kind) {
                    f.problems
                        .push(format!("{what}: expected {status} ({kind:?}), got {shown}"));
                    continue;
                }
                if value.is_some() && r.value != *value {
                    f.problems
                        .push(format!("{what}: expected value {value:?}: {shown}"));
                }
                let ok = match check {
                    Check::None => true,
                    Check::MaxRetries(m) => r.max_retries == *m,
                    Check::NoMetadata => r.metadata.is_empty(),
                    Check::MetadataPad(len) => r
                        .metadata
                        .get("pad")
                        .and_then(Value::as_str)
                        .is_some_and(|p| p.len() == *len),
                    Check::Attempts(a) => r.attempts == *a,
                    Check::Extra(field) => r.extra.contains_key(*field),
                    Check::CutShortRuns(_) => true,
                };
                if !ok {
                    f.problems
                        .push(format!("{what}: check {check:?} failed: {shown}"));
                }
                if *status == Status::Failed {
                    match letters.get(own) {
                        Some(l) if Some(l.error.kind.as_str()) == *kind => {}
                        other => f.problems.push(format!(
                            "{what}: failed, but its dead letter is {:?}",
                            other.map(|l| (&l.error.kind, &l.error.message))
                        )),
                    }
                }
                // Runs of its handler.
                let finals = mine.iter().filter(|e| e.attempt == r.attempts).count();
                let succeeded = mine
                    .iter()
                    .filter(|e| e.attempt == r.attempts && e.end.as_deref() == Some("success"))
                    .count();
                let mut attempts: Vec<u32> = mine.iter().map(|e| e.attempt).collect();
                attempts.sort_unstable();
                let twice = attempts.windows(2).any(|w| w[0] == w[1]);
                let ok = match ran {
                    Ran::Never => mine.is_empty(),
                    Ran::Once => finals == 1 && succeeded == 1 && !twice,
                    Ran::AtMostOnce => !twice,
                };
                if !ok {
                    f.problems.push(format!(
                        "{what}: its task was to run {ran:?}, but it ran {mine:?} (record: {shown})"
                    ));
                }
                note(
                    &mut f,
                    x,
                    &format!("{status} ({})", got_kind.unwrap_or("-")),
                );
            }
            (Expect::Untouched, Outcome::Stored(_)) => {
                check_untouched(&mut f, kv, x, &what).await;
                if let Some(l) = x.own.as_deref().and_then(|id| letters.get(id)) {
                    f.problems.push(format!(
                        "{what}: a dead letter under its id: {}",
                        l.error.message
                    ));
                }
                note(&mut f, x, "dropped, record left as written");
            }
            (e, o) => f.problems.push(format!(
                "{what}: published as {o:?}, which {e:?} does not allow"
            )),
        }
        // A message that was refused must have written no record.
        if matches!(x.expect, Expect::Refused(_)) {
            if let Some(own) = x.own.as_deref() {
                if let Ok(Some(_)) = kv.entry(own).await {
                    f.problems
                        .push(format!("{what}: refused, yet a record {own} exists"));
                }
            }
        }
    }
    // Every `invalid-` dead letter belongs to a hostile message (or to a
    // copy of one stored twice by a retried publish).
    let payloads: HashSet<&Bytes> = sent
        .iter()
        .filter(|x| x.retried)
        .map(|x| &x.payload)
        .collect();
    for (key, l) in letters {
        let Some(seq) = key
            .strip_prefix("invalid-default-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if stored.contains(&seq) {
            continue;
        }
        if payloads.contains(&l.payload) {
            f.extra_copies += 1;
        } else {
            f.problems.push(format!(
                "dead letter {key} ({}: {}) is not of any hostile message",
                l.error.kind, l.error.message
            ));
        }
    }
    f
}

async fn check_untouched(f: &mut Findings, kv: &jetstream::kv::Store, x: &Sent, what: &str) {
    let (Some(own), Some(written)) = (x.own.as_deref(), x.kv.as_ref()) else {
        return;
    };
    match kv.entry(own).await {
        Ok(Some(e)) if e.value == *written => {}
        other => f.problems.push(format!(
            "{what}: its record was changed: {:?}",
            other.map(|e| e.map(|e| String::from_utf8_lossy(&e.value).into_owned()))
        )),
    }
}
