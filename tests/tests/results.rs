//! How results reach their producer (issue 8's lean task path): the worker
//! that ends a request sends the record it wrote to the inbox the request
//! names (`notify`), and nowhere else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jetq::broker::Broker;
use jetq::{Client, Status, Worker};
use jetq_nats::NatsBroker;
use jetq_tests::{
    add, connect, connect_as, publish_add, server_with_config, stored_requests, NatsServer, WAIT,
};
use serde_json::json;

/// A server with two users: `worker` may do anything; `producer` may publish
/// requests and use its inbox, but may not read records (no direct or
/// stream gets, no KV subjects, no record notifications).
fn server_with_a_blind_producer() -> (NatsServer, tempfile::TempDir) {
    server_with_config(
        r#"
authorization {
  users = [
    { user: worker, password: w }
    { user: producer, password: p, permissions: {
        publish: { deny: ["$JS.API.DIRECT.GET.>", "$JS.API.STREAM.MSG.GET.>", "$KV.>"] }
        subscribe: { deny: ["jetq.records.>", "$KV.>"] } } }
  ]
}
"#,
    )
}

/// Guarantee: a producer waiting for the requests it published gets each
/// record from the worker through its inbox; it does not need to read the
/// record at all (here it may not).
#[tokio::test]
async fn a_producer_that_cannot_read_records_gets_its_results_by_its_inbox() {
    let (server, _conf) = server_with_a_blind_producer();
    let worker_broker = connect_as(&server, "worker", "w").await;
    let worker = Worker::builder(worker_broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let producer_broker = connect_as(&server, "producer", "p").await;
    let producer = Client::new(producer_broker.clone());
    let spy = async_nats::ConnectOptions::with_user_and_password("worker".into(), "w".into())
        .connect(server.url())
        .await
        .unwrap();
    let mut requests = spy.subscribe("jetq.tasks.>").await.unwrap();
    spy.flush().await.unwrap();
    // Reading a record is refused for this user: only the inbox can help.
    assert!(producer.record("anything").await.is_err());
    let handles: Vec<_> = futures_util::future::join_all((0..20).map(|i| {
        producer
            .task("demo.add")
            .args(&json!({"a": i, "b": 100}))
            .publish()
    }))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    for (i, h) in handles.iter().enumerate() {
        let value: i64 = h.result(WAIT).await.unwrap();
        assert_eq!(value, i as i64 + 100);
    }
    drop(handles);
    // The first waits tried to follow their records, which this user may
    // not subscribe to: nothing ever arrived there, so no request asked its
    // worker to tag its record and leave the inbox out; and the server's
    // refusal stopped the tries.
    for _ in 0..20 {
        assert_eq!(next_envelope(&mut requests).await.get("follow"), None);
    }
    assert!(producer_broker
        .follow_record("next")
        .await
        .unwrap()
        .is_none());
    let lone = publish_add(&producer, 2, 2).await;
    assert_eq!(next_envelope(&mut requests).await.get("follow"), None);
    assert_eq!(lone.result::<i64>(WAIT).await.unwrap(), 4);
    // A request published without asking for its result is still run and
    // recorded; its producer just is not told.
    let quiet = producer
        .task("demo.add")
        .args(&json!({"a": 1, "b": 1}))
        .notify(false)
        .publish()
        .await
        .unwrap();
    let record = Client::new(worker_broker.clone())
        .wait(quiet.id(), WAIT)
        .await
        .unwrap();
    assert_eq!(
        (record.status, record.value),
        (Status::Succeeded, Some(json!(2)))
    );
    worker.shutdown().await.unwrap();
}

/// Guarantee: a request cannot make a worker publish anywhere but an inbox:
/// a `notify` naming a record key, a task subject or a wildcard is ignored
/// (the request itself runs normally).
#[tokio::test]
async fn a_notify_address_that_is_not_an_inbox_is_never_published_to() {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    // The stream first: with the spy below subscribed, a publish before it
    // exists would wait for an answer instead of being told "no responders".
    broker.ensure_queue("default").await.unwrap();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut spy = nats.subscribe("jetq.>").await.unwrap();
    nats.flush().await.unwrap();
    let targets = [
        "$KV.JETQ_RESULTS.victim",
        "jetq.tasks.default.demo.add",
        "jetq.spied.on",
        "_INBOX.*",
        "_INBOX.a.b",
        "_INBOX",
    ];
    let mut ids = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let mut request = jetq::Request::new("demo.add");
        request.id = format!("notify-{i}");
        request.set_args(&json!({"a": i, "b": 0})).unwrap();
        request.notify = Some((*target).to_owned());
        let body = request.to_json().unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", request.id.as_str());
        let js = async_nats::jetstream::new(nats.clone());
        js.publish_with_headers("jetq.tasks.default.demo.add", headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
        ids.push(request.id);
    }
    for (i, id) in ids.iter().enumerate() {
        let record = client.wait(id, WAIT).await.unwrap();
        assert_eq!(
            (record.status, record.value),
            (Status::Succeeded, Some(json!(i)))
        );
    }
    // The worker acknowledges after it would have sent a notification, on
    // the same connection: once the stream is empty, anything it sent has
    // been routed.
    let deadline = tokio::time::Instant::now() + WAIT;
    while stored_requests(&server).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "requests left");
        // Polled: the stream has nothing to watch for "empty".
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nats.flush().await.unwrap();
    assert!(broker.get_record("victim").await.unwrap().is_none());
    while let Ok(Some(message)) = tokio::time::timeout(
        Duration::from_millis(1),
        futures_util::StreamExt::next(&mut spy),
    )
    .await
    {
        assert!(
            message.subject.as_str() == "jetq.tasks.default.demo.add"
                || message.subject.as_str().starts_with("jetq.records."),
            "a worker published to {}",
            message.subject
        );
        if message.subject.as_str() == "jetq.tasks.default.demo.add" {
            // Only our own six requests.
            let request = jetq::Request::from_json(&message.payload).unwrap();
            assert!(ids.contains(&request.id), "{request:?}");
        }
    }
    worker.shutdown().await.unwrap();
}

