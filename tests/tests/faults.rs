//! Fault tests: what jetq guarantees when tasks outlive the ack wait, workers
//! crash or are stopped under load, the server restarts, attempts time out or
//! panic, retries back off, and an id is published again long after the
//! server's dedup window. A real nats-server, real worker processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jetq::broker::Broker;
use jetq::time::OffsetDateTime;
use jetq::{Args, Client, Context, Record, RetryPolicy, State, Status, Task, TaskError, Worker};
use jetq_nats::{NatsBroker, NatsConfig};
use jetq_tests::{
    connect, demo_worker_with, latest, server_and_broker, sigterm, stored_requests, wait_exit,
    wait_for_record, NatsServer, RecordLog, Seen, WAIT,
};
use serde_json::json;

/// `b - a` in seconds (negative if `b` is earlier).
fn secs_between(a: OffsetDateTime, b: OffsetDateTime) -> f64 {
    (b - a).as_seconds_f64()
}

/// The consumer's delivery counters of queue `default`: (deliveries made,
/// redeliveries included; highest stream sequence delivered). Every
/// delivery, first or not, takes the next consumer sequence, so the first is
/// larger than the number of messages exactly when something was redelivered.
async fn deliveries(server: &NatsServer) -> (u64, u64) {
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js.get_stream("JETQ_TASKS").await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("jetq-default").await.unwrap();
    let info = consumer.info().await.unwrap();
    (
        info.delivered.consumer_sequence,
        info.delivered.stream_sequence,
    )
}

fn terminal(r: &Record) -> bool {
    r.status.is_terminal()
}

/// Keep-alive: a task running four times longer than the ack wait (1 s)
/// stays with the worker that runs it. It completes exactly once, in one
/// attempt; no revision of its record ever names another worker, and the
/// server never redelivered it, although a second worker was pulling from
/// the same queue the whole time.
#[tokio::test]
async fn a_task_longer_than_the_ack_wait_stays_with_its_worker() {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let log = RecordLog::start(&server).await;
    let client = Client::new(broker.clone());
    // Concurrency 1: while busy, the first worker has no pull open, so a
    // redelivery could only go to the second one.
    let _first = demo_worker_with(
        &server,
        &["--name", "keep-1", "--ack-wait", "1", "--concurrency", "1"],
    );
    let long = client
        .task("demo.sleep")
        .args(&json!({"ms": 4000}))
        .publish()
        .await
        .unwrap();
    wait_for_record(&broker, long.id(), |r| r.status == Status::Running).await;
    let _second = demo_worker_with(
        &server,
        &["--name", "keep-2", "--ack-wait", "1", "--concurrency", "1"],
    );
    // The second worker is up and pulling: it runs a probe while the long task runs.
    let probe = client
        .task("demo.add")
        .args(&json!({"a": 1, "b": 2}))
        .publish()
        .await
        .unwrap();
    let probe = probe.wait(WAIT).await.unwrap();
    assert_eq!(probe.status, Status::Succeeded);
    assert_eq!(probe.worker.as_deref(), Some("keep-2"));

    let rec = long.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded, "{rec:?}");
    assert_eq!(rec.value, Some(json!(4000)));
    assert_eq!(rec.attempts, 1, "ran once: {rec:?}");
    assert_eq!(rec.worker.as_deref(), Some("keep-1"));
    let ran = secs_between(rec.started_at.unwrap(), rec.finished_at.unwrap());
    assert!(
        ran >= 3.9,
        "the task outlived the ack wait several times: {ran} s"
    );
    let idle = secs_between(probe.finished_at.unwrap(), rec.finished_at.unwrap());
    assert!(
        idle >= 2.0,
        "the second worker sat idle and pulling for two ack waits or more while it ran: {idle} s"
    );

    let history = log.history(long.id());
    assert!(
        history.iter().any(|s| s.record.status == Status::Running),
        "{history:#?}"
    );
    for seen in &history {
        assert!(seen.record.attempts <= 1, "a second attempt: {seen:#?}");
        assert!(
            seen.record.worker.as_deref().is_none_or(|w| w == "keep-1"),
            "another worker claimed it: {seen:#?}"
        );
    }
    // Two messages (the long task and the probe), two deliveries: no redelivery.
    assert_eq!(deliveries(&server).await, (2, 2));
}

