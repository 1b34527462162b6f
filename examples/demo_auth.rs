//! The auth side of `jetq-demo-worker`: with `--auth-key-file PATH` every
//! request needs a valid token signed with that key (`jetq publish --user U
//! --roles a,b --auth-key-file PATH`), checked before anything else runs.
//!
//! - `demo.whoami` → `{"user": ..., "roles": [...], "assumed_role": null}`
//! - `demo.admin` (requires the role `admin`) → `"ok"`
//!
//! Without the flag both tasks are served too, and fail with
//! `unauthenticated`: nothing verified who the request runs for.

use std::path::Path;

use jetq::{TaskError, WorkerBuilder};
use jetq_middleware::auth::{Auth, AuthKey, RequireAuth, TokenAuth};
use serde_json::{json, Value};

/// The worker middleware for `--auth-key-file`, if given: the key file is
/// read at start, so a bad one stops the worker before it connects.
pub(crate) fn layer(key_file: Option<&Path>) -> jetq::Result<Option<RequireAuth>> {
    let Some(path) = key_file else {
        return Ok(None);
    };
    let key = AuthKey::from_file(path)
        .map_err(|e| jetq::Error::new(jetq::ErrorKind::Config, e.to_string()))?;
    Ok(Some(
        RequireAuth::new(TokenAuth::new(key)).require("demo.admin", ["admin"]),
    ))
}

/// Register the auth middleware (before any but metrics and tracing) and the
/// auth tasks.
pub(crate) fn register(builder: WorkerBuilder, auth: Option<RequireAuth>) -> WorkerBuilder {
    let builder = match auth {
        Some(auth) => builder.middleware(auth),
        None => builder,
    };
    builder
        .task("demo.whoami", whoami)
        .task("demo.admin", admin)
}

async fn whoami(auth: Auth) -> Result<Value, TaskError> {
    Ok(json!({
        "user": auth.user(),
        "roles": auth.roles(),
        "assumed_role": auth.assumed_role(),
    }))
}

async fn admin(_auth: Auth) -> Result<&'static str, TaskError> {
    Ok("ok")
}
