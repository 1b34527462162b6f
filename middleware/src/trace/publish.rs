//! The producer side: one span per publish, and the trace context in the
//! request's headers.

use jetq::broker::BoxFuture;
use jetq::middleware::{Publish, PublishMiddleware, PublishNext};
use jetq::{Result, TaskHandle};
use opentelemetry::trace::{Status, TraceContextExt};
use opentelemetry::KeyValue;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::attempt::AttemptSpan;
use super::propagation::{self, TRACEPARENT, TRACESTATE};
use super::{attr, task_subject, DEFAULT_PREFIX, SYSTEM};

/// Client (producer) middleware: runs every publish inside a span of kind
/// producer, named `send <subject>`, and writes that span into the
/// request's `traceparent` (and `tracestate`) header, so that the worker's
/// attempt span ([`TraceAttempts`](super::TraceAttempts)) becomes its child.
///
/// The publish span's parent is, in order:
///
/// 1. for a request published from a task ([`Context::client`](jetq::Context::client)),
///    the current span if it belongs to the attempt's trace (a span the
///    task opened inside the attempt), else the attempt's span itself;
/// 2. the span named by a valid `traceparent` header already on the request
///    (set by hand, to continue a trace from elsewhere);
/// 3. the current span, if any; else the publish starts a new trace.
///
/// Without an OpenTelemetry layer the span is not recorded and the headers
/// are left as they are, except that a request published from a task
/// inherits its parent's `traceparent`/`tracestate` when it has none.
///
/// ```
/// use jetq::memory::MemoryBroker;
/// use jetq::Client;
/// use jetq_middleware::trace::TracePublish;
///
/// let client = Client::new(MemoryBroker::new()).middleware(TracePublish::new());
/// # let _ = client;
/// ```
#[derive(Debug, Clone)]
pub struct TracePublish {
    prefix: String,
}

impl Default for TracePublish {
    fn default() -> Self {
        Self::new()
    }
}

impl TracePublish {
    /// The middleware, for subjects under the default prefix `jetq`.
    pub fn new() -> Self {
        TracePublish {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }

    /// The subject prefix the broker was configured with (`jetq` unless the
    /// NATS broker was given another): it names the destination,
    /// `<prefix>.tasks.<queue>.<task>`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

impl PublishMiddleware for TracePublish {
    fn publish<'a>(
        &'a self,
        mut publish: Publish,
        next: PublishNext,
    ) -> BoxFuture<'a, Result<TaskHandle>> {
        Box::pin(async move {
            let request = &publish.request;
            let subject = task_subject(&self.prefix, &request.queue, &request.task);
            let span = tracing::info_span!(
                target: super::TARGET,
                "jetq.publish",
                "otel.name" = %format_args!("send {subject}"),
                "otel.kind" = "producer",
            );
            if let Some(parent) = explicit_parent(&publish) {
                let _ = span.set_parent(parent);
            }
            for kv in [
                KeyValue::new(attr::MESSAGING_SYSTEM, SYSTEM),
                KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "send"),
                KeyValue::new(attr::MESSAGING_OPERATION_NAME, "send"),
                KeyValue::new(attr::MESSAGING_DESTINATION_NAME, subject),
                KeyValue::new(attr::MESSAGING_MESSAGE_ID, request.id.clone()),
                KeyValue::new(attr::JETQ_TASK, request.task.clone()),
                KeyValue::new(attr::JETQ_QUEUE, request.queue.clone()),
            ] {
                span.set_attribute(kv.key, kv.value);
            }
            if let Some(parent) = &request.parent {
                span.set_attribute(attr::JETQ_PARENT_ID, parent.clone());
            }
            let cx = span.context();
            if cx.span().span_context().is_valid() {
                propagation::inject(&cx, &mut publish.request.headers);
            } else if let Some(parent) = &publish.parent {
                // Not recorded (no OpenTelemetry layer): pass the parent's
                // trace context on rather than drop it.
                let headers = &mut publish.request.headers;
                if propagation::remote_parent(headers).is_none() {
                    for name in [TRACEPARENT, TRACESTATE] {
                        if let Some(value) = parent.header(name) {
                            headers.insert(name.to_owned(), value.to_owned());
                        }
                    }
                }
            }
            let result = next.run(publish).instrument(span.clone()).await;
            if let Err(e) = &result {
                span.set_attribute(attr::ERROR_TYPE, snake_case(&format!("{:?}", e.kind())));
                span.set_status(Status::error(e.to_string()));
            }
            result
        })
    }
}

/// The parent the publish span gets instead of the current context, if any
/// (rules 1 and 2 of [`TracePublish`]).
fn explicit_parent(publish: &Publish) -> Option<opentelemetry::Context> {
    let current = opentelemetry::Context::current();
    let current_span = current.span();
    let current_sc = current_span.span_context();
    let attempt = publish
        .parent
        .as_ref()
        .and_then(|ctx| ctx.extension::<AttemptSpan>())
        .map(|a| a.context())
        .filter(|cx| cx.span().span_context().is_valid());
    if let Some(attempt) = attempt {
        let same_trace = current_sc.is_valid()
            && current_sc.trace_id() == attempt.span().span_context().trace_id();
        return (!same_trace).then_some(attempt);
    }
    if propagation::remote_parent(&publish.request.headers).is_some() {
        return Some(propagation::extract(&publish.request.headers));
    }
    None
}

/// `InvalidName` → `invalid_name`: an error kind as a low-cardinality
/// `error.type`.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::snake_case;

    #[test]
    fn error_kinds_become_snake_case() {
        assert_eq!(snake_case("InvalidName"), "invalid_name");
        assert_eq!(snake_case("Broker"), "broker");
        assert_eq!(snake_case("PayloadTooLarge"), "payload_too_large");
    }
}
