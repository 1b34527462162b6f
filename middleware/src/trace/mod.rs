//! OpenTelemetry tracing for jetq: a span per publish on the producer, a
//! span per attempt on the worker, and W3C trace context in between.
//!
//! - [`TracePublish`] (client middleware) opens a span of kind producer,
//!   `send <subject>`, around each publish and writes it into the request's
//!   `traceparent`/`tracestate` headers.
//! - [`TraceAttempts`] (worker middleware) opens a span of kind consumer,
//!   `process <subject>`, around each attempt, as a child of the span the
//!   request's `traceparent` names (in another process, or a foreign
//!   producer that set the header by hand), and records the outcome. The
//!   task reaches it as the [`AttemptSpan`] extension; spans the task opens
//!   with `tracing` nest under it, and requests it publishes through
//!   [`Context::client`](jetq::Context::client) (with [`TracePublish`] on
//!   the worker's client) continue the trace.
//!
//! Both are `tracing` spans (target `jetq_middleware::trace`, level INFO)
//! that a `tracing-opentelemetry` layer turns into OpenTelemetry spans:
//! [`layer`] for a tracer of your own, or `init_otlp` (feature `otlp`) to
//! export over OTLP as the `OTEL_*` variables say. Without such a layer they
//! are plain `tracing` spans and nothing is exported.
//!
//! Attributes follow the OpenTelemetry messaging semantic conventions:
//!
//! | attribute | publish span | attempt span |
//! | --- | --- | --- |
//! | span kind | producer | consumer |
//! | span name | `send <subject>` | `process <subject>` |
//! | `messaging.system` | `nats` | `nats` |
//! | `messaging.operation.type` and `.name` | `send` | `process` |
//! | `messaging.destination.name` | the subject, `<prefix>.tasks.<queue>.<task>` | the same |
//! | `messaging.consumer.group.name` | | the queue's consumer, `<prefix>-<queue>` |
//! | `messaging.message.id` | the request id | the request id |
//! | `jetq.task`, `jetq.queue` | the task, the queue | the same |
//! | `jetq.parent_id` | the parent request's id (published from a task) | the same |
//! | `jetq.attempt`, `jetq.max_retries`, `jetq.worker` | | this attempt's number (from 1), the retries allowed, the worker's name |
//! | `jetq.status` | | `succeeded`, `retrying` (an error that will be retried), `failed` (no retry) or `interrupted` (the attempt was cancelled: by a client, a shutdown, or a takeover) |
//! | `error.type` | the client error's kind (`broker`, `invalid_name`, ...) | the task error's kind (`error`, `timeout`, `panic`, ...) |
//! | span status | error, with the message, if the publish failed | error, with the message, if the attempt failed |
//!
//! ```
//! use jetq::memory::MemoryBroker;
//! use jetq::{Client, Extension, TaskError, Worker};
//! use jetq_middleware::trace::{AttemptSpan, TraceAttempts, TracePublish};
//!
//! async fn resize(Extension(span): Extension<AttemptSpan>) -> Result<(), TaskError> {
//!     span.set_attribute("image.format", "png");
//!     Ok(())
//! }
//!
//! let broker = MemoryBroker::new();
//! // Producer.
//! let client = Client::new(broker.clone()).middleware(TracePublish::new());
//! // Worker: a span per attempt; child requests continue the trace.
//! let worker = Worker::builder(broker.clone())
//!     .middleware(TraceAttempts::new())
//!     .client(Client::new(broker).middleware(TracePublish::new()))
//!     .task("images.resize", resize);
//! # let _ = (client, worker);
//! ```

mod attempt;
mod layer;
#[cfg(feature = "otlp")]
mod otlp;
mod propagation;
mod publish;

pub use attempt::{AttemptSpan, TraceAttempts};
pub use layer::{layer, DELIVERY_SPAN};
#[cfg(feature = "otlp")]
pub use otlp::{init_otlp, Otlp, OtlpError, OtlpGuard};
pub use propagation::{extract, inject, remote_parent, TRACEPARENT, TRACESTATE};
pub use publish::TracePublish;

/// The `tracing` target of the attempt and publish spans.
pub const TARGET: &str = "jetq_middleware::trace";

/// The subject prefix jetq's NATS broker uses unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "jetq";

/// `messaging.system`.
pub const SYSTEM: &str = "nats";

/// The names of the attributes the spans carry.
pub mod attr {
    /// The messaging system: always `nats`.
    pub const MESSAGING_SYSTEM: &str = "messaging.system";
    /// `send` (publish span) or `process` (attempt span).
    pub const MESSAGING_OPERATION_TYPE: &str = "messaging.operation.type";
    /// The same as the operation type.
    pub const MESSAGING_OPERATION_NAME: &str = "messaging.operation.name";
    /// The request's subject, `<prefix>.tasks.<queue>.<task>`.
    pub const MESSAGING_DESTINATION_NAME: &str = "messaging.destination.name";
    /// The queue's durable consumer, `<prefix>-<queue>` (attempt span).
    pub const MESSAGING_CONSUMER_GROUP_NAME: &str = "messaging.consumer.group.name";
    /// The request id.
    pub const MESSAGING_MESSAGE_ID: &str = "messaging.message.id";
    /// The task name.
    pub const JETQ_TASK: &str = "jetq.task";
    /// The queue name.
    pub const JETQ_QUEUE: &str = "jetq.queue";
    /// The attempt's number, from 1 (attempt span).
    pub const JETQ_ATTEMPT: &str = "jetq.attempt";
    /// Retries allowed after the first attempt (attempt span).
    pub const JETQ_MAX_RETRIES: &str = "jetq.max_retries";
    /// The worker's name (attempt span).
    pub const JETQ_WORKER: &str = "jetq.worker";
    /// The id of the request whose task published this one, if a task did.
    pub const JETQ_PARENT_ID: &str = "jetq.parent_id";
    /// How the attempt ended: `succeeded`, `retrying`, `failed` or
    /// `interrupted` (attempt span).
    pub const JETQ_STATUS: &str = "jetq.status";
    /// The error's kind, when the attempt or publish failed.
    pub const ERROR_TYPE: &str = "error.type";
}

/// The subject a request for `task` on `queue` is published to.
fn task_subject(prefix: &str, queue: &str, task: &str) -> String {
    format!("{prefix}.tasks.{queue}.{task}")
}
