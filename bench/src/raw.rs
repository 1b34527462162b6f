//! The baseline: the same JetStream work with async-nats alone.
//!
//! A work-queue stream holds the requests; a worker pulls them from a durable
//! pull consumer (persistent pull, 16 handled at once, like jetq's default),
//! writes one KV entry per task (its result) and acks; the producer publishes
//! with publish acks pipelined and watches the bucket until it has seen every
//! result. No ids for deduplication, no records beyond the result, no
//! retries: the least a hand-written system does.

use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::kv::{self, Operation, Watch};
use async_nats::jetstream::{self, stream};
use async_nats::Subject;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::env::{run_timeout, Counter, Env, Sample};
use crate::error::{fail, BoxError, Context, Result};

/// A request: which result to write, and the numbers to add.
#[derive(Debug, Serialize, Deserialize)]
struct RawTask {
    id: String,
    a: u64,
    b: u64,
}

/// The encoded request number `i`, with id `t{i}`.
fn payload(i: u64) -> Result<Bytes> {
    let task = RawTask {
        id: format!("t{i}"),
        a: i,
        b: 1,
    };
    Ok(Bytes::from(serde_json::to_vec(&task)?))
}

/// The request number of result key `t{i}`.
fn index_of(key: &str) -> Option<usize> {
    key.strip_prefix('t')?.parse().ok()
}

/// Names of a raw run's streams: the task stream and the bucket's.
fn stream_names(base: &str) -> (String, String) {
    let upper = base.to_uppercase();
    (format!("{upper}_TASKS"), format!("{upper}_RESULTS"))
}

/// One raw run's connections, stream, bucket and consumer.
struct Raw {
    /// The producer's JetStream context.
    js: jetstream::Context,
    /// The producer's handle on the bucket (for watching results).
    kv: kv::Store,
    /// The worker's handle on the bucket.
    worker_kv: Arc<kv::Store>,
    consumer: PullConsumer,
    subject: Subject,
    task_stream: String,
    connections: Vec<String>,
    streams: Vec<String>,
}

