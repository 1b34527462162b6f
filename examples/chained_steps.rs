//! Ergate's chained steps: a workflow declared as named steps, each a
//! handler with injected dependencies. Step 1 gets the run's input (21) and
//! the current time from an injected clock, and returns 22; step 2 gets 22
//! and says who triggered the run, read from the request's metadata (the
//! user context). The program prints the run's record and fails unless the
//! run succeeded with the expected value and progress.
//!
//! Run it with `NATS_URL=nats://host:4222 cargo run -p jetq-examples
//! --example chained_steps`.

use std::time::Duration;

use jetq::workflow::{Next, Workflow};
use jetq::{Args, Client, Meta, State, TaskError, Worker};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const QUEUE: &str = "chained-steps";

/// The injected dependency: where the steps get the time from (a test
/// would give a fixed one).
#[derive(Clone)]
struct Clock(fn() -> OffsetDateTime);

/// The user context, as the producer attached it.
#[derive(Deserialize)]
struct TriggeredBy {
    user: String,
}

/// Step 1: the run's input, and the current time from the clock.
async fn step_1(State(clock): State<Clock>, Args(input): Args<u32>) -> Result<u32, TaskError> {
    let now = (clock.0)()
        .format(&Rfc3339)
        .map_err(|e| TaskError::permanent(e.to_string()))?;
    println!("step_1: got {input} at {now}");
    Ok(input + 1)
}

/// Step 2: the value of step 1, and who triggered the run. A run with no
/// user is aborted (kind `aborted`, no retries, dead-lettered).
async fn step_2(
    Meta(who): Meta<TriggeredBy>,
    Args(value): Args<u32>,
) -> Result<Next<String>, TaskError> {
    if who.user.is_empty() {
        return Ok(Next::abort("nobody triggered this run"));
    }
    println!("step_2: got {value}, triggered by {}", who.user);
    Ok(Next::Continue(format!(
        "{value}, triggered by {}",
        who.user
    )))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let broker = jetq_nats::NatsBroker::connect(&url).await?;

    let workflow = Workflow::new("seed.chain")
        .step("step_1", step_1)
        .step("step_2", step_2)
        .queue(QUEUE);
    let worker = Worker::builder(broker.clone())
        .state(Clock(OffsetDateTime::now_utc))
        .workflow(workflow)
        .spawn()?;

    let client = Client::new(broker);
    let handle = client
        .task("seed.chain")
        .queue(QUEUE)
        .args(&21)
        .metadata("user", "prryplatypus")
        .publish()
        .await?;
    let record = handle.wait(Duration::from_secs(30)).await?;
    println!("record: {}", serde_json::to_string_pretty(&record)?);
    worker.shutdown().await?;

    let expected = serde_json::json!("22, triggered by prryplatypus");
    if record.value.as_ref() != Some(&expected) {
        return Err(format!(
            "the run ended {} with value {:?} and error {:?}, expected the value {expected}",
            record.status, record.value, record.error
        )
        .into());
    }
    let steps = record.progress.map(|p| (p.current, p.total, p.message));
    if steps != Some((2, Some(2), Some("step_2".to_owned()))) {
        return Err(format!("unexpected progress {steps:?}, expected 2 of 2 at step_2").into());
    }
    println!("value: {expected}");
    Ok(())
}