/// Crash: a worker killed with SIGKILL in the middle of a task loses
/// nothing. Once the ack wait (1 s) passes the server redelivers the
/// request, a second worker process claims it (attempt 2) and it succeeds
/// there.
#[tokio::test]
async fn a_worker_killed_mid_task_loses_nothing() {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let log = RecordLog::start(&server).await;
    let client = Client::new(broker.clone());
    let mut first = demo_worker_with(
        &server,
        &["--name", "crash-1", "--ack-wait", "1", "--concurrency", "1"],
    );
    let h = client
        .task("demo.sleep")
        .args(&json!({"ms": 1500}))
        .publish()
        .await
        .unwrap();
    let running = wait_for_record(&broker, h.id(), |r| r.status == Status::Running).await;
    assert_eq!(
        (running.attempts, running.worker.as_deref()),
        (1, Some("crash-1"))
    );
    let _second = demo_worker_with(
        &server,
        &["--name", "crash-2", "--ack-wait", "1", "--concurrency", "1"],
    );
    first.0.kill().unwrap(); // SIGKILL: no release, no record write
    first.0.wait().unwrap();
    let killed_at = OffsetDateTime::now_utc();

    let rec = h.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded, "{rec:?}");
    assert_eq!(rec.value, Some(json!(1500)));
    assert_eq!(rec.attempts, 2, "{rec:?}");
    assert_eq!(rec.worker.as_deref(), Some("crash-2"));
    let after = secs_between(killed_at, rec.started_at.unwrap());
    assert!(
        (0.0..10.0).contains(&after),
        "the second attempt started after the crash, within a few ack waits: {after} s"
    );
    // The record went from attempt 1 on crash-1 straight to attempt 2 on
    // crash-2: nobody wrote anything for the dead worker.
    let states: Vec<(Status, u32, Option<String>)> = log
        .history(h.id())
        .into_iter()
        .map(|s| (s.record.status, s.record.attempts, s.record.worker))
        .collect();
    assert_eq!(
        states,
        [
            (Status::Running, 1, Some("crash-1".into())),
            (Status::Running, 2, Some("crash-2".into())),
            (Status::Succeeded, 2, Some("crash-2".into())),
        ]
    );
    // One message, delivered twice.
    assert_eq!(deliveries(&server).await, (2, 1));
}

