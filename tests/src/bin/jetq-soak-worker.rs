//! `jetq-soak-worker`: the demo tasks plus a flaky one and a workflow, for
//! the soak tests (`tests/tests/soak.rs`, `tests/tests/workflow_soak.rs`,
//! `scripts/soak`).
//!
//! It serves the demo worker's tasks with the same behaviour:
//!
//! - `demo.add` `{"a": i64, "b": i64}` → the sum
//! - `demo.sleep` `{"ms": u64}` → sleeps, then returns the milliseconds slept
//! - `demo.fail` `{"times": u32}` → a retryable error until the attempt
//!   number exceeds `times`, then succeeds with the attempt number
//! - `demo.panic` → panics
//!
//! and `soak.flaky` `{"p_fail": f64, "p_panic": f64, "max_sleep_ms": u64}`:
//! sleeps a random time up to `max_sleep_ms`, then panics with probability
//! `p_panic`, fails (retryably) with probability `p_fail`, and otherwise
//! succeeds with `{"attempt", "worker", "exec"}`.
//!
//! And a workflow, `soak.wf` (for `tests/tests/workflow_soak.rs`), with input
//! `{"steps": N, "p_fail": f64, "step_ms": u64, "base": u64, "sleep_ms": u64
//! | null, "sleep_at": i, "recv": bool, "recv_at": j, "recv_timeout_ms": u64}`
//! (all but `steps` optional): steps `step_0` .. `step_<N-1>`, each one
//! audited execution that takes a random time up to `step_ms`, then fails
//! (retryably) with probability `p_fail` and otherwise returns
//! `{"i": i, "exec": <its exec>, "out": base + i}`; a
//! durable `sleep` of `sleep_ms` before step `sleep_at` (default 1), and a
//! `recv` of a number on topic `go` (timeout `recv_timeout_ms`, default
//! 60 s) before step `recv_at` (default N - 1; the sleep comes first when
//! both are before the same step). It returns `{"sum": S, "received": R}`:
//! `R` the number received (`null` on timeout), `S` the sum of the steps'
//! `out`s plus `R`. A step's audit entries name it (`"step": "step_<i>"`).
//!
//! Every execution of a handler leaves evidence outside jetq: it publishes an
//! audit entry to JetStream (subject `<audit-subject>.<phase>`, a stream the
//! soak test creates) when it starts and when it ends (`success`, `fail` or
//! `panic`, published before the panic). Each execution has its own id
//! (`exec`, a UUID); an entry's `Nats-Msg-Id` is `<exec>-<phase>`, so a
//! retried publish is deduplicated while two executions never are. A handler
//! does not return until its entry is stored (it retries through a server
//! restart), so a succeeded record without a `success` entry, or two
//! executions of the same attempt (of a `soak.wf` step: of a step already
//! checkpointed), would be jetq's doing.
//!
//! Unlike the demo worker, it keeps trying to start for up to a minute while
//! the server is unreachable (the soak test starts replacement workers while
//! the server may be restarting), and a SIGTERM during start-up stops it
//! cleanly (exit 0).

use std::future::Future;
use std::io::IsTerminal;
use std::time::Duration;

use async_nats::header::{HeaderMap, NATS_MESSAGE_ID};
use async_nats::jetstream;
use clap::Parser;
use jetq::workflow::WorkflowContext;
use jetq::{Args, CancellationToken, Context, RetryPolicy, State, Task, TaskError, Worker};
use serde::Deserialize;
use serde_json::{json, Value};

/// Serve the demo tasks, `soak.flaky` and `soak.wf`, auditing every execution.
#[derive(Debug, Parser)]
#[command(name = "jetq-soak-worker", version, about)]
struct Opts {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Tasks run at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Queue to serve.
    #[arg(long, default_value = jetq::request::DEFAULT_QUEUE)]
    queue: String,
    /// Worker name (default: host and process id).
    #[arg(long)]
    name: Option<String>,
    /// Seconds before an unacknowledged request goes to another worker.
    #[arg(long, default_value_t = 2.0)]
    ack_wait: f64,
    /// Retries allowed when a request does not say.
    #[arg(long, default_value_t = 5)]
    max_retries: u32,
    /// Milliseconds before the first retry (doubling, with jitter).
    #[arg(long, default_value_t = 50)]
    backoff_ms: u64,
    /// Longest delay between retries, in milliseconds.
    #[arg(long, default_value_t = 500)]
    backoff_max_ms: u64,
    /// Subject prefix of the audit entries; a stream must capture `<prefix>.>`.
    #[arg(long, default_value = "soak.audit")]
    audit_subject: String,
}

