//! Ergate's `Depends(create_current_time)`: a step whose dependency (the
//! current time) is injected by a user-defined extractor, computed afresh
//! for each task.

use std::time::Duration;

use jetq::{Args, Client, Context, FromContext, TaskError, Worker};
use time::OffsetDateTime;

/// The injected dependency.
struct CurrentTime(OffsetDateTime);

impl FromContext for CurrentTime {
    async fn from_context(_ctx: &Context) -> Result<Self, TaskError> {
        Ok(CurrentTime(OffsetDateTime::now_utc()))
    }
}

async fn stamp(
    CurrentTime(now): CurrentTime,
    Args(event): Args<String>,
) -> Result<String, TaskError> {
    let at = now
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| TaskError::permanent(e.to_string()))?;
    Ok(format!("{event} handled at {at}"))
}

#[tokio::main]
async fn main() -> jetq::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let broker = jetq_nats::NatsBroker::connect(&url).await?;
    let worker = Worker::builder(broker.clone())
        .default_queue("dependency-injection")
        .task("events.stamp", stamp)
        .spawn()?;

    let client = Client::new(broker);
    let handle = client
        .task("events.stamp")
        .queue("dependency-injection")
        .args(&"signup")
        .publish()
        .await?;
    let text: String = handle.result(Duration::from_secs(30)).await?;
    println!("{text}");

    worker.shutdown().await
}
