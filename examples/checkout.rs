//! A DBOS-style checkout as a durable workflow function: it reserves the
//! order (an event a client can read), waits for the payment message
//! (`recv` on topic `payment`, holding no worker while it waits), charges
//! it as a checkpointed step, sleeps durably, and ships. The program plays
//! both sides: it starts the run with an id (a second start returns the
//! same run), follows its `status` event, sends the payment with an
//! idempotency key (twice: it arrives once), and prints the outcome and the
//! step log. It fails unless the run succeeded as expected.
//!
//! Run it with `NATS_URL=nats://host:4222 cargo run -p jetq-examples
//! --example checkout`.

use std::time::Duration;

use jetq::workflow::WorkflowContext;
use jetq::{Args, Client, Status, TaskError, Worker};
use serde::{Deserialize, Serialize};

const QUEUE: &str = "checkout-example";
const WAIT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
struct Order {
    order: String,
    amount: u64,
}

#[derive(Serialize, Deserialize)]
struct Payment {
    amount: u64,
}

async fn checkout(wf: WorkflowContext, Args(order): Args<Order>) -> Result<String, TaskError> {
    wf.set_event("status", "reserved").await?;
    // Waits up to a minute; longer than 2 s, so the run is suspended (its
    // worker slot free) until the payment arrives.
    let Some(payment) = wf
        .recv::<Payment>(Some("payment"), Duration::from_secs(60))
        .await?
    else {
        wf.set_event("status", "timed_out").await?;
        return Err(TaskError::permanent("no payment within a minute").with_kind("timed_out"));
    };
    if payment.amount != order.amount {
        wf.set_event("status", "refused").await?;
        return Err(TaskError::permanent("wrong amount").with_kind("refused"));
    }
    let receipt: String = wf
        .step("charge", async {
            // Runs once, even if the worker dies after it: its outcome is
            // checkpointed before the workflow moves on.
            println!("charging {} for {}", order.order, payment.amount);
            Ok::<_, TaskError>(format!("receipt-{}", order.order))
        })
        .await?;
    wf.set_event("status", "paid").await?;
    // Durable: after a crash, only the time left is waited.
    wf.sleep(Duration::from_secs(3)).await?;
    wf.set_event("status", "shipped").await?;
    Ok(receipt)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let broker = jetq_nats::NatsBroker::connect(&url).await?;
    let worker = Worker::builder(broker.clone())
        .default_queue(QUEUE)
        .task("shop.checkout", checkout)
        .spawn()?;
    let client = Client::new(broker);

    let id = format!("order-{}", jetq::request::new_id());
    let order = Order {
        order: id.clone(),
        amount: 42,
    };
    let run = client
        .workflow("shop.checkout")
        .queue(QUEUE)
        .id(&id)
        .args(&order)
        .publish()
        .await?;
    let status: Option<String> = client.get_event(&id, "status", WAIT).await?;
    println!("status: {status:?}");
    // Wait until the run is suspended in its recv, then pay (twice, with
    // one idempotency key: the second send is dropped).
    for _ in 0..2 {
        let seq = client
            .send(&id, &Payment { amount: 42 })
            .topic("payment")
            .key("pay-1")
            .await?;
        println!("payment sent (mailbox sequence {seq})");
    }
    let record = run.wait(WAIT).await?;
    println!("run ended {} with {:?}", record.status, record.value);
    let events = client.get_events(&id).await?;
    println!("events: {events:?}");
    for step in client.steps(&id).await? {
        println!("step {} {}: {:?}", step.position, step.name, step.value);
    }
    worker.shutdown().await?;
    if record.status != Status::Succeeded
        || record.value != Some(serde_json::json!(format!("receipt-{id}")))
        || events.get("status") != Some(&serde_json::json!("shipped"))
    {
        return Err("the checkout did not end as expected".into());
    }
    Ok(())
}