/// Publishes audit entries; given to the handlers as state.
#[derive(Clone)]
struct Audit {
    js: jetstream::Context,
    subject: String,
}

/// How long an audit entry is retried before the attempt gives up (with a
/// retryable error, so the request is not lost).
const AUDIT_PATIENCE: Duration = Duration::from_secs(120);

impl Audit {
    /// Publish the entry of `phase` of execution `exec` (of workflow step
    /// `step`, if it is one).
    async fn publish(
        &self,
        ctx: &Context,
        step: Option<&str>,
        exec: &str,
        phase: &str,
        detail: Value,
    ) -> Result<(), TaskError> {
        let mut entry = json!({
            "id": ctx.id(),
            "task": ctx.task(),
            "attempt": ctx.attempt(),
            "worker": ctx.worker(),
            "exec": exec,
            "phase": phase,
            "at_ms": jetq::time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000,
            "detail": detail,
        });
        if let Some(step) = step {
            entry["step"] = json!(step);
        }
        let payload = bytes_of(&entry);
        let subject = format!("{}.{phase}", self.subject);
        let msg_id = format!("{exec}-{phase}");
        let deadline = tokio::time::Instant::now() + AUDIT_PATIENCE;
        let mut pause = Duration::from_millis(50);
        loop {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, msg_id.as_str());
            let sent = match self
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(id = ctx.id(), phase, error = %e, "audit publish failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(TaskError::new(format!(
                        "cannot store the audit entry `{phase}`: {e}"
                    )))
                }
            }
        }
    }
}

fn bytes_of(value: &Value) -> bytes::Bytes {
    bytes::Bytes::from(value.to_string())
}

/// How an execution ended, before it is audited.
enum Outcome<T> {
    Success(T),
    Fail(TaskError),
    Panic(String),
}

/// Run `body` as one audited execution: a `start` entry, the body, then an
/// entry for its outcome; a `Panic` outcome panics after its entry is stored.
async fn audited<T, F, Fut>(audit: &Audit, ctx: &Context, body: F) -> Result<T, TaskError>
where
    T: serde::Serialize,
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Outcome<T>>,
{
    audited_as(audit, ctx, None, body).await
}

/// [`audited`], the entries naming workflow step `step` if given.
async fn audited_as<T, F, Fut>(
    audit: &Audit,
    ctx: &Context,
    step: Option<&str>,
    body: F,
) -> Result<T, TaskError>
where
    T: serde::Serialize,
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Outcome<T>>,
{
    let exec = uuid::Uuid::new_v4().to_string();
    audit
        .publish(ctx, step, &exec, "start", Value::Null)
        .await?;
    match body(exec.clone()).await {
        Outcome::Success(value) => {
            let shown = serde_json::to_value(&value).unwrap_or(Value::Null);
            audit.publish(ctx, step, &exec, "success", shown).await?;
            Ok(value)
        }
        Outcome::Fail(err) => {
            audit
                .publish(ctx, step, &exec, "fail", json!(err.to_string()))
                .await?;
            Err(err)
        }
        Outcome::Panic(message) => {
            audit
                .publish(ctx, step, &exec, "panic", json!(message))
                .await?;
            panic!("{message}")
        }
    }
}

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

async fn add(
    ctx: Context,
    State(audit): State<Audit>,
    Args(args): Args<AddArgs>,
) -> Result<i64, TaskError> {
    audited(&audit, &ctx, |_| async move {
        match args.a.checked_add(args.b) {
            Some(sum) => Outcome::Success(sum),
            None => Outcome::Fail(TaskError::permanent("the sum overflows i64")),
        }
    })
    .await
}

