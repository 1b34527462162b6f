//! `jetq-demo-worker`: serves the demo tasks, for trying jetq with the CLI.
//!
//! - `demo.add` `{"a": i64, "b": i64}` → the sum
//! - `demo.sleep` `{"ms": u64}` → sleeps, then returns the milliseconds slept;
//!   stops early (a retryable error) when the worker shuts down
//! - `demo.slow` `{"ms": u64}` → like `demo.sleep`, but ignores shutdown: it
//!   finishes within the shutdown timeout or is stopped and released
//! - `demo.fail` `{"times": u32}` → a retryable error until the attempt
//!   number exceeds `times`, then succeeds with the attempt number
//! - `demo.panic` → panics
//! - `demo.pipeline` (a workflow) `n` → step 1 returns n+1, step 2 doubles it,
//!   step 3 returns a string with that number and the `user` of the request's
//!   metadata
//! - `demo.steps` (a workflow) `{"count": u32, "ms": u64}` → `count` steps,
//!   each printing `step <i> of <id>` on stdout and sleeping `ms`; returns
//!   `count`
//! - `demo.checkout` (a workflow) `{"order": ID}` → sets event `status` =
//!   `reserved`; waits up to 60 s for a message on topic `payment`
//!   (`{"amount": N}`); on timeout sets `status` = `timed_out` and returns
//!   `{"timed_out": true}`; otherwise runs step `charge` (prints `charging
//!   ID`), sleeps durably 5 s, sets `status` = `shipped` and returns
//!   `{"paid": N}`. Its waits hold no worker slot.
//! - `demo.whoami`, `demo.admin`: who a signed request runs for, and a task
//!   for the role `admin` (see `demo_auth.rs`; `--auth-key-file`)
//!
//! With `--otlp` each attempt is a trace span (a child of the producer's
//! span when the request carries `traceparent`), exported over OTLP/HTTP to
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (default `http://localhost:4318`) as
//! `OTEL_SERVICE_NAME` (default `jetq-demo-worker`).

mod demo_auth;

use std::path::PathBuf;
use std::time::Duration;

use jetq::workflow::WorkflowContext;
use jetq::{Args, Context, Meta, TaskError, Worker};
use jetq_cli::args::{seconds, DAY, MIN_ACK_WAIT};
use serde::Deserialize;

/// Serve the demo tasks `demo.add`, `demo.sleep`, `demo.slow`, `demo.fail`,
/// `demo.panic`, `demo.whoami`, `demo.admin`, and the demo workflows
/// `demo.pipeline`, `demo.steps` and `demo.checkout`.
#[derive(Debug, clap::Parser)]
#[command(name = "jetq-demo-worker", version, about)]
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
    /// Seconds before an unacknowledged request goes to another worker
    /// (0.3 to 86400).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, default_value = "30", value_parser = seconds(MIN_ACK_WAIT, DAY))]
    ack_wait: Duration,
    /// Seconds running tasks may take to finish after SIGINT/SIGTERM before
    /// they are stopped and released for redelivery (at most 86400).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, default_value = "30", value_parser = seconds(Duration::ZERO, DAY))]
    shutdown_timeout: Duration,
    /// Seconds an attempt runs before its record says `running` (at most
    /// 86400; quicker attempts write their record once, with the outcome).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, default_value = "0.5", value_parser = seconds(Duration::ZERO, DAY))]
    running_after: Duration,
    /// Seconds to keep trying to reach the NATS server at start (at most
    /// 86400; 0 fails at once if it is down).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true, default_value = "60", value_parser = seconds(Duration::ZERO, DAY))]
    connect_wait: Duration,
    /// Serve Prometheus metrics (attempts by task and outcome, durations,
    /// in flight) over HTTP at this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Require a valid auth token on every request, verified with this key
    /// file: a shared secret, or an Ed25519 public (or private) key in PEM.
    /// `demo.admin` requires the role `admin`.
    #[arg(long, value_name = "PATH")]
    auth_key_file: Option<PathBuf>,
    /// Export a trace span per attempt over OTLP/HTTP (to
    /// OTEL_EXPORTER_OTLP_ENDPOINT, as OTEL_SERVICE_NAME).
    #[arg(long)]
    otlp: bool,
}

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

async fn add(Args(args): Args<AddArgs>) -> Result<i64, TaskError> {
    args.a
        .checked_add(args.b)
        .ok_or_else(|| TaskError::permanent("the sum overflows i64"))
}

#[derive(Deserialize)]
struct SleepArgs {
    ms: u64,
}

async fn sleep(ctx: Context, Args(args): Args<SleepArgs>) -> Result<u64, TaskError> {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(args.ms)) => Ok(args.ms),
        _ = ctx.cancelled() => Err(TaskError::new("interrupted")),
    }
}

async fn slow(Args(args): Args<SleepArgs>) -> Result<u64, TaskError> {
    tokio::time::sleep(Duration::from_millis(args.ms)).await;
    Ok(args.ms)
}

#[derive(Deserialize)]
struct FailArgs {
    times: u32,
}

async fn fail(ctx: Context, Args(args): Args<FailArgs>) -> Result<u32, TaskError> {
    if ctx.attempt() <= args.times {
        Err(TaskError::new(format!(
            "failing on purpose: attempt {} of the first {}",
            ctx.attempt(),
            args.times
        )))
    } else {
        Ok(ctx.attempt())
    }
}

