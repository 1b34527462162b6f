//! Provisioning, publishing and consuming against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{connect, pull_all, request, stream_messages};
use jetq::broker::{Broker, ConsumeOptions};
use jetq::ErrorKind;
use jetq_nats::{NatsBroker, NatsConfig};
use jetq_test_server::NatsServer;
use tokio::time::Instant;

#[tokio::test]
async fn provisioning_is_idempotent_and_safe_concurrently() {
    let server = NatsServer::start();
    let a = connect(&server.url()).await;
    let b = connect(&server.url()).await;
    // Two brokers racing to create the same stream, bucket and consumers.
    let (ra, rb) = tokio::join!(a.ensure_queue("default"), b.ensure_queue("default"));
    ra.unwrap();
    rb.unwrap();
    let (ra, rb) = tokio::join!(a.ensure_queue("emails"), b.ensure_queue("emails"));
    ra.unwrap();
    rb.unwrap();
    // Again, cached, and from a fresh broker (not cached).
    a.ensure_queue("default").await.unwrap();
    let c = connect(&server.url()).await;
    c.ensure_queue("default").await.unwrap();
    c.ensure_queue("emails").await.unwrap();

    // The first consumer's settings stay: a worker consuming with another ack
    // wait does not change it under the queue's other workers; it reads the
    // queue's value back and follows it.
    let mut consumer = c
        .consume(
            "default",
            ConsumeOptions::new("w1").ack_wait(Duration::from_secs(7)),
        )
        .await
        .unwrap();
    assert_eq!(
        consumer.ack_wait().await.unwrap(),
        Some(Duration::from_secs(30))
    );
    // A queue whose consumer a worker creates gets that worker's ack wait.
    let mut fresh = c
        .consume(
            "fresh",
            ConsumeOptions::new("w1").ack_wait(Duration::from_secs(7)),
        )
        .await
        .unwrap();
    assert_eq!(
        fresh.ack_wait().await.unwrap(),
        Some(Duration::from_secs(7))
    );
    let d = connect(&server.url()).await;
    d.ensure_queue("default").await.unwrap();
    let js = async_nats::jetstream::new(d.client().clone());
    let stream = js.get_stream(d.stream_name()).await.unwrap();
    let info = stream.consumer_info("jetq-default").await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(30));
    assert_eq!(info.config.filter_subject, "jetq.tasks.default.>");
    assert_eq!(info.config.max_deliver, -1);
    assert_eq!(info.config.max_ack_pending, 10_000);
}

#[tokio::test]
async fn publish_returns_sequence_and_deduplicates_by_id() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    broker.ensure_queue("default").await.unwrap();

    let first = broker
        .publish(request("req-1", "default", "images.resize", "one"))
        .await
        .unwrap();
    assert!(first.sequence >= 1);
    assert!(!first.duplicate);

    let again = broker
        .publish(request("req-1", "default", "images.resize", "one again"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(stream_messages(&broker).await, 1);

    let other = broker
        .publish(request("req-2", "default", "add", "two"))
        .await
        .unwrap();
    assert!(!other.duplicate);
    assert!(other.sequence > first.sequence);
    assert_eq!(stream_messages(&broker).await, 2);
}

#[tokio::test]
async fn publish_creates_the_stream_on_first_use_and_forwards_headers() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let mut req = request("req-h", "default", "add", "x");
    req.headers
        .push(("traceparent".into(), "00-abc-def-01".into()));
    broker.publish(req).await.unwrap();
    let js = async_nats::jetstream::new(broker.client().clone());
    let stream = js.get_stream("JETQ_TASKS").await.unwrap();
    let msg = stream.get_raw_message(1).await.unwrap();
    assert_eq!(msg.subject.as_str(), "jetq.tasks.default.add");
    assert_eq!(
        msg.headers.get("traceparent").map(|v| v.as_str()),
        Some("00-abc-def-01")
    );
    assert_eq!(
        msg.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("req-h")
    );

    // Reserved and malformed headers are refused.
    let mut bad = request("req-x", "default", "add", "x");
    bad.headers
        .push(("Nats-Expected-Stream".into(), "X".into()));
    assert_eq!(
        broker.publish(bad).await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    let mut bad = request("req-y", "default", "add", "x");
    bad.headers.push(("x-ok".into(), "line\r\nbreak".into()));
    assert_eq!(
        broker.publish(bad).await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
}

#[tokio::test]
async fn pull_yields_messages_and_nak_delay_redelivers_later() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let mut consumer = broker
        .consume("default", ConsumeOptions::new("w1"))
        .await
        .unwrap();
    broker
        .publish(request("r1", "default", "a.b.c", "payload-1"))
        .await
        .unwrap();
    broker
        .publish(request("r2", "default", "a", "payload-2"))
        .await
        .unwrap();
    // Another queue's request is not delivered here.
    broker
        .publish(request("r3", "other", "a", "payload-3"))
        .await
        .unwrap();

    let started = Instant::now();
    let got = pull_all(&mut consumer, 2, Duration::from_secs(5)).await;
    // Ends at `max`, not at `expires`.
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].payload(), b"payload-1");
    assert_eq!(got[1].payload(), b"payload-2");
    assert_eq!(got[0].info().delivered, 1);
    assert!(got[1].info().sequence > got[0].info().sequence);

    got[1].ack().await.unwrap();
    let seq = got[0].info().sequence;
    got[0].nak(Some(Duration::from_millis(600))).await.unwrap();
    let naked = Instant::now();

    // Not before the delay...
    let early = pull_all(&mut consumer, 1, Duration::from_millis(200)).await;
    assert!(early.is_empty(), "redelivered before the nak delay");
    // ...but after it.
    let again = pull_all(&mut consumer, 1, Duration::from_secs(5)).await;
    assert_eq!(again.len(), 1);
    assert!(naked.elapsed() >= Duration::from_millis(550));
    assert_eq!(again[0].info().sequence, seq);
    assert_eq!(again[0].info().delivered, 2);
    assert_eq!(again[0].payload(), b"payload-1");
    again[0].ack().await.unwrap();
}

