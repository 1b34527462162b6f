//! Record reads gathered into batch direct gets.
//!
//! A worker reads the record of every delivery before running it (the
//! claim). Read one by one, that is a request and a reply per task, and a
//! request the server handles on its own. The attempts of one pull are
//! woken together, so their reads are asked for together: this module's
//! task takes every read asked for in one go and sends them as one batch
//! direct get (`multi_last`, nats-server 2.11+), answered by one message
//! per record found and an end-of-batch status (or a single `404` when
//! none is). Fresh requests have no record yet, so a batch of them costs
//! two messages in all.
//!
//! A read begun while no other is under way goes out at once as the plain
//! direct get it always was (one request in flight pays no extra hop); the
//! reads that follow while it is out are gathered. A server that does not
//! answer the batch form (a status other than end-of-batch and no-results:
//! a server before 2.11, a bucket without direct gets, a stream without a
//! leader for the moment) gets each read on its own for the next 30 s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use jetq::broker::RecordEntry;
use jetq::{Error, ErrorKind, Result};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::acks::reply_number;
use crate::error::record;

/// The most reads in one batch (the server allows up to 1,024 results).
const MAX_BATCH: usize = 256;
/// How long a batch may go unanswered (as async-nats' request timeout).
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long reads go out one by one after the server refused a batch.
const SINGLE_FOR: Duration = Duration::from_secs(30);

/// One read asked for: a key of the record bucket and where its answer goes.
struct Read {
    key: String,
    answer: oneshot::Sender<Result<Option<RecordEntry>>>,
}

/// The handle on a bucket's reader task; dropping the last one ends it.
#[derive(Debug, Clone)]
pub(crate) struct RecordReader {
    reads: mpsc::UnboundedSender<Read>,
    /// Reads under way, batched or not.
    in_flight: Arc<AtomicUsize>,
}

/// A read under way, from [`RecordReader::enter`].
pub(crate) struct InFlight {
    in_flight: Arc<AtomicUsize>,
    alone: bool,
}

