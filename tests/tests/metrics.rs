//! The demo worker's Prometheus endpoint (`--metrics-addr`), scraped as
//! Prometheus would while the worker runs as its own process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use jetq::{Client, Status};
use jetq_tests::{connect, demo_worker_with, NatsServer, WAIT};
use serde_json::json;

fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the series `name` whose labels include every `label="value"`.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
}

#[tokio::test]
async fn the_demo_workers_endpoint_counts_requests_by_task_and_outcome() {
    let server = NatsServer::start();
    let addr = free_addr();
    let _worker = demo_worker_with(
        &server,
        &["--metrics-addr", &addr.to_string(), "--concurrency", "4"],
    );
    let client = Client::new(connect(&server).await);
    let mut ended = Vec::new();
    for (task, args, retries) in [
        ("demo.add", json!({"a": 1, "b": 2}), 0),
        ("demo.add", json!({"a": 3, "b": 4}), 0),
        ("demo.fail", json!({"times": 1}), 2),
        ("demo.panic", json!(null), 0),
    ] {
        let handle = client
            .task(task)
            .args(&args)
            .max_retries(retries)
            .publish()
            .await
            .unwrap();
        ended.push((task, handle.wait(WAIT).await.unwrap().status));
    }
    assert_eq!(
        ended.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        [
            Status::Succeeded,
            Status::Succeeded,
            Status::Succeeded,
            Status::Failed
        ]
    );
    // The chain counts an attempt's outcome before its record is written, so
    // every ended request is counted by now.
    let text = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();
    let ended = |task, outcome| {
        series(
            &text,
            "jetq_attempts_ended_total",
            &[("task", task), ("outcome", outcome)],
        )
    };
    assert_eq!(ended("demo.add", "succeeded"), Some(2.0), "{text}");
    assert_eq!(ended("demo.fail", "retried"), Some(1.0), "{text}");
    assert_eq!(ended("demo.fail", "succeeded"), Some(1.0), "{text}");
    assert_eq!(ended("demo.panic", "failed"), Some(1.0), "{text}");
    assert_eq!(ended("demo.add", "failed"), None, "{text}");
    assert_eq!(
        series(
            &text,
            "jetq_attempts_started_total",
            &[("task", "demo.fail"), ("queue", "default")]
        ),
        Some(2.0),
        "{text}"
    );
    assert!(
        series(
            &text,
            "jetq_attempt_duration_seconds_count",
            &[("task", "demo.add")]
        ) == Some(2.0),
        "{text}"
    );
}