#[tokio::test]
async fn pull_ends_at_expiry_when_nothing_arrives() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let mut consumer = broker
        .consume("default", ConsumeOptions::new("w1"))
        .await
        .unwrap();
    let started = Instant::now();
    // Long enough to get heartbeats, which must not surface.
    let got = pull_all(&mut consumer, 5, Duration::from_millis(2500)).await;
    assert!(got.is_empty());
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(2400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    // A message published during a pull is yielded as it arrives.
    let publisher = broker.clone();
    let pull = consumer.pull(3, Duration::from_secs(10)).await.unwrap();
    publisher
        .publish(request("late", "default", "t", "late"))
        .await
        .unwrap();
    let mut pull = pull;
    use futures_util::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(5), pull.next())
        .await
        .expect("yielded before expiry")
        .unwrap()
        .unwrap();
    assert_eq!(first.payload(), b"late");
    first.ack().await.unwrap();
}

#[tokio::test]
async fn ack_removes_the_message_from_the_work_queue() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let mut consumer = broker
        .consume("default", ConsumeOptions::new("w1"))
        .await
        .unwrap();
    broker
        .publish(request("r1", "default", "t", "x"))
        .await
        .unwrap();
    assert_eq!(stream_messages(&broker).await, 1);
    let got = pull_all(&mut consumer, 1, Duration::from_secs(5)).await;
    got[0].ack().await.unwrap();
    // The ack is confirmed by the server, so the removal is visible now.
    assert_eq!(stream_messages(&broker).await, 0);
}

#[tokio::test]
async fn in_progress_prevents_redelivery_and_term_stops_it() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let options = ConsumeOptions::new("w1").ack_wait(Duration::from_millis(800));
    let mut consumer = broker.consume("default", options).await.unwrap();
    broker
        .publish(request("r1", "default", "slow", "x"))
        .await
        .unwrap();
    let got = pull_all(&mut consumer, 1, Duration::from_secs(5)).await;
    let delivery = &got[0];

    // Keep working for three ack waits while a second pull waits for a redelivery.
    let mut other = broker
        .consume(
            "default",
            ConsumeOptions::new("w2").ack_wait(Duration::from_millis(800)),
        )
        .await
        .unwrap();
    let watcher = tokio::spawn(async move {
        pull_all(&mut other, 1, Duration::from_millis(2400))
            .await
            .len()
    });
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        delivery.in_progress().await.unwrap();
    }
    assert_eq!(watcher.await.unwrap(), 0, "redelivered despite in_progress");

    // Terminated: never delivered again, even after the ack wait.
    delivery.term("bad input").await.unwrap();
    let after = pull_all(&mut consumer, 1, Duration::from_millis(1800)).await;
    assert!(after.is_empty(), "redelivered after term");
}

#[tokio::test]
async fn without_in_progress_the_message_is_redelivered_after_ack_wait() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let options = ConsumeOptions::new("w1").ack_wait(Duration::from_millis(500));
    let mut consumer = broker.consume("default", options).await.unwrap();
    broker
        .publish(request("r1", "default", "slow", "x"))
        .await
        .unwrap();
    let first = pull_all(&mut consumer, 1, Duration::from_secs(5)).await;
    assert_eq!(first[0].info().delivered, 1);
    let second = pull_all(&mut consumer, 1, Duration::from_secs(5)).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].info().delivered, 2);
    second[0].ack().await.unwrap();
}

fn kind<T>(r: jetq::Result<T>) -> ErrorKind {
    match r {
        Ok(_) => panic!("accepted a hostile name"),
        Err(e) => e.kind(),
    }
}

