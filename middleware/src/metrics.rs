//! Metrics of a worker's attempts, as OpenTelemetry instruments, and a
//! Prometheus scrape endpoint.
//!
//! [`Metrics`] is a worker middleware recording, per task and queue:
//!
//! | instrument | kind | attributes | Prometheus name |
//! | --- | --- | --- | --- |
//! | `jetq.attempts.started` | counter | `task`, `queue` | `jetq_attempts_started_total` |
//! | `jetq.attempts.ended` | counter | `task`, `queue`, `outcome` | `jetq_attempts_ended_total` |
//! | `jetq.attempt.duration` | histogram, seconds | `task`, `queue`, `outcome` | `jetq_attempt_duration_seconds` |
//! | `jetq.attempts.in_flight` | up-down counter | `task`, `queue` | `jetq_attempts_in_flight` |
//!
//! `outcome` is one of `succeeded`, `failed` (a permanent error, or the last
//! attempt allowed), `retried` (a retryable error with attempts left),
//! `cancelled` (a client cancelled it) and `interrupted` (stopped by the
//! worker's shutdown or by losing its request; it runs again). Register it
//! outermost (or right inside tracing) so that it also counts attempts that
//! later middleware refuse.
//!
//! [`PrometheusEndpoint`] exports the instruments of a meter provider in the
//! Prometheus text format and serves them over HTTP (`GET /metrics`), as
//! the demo worker does with `--metrics-addr`.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use jetq::broker::BoxFuture;
use jetq::middleware::{Middleware, Next, Outcome};
use jetq::Context;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _, UpDownCounter};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

/// The instrumentation scope of jetq's instruments.
pub const METER_NAME: &str = "jetq";

/// Attempt metrics, as a worker middleware. See the [module](self) docs.
#[derive(Clone)]
pub struct Metrics {
    started: Counter<u64>,
    ended: Counter<u64>,
    duration: Histogram<f64>,
    in_flight: UpDownCounter<i64>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Instruments created on `meter`.
    pub fn new(meter: &Meter) -> Self {
        Metrics {
            started: meter
                .u64_counter("jetq.attempts.started")
                .with_description("Attempts started, by task and queue")
                .build(),
            ended: meter
                .u64_counter("jetq.attempts.ended")
                .with_description("Attempts ended, by task, queue and outcome")
                .build(),
            duration: meter
                .f64_histogram("jetq.attempt.duration")
                .with_unit("s")
                .with_description("How long attempts ran, by task, queue and outcome")
                .build(),
            in_flight: meter
                .i64_up_down_counter("jetq.attempts.in_flight")
                .with_description("Attempts running now, by task and queue")
                .build(),
        }
    }

    /// Instruments on the global meter provider
    /// (`opentelemetry::global::meter("jetq")`).
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter(METER_NAME))
    }

    async fn run(&self, ctx: Context, next: Next) -> Outcome {
        let attrs = [
            KeyValue::new("task", ctx.task().to_owned()),
            KeyValue::new("queue", ctx.queue().to_owned()),
        ];
        self.started.add(1, &attrs);
        self.in_flight.add(1, &attrs);
        // Counted down even if the attempt is dropped (a hard shutdown).
        let _guard = InFlight {
            gauge: &self.in_flight,
            attrs: &attrs,
        };
        let started = Instant::now();
        let outcome = next.run(ctx.clone()).await;
        let [task, queue] = attrs.clone();
        let with_outcome = [
            task,
            queue,
            KeyValue::new("outcome", outcome_of(&ctx, &outcome)),
        ];
        self.ended.add(1, &with_outcome);
        self.duration
            .record(started.elapsed().as_secs_f64(), &with_outcome);
        outcome
    }
}

/// Counts an attempt out of the in-flight gauge when dropped.
struct InFlight<'a> {
    gauge: &'a UpDownCounter<i64>,
    attrs: &'a [KeyValue; 2],
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.gauge.add(-1, self.attrs);
    }
}

/// What becomes of the request after this attempt, as far as the chain can
/// tell.
fn outcome_of(ctx: &Context, outcome: &Outcome) -> &'static str {
    if ctx.is_cancelled_by_client() {
        return "cancelled";
    }
    match outcome {
        Ok(_) => "succeeded",
        Err(e) if e.is_retryable() && ctx.is_cancelled() => "interrupted",
        Err(e) if e.is_retryable() && ctx.attempt() <= ctx.max_retries() => "retried",
        Err(_) => "failed",
    }
}

impl Middleware for Metrics {
    fn call<'a>(&'a self, ctx: Context, next: Next) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run(ctx, next))
    }
}

/// A meter provider whose instruments are read in the Prometheus text
/// format, and an HTTP endpoint serving them.
pub struct PrometheusEndpoint {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

impl fmt::Debug for PrometheusEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrometheusEndpoint").finish_non_exhaustive()
    }
}

/// Why metrics could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus exporter could not be built.
    #[error("cannot set up the Prometheus exporter: {0}")]
    Exporter(String),
    /// The endpoint's address could not be bound.
    #[error("cannot listen on {addr} for metrics scrapes: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
}

impl PrometheusEndpoint {
    /// A new meter provider with a Prometheus reader.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| MetricsError::Exporter(e.to_string()))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        Ok(PrometheusEndpoint { registry, provider })
    }

    /// The meter provider (to make it global, or for your own instruments).
    pub fn provider(&self) -> &SdkMeterProvider {
        &self.provider
    }

    /// jetq's meter on this provider.
    pub fn meter(&self) -> Meter {
        self.provider.meter(METER_NAME)
    }

    /// The [`Metrics`] middleware recording into this endpoint.
    pub fn metrics(&self) -> Metrics {
        Metrics::new(&self.meter())
    }

    /// Everything recorded so far, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Serve [`render`](Self::render) over HTTP on `addr` (any path; the
    /// usual one is `/metrics`) until the returned task is aborted. Returns
    /// the bound address (useful with port 0).
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics endpoint: accept failed");
                        continue;
                    }
                };
                let endpoint = Arc::clone(&self);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req: Request<_>| {
                        let body = endpoint.render();
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("content-type", "text/plain; version=0.0.4")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
                            )
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                    {
                        tracing::debug!(error = %e, "metrics endpoint: connection failed");
                    }
                });
            }
        });
        Ok((bound, task))
    }
}
