//! The `tracing` layer that records spans as OpenTelemetry spans.

use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The name of the `tracing` span jetq's worker opens around each delivery
/// (with the task, id, queue and stream sequence as fields, for logs).
pub const DELIVERY_SPAN: &str = "jetq.task";

/// A `tracing-opentelemetry` layer that records `tracing` spans as
/// OpenTelemetry spans with `tracer`, leaving out jetq's own per-delivery
/// span ([`DELIVERY_SPAN`], which stays in logs): the attempt span of
/// [`TraceAttempts`](super::TraceAttempts) covers it, and as a span of its
/// own it would only start a trace of one span per delivery.
///
/// Add it to the subscriber next to the log layers; give it a level filter
/// of its own if the log filter is stricter than INFO (the attempt and
/// publish spans are INFO spans):
///
/// ```no_run
/// use opentelemetry::trace::TracerProvider as _;
/// use opentelemetry_sdk::trace::SdkTracerProvider;
/// use tracing_subscriber::prelude::*;
///
/// let provider = SdkTracerProvider::builder().build(); // with an exporter
/// tracing_subscriber::registry()
///     .with(tracing_subscriber::fmt::layer().with_filter(tracing_subscriber::EnvFilter::new("warn")))
///     .with(jetq_middleware::trace::layer(provider.tracer("my-service"))
///         .with_filter(tracing_subscriber::filter::LevelFilter::INFO))
///     .init();
/// ```
///
/// A layer of your own works as well (`tracing_opentelemetry::layer()
/// .with_tracer(..)`); the delivery span then shows up as a separate trace.
pub fn layer<S, T>(tracer: T) -> impl Layer<S>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
    T: opentelemetry::trace::Tracer + Send + Sync + 'static,
    T::Span: Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter_fn(not_a_delivery_span))
}

/// Everything but jetq's per-delivery span.
fn not_a_delivery_span(meta: &Metadata<'_>) -> bool {
    !(meta.is_span() && meta.name() == DELIVERY_SPAN && meta.target().starts_with("jetq::"))
}
