//! FluxQueue's task context and worker storage: the task reads its id,
//! retries, max retries and enqueue time, and uses a pooled resource that is
//! created once per worker and shared by every task it runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jetq::{Args, Client, Context, Resource, RetryPolicy, Task, TaskError, Worker};

/// Stands in for a database pool or an HTTP client.
struct Pool {
    created: String,
    queries: AtomicU64,
}

async fn lookup(
    ctx: Context,
    pool: Resource<Pool>,
    Args(key): Args<String>,
) -> Result<String, TaskError> {
    let n = pool.queries.fetch_add(1, Ordering::SeqCst) + 1;
    println!(
        "task_id={} retries={} max_retries={} enqueued_at={} pool(created {}) query #{n}",
        ctx.id(),
        ctx.retries(),
        ctx.max_retries(),
        ctx.enqueued_at(),
        pool.created,
    );
    // Fail the first attempt, to show the retry count the next one sees.
    if ctx.retries() == 0 {
        return Err(TaskError::new("the first attempt fails on purpose"));
    }
    Ok(format!("{key} found after {} retries", ctx.retries()))
}

#[tokio::main]
async fn main() -> jetq::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let broker = jetq_nats::NatsBroker::connect(&url).await?;
    let worker = Worker::builder(broker.clone())
        .default_queue("task-context")
        // Built lazily, once per worker, on the first task that asks for it.
        .resource(|| async {
            Ok::<_, std::convert::Infallible>(Pool {
                created: time::OffsetDateTime::now_utc().to_string(),
                queries: AtomicU64::new(0),
            })
        })
        .register(
            Task::new("db.lookup", lookup).retry_policy(
                RetryPolicy::new(3)
                    .base(Duration::from_millis(100))
                    .jitter(false),
            ),
        )
        .spawn()?;

    let client = Client::new(broker);
    let handle = client
        .task("db.lookup")
        .queue("task-context")
        .args(&"user:42")
        .max_retries(2)
        .publish()
        .await?;
    let text: String = handle.result(Duration::from_secs(30)).await?;
    println!("{text}");
    let record = handle.record().await?;
    println!("status={} attempts={}", record.status, record.attempts);

    worker.shutdown().await
}
