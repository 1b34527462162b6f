//! OpenTelemetry tracing (jetq-middleware `trace`) against a real
//! nats-server: the publish span, the attempt span as its child, child
//! requests published from a task, attributes and error status, a
//! `traceparent` set by hand (as a Python producer would), and the OTLP
//! export of `jetq-demo-worker --otlp` to a small OTLP/HTTP receiver.
//!
//! The spans of the in-process producers and workers go to one in-memory
//! exporter behind the global `tracing` subscriber; each test looks only at
//! the traces it started.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use jetq::{Client, Context, Extension, Request, Status, Task, TaskError, Worker};
use jetq_middleware::trace::{attr, AttemptSpan, TraceAttempts, TracePublish};
use jetq_tests::otlp::OtlpReceiver;
use jetq_tests::{
    connect, demo_worker_with_env, server_and_broker, sigterm, wait_exit, NatsServer, WAIT,
};
use opentelemetry::trace::{SpanId, SpanKind, Status as SpanStatus, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::prelude::*;

/// The exporter behind the global subscriber, installed once.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(
            jetq_middleware::trace::layer(provider.tracer("jetq-tests"))
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        );
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
        exporter
    })
}

/// The finished spans of trace `trace`.
fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

/// Wait until the finished spans of `trace` satisfy `done`; panics after
/// [`WAIT`] showing what there is. (The exporter has no notification: this
/// polls.)
async fn wait_spans(trace: TraceId, done: impl Fn(&[SpanData]) -> bool) -> Vec<SpanData> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let spans = spans_of(trace);
        if done(&spans) {
            return spans;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the spans of trace {trace} are not as expected:\n{:#?}",
                names(&spans)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} ({:?}, span {}, parent {})",
                s.name,
                s.span_kind,
                s.span_context.span_id(),
                s.parent_span_id
            )
        })
        .collect()
}

fn attrs(span: &SpanData) -> BTreeMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

fn attr_of(span: &SpanData, key: &str) -> Option<String> {
    attrs(span).get(key).cloned()
}

/// The one span named `name` whose `messaging.message.id` is `id`.
fn find<'a>(spans: &'a [SpanData], name: &str, id: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == name && attr_of(s, attr::MESSAGING_MESSAGE_ID).as_deref() == Some(id))
        .collect();
    assert_eq!(found.len(), 1, "spans {name} of {id}: {:#?}", names(spans));
    found[0]
}

fn count(spans: &[SpanData], name: &str) -> usize {
    spans.iter().filter(|s| s.name == name).count()
}

/// The trace id of a span that was entered (or at least built).
fn trace_of(span: &tracing::Span) -> TraceId {
    use opentelemetry::trace::TraceContextExt as _;
    let id = span.context().span().span_context().trace_id();
    assert_ne!(id, TraceId::INVALID, "the test span is not recorded");
    id
}

fn traced_worker(broker: jetq_nats::NatsBroker, queue: &str) -> jetq::WorkerBuilder {
    Worker::builder(broker.clone())
        .default_queue(queue)
        .name("trace-worker")
        .middleware(TraceAttempts::new())
        .client(Client::new(broker).middleware(TracePublish::new()))
}

// ---------------------------------------------------------------------------

/// Publishes two children: one inside a span of its own, one from a spawned
/// (uninstrumented) task; returns the children's `traceparent` headers.
async fn parent_task(
    ctx: Context,
    Extension(span): Extension<AttemptSpan>,
) -> Result<Vec<String>, TaskError> {
    span.set_attribute("app.note", "hello");
    // The attempt span is also the current span.
    tracing::Span::current().set_attribute("app.current", true);
    let client = ctx.client();
    let step = tracing::info_span!("user.step");
    let first = async {
        tracing::info!("publishing the first child");
        client
            .task("trace.child")
            .queue("trace-a")
            .args(&1)
            .publish()
            .await
    }
    .instrument(step)
    .await
    .map_err(|e| TaskError::new(e.to_string()))?;
    let spawned = tokio::spawn(async move {
        client
            .task("trace.child")
            .queue("trace-a")
            .args(&2)
            .publish()
            .await
    })
    .await
    .map_err(|e| TaskError::new(e.to_string()))?
    .map_err(|e| TaskError::new(e.to_string()))?;
    let mut headers = Vec::new();
    for handle in [first, spawned] {
        headers.push(
            handle
                .result::<String>(WAIT)
                .await
                .map_err(|e| TaskError::new(e.to_string()))?,
        );
    }
    Ok(headers)
}