impl InFlight {
    /// Whether no other read was under way when this one began: then it
    /// goes out at once on its own (the hop through the reader task would
    /// only add to its latency), and the reads that follow while it is out
    /// are gathered.
    pub(crate) fn alone(&self) -> bool {
        self.alone
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RecordReader {
    /// Start the reader task for `store` on the current runtime.
    pub(crate) fn start(client: Client, store: kv::Store) -> RecordReader {
        let (reads, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(client, store, receiver));
        RecordReader {
            reads,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Count a read as under way until the guard is dropped.
    pub(crate) fn enter(&self) -> InFlight {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            in_flight: Arc::clone(&self.in_flight),
            alone: before == 0,
        }
    }

    /// The entry under `key`, read in a batch with the reads asked for at
    /// the same time (`Ok(None)` when there is none, or it was deleted);
    /// `None` when the reader task is gone (its runtime ended), and the
    /// caller reads on its own.
    pub(crate) async fn get(&self, key: &str) -> Option<Result<Option<RecordEntry>>> {
        let (answer, answered) = oneshot::channel();
        let read = Read {
            key: key.to_owned(),
            answer,
        };
        self.reads.send(read).ok()?;
        answered.await.ok()
    }
}

/// A batch sent and not yet fully answered.
struct Batch {
    reads: Vec<Read>,
    found: HashMap<String, RecordEntry>,
    deadline: Instant,
}

impl Batch {
    /// Answer every read: what was found, `None` for the rest.
    fn finish(self) {
        for read in self.reads {
            let entry = self.found.get(&read.key).cloned();
            let _ = read.answer.send(Ok(entry));
        }
    }

    /// Answer every read with an error made by `error`.
    fn fail(self, error: impl Fn(&str) -> Error) {
        for read in self.reads {
            let _ = read.answer.send(Err(error(&read.key)));
        }
    }
}

async fn run(client: Client, store: kv::Store, mut receiver: mpsc::UnboundedReceiver<Read>) {
    let inbox = client.new_inbox();
    let mut replies = match client.subscribe(format!("{inbox}.*")).await {
        Ok(sub) => Some(sub),
        Err(e) => {
            tracing::debug!(error = %e, "cannot subscribe for batch reads; reading records one by one");
            None
        }
    };
    let request_subject = format!("$JS.API.DIRECT.GET.{}", store.stream_name);
    let key_prefix = store.prefix.clone();
    let mut batches: HashMap<u64, Batch> = HashMap::new();
    // Set when the server refused a batch: single reads until then.
    let mut singles_until: Option<Instant> = None;
    let mut sent: u64 = 0;
    let mut singles = FuturesUnordered::new();
    let mut expiry = tokio::time::interval(BATCH_TIMEOUT / 5);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buffer: Vec<Read> = Vec::new();
    loop {
        tokio::select! {
            got = receiver.recv_many(&mut buffer, MAX_BATCH) => {
                if got == 0 {
                    break;
                }
                // Let the other attempts woken with these ask for theirs.
                tokio::task::yield_now().await;
                while buffer.len() < MAX_BATCH {
                    match receiver.try_recv() {
                        Ok(read) => buffer.push(read),
                        Err(_) => break,
                    }
                }
                let reads = std::mem::take(&mut buffer);
                let paused = singles_until.is_some_and(|until| Instant::now() < until);
                if reads.len() == 1 || replies.is_none() || paused {
                    for read in reads {
                        singles.push(single(&store, read));
                    }
                    continue;
                }
                sent += 1;
                let reply = format!("{inbox}.{sent}");
                let subjects: Vec<String> =
                    reads.iter().map(|r| format!("{key_prefix}{}", r.key)).collect();
                let body = serde_json::json!({ "multi_last": subjects });
                let payload = Bytes::from(body.to_string());
                match client
                    .publish_with_reply(request_subject.clone(), reply, payload)
                    .await
                {
                    Ok(()) => {
                        batches.insert(
                            sent,
                            Batch {
                                reads,
                                found: HashMap::new(),
                                deadline: Instant::now() + BATCH_TIMEOUT,
                            },
                        );
                    }
                    Err(e) => {
                        let message = e.to_string();
                        for read in reads {
                            let _ = read.answer.send(Err(Error::new(
                                ErrorKind::Broker,
                                format!("cannot read record {}: {message}", read.key),
                            )));
                        }
                    }
                }
            }
            Some(message) = next_reply(&mut replies) => {
                let Some(n) = reply_number(&message) else {
                    continue;
                };
                match message.status.map(|s| s.as_u16()) {
                    None => {
                        if let Some(batch) = batches.get_mut(&n) {
                            if let Some((key, Some(entry))) = entry_of(&message, &key_prefix) {
                                batch.found.insert(key, entry);
                            }
                        }
                    }
                    // End of batch; no results at all.
                    Some(204) | Some(404) => {
                        if let Some(batch) = batches.remove(&n) {
                            batch.finish();
                        }
                    }
                    Some(status) => {
                        // Not the batch form's answer (a server before 2.11,
                        // a bucket without direct gets, a stream without a
                        // leader for now): read one by one for a while.
                        tracing::debug!(%status, description = ?message.description, "batch direct get refused; reading records one by one for {SINGLE_FOR:?}");
                        singles_until = Some(Instant::now() + SINGLE_FOR);
                        if let Some(batch) = batches.remove(&n) {
                            for read in batch.reads {
                                singles.push(single(&store, read));
                            }
                        }
                    }
                }
            }
            Some(()) = singles.next(), if !singles.is_empty() => {}
            _ = expiry.tick(), if !batches.is_empty() => {
                let now = Instant::now();
                let late: Vec<u64> = batches
                    .iter()
                    .filter(|(_, b)| b.deadline <= now)
                    .map(|(n, _)| *n)
                    .collect();
                for n in late {
                    if let Some(batch) = batches.remove(&n) {
                        batch.fail(|key| {
                            Error::new(
                                ErrorKind::Timeout,
                                format!("no answer reading record {key} within {BATCH_TIMEOUT:?}"),
                            )
                        });
                    }
                }
            }
        }
    }
    // The handles are gone: finish the reads under way, then end.
    while singles.next().await.is_some() {}
}

/// The next reply on the batch subscription; never, without one.
async fn next_reply(replies: &mut Option<async_nats::Subscriber>) -> Option<Message> {
    match replies {
        Some(sub) => sub.next().await,
        None => std::future::poll_fn(|_| Poll::<Option<Message>>::Pending).await,
    }
}

/// The key and entry of one batch answer: `None` for the entry when the
/// key's last operation deleted or purged it; `None` in all for a message
/// that is not an entry of this bucket.
fn entry_of(message: &Message, key_prefix: &str) -> Option<(String, Option<RecordEntry>)> {
    let headers: &HeaderMap = message.headers.as_ref()?;
    let subject = headers.get("Nats-Subject")?.as_str();
    let key = subject.strip_prefix(key_prefix)?.to_owned();
    let revision: u64 = headers.get("Nats-Sequence")?.as_str().parse().ok()?;
    let deleted = headers
        .get("KV-Operation")
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
    let entry = (!deleted).then(|| RecordEntry::new(message.payload.clone(), revision));
    Some((key, entry))
}

/// One read on its own.
async fn single(store: &kv::Store, read: Read) {
    let result = read_entry(store, &read.key).await;
    let _ = read.answer.send(result);
}

/// The entry under `key`, read on its own (a direct get where the bucket
/// allows it); `None` when there is none or it was deleted.
pub(crate) async fn read_entry(store: &kv::Store, key: &str) -> Result<Option<RecordEntry>> {
    let entry = store
        .entry(key)
        .await
        .map_err(|e| record(format!("cannot read record entry {key}"), e))?;
    Ok(entry.and_then(|e| match e.operation {
        Operation::Put => Some(RecordEntry::new(e.value, e.revision)),
        Operation::Delete | Operation::Purge => None,
    }))
}
