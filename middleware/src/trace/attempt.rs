//! The worker side: one span per attempt.

use std::borrow::Cow;

use jetq::broker::BoxFuture;
use jetq::middleware::{Middleware, Next, Outcome};
use jetq::Context;
use opentelemetry::trace::{SpanContext, Status, TraceContextExt};
use opentelemetry::{Key, KeyValue, Value};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::propagation::{self, traceparent_of};
use super::{attr, task_subject, DEFAULT_PREFIX, SYSTEM};

/// Worker middleware: runs every attempt inside a span of kind consumer,
/// named `process <subject>`, whose parent is the span named by the
/// request's `traceparent` header (a new trace when it has none), with the
/// messaging and jetq attributes and the attempt's outcome. See the
/// [module documentation](super) for the attributes.
///
/// The span is a `tracing` span (target `jetq_middleware::trace`, level
/// INFO) that a `tracing-opentelemetry` layer, such as [`layer`](super::layer),
/// turns into an OpenTelemetry span; spans the task opens nest under it. The
/// task reaches it through the [`AttemptSpan`] extension.
///
/// Register it early, so that the span covers the middleware after it and
/// records their refusals too (the suggested order: metrics, tracing, auth,
/// limits, then your own):
///
/// ```
/// use jetq::memory::MemoryBroker;
/// use jetq::{Client, Worker};
/// use jetq_middleware::trace::{TraceAttempts, TracePublish};
///
/// let broker = MemoryBroker::new();
/// let worker = Worker::builder(broker.clone())
///     .middleware(TraceAttempts::new())
///     // Requests published from a task continue the trace.
///     .client(Client::new(broker).middleware(TracePublish::new()));
/// # let _ = worker;
/// ```
#[derive(Debug, Clone)]
pub struct TraceAttempts {
    prefix: String,
}

impl Default for TraceAttempts {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceAttempts {
    /// The middleware, for subjects under the default prefix `jetq`.
    pub fn new() -> Self {
        TraceAttempts {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }

    /// The subject prefix the broker was configured with (`jetq` unless the
    /// NATS broker was given another): it names the destination,
    /// `<prefix>.tasks.<queue>.<task>`, and the consumer group,
    /// `<prefix>-<queue>`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

impl Middleware for TraceAttempts {
    fn call<'a>(&'a self, ctx: Context, next: Next) -> BoxFuture<'a, Outcome> {
        let subject = task_subject(&self.prefix, ctx.queue(), ctx.task());
        let span = tracing::info_span!(
            target: super::TARGET,
            "jetq.attempt",
            "otel.name" = %format_args!("process {subject}"),
            "otel.kind" = "consumer",
        );
        // The producer's span, or none: an attempt never hangs under
        // whatever span the worker happens to run in.
        let _ = span.set_parent(propagation::extract(&ctx.request().headers));
        for kv in [
            KeyValue::new(attr::MESSAGING_SYSTEM, SYSTEM),
            KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "process"),
            KeyValue::new(attr::MESSAGING_OPERATION_NAME, "process"),
            KeyValue::new(attr::MESSAGING_DESTINATION_NAME, subject),
            KeyValue::new(
                attr::MESSAGING_CONSUMER_GROUP_NAME,
                format!("{}-{}", self.prefix, ctx.queue()),
            ),
            KeyValue::new(attr::MESSAGING_MESSAGE_ID, ctx.id().to_owned()),
            KeyValue::new(attr::JETQ_TASK, ctx.task().to_owned()),
            KeyValue::new(attr::JETQ_QUEUE, ctx.queue().to_owned()),
            KeyValue::new(attr::JETQ_ATTEMPT, i64::from(ctx.attempt())),
            KeyValue::new(attr::JETQ_MAX_RETRIES, i64::from(ctx.max_retries())),
            KeyValue::new(attr::JETQ_WORKER, ctx.worker().to_owned()),
        ] {
            span.set_attribute(kv.key, kv.value);
        }
        if let Some(parent) = &ctx.request().parent {
            span.set_attribute(attr::JETQ_PARENT_ID, parent.clone());
        }
        ctx.insert_extension(AttemptSpan::of(&span));
        let observed = ctx.clone();
        Box::pin(async move {
            let outcome = next.run(ctx).instrument(span.clone()).await;
            record_outcome(&span, &observed, &outcome);
            outcome
        })
    }
}

/// The attempt's status attribute, `error.type` and span status.
fn record_outcome(span: &tracing::Span, ctx: &Context, outcome: &Outcome) {
    match outcome {
        Ok(_) => span.set_attribute(attr::JETQ_STATUS, "succeeded"),
        Err(e) => {
            let status = if ctx.is_cancelled() {
                "interrupted"
            } else if e.is_retryable() && ctx.attempt() <= ctx.max_retries() {
                "retrying"
            } else {
                "failed"
            };
            span.set_attribute(attr::JETQ_STATUS, status);
            span.set_attribute(attr::ERROR_TYPE, e.kind().to_owned());
            span.set_status(Status::error(e.message().to_owned()));
        }
    }
}

/// The span of the running attempt, given to the task as an extension by
/// [`TraceAttempts`]: read it with `jetq::Extension<AttemptSpan>` (or
/// [`Context::extension`]) to add attributes or events, or to read the trace
/// id. Cheap to clone.
///
/// ```
/// use jetq::{Extension, TaskError};
/// use jetq_middleware::trace::AttemptSpan;
///
/// async fn resize(Extension(span): Extension<AttemptSpan>) -> Result<(), TaskError> {
///     span.set_attribute("image.width", 640_i64);
///     span.add_event("resized", vec![]);
///     Ok(())
/// }
/// ```
///
/// It holds the span's OpenTelemetry context, not the `tracing` span, so a
/// copy kept past the attempt does not keep the span open: the span ends
/// with the attempt, and changes made afterwards are ignored. Inside the
/// task the attempt's `tracing` span is `tracing::Span::current()` (unless
/// the task opened spans of its own), so `OpenTelemetrySpanExt` works on it
/// too, and it is the span to instrument spawned futures with.
#[derive(Debug, Clone)]
pub struct AttemptSpan {
    cx: opentelemetry::Context,
}

impl AttemptSpan {
    /// The handle of `span` (built now, if an OpenTelemetry layer records it).
    fn of(span: &tracing::Span) -> Self {
        AttemptSpan { cx: span.context() }
    }

    /// Set an attribute on the span (a later value of the same key wins).
    pub fn set_attribute(&self, key: impl Into<Key>, value: impl Into<Value>) {
        self.cx
            .span()
            .set_attribute(KeyValue::new(key.into(), value.into()));
    }

    /// Add an event (a timestamped log entry) to the span.
    pub fn add_event(&self, name: impl Into<Cow<'static, str>>, attributes: Vec<KeyValue>) {
        self.cx.span().add_event(name, attributes);
    }

    /// The OpenTelemetry context whose span is this one, for propagating it
    /// by hand (a call to another service). Empty when no OpenTelemetry
    /// layer records the span.
    pub fn context(&self) -> opentelemetry::Context {
        self.cx.clone()
    }

    /// The span's ids, if an OpenTelemetry layer records it.
    pub fn span_context(&self) -> Option<SpanContext> {
        let span = self.cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.clone())
    }

    /// The span as a W3C `traceparent` value
    /// (`00-<trace id>-<span id>-<flags>`), if an OpenTelemetry layer records
    /// it.
    pub fn traceparent(&self) -> Option<String> {
        self.span_context().as_ref().and_then(traceparent_of)
    }
}
