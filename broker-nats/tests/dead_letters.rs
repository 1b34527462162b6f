//! Reads that create nothing, and dead letters removed by their position.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::TryStreamExt;
use jetq::broker::{
    BoxFuture, BoxStream, Broker, ConsumeOptions, Consumer, OutgoingRequest, PublishAck,
    RecordEntry,
};
use jetq::{Client, DeadLetter, ErrorInfo, Request, Result};
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
    assert!(found.dead_sequence.is_some());

    // Another broker, which never wrote, reads what exists.
    let reader = connect(&server.url()).await;
    assert!(reader.get_record("x").await.unwrap().is_some());
    assert_eq!(reader.dead_letters(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn remove_dead_letters_through_keeps_newer_letters() {
    let server = NatsServer::start();
    let broker = connect(&server.url()).await;
    for (id, reason, seq) in [
        ("a", "first", 1),
        ("b", "other", 2),
        ("a", "second", 3),
        ("a", "third", 4),
    ] {
        broker
            .put_dead_letter(letter(id, reason, seq, Bytes::from_static(b"{}")))
            .await
            .unwrap();
    }
    let letters = broker.dead_letters(10).await.unwrap();
    let of_a: Vec<_> = letters.iter().filter(|l| l.id == "a").collect();
    let positions: Vec<u64> = of_a.iter().map(|l| l.dead_sequence.unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    // Through the second letter of `a`: the first two go, the third stays.
    let removed = broker
        .remove_dead_letters_through("a", positions[1])
        .await
        .unwrap();
    assert_eq!(removed, 2);
    let left: Vec<(String, String)> = broker
        .dead_letters(10)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.id, l.error.message))
        .collect();
    assert_eq!(
        left,
        [("b".into(), "other".into()), ("a".into(), "third".into())]
    );
}

/// A broker that, when the requeued request is published, stores a newer
/// dead letter for the same id first: the request died again at once,
/// before the requeue removed the letter it requeued.
#[derive(Debug, Clone)]
struct DiesAgainAtOnce {
    inner: NatsBroker,
    again: Arc<Mutex<Option<DeadLetter>>>,
}

impl Broker for DiesAgainAtOnce {
    fn ensure_queue(&self, queue: &str) -> BoxFuture<'_, Result<()>> {
        self.inner.ensure_queue(queue)
    }
    fn publish(&self, request: OutgoingRequest) -> BoxFuture<'_, Result<PublishAck>> {
        Box::pin(async move {
            let ack = self.inner.publish(request).await?;
            let again = self.again.lock().unwrap().take();
            if let Some(letter) = again {
                self.inner.put_dead_letter(letter).await?;
            }
            Ok(ack)
        })
    }
    fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>>> {
        self.inner.consume(queue, options)
    }
    fn stored_request(&self, sequence: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        self.inner.stored_request(sequence)
    }
    fn get_record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<RecordEntry>>> {
        self.inner.get_record(id)
    }
    fn create_record<'a>(&'a self, id: &'a str, value: Bytes) -> BoxFuture<'a, Result<u64>> {
        self.inner.create_record(id, value)
    }
    fn update_record<'a>(
        &'a self,
        id: &'a str,
        value: Bytes,
        revision: u64,
    ) -> BoxFuture<'a, Result<u64>> {
        self.inner.update_record(id, value, revision)
    }
    fn delete_record<'a>(&'a self, id: &'a str, revision: u64) -> BoxFuture<'a, Result<()>> {
        self.inner.delete_record(id, revision)
    }
    fn max_payload(&self) -> Option<usize> {
        self.inner.max_payload()
    }
    fn remove_delayed(&self, id: &str) -> BoxFuture<'_, Result<bool>> {
        self.inner.remove_delayed(id)
    }
    fn put_dead_letter(&self, letter: DeadLetter) -> BoxFuture<'_, Result<()>> {
        self.inner.put_dead_letter(letter)
    }
    fn dead_letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>>> {
        self.inner.dead_letters(limit)
    }
    fn get_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<Option<DeadLetter>>> {
        self.inner.get_dead_letter(id)
    }
    fn remove_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<u64>> {
        self.inner.remove_dead_letter(id)
    }
    fn remove_dead_letters_through(
        &self,
        id: &str,
        dead_sequence: u64,
    ) -> BoxFuture<'_, Result<u64>> {
        self.inner.remove_dead_letters_through(id, dead_sequence)
    }
    fn signal_cancel(&self, id: &str) -> BoxFuture<'_, Result<()>> {
        self.inner.signal_cancel(id)
    }
    fn cancel_signals(&self) -> BoxFuture<'_, Result<BoxStream<'static, String>>> {
        self.inner.cancel_signals()
    }
    fn watch_record(
        &self,
        id: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RecordEntry>>>> {
        self.inner.watch_record(id)
    }
}

#[tokio::test]
async fn requeue_keeps_a_dead_letter_newer_than_the_one_it_requeued() {
    let server = NatsServer::start();
    let nats = connect(&server.url()).await;
    let mut envelope = Request::new("demo.fail");
    envelope.id = "twice".to_owned();
    envelope.set_args(&serde_json::json!({"times": 9})).unwrap();
    let payload = Bytes::from(envelope.to_json().unwrap());
    nats.put_dead_letter(letter("twice", "first death", 1, payload.clone()))
        .await
        .unwrap();

    let broker = DiesAgainAtOnce {
        inner: nats.clone(),
        again: Arc::new(Mutex::new(Some(letter(
            "twice",
            "second death",
            2,
            payload,
        )))),
    };
    Client::new(broker.clone()).requeue("twice").await.unwrap();
    assert!(broker.again.lock().unwrap().is_none(), "the hook ran");

    let left: Vec<String> = nats
        .dead_letters(10)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.id == "twice")
        .map(|l| l.error.message)
        .collect();
    assert_eq!(
        left,
        ["second death"],
        "the requeued letter went, the newer one stayed"
    );
}
