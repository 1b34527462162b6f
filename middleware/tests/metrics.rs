//! Metrics: counts by task and outcome, durations, in flight, and the
//! Prometheus endpoint's text as a scraper reads it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jetq::memory::MemoryBroker;
use jetq::{Client, Context, RetryPolicy, Status, Task, TaskError, Worker};
use jetq_middleware::metrics::PrometheusEndpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

async fn ok() -> Result<u32, TaskError> {
    Ok(1)
}

async fn broken() -> Result<(), TaskError> {
    Err(TaskError::permanent("no"))
}

async fn flaky(ctx: Context) -> Result<u32, TaskError> {
    if ctx.attempt() < 3 {
        return Err(TaskError::new("not yet"));
    }
    Ok(ctx.attempt())
}

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse the Prometheus text format (enough of it for these metrics).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap();
            map.insert(k.to_owned(), v.trim_matches('"').to_owned());
        }
        out.push((name.to_owned(), map, value.parse().unwrap()));
    }
    out
}

fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    body.to_owned()
}

#[tokio::test]
async fn the_endpoint_counts_attempts_by_task_and_outcome() {
    let endpoint = Arc::new(PrometheusEndpoint::new().unwrap());
    let (addr, server) = Arc::clone(&endpoint)
        .serve("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let broker = MemoryBroker::new();
    let fast = RetryPolicy::new(5)
        .base(Duration::from_millis(5))
        .max(Duration::from_millis(10));
    let w = Worker::builder(broker.clone())
        .middleware(endpoint.metrics())
        .task("ok", ok)
        .task("broken", broken)
        .register(Task::new("flaky", flaky).retry_policy(fast))
        .spawn()
        .unwrap();
    let client = Client::new(broker);
    for _ in 0..3 {
        let h = client.task("ok").publish().await.unwrap();
        assert_eq!(h.wait(WAIT).await.unwrap().status, Status::Succeeded);
    }
    let h = client.task("broken").publish().await.unwrap();
    assert_eq!(h.wait(WAIT).await.unwrap().status, Status::Failed);
    let h = client.task("flaky").publish().await.unwrap();
    assert_eq!(h.wait(WAIT).await.unwrap().status, Status::Succeeded);

    let samples = parse(&scrape(addr).await);
    let ended = "jetq_attempts_ended_total";
    assert_eq!(
        value(&samples, ended, &[("task", "ok"), ("outcome", "succeeded")]),
        Some(3.0)
    );
    assert_eq!(
        value(
            &samples,
            ended,
            &[("task", "broken"), ("outcome", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            ended,
            &[("task", "flaky"), ("outcome", "retried")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            ended,
            &[("task", "flaky"), ("outcome", "succeeded")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, ended, &[("task", "ok"), ("outcome", "failed")]),
        None
    );
    let started = "jetq_attempts_started_total";
    assert_eq!(
        value(
            &samples,
            started,
            &[("task", "flaky"), ("queue", "default")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(&samples, "jetq_attempts_in_flight", &[("task", "ok")]),
        Some(0.0)
    );
    let count = "jetq_attempt_duration_seconds_count";
    assert_eq!(
        value(&samples, count, &[("task", "ok"), ("outcome", "succeeded")]),
        Some(3.0)
    );
    server.abort();
    w.shutdown().await.unwrap();
}
