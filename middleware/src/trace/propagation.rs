//! W3C trace context in a request's `headers` map.

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The header that carries the trace and the parent span (W3C Trace Context):
/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
pub const TRACEPARENT: &str = "traceparent";

/// The header that carries vendor-specific trace state (W3C Trace Context).
pub const TRACESTATE: &str = "tracestate";

/// Reads trace context from a request's headers. Names match exactly first,
/// then without regard to case (a foreign producer may write `Traceparent`).
struct HeaderExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(key))
                    .map(|(_, value)| value)
            })
            .map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes trace context into a request's headers, replacing any header of
/// the same name whatever its case.
struct HeaderInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0
            .retain(|name, _| name == key || !name.eq_ignore_ascii_case(key));
        self.0.insert(key.to_owned(), value);
    }
}

/// The trace context the `traceparent` and `tracestate` headers carry: a
/// context whose span is the remote parent, or an empty context when the
/// headers carry none (or an invalid one).
pub fn extract(headers: &BTreeMap<String, String>) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The remote parent span the headers name, if they carry a valid one.
pub fn remote_parent(headers: &BTreeMap<String, String>) -> Option<SpanContext> {
    let cx = extract(headers);
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

/// Write `cx`'s span as `traceparent` (and its trace state as `tracestate`)
/// into `headers`. Nothing is written when `cx` has no valid span.
pub fn inject(cx: &opentelemetry::Context, headers: &mut BTreeMap<String, String>) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// `sc` as a `traceparent` value, if it is valid.
pub(crate) fn traceparent_of(sc: &SpanContext) -> Option<String> {
    if !sc.is_valid() {
        return None;
    }
    Some(format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_is_read_whatever_its_case_and_written_back_the_same() {
        for name in ["traceparent", "Traceparent", "TRACEPARENT"] {
            let headers = BTreeMap::from([(name.to_owned(), PARENT.to_owned())]);
            let sc = remote_parent(&headers).expect("a valid parent");
            assert_eq!(
                sc.trace_id(),
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
            );
            assert_eq!(sc.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
            assert!(sc.is_sampled());
            assert!(sc.is_remote());
            assert_eq!(traceparent_of(&sc).as_deref(), Some(PARENT));
        }
    }

    #[test]
    fn no_or_a_malformed_traceparent_is_no_parent() {
        assert!(remote_parent(&BTreeMap::new()).is_none());
        for bad in [
            "",
            "garbage",
            // All-zero trace id and span id are invalid.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let headers = BTreeMap::from([(TRACEPARENT.to_owned(), bad.to_owned())]);
            assert!(remote_parent(&headers).is_none(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn inject_replaces_a_header_of_any_case_and_keeps_the_others() {
        let sc = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        let mut headers = BTreeMap::from([
            ("Traceparent".to_owned(), PARENT.to_owned()),
            ("authorization".to_owned(), "Bearer t".to_owned()),
        ]);
        inject(&cx, &mut headers);
        assert_eq!(
            headers,
            BTreeMap::from([
                (
                    "traceparent".to_owned(),
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()
                ),
                ("tracestate".to_owned(), "vendor=x".to_owned()),
                ("authorization".to_owned(), "Bearer t".to_owned()),
            ])
        );
        // An empty context writes nothing.
        let mut none = BTreeMap::new();
        inject(&opentelemetry::Context::new(), &mut none);
        assert!(none.is_empty());
    }
}
