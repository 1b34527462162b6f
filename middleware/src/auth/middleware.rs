//! The worker and producer middleware around [`TokenAuth`]: [`RequireAuth`]
//! verifies each attempt's token and gives the handler an [`Auth`];
//! [`SignAuth`] signs a token for each request a client publishes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jetq::broker::BoxFuture;
use jetq::middleware::{Middleware, Next, Outcome, Publish, PublishMiddleware, PublishNext};
use jetq::request::Request;
use jetq::time::OffsetDateTime;
use jetq::{Context, ErrorKind, FromContext, TaskError, TaskHandle};

use super::token::{
    bearer, AuthContext, AuthError, AuthErrorKind, SignError, TokenAuth, VerifiedAuth, AUTH_HEADER,
};

impl AuthError {
    /// The task error a worker ends the request with: permanent (no retry,
    /// a dead letter), of kind `unauthenticated` or `forbidden`, with this
    /// error's message (never the token or the key).
    pub fn to_task_error(&self) -> TaskError {
        TaskError::permanent(self.message()).with_kind(self.kind().as_str())
    }
}

/// Who an attempt runs for: the verified user and roles, and the role the
/// user assumes for the task. [`RequireAuth`] puts it in the attempt's
/// extensions; a handler takes it as a parameter:
///
/// ```
/// use jetq::TaskError;
/// use jetq_middleware::auth::Auth;
///
/// async fn whoami(auth: Auth) -> Result<String, TaskError> {
///     Ok(format!("{} as {:?}", auth.user(), auth.assumed_role()))
/// }
/// ```
///
/// As an extractor it fails the attempt at once (permanent, kind
/// `unauthenticated`) when the attempt has none: the worker runs the task
/// without [`RequireAuth`]. Middleware after [`RequireAuth`] read it with
/// [`Auth::of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    verified: VerifiedAuth,
}

impl Auth {
    /// An auth of a verified token (what [`RequireAuth`] builds; useful to
    /// test handlers).
    pub fn new(verified: VerifiedAuth) -> Self {
        Auth { verified }
    }

    /// The auth [`RequireAuth`] gave this attempt, if any.
    pub fn of(ctx: &Context) -> Option<Auth> {
        ctx.extension::<Auth>()
    }

    /// The user (the token's `sub`).
    pub fn user(&self) -> &str {
        &self.verified.context.user
    }

    /// The user's roles, in the token's order.
    pub fn roles(&self) -> &[String] {
        &self.verified.context.roles
    }

    /// Whether the user holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles().iter().any(|r| r == role)
    }

    /// The first of the task's required roles that the user holds; `None`
    /// when the task requires none.
    pub fn assumed_role(&self) -> Option<&str> {
        self.verified.assumed_role.as_deref()
    }

    /// When the token expires.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.verified.context.expires_at
    }

    /// The verified user, roles and expiry, as [`TokenAuth::sign_child`]
    /// takes them.
    pub fn context(&self) -> &AuthContext {
        &self.verified.context
    }

    /// The verified token and assumed role.
    pub fn verified(&self) -> &VerifiedAuth {
        &self.verified
    }

    /// The verified token and assumed role, by value.
    pub fn into_verified(self) -> VerifiedAuth {
        self.verified
    }
}

impl From<VerifiedAuth> for Auth {
    fn from(verified: VerifiedAuth) -> Self {
        Auth::new(verified)
    }
}

impl FromContext for Auth {
    async fn from_context(ctx: &Context) -> Result<Self, TaskError> {
        Auth::of(ctx).ok_or_else(|| {
            TaskError::permanent(format!(
                "task `{}` needs a verified auth context and this attempt has none: \
                 its worker does not check auth tokens (register RequireAuth)",
                ctx.task()
            ))
            .with_kind(AuthErrorKind::Unauthenticated.as_str())
        })
    }
}

