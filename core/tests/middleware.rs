//! The middleware chain: order, short-circuits, outcome mapping, extensions,
//! panics and timeouts, and the publish chain with child requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jetq::broker::Broker;
use jetq::memory::MemoryBroker;
use jetq::middleware::{from_fn, publish_from_fn, Middleware, Next, Outcome, Publish, PublishNext};
use jetq::{
    Args, Client, Context, ErrorKind, Extension, Request, State, Status, Task, TaskError, Worker,
};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A type-based middleware that logs around the rest of the chain.
struct Around {
    name: &'static str,
    log: Log,
}

impl Middleware for Around {
    fn call<'a>(&'a self, ctx: Context, next: Next) -> jetq::broker::BoxFuture<'a, Outcome> {
        Box::pin(async move {
            self.log.push(format!("{} before", self.name));
            let outcome = next.run(ctx).await;
            self.log.push(format!("{} after", self.name));
            outcome
        })
    }
}

async fn logged(State(log): State<Log>) -> Result<&'static str, TaskError> {
    log.push("handler");
    Ok("done")
}

#[tokio::test]
async fn the_first_registered_is_the_outermost_and_the_tasks_own_run_inside() {
    let broker = MemoryBroker::new();
    let log = Log::default();
    let w = Worker::builder(broker.clone())
        .state(log.clone())
        .middleware(Around {
            name: "a",
            log: log.clone(),
        })
        .middleware(Around {
            name: "b",
            log: log.clone(),
        })
        .register(Task::new("logged", logged).middleware(Around {
            name: "task",
            log: log.clone(),
        }))
        .task("plain", logged)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client.task("logged").publish().await.unwrap();
    assert_eq!(handle.result::<String>(WAIT).await.unwrap(), "done");
    assert_eq!(
        log.take(),
        [
            "a before",
            "b before",
            "task before",
            "handler",
            "task after",
            "b after",
            "a after"
        ]
    );
    // Another task has the worker's middleware only.
    let handle = client.task("plain").publish().await.unwrap();
    handle.result::<String>(WAIT).await.unwrap();
    assert_eq!(
        log.take(),
        ["a before", "b before", "handler", "b after", "a after"]
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refusal_fails_the_request_with_its_kind_and_the_handler_never_runs() {
    let broker = MemoryBroker::new();
    let log = Log::default();
    let gate = from_fn(|ctx: Context, next: Next| async move {
        if ctx.header("authorization").is_none() {
            return Err(TaskError::permanent("no credentials").with_kind("unauthenticated"));
        }
        next.run(ctx).await
    });
    let w = Worker::builder(broker.clone())
        .state(log.clone())
        .middleware(gate)
        .task("logged", logged)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let refused = client.task("logged").publish().await.unwrap();
    let rec = refused.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(rec.attempts, 1, "a permanent refusal is not retried");
    let error = rec.error.unwrap();
    assert_eq!(error.kind, "unauthenticated");
    assert_eq!(error.message, "no credentials");
    let letter = client.dead_letter(refused.id()).await.unwrap().unwrap();
    assert_eq!(letter.error.kind, "unauthenticated");
    assert!(log.take().is_empty(), "the handler never ran");
    // The worker lives on and serves the next request.
    let allowed = client
        .task("logged")
        .header("authorization", "Bearer x")
        .publish()
        .await
        .unwrap();
    assert_eq!(allowed.result::<String>(WAIT).await.unwrap(), "done");
    assert_eq!(log.take(), ["handler"]);
    w.shutdown().await.unwrap();
}

async fn fails_once(State(log): State<Log>, ctx: Context) -> Result<u32, TaskError> {
    log.push(format!("attempt {}", ctx.attempt()));
    Err(TaskError::new("flaky backend"))
}

#[tokio::test]
async fn a_middleware_maps_outcomes_and_the_record_follows() {
    let broker = MemoryBroker::new();
    let log = Log::default();
    // A fallback: a failure of `fallback` becomes a value; a success of
    // `strict` becomes a permanent error.
    let mapping = from_fn(|ctx: Context, next: Next| async move {
        let task = ctx.task().to_owned();
        match (task.as_str(), next.run(ctx).await) {
            ("fallback", Err(e)) => Ok(serde_json::json!({"fallback": e.message()})),
            ("strict", Ok(_)) => {
                Err(TaskError::permanent("values are not allowed").with_kind("mapped"))
            }
            (_, other) => other,
        }
    });
    let w = Worker::builder(broker.clone())
        .state(log.clone())
        .middleware(mapping)
        .task("fallback", fails_once)
        .task("strict", logged)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client.task("fallback").publish().await.unwrap();
    let value: serde_json::Value = handle.result(WAIT).await.unwrap();
    assert_eq!(value["fallback"], "flaky backend");
    assert_eq!(
        log.take(),
        ["attempt 1"],
        "no retry: the outcome was a value"
    );
    let handle = client.task("strict").publish().await.unwrap();
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(rec.error.unwrap().kind, "mapped");
    w.shutdown().await.unwrap();
}

#[derive(Clone, Debug, PartialEq)]
struct User(String);

async fn whoami(Extension(user): Extension<User>) -> Result<String, TaskError> {
    Ok(user.0)
}

#[tokio::test]
async fn extensions_reach_the_handler_and_a_missing_one_is_a_clear_failure() {
    let broker = MemoryBroker::new();
    let auth = from_fn(|ctx: Context, next: Next| async move {
        if let Some(user) = ctx.metadata().get("user").and_then(|u| u.as_str()) {
            assert!(ctx.insert_extension(User(user.to_owned())).is_none());
            // Visible to the rest of the chain at once.
            assert_eq!(ctx.extension::<User>(), Some(User(user.to_owned())));
        }
        next.run(ctx).await
    });
    let w = Worker::builder(broker.clone())
        .middleware(auth)
        .task("whoami", whoami)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let handle = client
        .task("whoami")
        .metadata("user", "alice")
        .publish()
        .await
        .unwrap();
    assert_eq!(handle.result::<String>(WAIT).await.unwrap(), "alice");
    let handle = client.task("whoami").publish().await.unwrap();
    let rec = handle.wait(WAIT).await.unwrap();
    assert_eq!(rec.status, Status::Failed);
    let error = rec.error.unwrap();
    assert_eq!(error.kind, "extractor");
    assert!(error.message.contains("User"), "{}", error.message);
    assert_eq!(rec.attempts, 1);
    w.shutdown().await.unwrap();
}

async fn panics() -> Result<(), TaskError> {
    panic!("handler bug")
}

async fn slow() -> Result<(), TaskError> {
    tokio::time::sleep(Duration::from_secs(30)).await;
    Ok(())
}

#[tokio::test]
async fn panics_and_timeouts_are_outcomes_the_chain_sees() {
    let broker = MemoryBroker::new();
    let log = Log::default();
    let seen = {
        let log = log.clone();
        from_fn(move |ctx: Context, next: Next| {
            let log = log.clone();
            async move {
                if ctx.task() == "mw.panics" {
                    panic!("middleware bug");
                }
                let outcome = next.run(ctx).await;
                if let Err(e) = &outcome {
                    log.push(e.kind().to_owned());
                }
                outcome
            }
        })
    };
    let w = Worker::builder(broker.clone())
        .middleware(seen)
        .register(Task::new("panics", panics).max_retries(0))
        .register(
            Task::new("slow", slow)
                .timeout(Duration::from_millis(50))
                .max_retries(0),
        )
        .register(Task::new("mw.panics", logged).max_retries(0))
        .state(log.clone())
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    for (task, kind) in [
        ("panics", "panic"),
        ("slow", "timeout"),
        ("mw.panics", "panic"),
    ] {
        let rec = client
            .task(task)
            .publish()
            .await
            .unwrap()
            .wait(WAIT)
            .await
            .unwrap();
        assert_eq!(rec.status, Status::Failed, "{task}");
        assert_eq!(rec.error.unwrap().kind, kind, "{task}");
    }
    // The middleware saw the handler's panic and the timeout as errors; its
    // own panic failed the attempt like a handler's.
    assert_eq!(log.take(), ["panic", "timeout"]);
    w.shutdown().await.unwrap();
}

async fn parent(ctx: Context, Args(n): Args<u32>) -> Result<String, TaskError> {
    let child = ctx
        .client()
        .task("child")
        .args(&(n + 1))
        .publish()
        .await
        .map_err(|e| TaskError::new(e.to_string()))?;
    Ok(child.id().to_owned())
}

async fn child(ctx: Context, Args(n): Args<u32>) -> Result<serde_json::Value, TaskError> {
    Ok(serde_json::json!({
        "n": n,
        "parent": ctx.request().parent,
        "stamp": ctx.header("x-stamp"),
    }))
}

#[tokio::test]
async fn the_publish_chain_stamps_refuses_and_sees_the_parent_of_a_child() {
    let broker = MemoryBroker::new();
    let log = Log::default();
    let stamp = {
        let log = log.clone();
        publish_from_fn(move |mut publish: Publish, next: PublishNext| {
            let log = log.clone();
            async move {
                if publish.request.task == "forbidden" {
                    return Err(jetq::Error::new(ErrorKind::Config, "refused by policy"));
                }
                let parent = publish.parent.as_ref().map(|p| p.id().to_owned());
                log.push(format!(
                    "{} parent={}",
                    publish.request.task,
                    parent.as_deref().unwrap_or("-")
                ));
                let value = match &parent {
                    Some(p) => format!("child-of-{p}"),
                    None => "top".to_owned(),
                };
                publish.request.headers.insert("x-stamp".to_owned(), value);
                next.run(publish).await
            }
        })
    };
    let producer = Client::new(broker.clone()).middleware(stamp);
    let w = Worker::builder(broker.clone())
        .client(producer.clone())
        .task("parent", parent)
        .task("child", child)
        .spawn()
        .unwrap();
    // Refused: nothing is published.
    let err = producer.task("forbidden").publish().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert_eq!(broker.unsettled(), 0);
    let handle = producer
        .task("parent")
        .id("p-1")
        .args(&1u32)
        .publish()
        .await
        .unwrap();
    let child_id: String = handle.result(WAIT).await.unwrap();
    let value: serde_json::Value = producer
        .wait(&child_id, WAIT)
        .await
        .unwrap()
        .value_as()
        .unwrap();
    assert_eq!(value["n"], 2);
    assert_eq!(value["parent"], "p-1");
    assert_eq!(value["stamp"], "child-of-p-1");
    assert_eq!(log.take(), ["parent parent=-", "child parent=p-1"]);
    // The envelope names the parent (the wire format's `parent`).
    let stored = broker.get_record(&child_id).await.unwrap().unwrap();
    let record = jetq::Record::from_json(&stored.value).unwrap();
    assert_eq!(record.status, Status::Succeeded);
    let request: Request = serde_json::from_value(serde_json::json!({
        "v": 1, "id": "x", "task": "t", "queue": "default",
        "enqueued_at": "2026-01-01T00:00:00Z", "parent": "p-1"
    }))
    .unwrap();
    assert_eq!(request.parent.as_deref(), Some("p-1"));
    w.shutdown().await.unwrap();
}