async fn child_task(ctx: Context) -> Result<String, TaskError> {
    Ok(ctx.header("traceparent").unwrap_or("none").to_owned())
}

#[tokio::test]
async fn one_trace_runs_from_the_producer_through_the_worker_into_child_requests() {
    exporter();
    let (_server, broker) = server_and_broker().await;
    let worker = traced_worker(broker.clone(), "trace-a")
        .task("trace.parent", parent_task)
        .task("trace.child", child_task)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone()).middleware(TracePublish::new());

    let root = tracing::info_span!("producer.request");
    let trace = trace_of(&root);
    let handle = client
        .task("trace.parent")
        .queue("trace-a")
        .publish()
        .instrument(root.clone())
        .await
        .unwrap();
    let headers: Vec<String> = handle.result(WAIT).await.unwrap();
    drop(root);

    let parent_subject = "jetq.tasks.trace-a.trace.parent";
    let child_subject = "jetq.tasks.trace-a.trace.child";
    let spans = wait_spans(trace, |s| {
        count(s, "producer.request") == 1
            && count(s, &format!("process {parent_subject}")) == 1
            && count(s, &format!("process {child_subject}")) == 2
            && count(s, &format!("send {child_subject}")) == 2
            && count(s, "user.step") == 1
    })
    .await;
    let root = spans.iter().find(|s| s.name == "producer.request").unwrap();
    let id = handle.id();

    // The publish span: a producer span, child of the caller's span.
    let send = find(&spans, &format!("send {parent_subject}"), id);
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(send.parent_span_id, root.span_context.span_id());
    let a = attrs(send);
    assert_eq!(a["messaging.system"], "nats");
    assert_eq!(a["messaging.operation.type"], "send");
    assert_eq!(a["messaging.operation.name"], "send");
    assert_eq!(a["messaging.destination.name"], parent_subject);
    assert_eq!(a["jetq.task"], "trace.parent");
    assert_eq!(a["jetq.queue"], "trace-a");
    assert!(!a.contains_key("jetq.parent_id"), "{a:?}");
    assert_eq!(send.status, SpanStatus::Unset);

    // The attempt span: a consumer span, child of the publish span, with
    // the attributes and the task's own.
    let process = find(&spans, &format!("process {parent_subject}"), id);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    assert!(
        process.parent_span_is_remote,
        "the parent came through the headers"
    );
    let a = attrs(process);
    assert_eq!(a["messaging.system"], "nats");
    assert_eq!(a["messaging.operation.type"], "process");
    assert_eq!(a["messaging.destination.name"], parent_subject);
    assert_eq!(a["messaging.consumer.group.name"], "jetq-trace-a");
    assert_eq!(a["jetq.task"], "trace.parent");
    assert_eq!(a["jetq.queue"], "trace-a");
    assert_eq!(a["jetq.attempt"], "1");
    assert_eq!(a["jetq.max_retries"], "3");
    assert_eq!(a["jetq.worker"], "trace-worker");
    assert_eq!(a["jetq.status"], "succeeded");
    assert_eq!(a["app.note"], "hello");
    assert_eq!(a["app.current"], "true");
    assert!(!a.contains_key("error.type"), "{a:?}");
    assert_eq!(process.status, SpanStatus::Unset);
    assert_eq!(process.instrumentation_scope.name(), "jetq-tests");

    // The task's own span nests under the attempt span, and its event is
    // on it.
    let step = spans.iter().find(|s| s.name == "user.step").unwrap();
    assert_eq!(step.parent_span_id, process.span_context.span_id());
    assert!(
        step.events
            .iter()
            .any(|e| e.name == "publishing the first child"),
        "{:?}",
        step.events
    );

    // The children: the first publish hangs under the task's span, the
    // spawned one under the attempt span; each child attempt under its
    // publish, whose ids its `traceparent` header carried.
    let children: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == format!("send {child_subject}"))
        .collect();
    let under_step = children
        .iter()
        .find(|s| s.parent_span_id == step.span_context.span_id())
        .expect("a child publish span under user.step");
    let under_attempt = children
        .iter()
        .find(|s| s.parent_span_id == process.span_context.span_id())
        .expect("a child publish span under the attempt span");
    for (send, header) in [under_step, under_attempt].into_iter().zip(&headers) {
        assert_eq!(send.span_kind, SpanKind::Producer);
        assert_eq!(attr_of(send, "jetq.parent_id").as_deref(), Some(id));
        assert_eq!(
            header,
            &format!("00-{trace}-{}-01", send.span_context.span_id()),
            "the child request's traceparent names its publish span"
        );
        let child_id = attr_of(send, attr::MESSAGING_MESSAGE_ID).unwrap();
        let process = find(&spans, &format!("process {child_subject}"), &child_id);
        assert_eq!(process.span_context.trace_id(), trace);
        assert_eq!(process.parent_span_id, send.span_context.span_id());
        assert_eq!(attr_of(process, "jetq.parent_id").as_deref(), Some(id));
        assert_eq!(
            attr_of(process, "jetq.status").as_deref(),
            Some("succeeded")
        );
    }
    worker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------