/// Guarantee: waiting for a record is a read: it creates no bucket or
/// stream, and still sees the record once a worker writes it.
#[tokio::test]
async fn waiting_creates_nothing_and_still_sees_the_record() {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let client = Client::new(broker.clone());
    let err = client
        .wait("nobody-yet", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), jetq::ErrorKind::Timeout);
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let names: Vec<String> = futures_util::TryStreamExt::try_collect(js.stream_names())
        .await
        .unwrap();
    assert!(names.is_empty(), "created {names:?}");
    // A wait begun before anything exists sees the record once it is written.
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.wait("later-1", WAIT).await }
    });
    let producer = Client::new(connect(&server).await);
    producer
        .task("demo.add")
        .id("later-1")
        .args(&json!({"a": 2, "b": 3}))
        .notify(false)
        .publish()
        .await
        .unwrap();
    let worker = Worker::builder(connect(&server).await)
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let record = waiting.await.unwrap().unwrap();
    assert_eq!(record.value, Some(json!(5)));
    worker.shutdown().await.unwrap();
}

/// Guarantee: what reaches a producer's inbox and is no record (not JSON, or
/// JSON that names the request and a terminal status but lacks a record's
/// other fields) is ignored by both kinds of wait, which go on to read the
/// stored record and get the real result. (The inbox checks a record's
/// required fields as it reads what arrives; `wait` decodes the rest, and
/// falls back to reading when it cannot.)
#[tokio::test]
async fn what_reaches_the_inbox_and_is_no_record_is_ignored() {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut requests = nats.subscribe("jetq.tasks.>").await.unwrap();
    nats.flush().await.unwrap();
    let client = Client::new(broker.clone());
    let handle = publish_add(&client, 40, 2).await;
    let envelope: serde_json::Value = serde_json::from_slice(
        &futures_util::StreamExt::next(&mut requests)
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    let inbox = envelope["notify"].as_str().unwrap().to_owned();
    let (value, record) = (handle.clone(), handle.clone());
    let value = tokio::spawn(async move { value.result::<i64>(WAIT).await });
    let record = tokio::spawn(async move { record.wait(WAIT).await });
    for fake in [
        b"not json".to_vec(),
        serde_json::to_vec(&json!({"id": handle.id(), "status": "succeeded", "value": 7})).unwrap(),
    ] {
        nats.publish(inbox.clone(), fake.into()).await.unwrap();
    }
    nats.flush().await.unwrap();
    // Nothing ran yet: no wait may have ended on what was sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !value.is_finished() && !record.is_finished(),
        "a wait took a fake record"
    );
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    assert_eq!(value.await.unwrap().unwrap(), 42);
    let record = record.await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.value),
        (Status::Succeeded, Some(json!(42)))
    );
    worker.shutdown().await.unwrap();
}