#[derive(Deserialize)]
struct SleepArgs {
    ms: u64,
}

async fn sleep(
    ctx: Context,
    State(audit): State<Audit>,
    Args(args): Args<SleepArgs>,
) -> Result<u64, TaskError> {
    let cancel = ctx.clone();
    audited(&audit, &ctx, |_| async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(args.ms)) => Outcome::Success(args.ms),
            _ = cancel.cancelled() => Outcome::Fail(TaskError::new("interrupted")),
        }
    })
    .await
}

#[derive(Deserialize)]
struct FailArgs {
    times: u32,
}

async fn fail(
    ctx: Context,
    State(audit): State<Audit>,
    Args(args): Args<FailArgs>,
) -> Result<u32, TaskError> {
    let attempt = ctx.attempt();
    audited(&audit, &ctx, |_| async move {
        if attempt <= args.times {
            Outcome::Fail(TaskError::new(format!(
                "failing on purpose: attempt {attempt} of the first {}",
                args.times
            )))
        } else {
            Outcome::Success(attempt)
        }
    })
    .await
}

async fn panic(ctx: Context, State(audit): State<Audit>) -> Result<(), TaskError> {
    audited(&audit, &ctx, |_| async {
        Outcome::<()>::Panic("demo.panic panics on purpose".to_owned())
    })
    .await
}

#[derive(Deserialize)]
struct FlakyArgs {
    #[serde(default)]
    p_fail: f64,
    #[serde(default)]
    p_panic: f64,
    #[serde(default)]
    max_sleep_ms: u64,
}