async fn flaky(ctx: Context) -> Result<(), TaskError> {
    Err(
        TaskError::new(format!("backend down (attempt {})", ctx.attempt()))
            .with_kind("backend")
            .with_retry(jetq::Retry::After(Duration::from_millis(10))),
    )
}

async fn refuses() -> Result<(), TaskError> {
    Err(TaskError::permanent("no such account").with_kind("not_found"))
}

#[tokio::test]
async fn failed_attempts_are_error_spans_with_their_kind() {
    exporter();
    let (_server, broker) = server_and_broker().await;
    let worker = traced_worker(broker.clone(), "trace-b")
        .task("trace.flaky", flaky)
        .register(Task::new("trace.refuses", refuses))
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone()).middleware(TracePublish::new());

    let root = tracing::info_span!("producer.failing");
    let trace = trace_of(&root);
    let (flaky, refused) = async {
        let flaky = client
            .task("trace.flaky")
            .queue("trace-b")
            .max_retries(1)
            .publish()
            .await
            .unwrap();
        let refused = client
            .task("trace.refuses")
            .queue("trace-b")
            .publish()
            .await
            .unwrap();
        (flaky, refused)
    }
    .instrument(root.clone())
    .await;
    assert_eq!(flaky.wait(WAIT).await.unwrap().status, Status::Failed);
    assert_eq!(refused.wait(WAIT).await.unwrap().status, Status::Failed);
    drop(root);

    let flaky_name = "process jetq.tasks.trace-b.trace.flaky";
    let refused_name = "process jetq.tasks.trace-b.trace.refuses";
    let spans = wait_spans(trace, |s| {
        count(s, flaky_name) == 2 && count(s, refused_name) == 1
    })
    .await;
    let send = find(&spans, "send jetq.tasks.trace-b.trace.flaky", flaky.id());

    // Two attempts, both children of the one publish: the first will be
    // retried, the second is the last.
    let mut attempts: Vec<&SpanData> = spans.iter().filter(|s| s.name == flaky_name).collect();
    attempts.sort_by_key(|s| attr_of(s, "jetq.attempt"));
    for (n, (span, status)) in attempts.iter().zip(["retrying", "failed"]).enumerate() {
        let n = n + 1;
        let a = attrs(span);
        assert_eq!(span.parent_span_id, send.span_context.span_id());
        assert_eq!(a["jetq.attempt"], n.to_string());
        assert_eq!(a["jetq.max_retries"], "1");
        assert_eq!(a["jetq.status"], status, "attempt {n}");
        assert_eq!(a["error.type"], "backend");
        assert_eq!(
            span.status,
            SpanStatus::error(format!("backend down (attempt {n})"))
        );
    }
    assert_ne!(
        attempts[0].span_context.span_id(),
        attempts[1].span_context.span_id()
    );

    let span = find(&spans, refused_name, refused.id());
    assert_eq!(attr_of(span, "jetq.status").as_deref(), Some("failed"));
    assert_eq!(attr_of(span, "jetq.attempt").as_deref(), Some("1"));
    assert_eq!(attr_of(span, "error.type").as_deref(), Some("not_found"));
    assert_eq!(span.status, SpanStatus::error("no such account"));
    worker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------

