//! Quickstart: a worker and a producer in one program.
//!
//! The producer publishes a few requests with metadata; the worker runs them;
//! the producer reads each record back from the KV bucket and prints it.
//!
//! Run it with `scripts/quickstart` (starts a throwaway nats-server), or
//! against your own server with `NATS_URL=nats://host:4222 cargo run -p
//! jetq-examples --example quickstart`.

use std::time::Duration;

use jetq::{Args, Client, Context, TaskError, Worker};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Resize {
    url: String,
    width: u32,
}

#[derive(Serialize, Deserialize)]
struct Thumb {
    url: String,
    bytes: u64,
}

/// A task: its parameters are extractors; this one reads the context and the arguments.
async fn resize(ctx: Context, Args(job): Args<Resize>) -> Result<Thumb, TaskError> {
    ctx.set_progress(1, Some(2)).await?;
    // A task can add metadata, readable by anyone who has the id.
    ctx.set_metadata("resized_by", ctx.worker()).await?;
    Ok(Thumb {
        url: format!("{}?w={}", job.url, job.width),
        bytes: u64::from(job.width) * 42,
    })
}

#[tokio::main]
async fn main() -> jetq::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let broker = jetq_nats::NatsBroker::connect(&url).await?;

    // The worker: in production it is its own process; here it runs alongside.
    let worker = Worker::builder(broker.clone())
        .name("quickstart-worker")
        .task("images.resize", resize)
        .spawn()?;

    // The producer: publish returns once JetStream has stored the request.
    let client = Client::new(broker);
    let mut handles = Vec::new();
    for (i, width) in [64u32, 128, 256].into_iter().enumerate() {
        let handle = client
            .task("images.resize")
            .args(&Resize {
                url: format!("https://example.com/cat-{i}.png"),
                width,
            })
            .metadata("tenant", "acme")
            .metadata("triggered_by", "quickstart")
            .publish()
            .await?;
        println!("published {} (images.resize, width {width})", handle.id());
        handles.push(handle);
    }

    for handle in &handles {
        // Wait for the terminal record (a KV watch, no polling) and print it.
        let thumb: Thumb = handle.result(Duration::from_secs(30)).await?;
        let record = client.record(handle.id()).await?;
        println!(
            "{} {} attempts={} value.url={} metadata={}",
            record.id,
            record.status,
            record.attempts,
            thumb.url,
            serde_json::Value::Object(record.metadata.clone())
        );
    }
    println!("record as stored in KV:");
    let last = client.record(handles[handles.len() - 1].id()).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&last).unwrap_or_default()
    );

    worker.shutdown().await
}
