//! Limits: running at once, started per period, default timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jetq::memory::MemoryBroker;
use jetq::{Client, State, Status, Task, TaskError, Worker};
use jetq_middleware::limits::Limits;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
struct Gauge {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    starts: Arc<Mutex<Vec<Instant>>>,
}

async fn busy(State(g): State<Gauge>) -> Result<(), TaskError> {
    g.starts.lock().unwrap().push(Instant::now());
    let now = g.now.fetch_add(1, Ordering::SeqCst) + 1;
    g.peak.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(40)).await;
    g.now.fetch_sub(1, Ordering::SeqCst);
    Ok(())
}

async fn run_all(client: &Client, task: &str, n: usize) {
    let mut handles = Vec::new();
    for _ in 0..n {
        handles.push(client.task(task).publish().await.unwrap());
    }
    for h in handles {
        assert_eq!(h.wait(WAIT).await.unwrap().status, Status::Succeeded);
    }
}

#[tokio::test]
async fn at_most_n_attempts_of_a_task_run_at_once_and_others_are_not_limited() {
    let broker = MemoryBroker::new();
    let limited = Gauge::default();
    let free = Gauge::default();
    async fn other(State(g): State<(Gauge,)>) -> Result<(), TaskError> {
        busy(State(g.0)).await
    }
    let w = Worker::builder(broker.clone())
        .concurrency(8)
        .state(limited.clone())
        .state((free.clone(),))
        .middleware(Limits::new().concurrency("limited", 2))
        .task("limited", busy)
        .task("free", other)
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    run_all(&client, "limited", 8).await;
    run_all(&client, "free", 6).await;
    assert_eq!(limited.peak.load(Ordering::SeqCst), 2);
    assert!(
        free.peak.load(Ordering::SeqCst) > 2,
        "the limit applies to its task only"
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn starts_are_spread_by_the_rate_limit() {
    let broker = MemoryBroker::new();
    let g = Gauge::default();
    // 4 per 400 ms: a burst of 4, then one every 100 ms.
    let w = Worker::builder(broker.clone())
        .concurrency(16)
        .state(g.clone())
        .middleware(Limits::new().rate("busy", 4, Duration::from_millis(400)))
        .task("busy", busy)
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    run_all(&client, "busy", 8).await;
    let mut starts = g.starts.lock().unwrap().clone();
    starts.sort();
    let spread = starts[7] - starts[0];
    assert!(
        spread >= Duration::from_millis(350),
        "8 starts at 4 per 400 ms took only {spread:?}"
    );
    w.shutdown().await.unwrap();
}

async fn sleepy() -> Result<(), TaskError> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

#[tokio::test]
async fn the_default_timeout_applies_to_tasks_without_their_own() {
    let broker = MemoryBroker::new();
    let w = Worker::builder(broker.clone())
        .middleware(Limits::new().default_timeout(Duration::from_millis(50)))
        .register(Task::new("no_limit", sleepy).max_retries(0))
        .register(
            Task::new("own_limit", sleepy)
                .timeout(Duration::from_secs(5))
                .max_retries(0),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    let cut = client.task("no_limit").publish().await.unwrap();
    let kept = client.task("own_limit").publish().await.unwrap();
    let rec = cut.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    let error = rec.error.unwrap();
    assert_eq!(error.kind, "timeout");
    assert!(error.message.contains("default limit"), "{}", error.message);
    assert_eq!(kept.wait(WAIT).await.unwrap().status, Status::Succeeded);
    w.shutdown().await.unwrap();
}
