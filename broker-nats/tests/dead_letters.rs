//! Reads that create nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use futures_util::TryStreamExt;
use jetq::broker::Broker;
use jetq::{DeadLetter, ErrorInfo};
use jetq_nats::NatsBroker;
use jetq_test_server::NatsServer;

use common::connect;

/// The names of every stream on the server (buckets are streams too).
async fn stream_names(broker: &NatsBroker) -> Vec<String> {
    let js = async_nats::jetstream::new(broker.client().clone());
    js.stream_names().try_collect().await.unwrap()
}

fn letter(id: &str, reason: &str, sequence: u64, payload: Bytes) -> DeadLetter {
    let mut letter = DeadLetter::new(
        id,
        "default",
        "demo.fail",
        ErrorInfo::new("error", reason),
        payload,
    );
    letter.sequence = sequence;
    letter
}

#[tokio::test]
async fn reads_create_nothing_and_writes_still_create_what_they_need() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    assert_eq!(broker.get_record("x").await.unwrap(), None);
    assert_eq!(broker.dead_letters(10).await.unwrap(), Vec::new());
    assert_eq!(broker.get_dead_letter("x").await.unwrap(), None);
    assert_eq!(stream_names(&broker).await, Vec::<String>::new());

    // The same broker writes afterwards: the misses were not remembered.
    broker
        .create_record("x", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    broker
        .put_dead_letter(letter("x", "boom", 1, Bytes::from_static(b"{}")))
        .await
        .unwrap();
    assert!(broker.get_record("x").await.unwrap().is_some());
    let found = broker.get_dead_letter("x").await.unwrap().unwrap();
    assert_eq!(found.error.message, "boom");

    // Another broker, which never wrote, reads what exists.
    let reader = connect(&server.url()).await;
    assert!(reader.get_record("x").await.unwrap().is_some());
    assert_eq!(reader.dead_letters(10).await.unwrap().len(), 1);
}