#[tokio::test]
async fn hostile_names_are_refused_before_anything_is_sent() {
    let mut server = NatsServer::start();
    let broker = connect(&server.url()).await;
    // With the server gone, anything that reached the network would hang or fail otherwise.
    server.kill();
    let started = Instant::now();
    for hostile in ["a.b", "*", ">", "a b", "", "a.>"] {
        assert_eq!(
            kind(broker.ensure_queue(hostile).await),
            ErrorKind::InvalidName
        );
        assert_eq!(
            kind(broker.publish(request(hostile, "default", "t", "x")).await),
            ErrorKind::InvalidName,
            "id {hostile:?}"
        );
        assert_eq!(
            kind(broker.publish(request("ok", hostile, "t", "x")).await),
            ErrorKind::InvalidName,
            "queue {hostile:?}"
        );
        assert_eq!(
            kind(broker.consume(hostile, ConsumeOptions::new("w")).await),
            ErrorKind::InvalidName
        );
        assert_eq!(
            kind(broker.get_record(hostile).await),
            ErrorKind::InvalidName
        );
        assert_eq!(
            kind(broker.create_record(hostile, "x".into()).await),
            ErrorKind::InvalidName
        );
        assert_eq!(
            kind(broker.update_record(hostile, "x".into(), 1).await),
            ErrorKind::InvalidName
        );
        assert_eq!(
            kind(broker.watch_record(hostile).await),
            ErrorKind::InvalidName
        );
    }
    for hostile_task in ["*", ">", "a.*", "a.>", "a..b", "a b"] {
        let err = broker
            .publish(request("ok", "default", hostile_task, "x"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidName, "task {hostile_task:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_custom_prefix_keeps_its_own_stream_and_consumers() {
    let server = NatsServer::start();
    let default = connect(&server.url()).await;
    let custom = NatsBroker::connect_with(NatsConfig::new(&server.url()).prefix("billing"))
        .await
        .unwrap();
    assert_eq!(custom.stream_name(), "BILLING_TASKS");
    assert_eq!(custom.bucket_name(), "BILLING_RESULTS");
    assert_eq!(custom.consumer_name("default").unwrap(), "billing-default");

    let mut c_default = default
        .consume("default", ConsumeOptions::new("w"))
        .await
        .unwrap();
    let mut c_custom = custom
        .consume("default", ConsumeOptions::new("w"))
        .await
        .unwrap();
    default
        .publish(request("same-id", "default", "t", "from-default"))
        .await
        .unwrap();
    // Same id, other prefix: not a duplicate, other stream.
    let ack = custom
        .publish(request("same-id", "default", "t", "from-custom"))
        .await
        .unwrap();
    assert!(!ack.duplicate);

    let got = pull_all(&mut c_custom, 5, Duration::from_millis(1500)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload(), b"from-custom");
    let got = pull_all(&mut c_default, 5, Duration::from_millis(1500)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload(), b"from-default");

    custom.create_record("rec", "c".into()).await.unwrap();
    assert!(default.get_record("rec").await.unwrap().is_none());
}

#[tokio::test]
async fn bad_options_are_config_errors() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let mut options = ConsumeOptions::new("w");
    options.max_deliver = Some(0);
    assert_eq!(
        broker.consume("default", options).await.unwrap_err().kind(),
        ErrorKind::Config
    );
    let err = NatsBroker::connect_with(NatsConfig::new(&server.url()).prefix("a.b"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

/// Acknowledgements are handed out by a task started with the first
/// publish. When the runtime of that first publish ends while the
/// connection lives on (made on another runtime), publishes and record
/// writes go through async-nats' own request path instead of waiting for a
/// hand-out that will never come.
#[test]
fn publishes_outlive_the_runtime_of_the_first_publish() {
    let server = NatsServer::start();
    let main = tokio::runtime::Runtime::new().unwrap();
    let broker = main.block_on(connect(&server.url()));
    let short = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let first = short
        .block_on(broker.publish(request("first", "default", "t", "{}")))
        .unwrap();
    short
        .block_on(broker.create_record("first", bytes::Bytes::from_static(b"{}")))
        .unwrap();
    drop(short);
    main.block_on(async {
        let again = tokio::time::timeout(
            Duration::from_secs(3),
            broker.publish(request("second", "default", "t", "{}")),
        )
        .await
        .expect("a publish after the hand-out's runtime ended does not hang")
        .unwrap();
        assert_eq!(again.sequence, first.sequence + 1);
        let revision = tokio::time::timeout(
            Duration::from_secs(3),
            broker.create_record("second", bytes::Bytes::from_static(b"{}")),
        )
        .await
        .expect("a record write after the hand-out's runtime ended does not hang")
        .unwrap();
        assert!(revision > 0);
    });
}
