//! jetq's side: no-op tasks through `jetq::Client` and `jetq::Worker` with
//! default settings, on a fresh prefix per run.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use jetq::{Args, Client, RunningWorker, State, TaskError, Worker};
use jetq_nats::{NatsBroker, NatsConfig};
use serde::{Deserialize, Serialize};

use crate::env::{run_timeout, Counter, Env, Sample};
use crate::error::{fail, BoxError, Context, Result};
use crate::monitor::peak_rss_kib;

/// How long the producer waits for one result.
const RESULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The task that is run: `demo.add`'s arguments.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AddArgs {
    a: u64,
    b: u64,
}

/// `demo.add`: the sum.
pub(crate) async fn add(Args(args): Args<AddArgs>) -> Result<u64, TaskError> {
    args.a
        .checked_add(args.b)
        .ok_or_else(|| TaskError::permanent("the sum overflows u64"))
}

/// `demo.add`, counting the tasks it ran (for fire-and-forget, where nobody
/// reads results).
async fn add_counted(
    State(done): State<Arc<Counter>>,
    args: Args<AddArgs>,
) -> Result<u64, TaskError> {
    let sum = add(args).await;
    done.add();
    sum
}

/// Connect a broker on `prefix`; `role` names the connection in `/connz`.
pub(crate) async fn broker(url: &str, prefix: &str, role: &str) -> Result<NatsBroker> {
    let config = NatsConfig::new(url)
        .prefix(prefix)
        .name(connection_name(prefix, role));
    NatsBroker::connect_with(config)
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

fn connection_name(prefix: &str, role: &str) -> String {
    format!("{prefix}-{role}")
}

/// The streams jetq creates for `prefix`.
fn stream_names(prefix: &str) -> Vec<String> {
    let config = NatsConfig::default().prefix(prefix);
    vec![
        config.stream_name(),
        format!("KV_{}", config.bucket_name()),
        config.dead_stream_name(),
    ]
}

/// One jetq run: a producer and an in-process worker, on their own
/// connections.
struct Jq {
    client: Client,
    worker: RunningWorker,
    /// Counts `demo.add_counted` tasks run.
    done: Arc<Counter>,
    task_stream: String,
    connections: Vec<String>,
    streams: Vec<String>,
}

impl Jq {
    async fn setup(env: &Env, prefix: &str, concurrency: usize, middleware: bool) -> Result<Jq> {
        let producer = broker(&env.url, prefix, "producer").await?;
        let done = Arc::new(Counter::default());
        // Default settings but the concurrency; the worker's own connection.
        let mut builder = Worker::builder(broker(&env.url, prefix, "worker").await?)
            .concurrency(concurrency)
            .state(Arc::clone(&done))
            .task("demo.add", add)
            .task("demo.add_counted", add_counted);
        let mut client = Client::new(producer);
        if middleware {
            // What a production deployment switches on: metrics (read by a
            // Prometheus endpoint) and tracing on both sides (spans recorded
            // by the OpenTelemetry SDK, not exported).
            let metrics = jetq_middleware::metrics::PrometheusEndpoint::new()
                .map_err(|e| fail(format!("cannot set up metrics: {e}")))?;
            builder = builder
                .middleware(metrics.metrics())
                .middleware(jetq_middleware::trace::TraceAttempts::new().prefix(prefix));
            client = client.middleware(jetq_middleware::trace::TracePublish::new().prefix(prefix));
        }
        let worker = builder.spawn().context("cannot start the worker")?;
        // One request through before timing: the worker is consuming and
        // both sides have created or opened the stream and the bucket.
        let value: u64 = client
            .task("demo.add")
            .args(&AddArgs { a: 1, b: 2 })
            .publish()
            .await
            .context("cannot publish the warm-up request")?
            .result(RESULT_TIMEOUT)
            .await
            .context("the warm-up request failed")?;
        if value != 3 {
            return Err(fail(format!("the warm-up request returned {value}, not 3")));
        }
        let streams = stream_names(prefix);
        Ok(Jq {
            client,
            worker,
            done,
            task_stream: streams[0].clone(),
            connections: vec![
                connection_name(prefix, "producer"),
                connection_name(prefix, "worker"),
            ],
            streams,
        })
    }

    /// Publish `demo.add` number `i` (started unchecked if `unchecked`) and
    /// wait for its result.
    async fn round_trip(&self, i: u64, unchecked: bool) -> Result<()> {
        let mut builder = self.client.task("demo.add").args(&AddArgs { a: i, b: 1 });
        if unchecked {
            builder = builder.start_unchecked();
        }
        let sum: u64 = builder
            .publish()
            .await
            .context("cannot publish")?
            .result(RESULT_TIMEOUT)
            .await
            .context("no result")?;
        if sum != i + 1 {
            return Err(fail(format!("request {i} returned {sum}, not {}", i + 1)));
        }
        Ok(())
    }
}

/// Set up a jetq run named after `kind`, run `body`, shut the worker down
/// and delete the run's streams (also when `body` fails).
async fn with_jq<T>(
    env: &Env,
    kind: &str,
    concurrency: usize,
    body: impl AsyncFnOnce(&Jq) -> Result<T>,
) -> Result<T> {
    with_jq_middleware(env, kind, concurrency, false, body).await
}

/// [`with_jq`], with the middleware of [`Jq::setup`] if `middleware`.
async fn with_jq_middleware<T>(
    env: &Env,
    kind: &str,
    concurrency: usize,
    middleware: bool,
    body: impl AsyncFnOnce(&Jq) -> Result<T>,
) -> Result<T> {
    let prefix = env.fresh_name(kind);
    let result = async {
        let jq = Jq::setup(env, &prefix, concurrency, middleware).await?;
        let result = body(&jq).await;
        jq.worker.shutdown().await.context("the worker failed")?;
        result
    }
    .await;
    env.delete_streams(&stream_names(&prefix)).await;
    result
}

/// Run `work`, failing if it takes too long for `tasks`.
async fn timed_out<T>(tasks: u64, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let limit = run_timeout(tasks);
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| fail(format!("the jetq run did not finish within {limit:?}")))?
}

