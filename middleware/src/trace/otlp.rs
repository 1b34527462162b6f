//! Export over OTLP (HTTP/protobuf), configured by the standard variables.

use std::fmt;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The instrumentation scope of the spans: this crate.
const SCOPE: &str = "jetq-middleware";

/// How to export spans over OTLP/HTTP with protobuf bodies. Unless set
/// here, everything comes from the standard variables:
///
/// | variable | meaning | default |
/// | --- | --- | --- |
/// | `OTEL_EXPORTER_OTLP_ENDPOINT` | base URL of the collector; `/v1/traces` is appended | `http://localhost:4318` |
/// | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | full URL for traces (used as is; wins over the above) | |
/// | `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TRACES_HEADERS` | `key=value,...` sent with each export | |
/// | `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` | milliseconds per export | 10000 |
/// | `OTEL_SERVICE_NAME` | the resource's `service.name` | [`service_name`](Self::service_name), else `unknown_service:<executable>` |
/// | `OTEL_RESOURCE_ATTRIBUTES` | more resource attributes, `key=value,...` | |
/// | `OTEL_BSP_SCHEDULE_DELAY` | milliseconds between batch exports | 5000 |
///
/// Only the HTTP/protobuf protocol is built in: `OTEL_EXPORTER_OTLP_PROTOCOL`
/// is not read. The HTTP client is plain HTTP (no TLS): use a collector on
/// the same host or network, or put TLS in front of it.
#[derive(Debug, Clone, Default)]
pub struct Otlp {
    endpoint: Option<String>,
    service_name: Option<String>,
}

impl Otlp {
    /// Settings from the environment only.
    pub fn from_env() -> Self {
        Self::default()
    }

    /// The collector's base URL, e.g. `http://127.0.0.1:4318`, instead of
    /// the variables: `/v1/traces` is appended.
    pub fn endpoint(mut self, base_url: impl Into<String>) -> Self {
        self.endpoint = Some(base_url.into());
        self
    }

    /// The `service.name` to report when neither `OTEL_SERVICE_NAME` nor
    /// `OTEL_RESOURCE_ATTRIBUTES` gives one.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Build the exporter and a tracer provider that exports in batches from
    /// a thread of its own. Also installs the provider and the W3C trace
    /// context propagator as OpenTelemetry's globals, for code that uses
    /// the `opentelemetry` API directly. Add [`OtlpGuard::layer`] to the
    /// `tracing` subscriber; keep the guard until the end of `main`.
    pub fn init(self) -> Result<OtlpGuard, OtlpError> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary);
        if let Some(base) = &self.endpoint {
            exporter = exporter.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
        }
        let exporter = exporter.build().map_err(|e| OtlpError(e.to_string()))?;
        let mut resource = Resource::builder().build();
        if let Some(name) = self.service_name {
            let unnamed = resource
                .get(&opentelemetry::Key::from_static_str("service.name"))
                .is_none_or(|v| v.as_str().starts_with("unknown_service"));
            if unnamed {
                resource = Resource::builder().with_service_name(name).build();
            }
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(OtlpGuard {
            provider,
            shut_down: false,
        })
    }
}

/// [`Otlp::from_env`] with a default service name, then
/// [`init`](Otlp::init):
///
/// ```no_run
/// use tracing_subscriber::prelude::*;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let otlp = jetq_middleware::trace::init_otlp("my-worker")?;
/// tracing_subscriber::registry()
///     .with(tracing_subscriber::fmt::layer())
///     .with(otlp.layer())
///     .init();
/// // ... run the worker; dropping `otlp` exports what is left.
/// # Ok(())
/// # }
/// ```
pub fn init_otlp(default_service_name: &str) -> Result<OtlpGuard, OtlpError> {
    Otlp::from_env().service_name(default_service_name).init()
}

/// Keeps the OTLP tracer provider; dropping it exports the spans still
/// queued and shuts the exporter down (blocking for at most a few seconds).
pub struct OtlpGuard {
    provider: SdkTracerProvider,
    shut_down: bool,
}

impl fmt::Debug for OtlpGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpGuard").finish_non_exhaustive()
    }
}

impl OtlpGuard {
    /// A tracer of the provider, for this crate's instrumentation scope.
    pub fn tracer(&self) -> Tracer {
        self.provider.tracer(SCOPE)
    }

    /// The `tracing` layer that records spans through this provider
    /// ([`layer`](super::layer) with [`tracer`](Self::tracer)).
    pub fn layer<S>(&self) -> impl Layer<S>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        super::layer(self.tracer())
    }

    /// The tracer provider.
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    /// Export the spans ended so far now, waiting for the collector's
    /// answer (this blocks the calling thread).
    pub fn flush(&self) -> Result<(), OtlpError> {
        self.provider
            .force_flush()
            .map_err(|e| OtlpError(e.to_string()))
    }

    /// Export what is left and shut the exporter down (dropping the guard
    /// does the same). The error says the provider could not be shut down
    /// in time; exports that the collector refused or never received are
    /// dropped by the SDK, not reported here.
    pub fn shutdown(mut self) -> Result<(), OtlpError> {
        self.shut_down = true;
        self.provider
            .shutdown()
            .map_err(|e| OtlpError(e.to_string()))
    }
}

impl Drop for OtlpGuard {
    fn drop(&mut self) {
        if !self.shut_down {
            let _ = self.provider.shutdown();
        }
    }
}

/// The OTLP exporter could not be built, or an export failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("OTLP trace export: {0}")]
pub struct OtlpError(String);
