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

use std::time::Duration;

use clap::Parser;
use jetq::{Args, Context, TaskError, Worker};
use serde::Deserialize;

/// Serve the demo tasks `demo.add`, `demo.sleep`, `demo.slow`, `demo.fail` and `demo.panic`.
#[derive(Debug, Parser)]
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
    /// Seconds before an unacknowledged request goes to another worker.
    #[arg(long, default_value_t = 30.0)]
    ack_wait: f64,
    /// Seconds running tasks may take to finish after SIGINT/SIGTERM before
    /// they are stopped and released for redelivery.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
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

async fn panic() -> Result<(), TaskError> {
    panic!("demo.panic panics on purpose")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let opts = Opts::parse();
    match run(opts).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jetq-demo-worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(opts: Opts) -> jetq::Result<()> {
    if !(opts.ack_wait.is_finite() && opts.ack_wait > 0.0) {
        return Err(jetq::Error::new(
            jetq::ErrorKind::Config,
            "--ack-wait must be a positive number of seconds",
        ));
    }
    if !(opts.shutdown_timeout.is_finite() && opts.shutdown_timeout >= 0.0) {
        return Err(jetq::Error::new(
            jetq::ErrorKind::Config,
            "--shutdown-timeout must be zero or a positive number of seconds",
        ));
    }
    let broker = jetq_nats::NatsBroker::connect(&opts.nats).await?;
    let mut builder = Worker::builder(broker)
        .default_queue(opts.queue)
        .concurrency(opts.concurrency)
        .ack_wait(Duration::from_secs_f64(opts.ack_wait))
        .shutdown_timeout(Duration::from_secs_f64(opts.shutdown_timeout))
        .task("demo.add", add)
        .task("demo.sleep", sleep)
        .task("demo.slow", slow)
        .task("demo.fail", fail)
        .task("demo.panic", panic);
    if let Some(name) = opts.name {
        builder = builder.name(name);
    }
    builder.run().await
}