async fn noop() -> Result<(), TaskError> {
    Ok(())
}

#[tokio::test]
async fn a_traceparent_set_by_hand_is_continued() {
    exporter();
    let (_server, broker) = server_and_broker().await;
    let worker = traced_worker(broker.clone(), "trace-c")
        .task("trace.noop", noop)
        .spawn()
        .unwrap();

    // As a Python producer would: the header in the envelope, no span here.
    let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let upstream = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    let traceparent = format!("00-{trace}-{upstream}-01");
    let plain = Client::new(broker.clone());
    let mut request = Request::new("trace.noop");
    request.queue = "trace-c".into();
    request
        .headers
        .insert("traceparent".into(), traceparent.clone());
    let by_hand = plain.publish_request(request).await.unwrap();
    by_hand.wait(WAIT).await.unwrap();

    // Through the publish middleware, outside any span: the publish span
    // continues the header's trace, and the attempt hangs under it.
    let traced = Client::new(broker.clone()).middleware(TracePublish::new());
    let via_middleware = traced
        .task("trace.noop")
        .queue("trace-c")
        .header("traceparent", traceparent.clone())
        .publish()
        .await
        .unwrap();
    via_middleware.wait(WAIT).await.unwrap();

    let name = "process jetq.tasks.trace-c.trace.noop";
    let spans = wait_spans(trace, |s| count(s, name) == 2).await;
    let process = find(&spans, name, by_hand.id());
    assert_eq!(process.parent_span_id, upstream);
    assert!(process.parent_span_is_remote);
    assert_eq!(process.span_kind, SpanKind::Consumer);

    let send = find(
        &spans,
        "send jetq.tasks.trace-c.trace.noop",
        via_middleware.id(),
    );
    assert_eq!(send.parent_span_id, upstream);
    let process = find(&spans, name, via_middleware.id());
    assert_eq!(process.parent_span_id, send.span_context.span_id());

    // A request without trace context starts a trace of its own.
    let fresh = plain
        .task("trace.noop")
        .queue("trace-c")
        .publish()
        .await
        .unwrap();
    fresh.wait(WAIT).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let root = loop {
        let found: Vec<SpanData> = exporter()
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| attr_of(s, attr::MESSAGING_MESSAGE_ID).as_deref() == Some(fresh.id()))
            .collect();
        if let Some(span) = found.into_iter().next() {
            break span;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no span for {}",
            fresh.id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(root.parent_span_id, SpanId::INVALID);
    assert_ne!(root.span_context.trace_id(), trace);
    worker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------

/// Contexts (and their extensions) that tasks kept after their attempt.
#[derive(Clone, Default)]
struct Kept(std::sync::Arc<std::sync::Mutex<Vec<(Context, AttemptSpan)>>>);

async fn keeps(
    ctx: Context,
    Extension(span): Extension<AttemptSpan>,
    jetq::State(kept): jetq::State<Kept>,
) -> Result<(), TaskError> {
    kept.0.lock().unwrap().push((ctx, span));
    Ok(())
}

#[tokio::test]
async fn the_attempt_span_ends_with_the_attempt_even_if_the_task_keeps_it() {
    exporter();
    let (_server, broker) = server_and_broker().await;
    let kept = Kept::default();
    let worker = traced_worker(broker.clone(), "trace-d")
        .state(kept.clone())
        .task("trace.keeps", keeps)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone()).middleware(TracePublish::new());
    let root = tracing::info_span!("producer.keeps");
    let trace = trace_of(&root);
    let handle = client
        .task("trace.keeps")
        .queue("trace-d")
        .publish()
        .instrument(root.clone())
        .await
        .unwrap();
    handle.wait(WAIT).await.unwrap();
    // Ended (exported) while the task's copies are still alive.
    let name = "process jetq.tasks.trace-d.trace.keeps";
    let spans = wait_spans(trace, |s| count(s, name) == 1).await;
    let span = find(&spans, name, handle.id());
    let (_, attempt) = kept.0.lock().unwrap()[0].clone();
    assert_eq!(
        attempt.span_context().map(|sc| sc.span_id()),
        Some(span.span_context.span_id())
    );
    assert_eq!(
        attempt.traceparent(),
        Some(format!("00-{trace}-{}-01", span.span_context.span_id()))
    );
    // A late change goes nowhere.
    attempt.set_attribute("late", true);
    assert_eq!(count(&spans_of(trace), name), 1);
    worker.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_demo_worker_exports_its_attempt_spans_over_otlp() {
    exporter();
    let receiver = OtlpReceiver::start();
    let server = NatsServer::start();
    let endpoint = receiver.endpoint();
    let worker = demo_worker_with_env(
        &server,
        &["--otlp", "--concurrency", "2"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "jetq-test-worker"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let broker = connect(&server).await;
    let client = Client::new(broker).middleware(TracePublish::new());

    let root = tracing::info_span!("producer.otlp");
    let trace = trace_of(&root);
    let (add, fail) = async {
        let add = client
            .task("demo.add")
            .args(&serde_json::json!({"a": 2, "b": 40}))
            .publish()
            .await
            .unwrap();
        let fail = client
            .task("demo.fail")
            .args(&serde_json::json!({"times": 5}))
            .max_retries(0)
            .publish()
            .await
            .unwrap();
        (add, fail)
    }
    .instrument(root.clone())
    .await;
    assert_eq!(add.result::<i64>(WAIT).await.unwrap(), 42);
    assert_eq!(fail.wait(WAIT).await.unwrap().status, Status::Failed);
    drop(root);
    let local = wait_spans(trace, |s| count(s, "send jetq.tasks.default.demo.add") == 1).await;
    let send_add = find(&local, "send jetq.tasks.default.demo.add", add.id());
    let send_fail = find(&local, "send jetq.tasks.default.demo.fail", fail.id());

    let trace_hex = trace.to_string();
    let spans = receiver
        .wait_for(WAIT, |spans| {
            spans.iter().filter(|s| s.trace_id == trace_hex).count() >= 2
        })
        .await;
    let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == trace_hex).collect();
    assert_eq!(ours.len(), 2, "{ours:#?}");
    let of = |id: &str| {
        *ours
            .iter()
            .find(|s| s.attr("messaging.message.id") == Some(id))
            .unwrap_or_else(|| panic!("no exported span for {id}: {ours:#?}"))
    };
    let span = of(add.id());
    assert_eq!(span.service_name, "jetq-test-worker");
    assert_eq!(span.scope, "jetq-middleware");
    assert_eq!(span.name, "process jetq.tasks.default.demo.add");
    assert_eq!(span.kind, 5, "SPAN_KIND_CONSUMER");
    assert_eq!(
        span.parent_span_id,
        send_add.span_context.span_id().to_string()
    );
    assert_eq!(span.attr("messaging.system"), Some("nats"));
    assert_eq!(span.attr("messaging.operation.type"), Some("process"));
    assert_eq!(span.attr("jetq.task"), Some("demo.add"));
    assert_eq!(span.attr("jetq.attempt"), Some("1"));
    assert_eq!(span.attr("jetq.status"), Some("succeeded"));
    assert_eq!(span.status_code, 0, "unset");

    let span = of(fail.id());
    assert_eq!(span.name, "process jetq.tasks.default.demo.fail");
    assert_eq!(
        span.parent_span_id,
        send_fail.span_context.span_id().to_string()
    );
    assert_eq!(span.attr("jetq.status"), Some("failed"));
    assert_eq!(span.attr("error.type"), Some("error"));
    assert_eq!(span.status_code, 2, "STATUS_CODE_ERROR");
    assert!(
        span.status_message.contains("failing on purpose"),
        "{span:?}"
    );

    for request in receiver.requests() {
        assert_eq!(request.line, "POST /v1/traces");
        assert_eq!(
            request.content_type.as_deref(),
            Some("application/x-protobuf")
        );
    }
    // A graceful stop still exits 0 with the exporter shut down.
    sigterm(&worker);
    assert!(wait_exit(worker).await.success());
}