async fn pipeline(
    wf: WorkflowContext,
    Args(n): Args<i64>,
    Meta(meta): Meta<serde_json::Map<String, serde_json::Value>>,
) -> Result<String, TaskError> {
    let one: i64 = wf
        .step("add_one", async { Ok::<_, TaskError>(n + 1) })
        .await?;
    let two: i64 = wf
        .step("double", async { Ok::<_, TaskError>(one * 2) })
        .await?;
    let user = meta
        .get("user")
        .and_then(|u| u.as_str())
        .unwrap_or("someone")
        .to_owned();
    wf.step("describe", async move {
        Ok::<_, TaskError>(format!("{user} got {two}"))
    })
    .await
}

#[derive(Deserialize)]
struct StepsArgs {
    count: u32,
    ms: u64,
}

async fn steps(wf: WorkflowContext, Args(args): Args<StepsArgs>) -> Result<u32, TaskError> {
    for i in 0..args.count {
        let id = wf.workflow_id().to_owned();
        wf.step(&format!("step_{i}"), async move {
            println!("step {i} of {id}");
            tokio::time::sleep(Duration::from_millis(args.ms)).await;
            Ok::<_, TaskError>(())
        })
        .await?;
    }
    Ok(args.count)
}

#[derive(Deserialize)]
struct CheckoutArgs {
    order: String,
}

#[derive(Deserialize)]
struct Payment {
    amount: u64,
}

/// A DBOS-style checkout: reserve, wait for the payment, charge, ship.
async fn checkout(
    wf: WorkflowContext,
    Args(args): Args<CheckoutArgs>,
) -> Result<serde_json::Value, TaskError> {
    wf.set_event("status", "reserved").await?;
    let payment = wf
        .recv::<Payment>(Some("payment"), Duration::from_secs(60))
        .await?;
    let Some(payment) = payment else {
        wf.set_event("status", "timed_out").await?;
        return Ok(serde_json::json!({ "timed_out": true }));
    };
    let order = args.order;
    let amount = wf
        .step("charge", async move {
            println!("charging {order}");
            Ok::<_, TaskError>(payment.amount)
        })
        .await?;
    wf.sleep(Duration::from_secs(5)).await?;
    wf.set_event("status", "shipped").await?;
    Ok(serde_json::json!({ "paid": amount }))
}

async fn panic() -> Result<(), TaskError> {
    panic!("demo.panic panics on purpose")
}

/// A worker's allocator: glibc's `malloc` serves jetq's pattern (much of
/// what one thread allocates is freed on another) slowly. With mimalloc the
/// benchmark's producer and worker spend about 12 µs less CPU per task
/// (`docs/performance.md`); one line in any worker's `main.rs`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let opts: Opts = jetq_cli::args::parse("jetq-demo-worker");
    // Kept to the end: dropping it exports the spans still queued.
    let _otlp = match init_logging(opts.otlp) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("jetq-demo-worker: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run(opts).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "jetq-demo-worker: {}",
                jetq_cli::display::escape(&e.to_string())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr as `RUST_LOG` says (default `info`); with `otlp`, INFO
/// spans are also exported over OTLP.
fn init_logging(
    otlp: bool,
) -> Result<Option<jetq_middleware::trace::OtlpGuard>, jetq_middleware::trace::OtlpError> {
    use tracing_subscriber::prelude::*;
    let logs = tracing_subscriber::fmt::layer().with_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    if !otlp {
        tracing_subscriber::registry().with(logs).init();
        return Ok(None);
    }
    let guard = jetq_middleware::trace::init_otlp("jetq-demo-worker")?;
    let spans = guard
        .layer()
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(Some(guard))
}

async fn run(opts: Opts) -> jetq::Result<()> {
    let auth = demo_auth::layer(opts.auth_key_file.as_deref())?;
    let config = jetq_nats::NatsConfig::new(&opts.nats).connect_wait(opts.connect_wait);
    let broker = jetq_nats::NatsBroker::connect_with(config).await?;
    let mut builder = Worker::builder(broker.clone());
    // Metrics outermost, so they count attempts that other middleware refuse.
    let mut _metrics_server = None;
    if let Some(addr) = opts.metrics_addr {
        let endpoint = std::sync::Arc::new(
            jetq_middleware::metrics::PrometheusEndpoint::new()
                .map_err(|e| jetq::Error::new(jetq::ErrorKind::Config, e.to_string()))?,
        );
        builder = builder.middleware(endpoint.metrics());
        let (bound, server) = endpoint
            .serve(addr)
            .await
            .map_err(|e| jetq::Error::new(jetq::ErrorKind::Config, e.to_string()))?;
        tracing::info!("metrics at http://{bound}/metrics");
        _metrics_server = Some(server);
    }
    // Tracing next, so that a refusal by auth is a traced attempt too;
    // requests published from tasks continue the trace.
    if opts.otlp {
        use jetq_middleware::trace::{TraceAttempts, TracePublish};
        builder = builder
            .middleware(TraceAttempts::new())
            .client(jetq::Client::new(broker).middleware(TracePublish::new()));
    }
    // Auth after them: nothing else runs for a refused request.
    let mut builder = demo_auth::register(builder, auth)
        .default_queue(opts.queue)
        .concurrency(opts.concurrency)
        .ack_wait(opts.ack_wait)
        .shutdown_timeout(opts.shutdown_timeout)
        .running_after(opts.running_after)
        .task("demo.add", add)
        .task("demo.sleep", sleep)
        .task("demo.slow", slow)
        .task("demo.fail", fail)
        .task("demo.panic", panic)
        .task("demo.pipeline", pipeline)
        .task("demo.steps", steps)
        .task("demo.checkout", checkout);
    if let Some(name) = opts.name {
        builder = builder.name(name);
    }
    builder.run().await
}