/// The worker middleware: verifies every attempt's `authorization` header
/// (signature, algorithm, expiry with the leeway, binding to the request's
/// id and task) and the task's required roles before the rest of the chain
/// runs, and gives the attempt an [`Auth`].
///
/// A missing, malformed, forged, expired, wrongly bound or insufficient
/// token ends the request `failed` at once: a permanent error of kind
/// `unauthenticated` or `forbidden` ([`AuthError::to_task_error`]), a dead
/// letter, no retry; the handler never runs and the worker goes on.
///
/// Register it first (outermost) with
/// [`WorkerBuilder::middleware`](jetq::WorkerBuilder::middleware), or right
/// after metrics and tracing, so that nothing else (limits, your own
/// middleware, extractors, the handler) runs for a refused request. It checks every task of the worker; tasks not named in
/// [`require`](Self::require) need a valid token and no role.
///
/// ```
/// use jetq::memory::MemoryBroker;
/// use jetq::{TaskError, Worker};
/// use jetq_middleware::auth::{Auth, AuthKey, RequireAuth, TokenAuth};
///
/// async fn admin(auth: Auth) -> Result<String, TaskError> {
///     Ok(format!("{} acts as {}", auth.user(), auth.assumed_role().unwrap_or("-")))
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let key = AuthKey::from_pem_or_secret(b"an example secret of at least 32 bytes\n")?;
/// let auth = RequireAuth::new(TokenAuth::new(key)).require("reports.admin", ["admin", "ops"]);
/// let builder = Worker::builder(MemoryBroker::new())
///     .middleware(auth)
///     .task("reports.admin", admin);
/// # let _ = builder;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RequireAuth {
    auth: TokenAuth,
    roles: Arc<HashMap<String, Vec<String>>>,
}

impl RequireAuth {
    /// Verify tokens with `auth` (its key, leeway); no task requires roles yet.
    pub fn new(auth: TokenAuth) -> Self {
        RequireAuth {
            auth,
            roles: Arc::default(),
        }
    }

    /// Require one of `roles` for `task` (matched by its exact name), in
    /// order of preference: the user assumes the first of them it holds
    /// ([`assumed_role`](super::assumed_role)); a user holding none is
    /// refused with `forbidden`. Replaces what an earlier call said for the
    /// task; an empty list requires a valid token only.
    pub fn require<I, S>(mut self, task: impl Into<String>, roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let roles = roles.into_iter().map(Into::into).collect();
        Arc::make_mut(&mut self.roles).insert(task.into(), roles);
        self
    }

    /// The roles `task` requires (empty: a valid token is enough).
    pub fn required_roles(&self, task: &str) -> &[String] {
        self.roles.get(task).map(Vec::as_slice).unwrap_or_default()
    }

    /// The verifier.
    pub fn token_auth(&self) -> &TokenAuth {
        &self.auth
    }

    /// Check an attempt's token and its task's roles, as the middleware
    /// does, without touching the attempt.
    pub fn check(&self, ctx: &Context) -> Result<Auth, AuthError> {
        self.auth
            .authorize(
                ctx.header(AUTH_HEADER),
                ctx.id(),
                ctx.task(),
                self.required_roles(ctx.task()),
            )
            .map(Auth::new)
    }
}

impl Middleware for RequireAuth {
    fn call<'a>(&'a self, ctx: Context, next: Next) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            match self.check(&ctx) {
                Ok(auth) => {
                    ctx.insert_extension(auth);
                    next.run(ctx).await
                }
                Err(e) => Err(e.to_task_error()),
            }
        })
    }
}

/// The producer middleware: signs a token bound to each request a client
/// publishes and sets its `authorization` header (replacing any).
///
/// - A request published with no parent (a producer's own) is signed for
///   the context given to [`SignAuth::new`], expiring at its `expires_at` or
///   after the TTL ([`with_ttl`](Self::with_ttl), default: the
///   [`TokenAuth`]'s default lifetime) counted from when the request is due
///   (its `not_before`, for a delayed request, or now). A `SignAuth` made
///   with [`SignAuth::children`] leaves such requests as they are.
/// - A child request (published by a task through
///   [`Context::client`](jetq::Context::client), on a worker whose client
///   has this middleware: [`WorkerBuilder::client`](jetq::WorkerBuilder::client))
///   is signed for the parent attempt's verified [`Auth`] (same user and
///   roles) with [`TokenAuth::sign_child`]: bound to the child's id and
///   task, never outliving the parent's token. A parent whose token has
///   expired cannot publish children: the publish fails (kind
///   [`ErrorKind::Config`]). A child of an attempt without a verified auth
///   is left as it is: it never gains an identity its parent did not have,
///   not even the context given to [`SignAuth::new`].
/// - A key that only verifies (an Ed25519 public key) cannot sign: children
///   of a worker holding one are published as the task built them, with no
///   token, and a worker that requires auth refuses them with
///   `unauthenticated`. [`SignAuth::new`] refuses such a key.
///
/// Add it last (innermost) to the client's chain, after any middleware that
/// changes a request's id or task, since the token is bound to them.
///
/// ```
/// use std::time::Duration;
/// use jetq::memory::MemoryBroker;
/// use jetq::Client;
/// use jetq_middleware::auth::{AuthContext, AuthKey, SignAuth, TokenAuth};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let key = AuthKey::from_pem_or_secret(b"an example secret of at least 32 bytes\n")?;
/// let who = AuthContext::new("alice").with_roles(["viewer"]);
/// let sign = SignAuth::new(TokenAuth::new(key), who)?.with_ttl(Duration::from_secs(600));
/// let client = Client::new(MemoryBroker::new()).middleware(sign);
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SignAuth {
    auth: TokenAuth,
    context: Option<AuthContext>,
    ttl: Option<Duration>,
}