/// Guarantee: a producer waiting on few requests also follows each one's
/// record where the bucket republishes it (envelope `follow`), which reaches
/// it before the worker's message to its inbox; it takes a change from there
/// only with the tag that the worker's write gives it (HMAC-SHA256 of the
/// record, keyed by the producer's inbox address). A record there without
/// a tag, or tagged with another key, is ignored; one tagged with the inbox
/// address is taken: it is trusted as far as the inbox is. The record a
/// worker stores for a followed request carries its tag.
#[tokio::test]
async fn a_followed_record_counts_only_with_its_tag() {
    let Following {
        server: _server,
        broker,
        nats,
        client,
        mut requests,
    } = following().await;
    // No worker now: the request waits in its queue.
    let handle = publish_add(&client, 40, 2).await;
    let envelope = next_envelope(&mut requests).await;
    assert_eq!(envelope["follow"], true, "a lone wait follows its record");
    let inbox = envelope["notify"].as_str().unwrap().to_owned();
    let waiting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.result::<i64>(WAIT).await }
    });
    let mut fake = handle.record().await.unwrap();
    fake.status = Status::Succeeded;
    fake.value = Some(json!(7));
    let body = bytes::Bytes::from(fake.to_json().unwrap());
    // The fake record, published where the bucket republishes it.
    let publish_fake = |tag: Option<String>| {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(tag) = tag {
            headers.insert(jetq::tag::TAG_HEADER, tag.as_str());
        }
        nats.publish_with_headers(
            format!("jetq.records.{}", handle.id()),
            headers,
            body.clone(),
        )
    };
    for tag in [
        None,
        jetq::tag::tag("_INBOX.someone_else", &body),
        jetq::tag::tag(&inbox, b"other bytes"),
    ] {
        publish_fake(tag).await.unwrap();
    }
    nats.flush().await.unwrap();
    assert!(
        jetq_tests::still_running_after(&waiting, Duration::from_millis(500)).await,
        "a wait took a record without a valid tag"
    );
    publish_fake(jetq::tag::tag(&inbox, &body)).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), 7);

    // A worker's write that ends a followed record carries the record's
    // tag, and the worker sends nothing to the inbox for it.
    let mut inbox_spy = nats.subscribe(inbox.clone()).await.unwrap();
    nats.flush().await.unwrap();
    let followed = publish_add(&client, 1, 2).await;
    assert_eq!(next_envelope(&mut requests).await["follow"], true);
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    assert_eq!(followed.result::<i64>(WAIT).await.unwrap(), 3);
    let stored = async_nats::jetstream::new(nats.clone())
        .get_stream("KV_JETQ_RESULTS")
        .await
        .unwrap()
        .direct_get_last_for_subject(format!("$KV.JETQ_RESULTS.{}", followed.id()))
        .await
        .unwrap();
    let tag = stored.headers.get(jetq::tag::TAG_HEADER).unwrap().as_str();
    assert!(jetq::tag::verify(&inbox, &stored.payload, tag));
    // Stopped and flushed: whatever it sent has reached the spy.
    worker.shutdown().await.unwrap();
    nats.flush().await.unwrap();
    let sent = futures_util::FutureExt::now_or_never(futures_util::StreamExt::next(&mut inbox_spy));
    assert!(
        sent.is_none(),
        "the worker sent a followed record to the inbox"
    );
}

