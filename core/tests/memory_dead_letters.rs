//! Dead letters in the in-memory broker: numbered, and removed by position.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use jetq::broker::Broker;
use jetq::memory::MemoryBroker;
use jetq::{Client, DeadLetter, ErrorInfo, Request};

fn letter(id: &str, reason: &str, sequence: u64) -> DeadLetter {
    let mut envelope = Request::new("demo.fail");
    envelope.id = id.to_owned();
    let mut letter = DeadLetter::new(
        id,
        "default",
        "demo.fail",
        ErrorInfo::new("error", reason),
        Bytes::from(envelope.to_json().unwrap()),
    );
    letter.sequence = sequence;
    letter
}

fn reasons(letters: &[DeadLetter], id: &str) -> Vec<String> {
    letters
        .iter()
        .filter(|l| l.id == id)
        .map(|l| l.error.message.clone())
        .collect()
}

#[tokio::test]
async fn letters_are_numbered_and_removed_through_a_position() {
    let broker = MemoryBroker::new();
    for (id, reason, seq) in [
        ("a", "first", 1),
        ("b", "other", 2),
        ("a", "second", 3),
        ("a", "third", 4),
    ] {
        broker
            .put_dead_letter(letter(id, reason, seq))
            .await
            .unwrap();
    }
    let letters = broker.dead_letters(10).await.unwrap();
    let positions: Vec<u64> = letters.iter().map(|l| l.dead_sequence.unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    let second = letters
        .iter()
        .find(|l| l.error.message == "second")
        .unwrap();
    let removed = broker
        .remove_dead_letters_through("a", second.dead_sequence.unwrap())
        .await
        .unwrap();
    assert_eq!(removed, 2);
    let letters = broker.dead_letters(10).await.unwrap();
    assert_eq!(reasons(&letters, "a"), ["third"]);
    assert_eq!(reasons(&letters, "b"), ["other"]);
}

#[tokio::test]
async fn requeue_removes_the_letter_it_requeued() {
    let broker = MemoryBroker::new();
    broker
        .put_dead_letter(letter("a", "first", 1))
        .await
        .unwrap();
    broker
        .put_dead_letter(letter("a", "second", 2))
        .await
        .unwrap();
    Client::new(broker.clone()).requeue("a").await.unwrap();
    assert_eq!(broker.dead_letters(10).await.unwrap(), Vec::new());
    // Dead again after the requeue: the new letter is kept.
    broker
        .put_dead_letter(letter("a", "third", 3))
        .await
        .unwrap();
    assert_eq!(
        reasons(&broker.dead_letters(10).await.unwrap(), "a"),
        ["third"]
    );
}