/// Graceful shutdown under load: a worker with 8 requests running and 32
/// waiting gets SIGTERM and exits 0. Tasks that honour cancellation
/// (`demo.sleep`) are released at once, tasks that ignore it (`demo.slow`)
/// finish if they can within the 1.5 s grace period and are stopped and
/// released if not; none is left `running`. A second worker runs the
/// released and the waiting ones well inside the 30 s ack wait (nothing
/// stranded): all 40 succeed, each with exactly one terminal revision.
#[tokio::test]
async fn sigterm_under_load_finishes_or_releases_everything() {
    const GRACE: f64 = 1.5;
    const MARGIN: f64 = 0.4;
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let log = RecordLog::start(&server).await;
    let client = Client::new(broker.clone());
    let mut handles = Vec::new();
    for i in 0..40u64 {
        let (task, ms) = match i % 4 {
            0 => ("demo.sleep", 1200),
            1 => ("demo.slow", 700),
            2 => ("demo.slow", 2500),
            _ => ("demo.sleep", 300 + 40 * i),
        };
        let h = client
            .task(task)
            .args(&json!({ "ms": ms }))
            .publish()
            .await
            .unwrap();
        handles.push((h, task, ms));
    }
    let ids: Vec<String> = handles.iter().map(|(h, _, _)| h.id().to_owned()).collect();
    let first = demo_worker_with(
        &server,
        &[
            "--name",
            "drain-1",
            "--concurrency",
            "8",
            "--shutdown-timeout",
            "1.5",
            // Every running attempt visible at once, for the log below.
            "--running-after",
            "0",
        ],
    );
    let running: Vec<Record> = log
        .wait_until("8 requests running at once", |all| {
            // (More than 8 when the log has yet to see one of them end.)
            let running: Vec<Record> = ids
                .iter()
                .filter_map(|id| latest(all, id))
                .filter(|r| r.status == Status::Running)
                .cloned()
                .collect();
            (running.len() >= 8).then_some(running)
        })
        .await;
    let signalled_at = OffsetDateTime::now_utc();
    sigterm(&first);
    let exit = wait_exit(first).await;
    assert!(exit.success(), "the worker exits 0 after SIGTERM: {exit:?}");

    // Nothing is left running by the worker that left.
    let mut interrupted = Vec::new();
    for (h, _, _) in &handles {
        let rec = h.record().await.unwrap();
        match rec.status {
            Status::Pending => assert_eq!(rec.attempts, 0),
            Status::Succeeded => assert_eq!(rec.worker.as_deref(), Some("drain-1")),
            Status::Retrying => {
                assert_eq!(rec.error.as_ref().unwrap().kind, "interrupted", "{rec:?}");
                interrupted.push(rec.id.clone());
            }
            other => panic!("after the shutdown {} is {other}: {rec:?}", rec.id),
        }
    }
    // What became of each task that was running at SIGTERM.
    let (mut released_at_once, mut finished_in_grace, mut stopped_at_grace) = (0, 0, 0);
    for r in &running {
        let (_, task, ms) = handles.iter().find(|(h, _, _)| h.id() == r.id).unwrap();
        let remaining = *ms as f64 / 1000.0 - secs_between(r.started_at.unwrap(), signalled_at);
        let after = log.history(&r.id).into_iter().find(|s| {
            s.record.attempts == 1
                && matches!(s.record.status, Status::Retrying | Status::Succeeded)
        });
        let Seen {
            record: after,
            seen_at,
            ..
        } = after.unwrap_or_else(|| panic!("no outcome for {}: {:#?}", r.id, log.history(&r.id)));
        if *task == "demo.sleep" && remaining > MARGIN {
            assert_eq!(after.status, Status::Retrying, "{after:?}");
            let took = secs_between(signalled_at, seen_at);
            assert!(
                took < GRACE,
                "a task that honours cancellation is released at once, not at the grace period: {took} s"
            );
            released_at_once += 1;
        } else if *task == "demo.slow" && remaining < GRACE - MARGIN {
            assert_eq!(after.status, Status::Succeeded, "{after:?}");
            finished_in_grace += 1;
        } else if *task == "demo.slow" && remaining > GRACE + MARGIN {
            assert_eq!(after.status, Status::Retrying, "{after:?}");
            let took = secs_between(signalled_at, seen_at);
            assert!(
                took >= GRACE - 0.1,
                "released when the grace period ran out, not before: {took} s"
            );
            stopped_at_grace += 1;
        }
    }
    eprintln!(
        "at SIGTERM: {} running; released at once {released_at_once}, finished in grace {finished_in_grace}, stopped at grace {stopped_at_grace}; {} released in all",
        running.len(),
        interrupted.len()
    );
    assert!(
        released_at_once > 0 && finished_in_grace > 0 && stopped_at_grace > 0,
        "each shutdown path was taken: released at once {released_at_once}, finished in grace {finished_in_grace}, stopped at grace {stopped_at_grace}"
    );

    let _second = demo_worker_with(&server, &["--name", "drain-2", "--concurrency", "8"]);
    // Well under the 30 s ack wait: a request stranded with the first worker
    // would only come back after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for (h, _, ms) in &handles {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let rec = h.wait(left).await.unwrap_or_else(|e| {
            panic!(
                "{e}; the record's history: {:#?}",
                log.history(h.id())
                    .into_iter()
                    .map(|s| s.record)
                    .collect::<Vec<_>>()
            )
        });
        assert_eq!(rec.status, Status::Succeeded, "{rec:?}");
        assert_eq!(rec.value, Some(json!(ms)));
        if interrupted.contains(&rec.id) {
            assert_eq!((rec.attempts, rec.worker.as_deref()), (2, Some("drain-2")));
        } else {
            assert_eq!(rec.attempts, 1, "{rec:?}");
        }
    }
    let all = log.snapshot();
    for id in &ids {
        let terminal_revisions = all[id].iter().filter(|s| terminal(&s.record)).count();
        assert_eq!(terminal_revisions, 1, "{id}: {:#?}", all[id]);
    }
    assert_eq!(stored_requests(&server).await, 0);
}