/// Throughput: `tasks` requests published and every result read back by the
/// producer (`TaskHandle::result`), `env.window` at a time.
pub(crate) async fn throughput(
    env: &Env,
    tasks: u64,
    concurrency: usize,
    middleware: bool,
) -> Result<Sample> {
    let kind = if middleware { "jm" } else { "jt" };
    with_jq_middleware(env, kind, concurrency, middleware, async |jq| {
        let before = env.probe_before(&jq.connections, &jq.streams).await?;
        let start = Instant::now();
        timed_out(tasks, async {
            let mut runs = futures_util::stream::iter(0..tasks)
                .map(|i| jq.round_trip(i, false))
                .buffer_unordered(env.window);
            while let Some(run) = runs.next().await {
                run?;
            }
            Ok(())
        })
        .await?;
        let elapsed = start.elapsed();
        let after = env.probe_after(&jq.connections, &jq.streams).await?;
        Ok(Sample::new(tasks, elapsed, before, after))
    })
    .await
}

/// Publish `tasks` requests of `task`, `window` publishes at a time, none
/// to be waited for (no result sent to the producer's inbox); with
/// `ignore_result`, none whose success is recorded either.
async fn publish_all(
    client: &Client,
    task: &str,
    tasks: u64,
    window: usize,
    ignore_result: bool,
) -> Result<()> {
    let mut publishes = futures_util::stream::iter(0..tasks)
        .map(|i| {
            let request = client
                .task(task)
                .args(&AddArgs { a: i, b: 1 })
                .notify(false);
            match ignore_result {
                true => request.ignore_result(),
                false => request,
            }
            .publish()
        })
        .buffer_unordered(window);
    while let Some(published) = publishes.next().await {
        published.context("cannot publish")?;
    }
    Ok(())
}

/// Fire and forget: `tasks` requests published and run, their records never
/// read; done when every request has been run and acknowledged. With
/// `ignore_result` (the requests say nobody reads their result) a success
/// writes no record; without, every record is written.
pub(crate) async fn fire_and_forget(
    env: &Env,
    tasks: u64,
    concurrency: usize,
    ignore_result: bool,
) -> Result<Sample> {
    let prefix = if ignore_result { "jf" } else { "jg" };
    with_jq(env, prefix, concurrency, async |jq| {
        let before = env.probe_before(&jq.connections, &jq.streams).await?;
        let start = Instant::now();
        timed_out(tasks, async {
            publish_all(
                &jq.client,
                "demo.add_counted",
                tasks,
                env.window,
                ignore_result,
            )
            .await?;
            jq.done.wait_for(tasks).await;
            env.wait_empty(&jq.task_stream, Duration::from_secs(30))
                .await
        })
        .await?;
        let elapsed = start.elapsed();
        let after = env.probe_after(&jq.connections, &jq.streams).await?;
        Ok(Sample::new(tasks, elapsed, before, after))
    })
    .await
}

