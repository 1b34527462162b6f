//! Tracing a request from the producer through the worker into a child
//! request, with OpenTelemetry (jetq-middleware `trace`).
//!
//! The producer's `checkout` span, the publish span (`send ...`), the
//! attempt span (`process ...`), a span the task opens itself, and the
//! child request's publish and attempt spans all land in one trace.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set (e.g. `http://127.0.0.1:4318`, a
//! collector or Jaeger), the spans are exported there over OTLP/HTTP as
//! `OTEL_SERVICE_NAME` (default `jetq-tracing-example`). Without it they
//! are printed as a tree, and the example checks that they form one.
//!
//! Needs a nats-server with JetStream at `NATS_URL` (default
//! `nats://127.0.0.1:4222`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jetq::{Args, Client, Context, Extension, TaskError, Worker};
use jetq_middleware::trace::{AttemptSpan, TraceAttempts, TracePublish};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::Instrument;
use tracing_subscriber::prelude::*;

const QUEUE: &str = "tracing-example";
const WAIT: Duration = Duration::from_secs(30);

/// Places an order: charges in a span of its own, then sends the
/// confirmation email as a child request.
async fn place(
    ctx: Context,
    Extension(span): Extension<AttemptSpan>,
    Args(order): Args<String>,
) -> Result<String, TaskError> {
    // The task's own attributes on the attempt span.
    span.set_attribute("shop.order", order.clone());
    async {
        tracing::info!(%order, "charging the card");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    .instrument(tracing::info_span!("charge card"))
    .await;
    // Goes through the worker's publish middleware: the trace goes on.
    let email = ctx
        .client()
        .task("orders.email")
        .queue(QUEUE)
        .args(&order)
        .publish()
        .await
        .map_err(|e| TaskError::new(e.to_string()))?;
    let sent: String = email
        .result(WAIT)
        .await
        .map_err(|e| TaskError::new(e.to_string()))?;
    Ok(format!("order {order} placed, {sent}"))
}

async fn email(Args(order): Args<String>) -> Result<String, TaskError> {
    Ok(format!("confirmation for {order} sent"))
}

/// Keeps the spans to print them at the end (when there is no collector).
#[derive(Debug, Clone, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collect {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(batch);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
    let collected = Collect::default();
    let logs =
        tracing_subscriber::fmt::layer().with_filter(tracing_subscriber::filter::LevelFilter::WARN);
    let mut otlp = None;
    let mut local = None;
    match &otlp_endpoint {
        Some(endpoint) => {
            let guard = jetq_middleware::trace::init_otlp("jetq-tracing-example")?;
            tracing_subscriber::registry()
                .with(logs)
                .with(guard.layer())
                .init();
            println!("exporting spans over OTLP to {endpoint}");
            otlp = Some(guard);
        }
        None => {
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(collected.clone())
                .build();
            tracing_subscriber::registry()
                .with(logs)
                .with(jetq_middleware::trace::layer(
                    provider.tracer("jetq-tracing-example"),
                ))
                .init();
            local = Some(provider);
        }
    }

    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let broker = jetq_nats::NatsBroker::connect(&url).await?;
    let worker = Worker::builder(broker.clone())
        .default_queue(QUEUE)
        .middleware(TraceAttempts::new())
        .client(Client::new(broker.clone()).middleware(TracePublish::new()))
        .task("orders.place", place)
        .task("orders.email", email)
        .spawn()?;

    let client = Client::new(broker).middleware(TracePublish::new());
    let checkout = tracing::info_span!("checkout");
    let text: String = async {
        let handle = client
            .task("orders.place")
            .queue(QUEUE)
            .args(&"order-7")
            .publish()
            .await?;
        handle.result(WAIT).await
    }
    .instrument(checkout)
    .await?;
    println!("{text}");
    worker.shutdown().await?;

    if let Some(guard) = otlp {
        guard.shutdown()?;
        return Ok(());
    }
    if let Some(provider) = local {
        provider.force_flush()?;
    }
    let spans = collected
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    print_tree(&spans)?;
    Ok(())
}

/// Print the spans as a tree under the root span, and check that all six
/// are in it.
fn print_tree(spans: &[SpanData]) -> Result<(), Box<dyn std::error::Error>> {
    let root = spans
        .iter()
        .find(|s| s.name == "checkout")
        .ok_or("no checkout span")?;
    println!("trace {}", root.span_context.trace_id());
    let mut printed = 0;
    let mut stack = vec![(root, 0)];
    while let Some((span, depth)) = stack.pop() {
        printed += 1;
        let status = span
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == "jetq.status")
            .map(|kv| format!(" [{}]", kv.value))
            .unwrap_or_default();
        println!(
            "{:indent$}{} ({:?}){status}",
            "",
            span.name,
            span.span_kind,
            indent = depth * 2
        );
        let mut children: Vec<&SpanData> = spans
            .iter()
            .filter(|c| c.parent_span_id == span.span_context.span_id())
            .filter(|c| c.parent_span_id != SpanId::INVALID)
            .collect();
        children.sort_by_key(|c| std::cmp::Reverse(c.start_time));
        stack.extend(children.into_iter().map(|c| (c, depth + 1)));
    }
    // checkout, send, process, charge card, send (child), process (child).
    if printed != 6 {
        return Err(format!("expected 6 spans in the trace, found {printed}").into());
    }
    Ok(())
}
