//! Mognet's metadata: a task writes metadata while it runs; the producer
//! reads it back by id, from any process.

use std::time::Duration;

use jetq::{Args, Client, Context, TaskError, Worker};

async fn import(ctx: Context, Args(rows): Args<u64>) -> Result<u64, TaskError> {
    let mut imported = 0;
    for chunk in 0..4 {
        imported += rows / 4;
        ctx.set_progress(chunk + 1, Some(4)).await?;
    }
    ctx.set_metadata("rows_imported", imported).await?;
    ctx.set_metadata("source_file", "customers.csv").await?;
    Ok(imported)
}

#[tokio::main]
async fn main() -> jetq::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let broker = jetq_nats::NatsBroker::connect(&url).await?;
    let worker = Worker::builder(broker.clone())
        .default_queue("task-metadata")
        .task("csv.import", import)
        .spawn()?;

    let client = Client::new(broker);
    let handle = client
        .task("csv.import")
        .queue("task-metadata")
        .args(&1000u64)
        .metadata("requested_by", "ops")
        .publish()
        .await?;
    handle.wait(Duration::from_secs(30)).await?;

    // Anyone with the id can read the metadata: here through a fresh lookup.
    let id = handle.id().to_owned();
    let metadata = client.metadata(&id).await?;
    println!("metadata of {id}: {}", serde_json::Value::Object(metadata));

    worker.shutdown().await
}