/// Latency with one request in flight: publish → result read by the
/// producer; with `unchecked`, each request is started without the claim's
/// record read (`start_unchecked`).
pub(crate) async fn latency(
    env: &Env,
    requests: u64,
    concurrency: usize,
    unchecked: bool,
) -> Result<Vec<Duration>> {
    with_jq(
        env,
        if unchecked { "ju" } else { "jl" },
        concurrency,
        async |jq| {
            timed_out(requests, async {
                let mut latencies = Vec::with_capacity(requests as usize);
                for i in 0..requests {
                    let start = Instant::now();
                    jq.round_trip(i, unchecked).await?;
                    latencies.push(start.elapsed());
                }
                Ok(latencies)
            })
            .await
        },
    )
    .await
}

/// Latency at a steady rate: `requests` started `rate` per second, each
/// timed from its publish to its result read.
pub(crate) async fn latency_at_rate(
    env: &Env,
    requests: u64,
    rate: f64,
    concurrency: usize,
) -> Result<Vec<Duration>> {
    with_jq(env, "jr", concurrency, async |jq| {
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        timed_out(requests, async {
            let start = tokio::time::Instant::now();
            let mut runs = Vec::with_capacity(requests as usize);
            for i in 0..requests {
                tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
                let client = jq.client.clone();
                runs.push(tokio::spawn(async move {
                    let started = Instant::now();
                    let sum: u64 = client
                        .task("demo.add")
                        .args(&AddArgs { a: i, b: 1 })
                        .publish()
                        .await?
                        .result(RESULT_TIMEOUT)
                        .await?;
                    if sum != i + 1 {
                        return Err(fail(format!("request {i} returned {sum}")));
                    }
                    Ok::<_, BoxError>(started.elapsed())
                }));
            }
            let mut latencies = Vec::with_capacity(runs.len());
            for run in runs {
                latencies.push(run.await.context("a request task failed")??);
            }
            Ok(latencies)
        })
        .await
    })
    .await
}

/// What the memory run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemorySample {
    /// Peak resident memory of the worker process, KiB.
    pub(crate) peak_rss_kib: u64,
    /// Tasks per second from starting the worker process to an empty queue.
    pub(crate) drain_per_s: f64,
}

/// Kills the child worker if the run ends early.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Memory: queue `tasks` requests, then drain them with a worker in its own
/// process (this binary's hidden `worker` command) at `concurrency`, and
/// read that process's peak resident memory.
pub(crate) async fn memory(env: &Env, tasks: u64, concurrency: usize) -> Result<MemorySample> {
    let prefix = env.fresh_name("jm");
    let result = async {
        let client = Client::new(broker(&env.url, &prefix, "producer").await?);
        timed_out(
            tasks,
            publish_all(&client, "demo.add", tasks, env.window, false),
        )
        .await?;
        let exe = std::env::current_exe().context("cannot find this program to run the worker")?;
        let start = Instant::now();
        let child = Command::new(&exe)
            .arg("worker")
            .arg("--nats")
            .arg(&env.url)
            .arg("--prefix")
            .arg(&prefix)
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {} worker", exe.display()))?;
        let mut child = ChildGuard(child);
        let task_stream = NatsConfig::default().prefix(&prefix).stream_name();
        let deadline = Instant::now() + run_timeout(tasks);
        loop {
            if let Some(status) = child.0.try_wait()? {
                return Err(fail(format!("the worker process exited early ({status})")));
            }
            if env.stream_messages(&task_stream).await? == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(fail("the worker process did not drain the queue in time"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain = start.elapsed();
        let peak_rss_kib = peak_rss_kib(child.0.id())?;
        // Closing its standard input stops the worker gracefully.
        drop(child.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(40);
        while child.0.try_wait()?.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(MemorySample {
            peak_rss_kib,
            drain_per_s: tasks as f64 / drain.as_secs_f64().max(1e-9),
        })
    }
    .await;
    env.delete_streams(&stream_names(&prefix)).await;
    result
}

/// The hidden `worker` command: serve `demo.add` on `prefix` until standard
/// input closes.
pub(crate) async fn worker_process(url: &str, prefix: &str, concurrency: usize) -> Result<()> {
    let worker = Worker::builder(broker(url, prefix, "worker").await?)
        .concurrency(concurrency)
        .task("demo.add", add)
        .spawn()
        .context("cannot start the worker")?;
    let stdin = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while stdin.read(&mut sink)? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
    let stopped = worker.shutdown().await.context("the worker failed");
    stdin
        .context("the standard input reader failed")?
        .context("cannot read standard input")?;
    stopped
}
