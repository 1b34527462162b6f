//! Records in the KV bucket, and watching them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::connect;
use futures_util::StreamExt;
use jetq::broker::{Broker, RecordEntry};
use jetq::ErrorKind;
use jetq_nats::{NatsBroker, NatsConfig};
use jetq_test_server::NatsServer;

async fn next(
    watch: &mut jetq::broker::BoxStream<'static, jetq::Result<RecordEntry>>,
) -> RecordEntry {
    tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an entry within 5 s")
        .expect("stream still open")
        .expect("entry")
}

#[tokio::test]
async fn create_get_update_with_revisions() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    assert!(broker.get_record("r1").await.unwrap().is_none());

    let rev1 = broker.create_record("r1", "v1".into()).await.unwrap();
    let err = broker.create_record("r1", "v1b".into()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert!(std::error::Error::source(&err).is_some());

    let entry = broker.get_record("r1").await.unwrap().unwrap();
    assert_eq!(entry, RecordEntry::new("v1".into(), rev1));

    let rev2 = broker.update_record("r1", "v2".into(), rev1).await.unwrap();
    assert!(rev2 > rev1);
    let err = broker
        .update_record("r1", "v3".into(), rev1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let entry = broker.get_record("r1").await.unwrap().unwrap();
    assert_eq!(entry, RecordEntry::new("v2".into(), rev2));
}

#[tokio::test]
async fn deleted_records_read_as_none_and_can_be_created_again() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    broker.create_record("r1", "v1".into()).await.unwrap();
    let js = async_nats::jetstream::new(broker.client().clone());
    let kv = js.get_key_value(broker.bucket_name()).await.unwrap();
    kv.delete("r1").await.unwrap();
    assert!(broker.get_record("r1").await.unwrap().is_none());
    broker.create_record("r1", "v2".into()).await.unwrap();
    assert_eq!(broker.get_record("r1").await.unwrap().unwrap().value, "v2");
    kv.purge("r1").await.unwrap();
    assert!(broker.get_record("r1").await.unwrap().is_none());
}

#[tokio::test]
async fn watch_yields_the_current_entry_then_updates() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let rev1 = broker
        .create_record("job-1", "queued".into())
        .await
        .unwrap();

    let mut watch = broker.watch_record("job-1").await.unwrap();
    assert_eq!(
        next(&mut watch).await,
        RecordEntry::new("queued".into(), rev1)
    );

    let rev2 = broker
        .update_record("job-1", "running".into(), rev1)
        .await
        .unwrap();
    assert_eq!(
        next(&mut watch).await,
        RecordEntry::new("running".into(), rev2)
    );

    // A rejected update (stale revision) is not a change.
    broker
        .update_record("job-1", "bogus".into(), rev1)
        .await
        .unwrap_err();
    // Another record's changes do not show up.
    broker.create_record("job-2", "other".into()).await.unwrap();
    let rev3 = broker
        .update_record("job-1", "done".into(), rev2)
        .await
        .unwrap();
    assert_eq!(
        next(&mut watch).await,
        RecordEntry::new("done".into(), rev3)
    );
}

#[tokio::test]
async fn watch_before_the_record_exists_and_costs_no_consumer() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let mut watches = Vec::new();
    for _ in 0..20 {
        watches.push(broker.watch_record("later").await.unwrap());
    }
    let rev = broker.create_record("later", "hello".into()).await.unwrap();
    for watch in &mut watches {
        assert_eq!(next(watch).await, RecordEntry::new("hello".into(), rev));
    }
    let js = async_nats::jetstream::new(broker.client().clone());
    let mut stream = js
        .get_stream(format!("KV_{}", broker.bucket_name()))
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 0);
}

#[tokio::test]
async fn watch_skips_deletes() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    let mut watch = broker.watch_record("r").await.unwrap();
    broker.create_record("r", "a".into()).await.unwrap();
    assert_eq!(next(&mut watch).await.value, "a");
    let js = async_nats::jetstream::new(broker.client().clone());
    let kv = js.get_key_value(broker.bucket_name()).await.unwrap();
    kv.delete("r").await.unwrap();
    let rev = broker.create_record("r", "b".into()).await.unwrap();
    assert_eq!(next(&mut watch).await, RecordEntry::new("b".into(), rev));
}

#[tokio::test]
async fn records_with_a_ttl_bucket() {
    let server = NatsServer::start();
    let broker = NatsBroker::connect_with(
        NatsConfig::new(&server.url()).record_ttl(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    broker.create_record("r", "a".into()).await.unwrap();
    let js = async_nats::jetstream::new(broker.client().clone());
    let mut stream = js
        .get_stream(format!("KV_{}", broker.bucket_name()))
        .await
        .unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    assert_eq!(info.config.max_messages_per_subject, 1);

    // A second broker with another TTL updates the bucket instead of failing,
    // when it first writes: a read changes nothing on the server.
    let other = NatsBroker::connect_with(
        NatsConfig::new(&server.url()).record_ttl(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    other.get_record("r").await.unwrap().unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    other.create_record("s", "b".into()).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::from_secs(60));
}