async fn flaky(
    ctx: Context,
    State(audit): State<Audit>,
    Args(args): Args<FlakyArgs>,
) -> Result<Value, TaskError> {
    let (attempt, worker) = (ctx.attempt(), ctx.worker().to_owned());
    audited(&audit, &ctx, |exec| async move {
        let ms = fastrand::u64(0..=args.max_sleep_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let roll = fastrand::f64();
        if roll < args.p_panic {
            Outcome::Panic(format!("soak.flaky panics on purpose (attempt {attempt})"))
        } else if roll < args.p_panic + args.p_fail {
            Outcome::Fail(TaskError::new(format!(
                "soak.flaky fails on purpose (attempt {attempt})"
            )))
        } else {
            Outcome::Success(json!({"attempt": attempt, "worker": worker, "exec": exec}))
        }
    })
    .await
}

#[derive(Deserialize)]
struct WfArgs {
    steps: u32,
    #[serde(default)]
    p_fail: f64,
    #[serde(default)]
    step_ms: u64,
    #[serde(default)]
    base: u64,
    #[serde(default)]
    sleep_ms: Option<u64>,
    #[serde(default)]
    sleep_at: Option<u32>,
    #[serde(default)]
    recv: bool,
    #[serde(default)]
    recv_at: Option<u32>,
    #[serde(default)]
    recv_timeout_ms: Option<u64>,
}

/// The value of a step of `soak.wf`.
#[derive(serde::Serialize, Deserialize)]
struct StepOut {
    i: u32,
    exec: String,
    out: u64,
}

/// `soak.wf`: see the module docs.
async fn workflow(
    wf: WorkflowContext,
    State(audit): State<Audit>,
    Args(args): Args<WfArgs>,
) -> Result<Value, TaskError> {
    let ctx = wf.context().clone();
    let sleep_at = args.sleep_at.unwrap_or(1);
    let recv_at = args.recv_at.unwrap_or(args.steps.saturating_sub(1));
    let mut sum: u64 = 0;
    let mut received: Option<u64> = None;
    for i in 0..args.steps {
        if let (Some(ms), true) = (args.sleep_ms, i == sleep_at) {
            wf.sleep(Duration::from_millis(ms)).await?;
        }
        if args.recv && i == recv_at {
            let timeout = Duration::from_millis(args.recv_timeout_ms.unwrap_or(60_000));
            received = wf.recv::<u64>(Some("go"), timeout).await?;
        }
        let name = format!("step_{i}");
        let (p_fail, out) = (args.p_fail, args.base.wrapping_add(u64::from(i)));
        let (attempt, step_ms) = (ctx.attempt(), args.step_ms);
        let step = audited_as(&audit, &ctx, Some(&name), |exec| async move {
            let ms = fastrand::u64(0..=step_ms);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if fastrand::f64() < p_fail {
                Outcome::Fail(TaskError::new(format!(
                    "step_{i} fails on purpose (attempt {attempt})"
                )))
            } else {
                Outcome::Success(StepOut { i, exec, out })
            }
        });
        let done: StepOut = wf.step(&name, step).await?;
        sum = sum.wrapping_add(done.out);
    }
    sum = sum.wrapping_add(received.unwrap_or(0));
    Ok(json!({"sum": sum, "received": received}))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let opts = Opts::parse();
    match run(opts).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jetq-soak-worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How long the worker keeps trying to start (connect, create its consumer)
/// while the server is unreachable: the soak test starts replacement workers
/// while the server may be restarting.
const START_PATIENCE: Duration = Duration::from_secs(60);

async fn run(opts: Opts) -> jetq::Result<()> {
    if !(opts.ack_wait.is_finite() && opts.ack_wait > 0.0) {
        return Err(jetq::Error::new(
            jetq::ErrorKind::Config,
            "--ack-wait must be a positive number of seconds",
        ));
    }
    // Listen for SIGINT/SIGTERM from the very start, so a signal that comes
    // while the worker is still connecting stops it cleanly too.
    let stop = CancellationToken::new();
    listen_for_signals(stop.clone()).map_err(|e| {
        jetq::Error::new(
            jetq::ErrorKind::Config,
            format!("cannot listen for signals: {e}"),
        )
    })?;
    let deadline = tokio::time::Instant::now() + START_PATIENCE;
    loop {
        // `run_until` fails only while starting (connecting, creating the
        // stream, bucket and consumer); once started it returns after a signal.
        match start_and_run(&opts, stop.clone()).await {
            Err(e) if tokio::time::Instant::now() < deadline && !stop.is_cancelled() => {
                tracing::warn!(error = %e, "cannot start yet; retrying in 250 ms");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
            }
            // Stopped while still starting: nothing ran, nothing to report.
            Err(_) if stop.is_cancelled() => return Ok(()),
            result => return result,
        }
    }
}

/// Cancel `stop` on SIGTERM or SIGINT; the handlers are installed before this returns.
#[cfg(unix)]
fn listen_for_signals(stop: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        stop.cancel();
    });
    Ok(())
}

#[cfg(not(unix))]
fn listen_for_signals(stop: CancellationToken) -> std::io::Result<()> {
    tokio::spawn(async move {
        jetq::shutdown_signal().await;
        stop.cancel();
    });
    Ok(())
}

async fn start_and_run(opts: &Opts, stop: CancellationToken) -> jetq::Result<()> {
    let broker = jetq_nats::NatsBroker::connect(&opts.nats).await?;
    let audit = Audit {
        js: jetstream::new(broker.client().clone()),
        subject: opts.audit_subject.clone(),
    };
    let policy = RetryPolicy::new(opts.max_retries)
        .base(Duration::from_millis(opts.backoff_ms))
        .max(Duration::from_millis(opts.backoff_max_ms));
    let mut builder = Worker::builder(broker)
        .default_queue(opts.queue.clone())
        .concurrency(opts.concurrency)
        .ack_wait(Duration::from_secs_f64(opts.ack_wait))
        .state(audit)
        .register(Task::new("demo.add", add).retry_policy(policy))
        .register(Task::new("demo.sleep", sleep).retry_policy(policy))
        .register(Task::new("demo.fail", fail).retry_policy(policy))
        .register(Task::new("demo.panic", panic).retry_policy(policy))
        .register(Task::new("soak.flaky", flaky).retry_policy(policy))
        .register(Task::new("soak.wf", workflow).retry_policy(policy));
    if let Some(name) = &opts.name {
        builder = builder.name(name.clone());
    }
    builder.run_until(stop.cancelled_owned()).await
}