/// Stop (or kill) the server while a worker process runs and a client
/// publishes continuously, start it again on the same port and store: the
/// worker and the client reconnect by themselves, and every request whose
/// publish returned Ok ends `succeeded` with its own value. A record watch
/// set up before the outage still delivers the record's end after it.
async fn requests_survive_a_server_outage(kill: bool) {
    use futures_util::StreamExt;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;
    let mut server = NatsServer::start();
    let broker = connect(&server).await;
    let client = Client::new(broker.clone());
    let name = if kill { "outage-kill" } else { "outage-stop" };
    // A short ack wait: a delivery the server sent as it went down (and so
    // never reached the worker) comes back after it.
    let mut worker = demo_worker_with(
        &server,
        &["--name", name, "--concurrency", "4", "--ack-wait", "2"],
    );

    // Nobody serves queue `later` until after the outage; its watch spans it.
    let later = client
        .task("demo.add")
        .queue("later")
        .args(&json!({"a": 1, "b": 2}))
        .publish()
        .await
        .unwrap();
    let mut later_watch = broker.watch_record(later.id()).await.unwrap();

    let (published_tx, mut published) = watch::channel(0usize);
    let stop = CancellationToken::new();
    let publisher = tokio::spawn({
        let client = client.clone();
        let stop = stop.clone();
        async move {
            let mut handles = Vec::new();
            let mut refused = 0usize;
            let mut i = 0i64;
            while !stop.is_cancelled() {
                match client
                    .task("demo.add")
                    .args(&json!({"a": i, "b": 1000}))
                    .publish()
                    .await
                {
                    Ok(h) => {
                        handles.push((i, h));
                        published_tx.send_modify(|n| *n += 1);
                    }
                    Err(_) => refused += 1,
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (handles, refused)
        }
    });

    tokio::time::timeout(WAIT, published.wait_for(|n| *n >= 10))
        .await
        .unwrap()
        .unwrap();
    server = tokio::task::spawn_blocking(move || {
        if kill {
            server.kill();
        } else {
            server.stop();
        }
        std::thread::sleep(Duration::from_secs(1)); // the outage
        server.restart();
        server
    })
    .await
    .unwrap();
    let before = *published.borrow();
    tokio::time::timeout(WAIT, published.wait_for(|n| *n >= before + 10))
        .await
        .expect("publishing works again after the restart")
        .unwrap();
    stop.cancel();
    let (handles, refused) = publisher.await.unwrap();
    let mut slowest = 0.0f64;
    for (i, h) in &handles {
        let rec = match h.wait(WAIT).await {
            Ok(r) => r,
            Err(e) => panic!(
                "request {i} ({}): {e}; record now: {:?}",
                h.id(),
                h.record().await
            ),
        };
        assert_eq!(rec.status, Status::Succeeded, "{rec:?}");
        assert_eq!(rec.value, Some(json!(i + 1000)), "{rec:?}");
        slowest = slowest.max(secs_between(rec.enqueued_at, rec.finished_at.unwrap()));
    }
    eprintln!(
        "{name}: {} published and succeeded ({refused} refused during the outage); slowest took {slowest:.2} s",
        handles.len()
    );
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker process rode out the outage"
    );

    let _later_worker = demo_worker_with(&server, &["--queue", "later"]);
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(entry) = later_watch.next().await {
            let rec = Record::from_json(&entry.unwrap().value).unwrap();
            if terminal(&rec) {
                return rec;
            }
        }
        panic!("the watch of {} ended", later.id())
    })
    .await
    .expect("the watch set up before the outage sees the record end");
    assert_eq!(
        (ended.status, ended.value),
        (Status::Succeeded, Some(json!(3)))
    );
}

