//! Middleware for jetq.
//!
//! [`auth`]: signed auth tokens (JWT, RFC 7519) that a producer attaches to a
//! request's `authorization` header and a worker verifies before running the
//! task. A token is bound to its request (id and task name), so a token lifted
//! from one request cannot authorise another; a task may require roles, and
//! the user's assumed role is the first required role the user holds.
//!
//! The auth logic (keys, signing, verification, role checks) stands alone in
//! [`auth::TokenAuth`]; the worker middleware [`auth::RequireAuth`] and the
//! producer middleware [`auth::SignAuth`] wrap it.
//!
//! [`trace`]: OpenTelemetry spans for each publish and each attempt,
//! following the messaging semantic conventions, with W3C trace context
//! carried in the request's headers from producer to worker and on to child
//! requests; bridged through `tracing`, and exported over OTLP (feature
//! `otlp`, on by default).

pub mod auth;
pub mod limits;
pub mod metrics;
pub mod trace;
