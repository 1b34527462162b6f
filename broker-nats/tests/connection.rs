//! Authentication, connection errors, payload limits and reconnects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{connect, pull_all, request, stream_messages};
use jetq::broker::{Broker, ConsumeOptions, OutgoingRequest};
use jetq::ErrorKind;
use jetq_nats::{NatsBroker, NatsConfig};
use jetq_test_server::NatsServer;

#[tokio::test]
async fn user_and_password() {
    let server = NatsServer::start_with_args(&["--user", "u", "--pass", "p"]);
    let broker =
        NatsBroker::connect_with(NatsConfig::new(&server.url()).user_and_password("u", "p"))
            .await
            .unwrap();
    broker.ensure_queue("default").await.unwrap();

    let err =
        NatsBroker::connect_with(NatsConfig::new(&server.url()).user_and_password("u", "wrong"))
            .await
            .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Broker);
    assert!(err.message().contains("refused the credentials"), "{err}");
    assert!(std::error::Error::source(&err).is_some());

    let err = NatsBroker::connect(&server.url()).await.unwrap_err();
    assert!(err.message().contains("credentials"), "{err}");
}

#[tokio::test]
async fn token() {
    let server = NatsServer::start_with_args(&["--auth", "s3cret"]);
    let broker = NatsBroker::connect_with(NatsConfig::new(&server.url()).token("s3cret"))
        .await
        .unwrap();
    broker.ensure_queue("default").await.unwrap();
    let err = NatsBroker::connect_with(NatsConfig::new(&server.url()).token("nope"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Broker);
    assert!(err.message().contains("refused the credentials"), "{err}");
}

#[tokio::test]
async fn unreachable_server_and_bad_url_fail_clearly() {
    let mut server = NatsServer::start();
    let url = server.url();
    server.kill();
    let err = NatsBroker::connect(&url).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Broker | ErrorKind::Timeout),
        "{err:?}"
    );
    assert!(err.message().contains(&url), "{err}");

    let err = NatsBroker::connect("nats://bad host:4222")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
}

#[tokio::test]
async fn server_list_and_existing_client() {
    let mut dead = NatsServer::start();
    let dead_url = dead.url();
    dead.kill();
    let server = NatsServer::start();
    // One dead server in the list: the client moves on to the next.
    let broker = NatsBroker::connect(&format!("{dead_url},{}", server.url()))
        .await
        .unwrap();
    broker.ensure_queue("default").await.unwrap();

    let client = async_nats::connect(server.url()).await.unwrap();
    let broker = NatsBroker::from_client(client, NatsConfig::default()).unwrap();
    broker
        .publish(request("r1", "default", "t", "x"))
        .await
        .unwrap();
    assert_eq!(stream_messages(&broker).await, 1);
}

#[tokio::test]
async fn payload_too_large_names_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let server = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
    let broker = connect(&server.url()).await;
    let big = OutgoingRequest::new("big", "default", "t", vec![b'x'; 10_000].into());
    let err = broker.publish(big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err:?}");
    assert!(err.message().contains("4096"), "{err}");

    let err = broker
        .create_record("big", vec![b'x'; 10_000].into())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err:?}");
}