/// Server restart (SIGTERM, clean shutdown): see [`requests_survive_a_server_outage`].
#[tokio::test]
async fn requests_survive_a_server_restart() {
    requests_survive_a_server_outage(false).await;
}

/// Server crash (SIGKILL, no clean shutdown): see [`requests_survive_a_server_outage`].
#[tokio::test]
async fn requests_survive_a_server_killed_with_sigkill() {
    requests_survive_a_server_outage(true).await;
}

/// A client rides out an outage while waiting: `TaskHandle::wait` called
/// while the server is down keeps waiting (within its timeout) and returns
/// the record once the server is back and a worker has run the request.
#[tokio::test]
async fn a_wait_begun_while_the_server_is_down_returns_once_it_is_back() {
    let mut server = NatsServer::start();
    let config = NatsConfig::new(&server.url()).request_timeout(Duration::from_secs(1));
    let client = Client::new(NatsBroker::connect_with(config).await.unwrap());
    let h = client
        .task("demo.add")
        .args(&json!({"a": 2, "b": 40}))
        .publish()
        .await
        .unwrap();
    server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    let waiting = tokio::spawn({
        let h = h.clone();
        async move { h.wait(WAIT).await }
    });
    // An outage longer than the client's 1 s request timeout.
    server = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(3));
        server.restart();
        server
    })
    .await
    .unwrap();
    let _worker = demo_worker_with(&server, &["--name", "after-outage"]);
    let rec = match waiting.await.unwrap() {
        Ok(r) => r,
        Err(e) => panic!(
            "the wait gave up although its timeout had not passed: {e}; record now: {:?}",
            h.record().await
        ),
    };
    assert_eq!(
        (rec.status, rec.value),
        (Status::Succeeded, Some(json!(42)))
    );
}

/// Sleeps 10 s on its first `slow_attempts` attempts, then returns the attempt number.
async fn sluggish(ctx: Context, Args(slow_attempts): Args<u32>) -> Result<u32, TaskError> {
    if ctx.attempt() <= slow_attempts {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    Ok(ctx.attempt())
}

/// Timeout: an attempt that runs past the task's `timeout` (300 ms) is cut
/// off and fails with kind `timeout`, and is retried per the task's policy:
/// slow on attempt 1, it succeeds on attempt 2; slow every time with no
/// retries allowed, it ends `failed` with kind `timeout`.
#[tokio::test]
async fn an_attempt_past_its_timeout_fails_with_kind_timeout_and_is_retried() {
    let (server, broker) = server_and_broker().await;
    let log = RecordLog::start(&server).await;
    let policy = RetryPolicy::new(3)
        .base(Duration::from_millis(100))
        .jitter(false);
    let worker = Worker::builder(broker.clone())
        .register(
            Task::new("sluggish", sluggish)
                .timeout(Duration::from_millis(300))
                .retry_policy(policy),
        )
        .spawn()
        .unwrap();
    let client = Client::new(broker);

    let h = client.task("sluggish").args(&1).publish().await.unwrap();
    let rec = h.wait(WAIT).await.unwrap();
    assert_eq!(
        (rec.status, rec.attempts),
        (Status::Succeeded, 2),
        "{rec:?}"
    );
    assert_eq!(rec.value, Some(json!(2)));
    let total = secs_between(rec.enqueued_at, rec.finished_at.unwrap());
    assert!(
        total < 5.0,
        "attempt 1 was cut off, not waited out: {total} s"
    );
    let retrying = log
        .history(h.id())
        .into_iter()
        .find(|s| s.record.status == Status::Retrying)
        .unwrap_or_else(|| panic!("no retrying revision: {:#?}", log.history(h.id())));
    let err = retrying.record.error.unwrap();
    assert_eq!(err.kind, "timeout", "{err:?}");
    assert_eq!(retrying.record.attempts, 1);

    let rec = client
        .task("sluggish")
        .args(&99)
        .max_retries(0)
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!((rec.status, rec.attempts), (Status::Failed, 1), "{rec:?}");
    assert_eq!(rec.error.as_ref().unwrap().kind, "timeout");
    let ran = secs_between(rec.started_at.unwrap(), rec.finished_at.unwrap());
    assert!(
        (0.25..3.0).contains(&ran),
        "cut off at about 300 ms: {ran} s"
    );
    worker.shutdown().await.unwrap();
}

/// Panic: `demo.panic` on a worker process ends `failed` with kind `panic`
/// (retried once on the same process, which panics again), and that process
/// is still alive and serving `demo.add` afterwards.
#[tokio::test]
async fn a_panicking_task_fails_and_its_worker_process_keeps_serving() {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let client = Client::new(broker);
    let mut worker = demo_worker_with(&server, &["--name", "panic-1", "--concurrency", "2"]);
    let rec = client
        .task("demo.panic")
        .max_retries(1)
        .publish()
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!((rec.status, rec.attempts), (Status::Failed, 2), "{rec:?}");
    let err = rec.error.unwrap();
    assert_eq!(err.kind, "panic");
    assert!(err.message.contains("panics on purpose"), "{}", err.message);
    assert_eq!(rec.worker.as_deref(), Some("panic-1"));
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker is alive"
    );

    let add = client
        .task("demo.add")
        .args(&json!({"a": 20, "b": 22}))
        .publish()
        .await
        .unwrap();
    let rec = add.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert_eq!(rec.value, Some(json!(42)));
    assert_eq!(rec.worker.as_deref(), Some("panic-1"));
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker is alive"
    );
}

