#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use jetq::broker::{Consumer, Delivery, OutgoingRequest};
use jetq_nats::NatsBroker;

pub async fn connect(url: &str) -> NatsBroker {
    NatsBroker::connect(url).await.expect("connect")
}

pub fn request(id: &str, queue: &str, task: &str, payload: &'static str) -> OutgoingRequest {
    OutgoingRequest::new(id, queue, task, Bytes::from_static(payload.as_bytes()))
}

/// Number of messages in the broker's task stream.
pub async fn stream_messages(broker: &NatsBroker) -> u64 {
    let js = async_nats::jetstream::new(broker.client().clone());
    let mut stream = js.get_stream(broker.stream_name()).await.expect("stream");
    stream.info().await.expect("info").state.messages
}

/// Pull and collect everything the pull yields.
pub async fn pull_all(
    consumer: &mut Box<dyn Consumer>,
    max: usize,
    expires: Duration,
) -> Vec<Box<dyn Delivery>> {
    let stream = consumer.pull(max, expires).await.expect("pull");
    let items: Vec<_> = stream.collect().await;
    items.into_iter().map(|d| d.expect("delivery")).collect()
}