#[tokio::test]
async fn publish_survives_a_server_restart() {
    let mut server = NatsServer::start();
    let broker = NatsBroker::connect_with(
        NatsConfig::new(&server.url()).ping_interval(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    broker.ensure_queue("default").await.unwrap();
    broker
        .publish(request("before", "default", "t", "before"))
        .await
        .unwrap();

    server.restart();

    // Same broker, no restart of ours: the client reconnects and the publish is retried.
    let ack = broker
        .publish(request("after", "default", "t", "after"))
        .await
        .unwrap();
    assert!(!ack.duplicate);
    assert_eq!(stream_messages(&broker).await, 2);

    let mut consumer = broker
        .consume("default", ConsumeOptions::new("w"))
        .await
        .unwrap();
    let got = pull_all(&mut consumer, 2, Duration::from_secs(5)).await;
    let payloads: Vec<_> = got.iter().map(|d| d.payload().to_vec()).collect();
    assert_eq!(payloads, [b"before".to_vec(), b"after".to_vec()]);
}

#[tokio::test]
async fn publish_while_the_server_is_down_succeeds_once_it_is_back() {
    let mut server = NatsServer::start();
    let broker = NatsBroker::connect_with(
        NatsConfig::new(&server.url()).ping_interval(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    broker.ensure_queue("default").await.unwrap();
    server.kill();
    let publisher = broker.clone();
    let publish =
        tokio::spawn(async move { publisher.publish(request("r", "default", "t", "x")).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();
    let ack = publish.await.unwrap().unwrap();
    assert!(ack.sequence >= 1);
    assert_eq!(stream_messages(&broker).await, 1);
}

#[tokio::test]
async fn publish_gives_up_when_the_stream_is_gone() {
    let server = NatsServer::start();
    let broker = NatsBroker::connect_with(
        NatsConfig::new(&server.url()).publish_retry_for(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    broker.ensure_queue("default").await.unwrap();
    let js = async_nats::jetstream::new(broker.client().clone());
    js.delete_stream(broker.stream_name()).await.unwrap();
    let err = broker
        .publish(request("r", "default", "t", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Broker, "{err:?}");
    assert!(err.message().contains("JETQ_TASKS"), "{err}");
    // Not recreated behind the operator's back.
    assert!(js.get_stream(broker.stream_name()).await.is_err());
}

#[tokio::test]
async fn watch_and_pull_continue_after_a_server_restart() {
    use futures_util::StreamExt;

    let mut server = NatsServer::start();
    let broker = NatsBroker::connect_with(
        NatsConfig::new(&server.url()).ping_interval(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let rev = broker.create_record("job", "queued".into()).await.unwrap();
    let mut watch = broker.watch_record("job").await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap().value, "queued");
    let mut consumer = broker
        .consume("default", ConsumeOptions::new("w"))
        .await
        .unwrap();

    server.restart();

    // Retried like a publish would be: the first attempts may hit the reconnect.
    let mut rev2 = None;
    for _ in 0..50 {
        match broker.update_record("job", "done".into(), rev).await {
            Ok(r) => {
                rev2 = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let rev2 = rev2.expect("update after restart");
    let entry = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch yields after the restart")
        .unwrap()
        .unwrap();
    assert_eq!((entry.value.as_ref(), entry.revision), (&b"done"[..], rev2));

    broker
        .publish(request("after", "default", "t", "after"))
        .await
        .unwrap();
    let got = pull_all(&mut consumer, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].payload(), b"after");
}

#[tokio::test]
async fn connect_wait_rides_out_a_server_that_starts_late() {
    let mut server = NatsServer::start();
    let url = server.url();
    server.stop();
    // The default fails at once.
    let err = NatsBroker::connect(&url).await.unwrap_err();
    assert!(err.message().contains("cannot connect"), "{err}");

    let config = NatsConfig::new(&url).connect_wait(Duration::from_secs(60));
    let mut connecting = tokio::spawn(NatsBroker::connect_with(config));
    assert!(
        tokio::time::timeout(Duration::from_millis(800), &mut connecting)
            .await
            .is_err(),
        "still waiting for the server"
    );
    server.restart();
    let broker = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .expect("connected once the server was back")
        .unwrap()
        .unwrap();
    broker.ensure_queue("default").await.unwrap();
}

#[tokio::test]
async fn connect_wait_gives_up_after_it_and_never_waits_on_refused_credentials() {
    let mut server = NatsServer::start();
    let url = server.url();
    server.stop();
    let started = tokio::time::Instant::now();
    let config = NatsConfig::new(&url).connect_wait(Duration::from_secs(1));
    let err = NatsBroker::connect_with(config).await.unwrap_err();
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1), "waited: {took:?}");
    assert!(took < Duration::from_secs(8), "then gave up: {took:?}");
    assert!(
        err.message().contains("cannot connect") && err.message().contains(&url),
        "{err}"
    );

    let server = NatsServer::start_with_args(&["--user", "u", "--pass", "p"]);
    let started = tokio::time::Instant::now();
    let config = NatsConfig::new(&server.url())
        .user_and_password("u", "wrong")
        .connect_wait(Duration::from_secs(60));
    let err = NatsBroker::connect_with(config).await.unwrap_err();
    assert!(err.message().contains("refused the credentials"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no waiting on a refusal"
    );
}