/// Retries with backoff are visible: `demo.fail {"times": 2}` with 5
/// retries allowed succeeds on attempt 3. Between attempts the record says
/// `retrying`, carries the error, and a `next_attempt_at` in the future
/// (the default policy: 0.5–1 s, then 1–2 s), and no attempt starts before
/// the time the previous one announced.
#[tokio::test]
async fn retries_back_off_and_the_record_shows_them() {
    const TOLERANCE: f64 = 0.05;
    let server = NatsServer::start();
    let broker = connect(&server).await;
    let log = RecordLog::start(&server).await;
    let client = Client::new(broker);
    let _worker = demo_worker_with(&server, &["--name", "retry-1"]);
    let h = client
        .task("demo.fail")
        .args(&json!({"times": 2}))
        .max_retries(5)
        .publish()
        .await
        .unwrap();
    let rec = h.wait(WAIT).await.unwrap();
    assert_eq!(
        (rec.status, rec.attempts),
        (Status::Succeeded, 3),
        "{rec:?}"
    );
    assert_eq!(rec.value, Some(json!(3)));
    assert_eq!(rec.max_retries, 5);

    let history = log.history(h.id());
    let find = |status: Status, attempts: u32| -> Seen {
        history
            .iter()
            .find(|s| s.record.status == status && s.record.attempts == attempts)
            .cloned()
            .unwrap_or_else(|| panic!("no {status} revision of attempt {attempts}: {history:#?}"))
    };
    for (attempt, min_delay) in [(1u32, 0.5), (2, 1.0)] {
        let failed = find(Status::Retrying, attempt);
        let err = failed.record.error.as_ref().expect("the error is shown");
        assert_eq!(err.kind, "error");
        assert!(
            err.message.contains(&format!("attempt {attempt} ")),
            "{}",
            err.message
        );
        let due = failed
            .record
            .next_attempt_at
            .expect("next_attempt_at is set");
        let ahead = secs_between(failed.seen_at, due);
        assert!(
            ahead > 0.0,
            "next_attempt_at is in the future when seen: {ahead} s"
        );
        let delay = secs_between(failed.record.started_at.unwrap(), due);
        assert!(
            delay >= min_delay - TOLERANCE,
            "the backoff before retry {attempt} is at least {min_delay} s: {delay} s"
        );
        let next = find(Status::Running, attempt + 1);
        let early = secs_between(next.record.started_at.unwrap(), due);
        assert!(
            early <= TOLERANCE,
            "attempt {} started {early} s before its next_attempt_at",
            attempt + 1
        );
        assert!(next.record.next_attempt_at.is_none());
    }
}