/// Guarantee: a producer with more than a few results outstanding does not
/// follow records (a subscription each): its requests leave `follow` out,
/// and their results come by the inbox alone.
#[tokio::test]
async fn a_producer_waiting_on_many_requests_does_not_follow_them() {
    let Following {
        server: _server,
        broker,
        nats,
        client,
        mut requests,
    } = following().await;
    let mut handles = Vec::new();
    let mut follows = Vec::new();
    let mut inbox_spy = None;
    for i in 0..6 {
        handles.push(publish_add(&client, i, 1).await);
        let envelope = next_envelope(&mut requests).await;
        follows.push(envelope["follow"].as_bool());
        if inbox_spy.is_none() {
            let inbox = envelope["notify"].as_str().unwrap().to_owned();
            inbox_spy = Some(nats.subscribe(inbox).await.unwrap());
            nats.flush().await.unwrap();
        }
    }
    // Four waits at most follow (this one included).
    assert_eq!(
        follows,
        [Some(true), Some(true), Some(true), Some(true), None, None]
    );
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    for (i, h) in handles.iter().enumerate() {
        assert_eq!(h.result::<i64>(WAIT).await.unwrap(), i as i64 + 1);
    }
    // The two not followed got their records by the inbox, the others not.
    worker.shutdown().await.unwrap();
    nats.flush().await.unwrap();
    let mut inbox_spy = inbox_spy.unwrap();
    let mut sent = Vec::new();
    while let Some(Some(message)) =
        futures_util::FutureExt::now_or_never(futures_util::StreamExt::next(&mut inbox_spy))
    {
        let record: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        sent.push(record["id"].as_str().unwrap().to_owned());
    }
    sent.sort();
    let mut expected = vec![handles[4].id().to_owned(), handles[5].id().to_owned()];
    expected.sort();
    assert_eq!(sent, expected);
}

/// Guarantee: a producer that publishes without waiting does not pay a
/// subscription per request: once a followed request's handle is dropped
/// unwaited, the next requests are not followed, until the producer waits
/// for one again.
#[tokio::test]
async fn a_producer_that_does_not_wait_stops_following() {
    let Following {
        server: _server,
        broker,
        nats: _nats,
        client,
        mut requests,
    } = following().await;
    let publish = |i: i64| {
        client
            .task("demo.add")
            .args(&json!({"a": i, "b": 1}))
            .publish()
    };
    let forgotten = publish(1).await.unwrap();
    assert_eq!(next_envelope(&mut requests).await["follow"], true);
    drop(forgotten);
    let waited = publish(2).await.unwrap();
    assert_eq!(next_envelope(&mut requests).await.get("follow"), None);
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    assert_eq!(waited.result::<i64>(WAIT).await.unwrap(), 3);
    drop(waited);
    let followed = publish(3).await.unwrap();
    assert_eq!(next_envelope(&mut requests).await["follow"], true);
    assert_eq!(followed.result::<i64>(WAIT).await.unwrap(), 4);
    worker.shutdown().await.unwrap();
}

/// A server, a producer's broker and client that have seen following work,
/// and a plain connection with a subscription to the task subjects.
struct Following {
    server: NatsServer,
    broker: NatsBroker,
    nats: async_nats::Client,
    client: Client,
    requests: async_nats::Subscriber,
}

async fn following() -> Following {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let requests = nats.subscribe("jetq.tasks.>").await.unwrap();
    nats.flush().await.unwrap();
    let client = Client::new(broker.clone());
    let requests = follow_seen_to_work(&client, &broker, requests).await;
    Following {
        server,
        broker,
        nats,
        client,
        requests,
    }
}

/// Run one request while its producer waits for it: the record's
/// subscription shows the client that following works. Until then a worker
/// is not asked to tag its record (and sends it to the inbox as usual).
/// `requests` is a subscription to the task subjects; it is given back
/// with that request's envelope taken.
async fn follow_seen_to_work(
    client: &Client,
    broker: &NatsBroker,
    mut requests: async_nats::Subscriber,
) -> async_nats::Subscriber {
    let worker = Worker::builder(broker.clone())
        .task("demo.add", add)
        .spawn()
        .unwrap();
    let first = publish_add(client, 1, 1).await;
    assert_eq!(next_envelope(&mut requests).await.get("follow"), None);
    assert_eq!(first.result::<i64>(WAIT).await.unwrap(), 2);
    worker.shutdown().await.unwrap();
    requests
}

/// The next request envelope published, decoded.
async fn next_envelope(requests: &mut async_nats::Subscriber) -> serde_json::Value {
    let message = futures_util::StreamExt::next(requests).await.unwrap();
    serde_json::from_slice(&message.payload).unwrap()
}
