//! Middleware, both sides:
//! - the Mognet metadata pattern: a producer middleware stamps every request
//!   with metadata (who submitted it, from where), and tasks read it with
//!   `Meta<T>`;
//! - a `from_fn` worker middleware that times each attempt and stamps the
//!   record's metadata with the result, and refuses requests without a tenant;
//! - limits and metrics from `jetq-middleware`.

use std::time::{Duration, Instant};

use jetq::middleware::{from_fn, publish_from_fn, Next, Publish, PublishNext};
use jetq::{Client, Context, Meta, TaskError, Worker};
use jetq_middleware::limits::Limits;
use jetq_middleware::metrics::PrometheusEndpoint;
use serde::Deserialize;

#[derive(Deserialize)]
struct Submitted {
    tenant: String,
    submitted_by: String,
}

async fn report(Meta(who): Meta<Submitted>) -> Result<String, TaskError> {
    Ok(format!("report for {} by {}", who.tenant, who.submitted_by))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let broker = jetq_nats::NatsBroker::connect(&url).await?;

    // Producer side: every request of this client carries who submitted it.
    let stamp = publish_from_fn(|mut publish: Publish, next: PublishNext| async move {
        let metadata = &mut publish.request.metadata;
        metadata
            .entry("submitted_by")
            .or_insert_with(|| "billing-service".into());
        metadata.entry("tenant").or_insert_with(|| "acme".into());
        next.run(publish).await
    });
    let client = Client::new(broker.clone()).middleware(stamp);

    // Worker side: refuse requests without a tenant, time every attempt.
    let timing = from_fn(|ctx: Context, next: Next| async move {
        if ctx.metadata().get("tenant").is_none() {
            return Err(TaskError::permanent("no tenant").with_kind("forbidden"));
        }
        let started = Instant::now();
        let outcome = next.run(ctx.clone()).await;
        // Stored in the record's metadata (one more record write).
        let _ = ctx
            .set_metadata("took_us", started.elapsed().as_micros() as u64)
            .await;
        outcome
    });
    let metrics = PrometheusEndpoint::new()?;
    let worker = Worker::builder(broker)
        .default_queue("middleware")
        .middleware(metrics.metrics())
        .middleware(timing)
        .middleware(Limits::new().concurrency("reports.build", 2))
        .task("reports.build", report)
        .spawn()?;

    let handle = client
        .task("reports.build")
        .queue("middleware")
        .publish()
        .await?;
    let value: String = handle.result(Duration::from_secs(30)).await?;
    println!("{value}");
    let metadata = handle.metadata().await?;
    println!(
        "metadata: tenant={} submitted_by={} took_us present: {}",
        metadata["tenant"],
        metadata["submitted_by"],
        metadata.contains_key("took_us")
    );
    let counted = metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("jetq_attempts_ended_total{"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    println!("metrics: {}", counted.join("\n         "));
    worker.shutdown().await?;
    Ok(())
}
