//! Ergate's `Annotated[dict, Context()]` and Mognet's metadata: a job's user
//! context (who triggered it) travels as request metadata and is read by a
//! typed extractor, `Meta<T>`.

use std::time::Duration;

use jetq::{Args, Client, Meta, TaskError, Worker};
use serde::Deserialize;

/// The user context, as the producer attached it.
#[derive(Deserialize)]
struct TriggeredBy {
    user: String,
    role: String,
}

async fn send_report(
    Meta(who): Meta<TriggeredBy>,
    Args(report): Args<String>,
) -> Result<String, TaskError> {
    if who.role != "admin" {
        return Err(TaskError::permanent(format!(
            "{} may not send reports",
            who.user
        )));
    }
    Ok(format!("report `{report}` sent on behalf of {}", who.user))
}

#[tokio::main]
async fn main() -> jetq::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let broker = jetq_nats::NatsBroker::connect(&url).await?;
    let worker = Worker::builder(broker.clone())
        .default_queue("user-context")
        .task("reports.send", send_report)
        .spawn()?;

    let client = Client::new(broker);
    let handle = client
        .task("reports.send")
        .queue("user-context")
        .args(&"weekly-sales")
        .metadata("user", "alice")
        .metadata("role", "admin")
        .publish()
        .await?;
    let text: String = handle.result(Duration::from_secs(30)).await?;
    println!("{text}");

    worker.shutdown().await
}