impl Raw {
    /// Create the stream, the bucket and the consumer named after `base`, and
    /// connect a producer and a worker (two connections, as two processes
    /// would have).
    async fn setup(env: &Env, base: &str) -> Result<Raw> {
        let (task_stream, bucket) = stream_names(base);
        env.js
            .create_stream(stream::Config {
                name: task_stream.clone(),
                subjects: vec![format!("{base}.tasks.>")],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create stream {task_stream}"))?;
        env.js
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                history: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create bucket {bucket}"))?;
        let producer_name = format!("{base}-producer");
        let worker_name = format!("{base}-worker");
        let js = jetstream::new(connect(env, &producer_name).await?);
        let worker_js = jetstream::new(connect(env, &worker_name).await?);
        let consumer = worker_js
            .get_stream(&task_stream)
            .await
            .with_context(|| format!("cannot open stream {task_stream}"))?
            .create_consumer(consumer::pull::Config {
                durable_name: Some("worker".to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await
            .context("cannot create the consumer")?;
        let kv = js
            .get_key_value(&bucket)
            .await
            .with_context(|| format!("cannot open bucket {bucket}"))?;
        let worker_kv = Arc::new(
            worker_js
                .get_key_value(&bucket)
                .await
                .with_context(|| format!("cannot open bucket {bucket}"))?,
        );
        Ok(Raw {
            js,
            kv,
            worker_kv,
            consumer,
            subject: Subject::from(format!("{base}.tasks.default.demo.add")),
            streams: vec![task_stream.clone(), format!("KV_{bucket}")],
            task_stream,
            connections: vec![producer_name, worker_name],
        })
    }

    /// Run the worker in the background: pull, (write the result when
    /// `write_results`), ack, count.
    fn spawn_worker(
        &self,
        concurrency: usize,
        write_results: bool,
        done: Arc<Counter>,
    ) -> JoinHandle<Result<()>> {
        let consumer = self.consumer.clone();
        let kv = write_results.then(|| Arc::clone(&self.worker_kv));
        tokio::spawn(async move {
            let messages = consumer.messages().await.context("cannot start pulling")?;
            messages
                .map_err(|e| -> BoxError { Box::new(e) })
                .try_for_each_concurrent(concurrency, |message| {
                    let kv = kv.clone();
                    let done = Arc::clone(&done);
                    async move {
                        if let Some(kv) = kv {
                            let task: RawTask = serde_json::from_slice(&message.payload)?;
                            let sum = task.a.saturating_add(task.b);
                            kv.put(&task.id, Bytes::from(sum.to_string()))
                                .await
                                .context("cannot write a result")?;
                        }
                        message.ack().await?;
                        done.add();
                        Ok(())
                    }
                })
                .await
        })
    }

    /// Publish requests `ids`, keeping at most `window` publish acks
    /// outstanding.
    async fn publish_range(&self, ids: Range<u64>, window: usize) -> Result<()> {
        let mut acks: VecDeque<PublishAckFuture> = VecDeque::with_capacity(window);
        for i in ids {
            if acks.len() >= window {
                if let Some(ack) = acks.pop_front() {
                    ack.await.context("a publish was not acknowledged")?;
                }
            }
            let ack = self
                .js
                .publish(self.subject.clone(), payload(i)?)
                .await
                .context("cannot publish")?;
            acks.push_back(ack);
        }
        for ack in acks {
            ack.await.context("a publish was not acknowledged")?;
        }
        Ok(())
    }

    /// Publish one request and wait until it is acknowledged.
    async fn publish_one(&self, i: u64) -> Result<()> {
        self.js
            .publish(self.subject.clone(), payload(i)?)
            .await
            .context("cannot publish")?
            .await
            .context("a publish was not acknowledged")?;
        Ok(())
    }

    /// One request through the system before timing, so that consumers,
    /// subscriptions and caches are in place.
    async fn warm_up(&self, watch: Option<&mut Watch>, done: &Counter) -> Result<()> {
        let id = u64::MAX - 1;
        self.publish_one(id).await?;
        match watch {
            Some(watch) => wait_for_key(watch, &format!("t{id}")).await,
            None => {
                done.wait_for(1).await;
                Ok(())
            }
        }
    }
}

/// A connection named `name` (the name picks it out in `/connz`).
async fn connect(env: &Env, name: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .connect(env.url.as_str())
        .await
        .with_context(|| format!("cannot connect to {}", env.url))
}

/// The next result put in the bucket.
async fn next_put(watch: &mut Watch) -> Result<kv::Entry> {
    loop {
        let entry = watch
            .next()
            .await
            .ok_or_else(|| fail("the bucket watch ended"))?
            .context("the bucket watch failed")?;
        if entry.operation == Operation::Put {
            return Ok(entry);
        }
    }
}

/// Wait for the result with key `key`.
async fn wait_for_key(watch: &mut Watch, key: &str) -> Result<()> {
    while next_put(watch).await?.key != key {}
    Ok(())
}

/// Run `work`, failing if the worker stops first or `tasks` take too long.
async fn guarded<T>(
    worker: &mut JoinHandle<Result<()>>,
    tasks: u64,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    let limit = run_timeout(tasks);
    tokio::select! {
        r = tokio::time::timeout(limit, work) => {
            r.map_err(|_| fail(format!("the raw run did not finish within {limit:?}")))?
        }
        w = worker => Err(match w {
            Ok(Ok(())) => fail("the raw worker stopped"),
            Ok(Err(e)) => e,
            Err(e) => Box::new(e),
        }),
    }
}

/// Set up a raw run named after `kind`, run `body` on it, stop the worker
/// and delete the run's streams (also when `body` fails).
async fn with_raw<T>(
    env: &Env,
    kind: &str,
    concurrency: usize,
    write_results: bool,
    body: impl AsyncFnOnce(&Raw, &mut JoinHandle<Result<()>>, &Counter) -> Result<T>,
) -> Result<T> {
    let base = env.fresh_name(kind);
    let result = async {
        let raw = Raw::setup(env, &base).await?;
        let done = Arc::new(Counter::default());
        let mut worker = raw.spawn_worker(concurrency, write_results, Arc::clone(&done));
        let result = body(&raw, &mut worker, &done).await;
        worker.abort();
        result
    }
    .await;
    let (task_stream, bucket) = stream_names(&base);
    env.delete_streams(&[task_stream, format!("KV_{bucket}")])
        .await;
    result
}

/// Throughput: `tasks` requests published, run, and every result seen by the
/// producer.
pub(crate) async fn throughput(env: &Env, tasks: u64, concurrency: usize) -> Result<Sample> {
    with_raw(env, "rt", concurrency, true, async |raw, worker, done| {
        let mut watch = raw.kv.watch_all().await.context("cannot watch")?;
        raw.warm_up(Some(&mut watch), done).await?;
        let before = env.probe_before(&raw.connections, &raw.streams).await?;
        let start = Instant::now();
        let work = async {
            let watch = &mut watch;
            let results = async move {
                for _ in 0..tasks {
                    next_put(watch).await?;
                }
                Ok(())
            };
            tokio::try_join!(raw.publish_range(0..tasks, env.window), results)?;
            Ok(())
        };
        guarded(worker, tasks, work).await?;
        let elapsed = start.elapsed();
        let after = env.probe_after(&raw.connections, &raw.streams).await?;
        Ok(Sample::new(tasks, elapsed, before, after))
    })
    .await
}

/// Fire and forget: `tasks` requests published, pulled and acked; done when
/// the stream is empty.
pub(crate) async fn fire_and_forget(env: &Env, tasks: u64, concurrency: usize) -> Result<Sample> {
    with_raw(env, "rf", concurrency, false, async |raw, worker, done| {
        raw.warm_up(None, done).await?;
        let before = env.probe_before(&raw.connections, &raw.streams).await?;
        let start = Instant::now();
        let work = async {
            raw.publish_range(0..tasks, env.window).await?;
            done.wait_for(tasks + 1).await;
            env.wait_empty(&raw.task_stream, Duration::from_secs(30))
                .await
        };
        guarded(worker, tasks, work).await?;
        let elapsed = start.elapsed();
        let after = env.probe_after(&raw.connections, &raw.streams).await?;
        Ok(Sample::new(tasks, elapsed, before, after))
    })
    .await
}

/// Latency with one request in flight: publish (acknowledged) → result seen.
pub(crate) async fn latency(env: &Env, requests: u64, concurrency: usize) -> Result<Vec<Duration>> {
    with_raw(env, "rl", concurrency, true, async |raw, worker, done| {
        let mut watch = raw.kv.watch_all().await.context("cannot watch")?;
        raw.warm_up(Some(&mut watch), done).await?;
        let work = async {
            let mut latencies = Vec::with_capacity(requests as usize);
            for i in 0..requests {
                let start = Instant::now();
                raw.publish_one(i).await?;
                wait_for_key(&mut watch, &format!("t{i}")).await?;
                latencies.push(start.elapsed());
            }
            Ok(latencies)
        };
        guarded(worker, requests, work).await
    })
    .await
}

/// Latency at a steady rate: `requests` sent `rate` per second, each timed
/// from its publish to its result seen.
pub(crate) async fn latency_at_rate(
    env: &Env,
    requests: u64,
    rate: f64,
    concurrency: usize,
) -> Result<Vec<Duration>> {
    with_raw(env, "rr", concurrency, true, async |raw, worker, done| {
        let mut watch = raw.kv.watch_all().await.context("cannot watch")?;
        raw.warm_up(Some(&mut watch), done).await?;
        let count = requests as usize;
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let work = async {
            let start = tokio::time::Instant::now();
            let publisher = async {
                let mut sent = Vec::with_capacity(count);
                let mut acks: VecDeque<PublishAckFuture> = VecDeque::new();
                for i in 0..requests {
                    tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
                    sent.push(Instant::now());
                    let ack = raw
                        .js
                        .publish(raw.subject.clone(), payload(i)?)
                        .await
                        .context("cannot publish")?;
                    acks.push_back(ack);
                    // Collect acknowledgements that have arrived meanwhile.
                    while acks.len() > env.window {
                        if let Some(ack) = acks.pop_front() {
                            ack.await.context("a publish was not acknowledged")?;
                        }
                    }
                }
                for ack in acks {
                    ack.await.context("a publish was not acknowledged")?;
                }
                Ok::<_, BoxError>(sent)
            };
            let watch = &mut watch;
            let results = async move {
                let mut seen = vec![None; count];
                for _ in 0..count {
                    let entry = next_put(watch).await?;
                    if let Some(slot) = index_of(&entry.key).and_then(|i| seen.get_mut(i)) {
                        *slot = Some(Instant::now());
                    }
                }
                Ok::<_, BoxError>(seen)
            };
            let (sent, seen) = tokio::try_join!(publisher, results)?;
            sent.iter()
                .zip(seen)
                .map(|(sent, seen)| {
                    seen.map(|at| at.saturating_duration_since(*sent))
                        .ok_or_else(|| fail("a result was not seen"))
                })
                .collect::<Result<Vec<_>>>()
        };
        guarded(worker, requests, work).await
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn payload_and_keys() {
        let task: RawTask = serde_json::from_slice(&payload(7).unwrap()).unwrap();
        assert_eq!((task.id.as_str(), task.a, task.b), ("t7", 7, 1));
        assert_eq!(index_of("t42"), Some(42));
        assert_eq!(index_of("x"), None);
        assert_eq!(
            stream_names("b1rt"),
            ("B1RT_TASKS".to_owned(), "B1RT_RESULTS".to_owned())
        );
    }
}
