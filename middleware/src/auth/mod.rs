//! Signed auth tokens bound to their request.
//!
//! A producer attaches who a request runs for (an [`AuthContext`]: user,
//! roles, expiry) as a JWT (RFC 7519) in the request's
//! [`authorization`](AUTH_HEADER) header, as `Bearer <jwt>`. The token is
//! signed with `HS256` (a shared secret) or `EdDSA` (an Ed25519 key, so that
//! workers can hold only the public key) and carries the request's id and
//! task name ([`claims`]), so it authorises that request and no other.
//!
//! A worker verifies it with [`TokenAuth::verify`] (or
//! [`TokenAuth::authorize`], which also picks the [`assumed_role`] for the
//! task's required roles) and, when its key can sign, signs a token for each
//! child request with [`TokenAuth::sign_child`]. Failures are [`AuthError`]s
//! of kind `unauthenticated` or `forbidden`.
//!
//! The middleware wrap this: [`RequireAuth`] on a worker verifies every
//! attempt (and the task's required roles) before anything else runs and
//! gives the handler an [`Auth`] extractor; [`SignAuth`] on a client signs a
//! token for each request it publishes, and on a worker's client one for
//! each child request, for the parent's user. See `docs/middleware.md` (Auth context).
//!
//! ```
//! use jetq_middleware::auth::{bearer, AuthContext, AuthKey, TokenAuth};
//!
//! let key = AuthKey::from_pem_or_secret(b"an example secret of at least 32 bytes\n")?;
//! let auth = TokenAuth::new(key);
//!
//! // Producer: sign for this request.
//! let ctx = AuthContext::new("alice").with_roles(["editor"]);
//! let header = bearer(&auth.sign(&ctx, "req-1", "docs.publish")?);
//!
//! // Worker: verify against the envelope, then check the task's roles.
//! let required = vec!["admin".to_owned(), "editor".to_owned()];
//! let verified = auth.authorize(Some(&header), "req-1", "docs.publish", &required)?;
//! assert_eq!(verified.context.user, "alice");
//! assert_eq!(verified.assumed_role.as_deref(), Some("editor"));
//!
//! // The same token does not authorise another request.
//! assert!(auth.verify(Some(&header), "req-2", "docs.publish").is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod keys;
mod middleware;
mod token;

pub use keys::{Algorithm, AuthKey, KeyError, MIN_SECRET_LEN};
pub use middleware::{Auth, RequireAuth, SignAuth};
pub use token::{
    assumed_role, bearer, claims, AuthContext, AuthError, AuthErrorKind, AuthFailure, Claims,
    SignError, TokenAuth, VerifiedAuth, AUTH_HEADER, BEARER_SCHEME, DEFAULT_LEEWAY,
    DEFAULT_LIFETIME, MAX_TOKEN_LEN,
};