impl SignAuth {
    /// Sign every request for `context`, and children for their parent's
    /// verified auth. Refused when the key cannot sign
    /// ([`SignError::CannotSign`]) or the context has no user
    /// ([`SignError::NoUser`]).
    pub fn new(auth: TokenAuth, context: AuthContext) -> Result<Self, SignError> {
        if !auth.can_sign() {
            return Err(SignError::CannotSign);
        }
        if context.user.is_empty() {
            return Err(SignError::NoUser);
        }
        Ok(SignAuth {
            auth,
            context: Some(context),
            ttl: None,
        })
    }

    /// Sign child requests only, for their parent's verified auth: for a
    /// worker's client. With a key that only verifies, nothing is signed.
    pub fn children(auth: TokenAuth) -> Self {
        SignAuth {
            auth,
            context: None,
            ttl: None,
        }
    }

    /// Set how long the tokens of requests without a parent live, counted
    /// from when the request is due, when the context has no `expires_at`
    /// (whole seconds).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The signer.
    pub fn token_auth(&self) -> &TokenAuth {
        &self.auth
    }

    /// The context requests without a parent are signed for.
    pub fn context(&self) -> Option<&AuthContext> {
        self.context.as_ref()
    }

    /// Sign `request` as the middleware does: set its `authorization` header
    /// when a token is due (see [`SignAuth`]); `parent` is the attempt
    /// publishing it, if any. Returns whether a token was set.
    pub fn sign_request(
        &self,
        request: &mut Request,
        parent: Option<&Context>,
    ) -> Result<bool, SignError> {
        let token = match parent {
            Some(parent) => match Auth::of(parent) {
                Some(auth) if self.auth.can_sign() => {
                    self.auth
                        .sign_child(auth.context(), &request.id, &request.task)?
                }
                // A verify-only key, or a parent without verified auth.
                _ => return Ok(false),
            },
            None => match &self.context {
                Some(context) => {
                    let context = match context.expires_at {
                        Some(_) => context.clone(),
                        None => {
                            let now = OffsetDateTime::now_utc();
                            let due = request.not_before.map_or(now, |at| at.max(now));
                            let ttl = self.ttl.unwrap_or(self.auth.default_lifetime());
                            let ttl = jetq::time::Duration::try_from(ttl)
                                .unwrap_or(jetq::time::Duration::MAX);
                            let expires = due.checked_add(ttl).unwrap_or(due);
                            context.clone().with_expires_at(expires)
                        }
                    };
                    self.auth.sign(&context, &request.id, &request.task)?
                }
                None => return Ok(false),
            },
        };
        request
            .headers
            .insert(AUTH_HEADER.to_owned(), bearer(&token));
        Ok(true)
    }
}

impl PublishMiddleware for SignAuth {
    fn publish<'a>(
        &'a self,
        mut publish: Publish,
        next: PublishNext,
    ) -> BoxFuture<'a, jetq::Result<TaskHandle>> {
        Box::pin(async move {
            if let Err(e) = self.sign_request(&mut publish.request, publish.parent.as_ref()) {
                let what = match &publish.parent {
                    Some(parent) => format!(
                        "child request `{}` of `{}`",
                        publish.request.id,
                        parent.id()
                    ),
                    None => format!("request `{}`", publish.request.id),
                };
                return Err(jetq::Error::new(
                    ErrorKind::Config,
                    format!("cannot sign an auth token for {what}: {e}"),
                )
                .with_source(e));
            }
            next.run(publish).await
        })
    }
}