/// Idempotency after the dedup window: with a 1 s duplicate window, an id
/// published again long after the window still runs once. The client's
/// second publish returns a handle to the same, finished record; and a raw
/// JetStream publish of the same id (which the server now stores, as the
/// window has passed) is dropped by the worker: the record keeps its
/// revision and `started_at`, and the handler ran once.
#[tokio::test]
async fn an_id_published_again_after_the_dedup_window_runs_once() {
    const WINDOW: Duration = Duration::from_secs(1);
    let server = NatsServer::start();
    let broker = NatsBroker::connect_with(NatsConfig::new(&server.url()).duplicate_window(WINDOW))
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    async fn count(State(runs): State<Arc<AtomicUsize>>) -> Result<usize, TaskError> {
        Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
    async fn noop() -> Result<(), TaskError> {
        Ok(())
    }
    // Concurrency 1: requests are processed one after the other, in stream order.
    let worker = Worker::builder(broker.clone())
        .state(Arc::clone(&runs))
        .concurrency(1)
        .task("count", count)
        .task("noop", noop)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let first = client
        .task("count")
        .id("once-only")
        .publish()
        .await
        .unwrap();
    assert_eq!(first.result::<usize>(WAIT).await.unwrap(), 1);
    let done_entry = broker.get_record("once-only").await.unwrap().unwrap();
    let done = Record::from_json(&done_entry.value).unwrap();

    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let mut stream = js.get_stream("JETQ_TASKS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.duplicate_window, WINDOW);

    tokio::time::sleep(WINDOW + Duration::from_millis(500)).await; // past the window

    let again = client
        .task("count")
        .id("once-only")
        .publish()
        .await
        .unwrap();
    assert_eq!(again.id(), "once-only");
    let rec = again.wait(WAIT).await.unwrap();
    assert_eq!((rec.status, rec.value), (Status::Succeeded, Some(json!(1))));

    // As a foreign client would: the server, past its window, stores it.
    let mut envelope = jetq::Request::new("count");
    envelope.id = "once-only".to_owned();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "once-only");
    let mut stored = None;
    for _ in 0..20 {
        let ack = js
            .publish_with_headers(
                "jetq.tasks.default.count",
                headers.clone(),
                envelope.to_json().unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if !ack.duplicate {
            stored = Some(ack.sequence);
            break;
        }
        // The server forgets ids on a timer; a duplicate ack stored nothing.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let stored =
        stored.expect("the server still dropped the id as a duplicate long after its window");

    // A later request on the same queue has run, so the duplicate was handled.
    let marker = client.task("noop").publish().await.unwrap();
    assert_eq!(marker.wait(WAIT).await.unwrap().status, Status::Succeeded);

    let entry = broker.get_record("once-only").await.unwrap().unwrap();
    let now = Record::from_json(&entry.value).unwrap();
    assert_eq!(now.attempts, 1);
    assert_eq!(now.started_at, done.started_at);
    assert_eq!(now.finished_at, done.finished_at);
    assert_eq!(now.status, Status::Succeeded);
    assert_eq!(
        entry.revision, done_entry.revision,
        "nothing wrote the record again"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    // The worker was handed the duplicate, once, and acknowledged it.
    let (delivered, last_delivered) = deliveries(&server).await;
    assert!(last_delivered > stored, "{last_delivered} <= {stored}");
    assert_eq!(delivered, last_delivered, "nothing was redelivered");
    assert_eq!(
        stored_requests(&server).await,
        0,
        "the duplicate was consumed"
    );
    worker.shutdown().await.unwrap();
}
