//! Auth tokens: signing, verification, request binding and role checks.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::keys::AuthKey;

/// The request header that carries the token: `authorization`, with the value
/// `Bearer <jwt>`. The name is matched exactly (lowercase).
pub const AUTH_HEADER: &str = "authorization";

/// The authentication scheme of the header value (`Bearer <jwt>`, RFC 6750).
/// Verification matches it without regard to case.
pub const BEARER_SCHEME: &str = "Bearer";

/// How long a token lives when the producer gives no expiry, and the longest
/// a child token may live past its signing: 1 hour.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// The clock skew allowed when checking `exp` and `nbf`: 30 seconds.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// The longest token accepted, in bytes (16 KiB); a longer one is malformed.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Claim names, for producers that sign their own tokens.
pub mod claims {
    /// The user (string, required, not empty).
    pub const SUB: &str = "sub";
    /// The user's roles (array of strings; may be empty; absent means none).
    pub const ROLES: &str = "roles";
    /// The request id the token is bound to (string, required).
    pub const JETQ_ID: &str = "jetq_id";
    /// The task name the token is bound to (string, required).
    pub const JETQ_TASK: &str = "jetq_task";
    /// Issued at, seconds since the Unix epoch (optional when verifying;
    /// always written when signing; informational).
    pub const IAT: &str = "iat";
    /// Expiry, seconds since the Unix epoch (required).
    pub const EXP: &str = "exp";
    /// Not before, seconds since the Unix epoch (optional; checked when present).
    pub const NBF: &str = "nbf";
}

/// Who a request runs for: the user, the user's roles, and when the user's
/// token expires.
///
/// A producer fills it in to sign a token ([`TokenAuth::sign`]); a worker gets
/// it back from a verified token ([`TokenAuth::verify`]), where `expires_at`
/// is always set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthContext {
    /// The user (the token's `sub`).
    pub user: String,
    /// The user's roles (the token's `roles`), in the token's order.
    #[serde(default)]
    pub roles: Vec<String>,
    /// When the token expires (the token's `exp`). When signing, `None` means
    /// [`DEFAULT_LIFETIME`] (or the signer's own default) from now.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
}

impl AuthContext {
    /// A user with no roles and the default lifetime.
    pub fn new(user: impl Into<String>) -> Self {
        AuthContext {
            user: user.into(),
            roles: Vec::new(),
            expires_at: None,
        }
    }

    /// Set the user's roles.
    pub fn with_roles<I, S>(mut self, roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.roles = roles.into_iter().map(Into::into).collect();
        self
    }

    /// Set when the token expires (whole seconds; fractions are dropped).
    pub fn with_expires_at(mut self, at: OffsetDateTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// The role the user assumes for a task that requires `required`: see
    /// [`assumed_role`].
    pub fn assume(&self, required: &[String]) -> Result<Option<String>, AuthError> {
        assumed_role(required, &self.roles)
    }
}

/// A verified token and the role the user assumes for the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedAuth {
    /// The verified user, roles and expiry.
    pub context: AuthContext,
    /// The first of the task's required roles that the user holds; `None`
    /// when the task requires none.
    pub assumed_role: Option<String>,
}

/// The role a user assumes for a task.
///
/// With no required roles, access is granted and no role is assumed
/// (`Ok(None)`). Otherwise the assumed role is the first role of `required`,
/// in the task's declared order, that appears in `user_roles`; when the user
/// holds none of them the error is [`AuthErrorKind::Forbidden`]
/// ([`AuthFailure::MissingRole`]), its message naming the required roles.
pub fn assumed_role(
    required: &[String],
    user_roles: &[String],
) -> Result<Option<String>, AuthError> {
    if required.is_empty() {
        return Ok(None);
    }
    match required.iter().find(|r| user_roles.contains(r)) {
        Some(role) => Ok(Some(role.clone())),
        None => {
            let names: Vec<String> = required.iter().map(|r| format!("{r:?}")).collect();
            Err(AuthError::new(
                AuthFailure::MissingRole,
                format!(
                    "the task requires one of the roles {}; the user holds none of them",
                    names.join(", ")
                ),
            ))
        }
    }
}

/// The class of an auth failure, as reported to the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthErrorKind {
    /// No valid token for this request: missing, malformed, wrongly signed,
    /// expired or not yet valid, or bound to another request or task.
    Unauthenticated,
    /// A valid token whose user holds none of the task's required roles.
    Forbidden,
}

impl AuthErrorKind {
    /// A stable machine-readable name: `unauthenticated` or `forbidden`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthErrorKind::Unauthenticated => "unauthenticated",
            AuthErrorKind::Forbidden => "forbidden",
        }
    }
}

impl fmt::Display for AuthErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a token was refused, finer than [`AuthErrorKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthFailure {
    /// No `authorization` header.
    Missing,
    /// The header is not `Bearer <jwt>`, the JWT is not well formed, or its
    /// claims are missing or of the wrong type.
    Malformed,
    /// The signature does not match the key: a tampered token, or one signed
    /// with another key.
    BadSignature,
    /// The token's `alg` is not the key's algorithm (`none`, or `HS256`
    /// presented to an Ed25519 key, or the reverse).
    Algorithm,
    /// The token expired (beyond the leeway).
    Expired,
    /// The token's `nbf` is still ahead (beyond the leeway).
    NotYetValid,
    /// The token is bound to another request id.
    WrongRequest,
    /// The token is bound to another task.
    WrongTask,
    /// The user holds none of the task's required roles.
    MissingRole,
}

impl AuthFailure {
    /// The class reported to the producer: [`AuthErrorKind::Forbidden`] for
    /// [`MissingRole`](Self::MissingRole), otherwise
    /// [`AuthErrorKind::Unauthenticated`].
    pub fn kind(self) -> AuthErrorKind {
        match self {
            AuthFailure::MissingRole => AuthErrorKind::Forbidden,
            _ => AuthErrorKind::Unauthenticated,
        }
    }

    /// A stable machine-readable name, e.g. `bad_signature`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Algorithm => "algorithm",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::WrongRequest => "wrong_request",
            AuthFailure::WrongTask => "wrong_task",
            AuthFailure::MissingRole => "missing_role",
        }
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request refused by auth. Displayed as `<kind>: <message>`; the message
/// never contains the token or the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", failure.kind())]
pub struct AuthError {
    failure: AuthFailure,
    message: String,
}

impl AuthError {
    fn new(failure: AuthFailure, message: impl Into<String>) -> Self {
        AuthError {
            failure,
            message: message.into(),
        }
    }

    /// The class of failure: unauthenticated or forbidden.
    pub fn kind(&self) -> AuthErrorKind {
        self.failure.kind()
    }

    /// The precise reason.
    pub fn failure(&self) -> AuthFailure {
        self.failure
    }

    /// What went wrong, without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A token that could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The key only verifies (an Ed25519 public key).
    #[error(
        "this auth key can only verify (an Ed25519 public key); signing needs \
         an Ed25519 private key or a shared secret"
    )]
    CannotSign,
    /// The context has no user.
    #[error("the auth context has no user")]
    NoUser,
    /// The token would already have expired: the given expiry, or the
    /// parent's for a child token, is not in the future.
    #[error("the token would expire at {}, which is not in the future", format_time(*.0))]
    Expired(OffsetDateTime),
    /// The JWT library failed to sign.
    #[error("signing failed: {0}")]
    Encode(String),
}

/// The claims of a jetq auth token (the JWT payload).
///
/// Times are seconds since the Unix epoch (JWT NumericDate; a fractional
/// value is rounded down). Other claims are ignored, except `aud`, which
/// jetq does not use: a token naming an audience is refused (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// The user's roles (absent means none).
    #[serde(default)]
    pub roles: Vec<String>,
    /// The request id the token is bound to.
    pub jetq_id: String,
    /// The task name the token is bound to.
    pub jetq_task: String,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Expiry (always present in a verified token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

/// Signs and verifies auth tokens with one [`AuthKey`].
///
/// A producer uses [`sign`](Self::sign) (and [`bearer`] for the header
/// value); a worker uses [`verify`](Self::verify) or
/// [`authorize`](Self::authorize), and, when its key can sign,
/// [`sign_child`](Self::sign_child) for the requests a task publishes.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    key: AuthKey,
    leeway: Duration,
    lifetime: Duration,
}

impl TokenAuth {
    /// Tokens signed and verified with `key`, with [`DEFAULT_LEEWAY`] and
    /// [`DEFAULT_LIFETIME`].
    pub fn new(key: AuthKey) -> Self {
        TokenAuth {
            key,
            leeway: DEFAULT_LEEWAY,
            lifetime: DEFAULT_LIFETIME,
        }
    }

    /// Set the clock skew allowed when checking `exp` and `nbf` (whole seconds).
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Set the lifetime of tokens signed without an expiry, which also caps
    /// child tokens (whole seconds).
    pub fn with_default_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The key.
    pub fn key(&self) -> &AuthKey {
        &self.key
    }

    /// The clock skew allowed.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// The lifetime of tokens signed without an expiry.
    pub fn default_lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Whether the key can sign (see [`AuthKey::can_sign`]).
    pub fn can_sign(&self) -> bool {
        self.key.can_sign()
    }

    /// Sign a token for `ctx`, bound to the request `id` and `task`. It
    /// expires at `ctx.expires_at`, or after the default lifetime when that is
    /// `None`. Returns the JWT; [`bearer`] makes the header value.
    pub fn sign(&self, ctx: &AuthContext, id: &str, task: &str) -> Result<String, SignError> {
        self.sign_at(ctx, id, task, OffsetDateTime::now_utc())
    }

    /// [`sign`](Self::sign) with `now` as the current time.
    pub fn sign_at(
        &self,
        ctx: &AuthContext,
        id: &str,
        task: &str,
        now: OffsetDateTime,
    ) -> Result<String, SignError> {
        let now = now.unix_timestamp();
        let exp = match ctx.expires_at {
            Some(at) => at.unix_timestamp(),
            None => now.saturating_add(secs(self.lifetime)),
        };
        self.encode(ctx, id, task, now, exp)
    }

    /// Sign a token for a child request published by a task running for
    /// `parent`: the same user and roles, bound to the child's id and task,
    /// expiring at the parent's expiry or after the default lifetime,
    /// whichever comes first. A child never outlives its parent; once the
    /// parent's token has expired no child token is signed
    /// ([`SignError::Expired`]).
    pub fn sign_child(
        &self,
        parent: &AuthContext,
        child_id: &str,
        child_task: &str,
    ) -> Result<String, SignError> {
        self.sign_child_at(parent, child_id, child_task, OffsetDateTime::now_utc())
    }

    /// [`sign_child`](Self::sign_child) with `now` as the current time.
    pub fn sign_child_at(
        &self,
        parent: &AuthContext,
        child_id: &str,
        child_task: &str,
        now: OffsetDateTime,
    ) -> Result<String, SignError> {
        let now = now.unix_timestamp();
        let cap = now.saturating_add(secs(self.lifetime));
        let exp = match parent.expires_at {
            Some(at) => at.unix_timestamp().min(cap),
            None => cap,
        };
        self.encode(parent, child_id, child_task, now, exp)
    }

    fn encode(
        &self,
        ctx: &AuthContext,
        id: &str,
        task: &str,
        now: i64,
        exp: i64,
    ) -> Result<String, SignError> {
        let key = self.key.encoding().ok_or(SignError::CannotSign)?;
        if ctx.user.is_empty() {
            return Err(SignError::NoUser);
        }
        if exp <= now {
            return Err(SignError::Expired(from_unix(exp)));
        }
        let claims = Claims {
            sub: ctx.user.clone(),
            roles: ctx.roles.clone(),
            jetq_id: id.to_owned(),
            jetq_task: task.to_owned(),
            iat: Some(now),
            exp: Some(exp),
            nbf: None,
        };
        let header = jsonwebtoken::Header::new(self.key.algorithm().jwt());
        jsonwebtoken::encode(&header, &claims, key).map_err(|e| SignError::Encode(e.to_string()))
    }

    /// Verify the `authorization` header value of the request `id` for
    /// `task` (`None` when the request has no such header), and return who
    /// it runs for.
    ///
    /// Checks, in order: the header (`Bearer <jwt>`), the token's algorithm
    /// (only the key's), the signature, the claims, the expiry and `nbf`
    /// (with the leeway), then the binding: the token's `jetq_id` and
    /// `jetq_task` must be `id` and `task`. Roles are not checked here: see
    /// [`authorize`](Self::authorize) or [`assumed_role`].
    pub fn verify(
        &self,
        header: Option<&str>,
        id: &str,
        task: &str,
    ) -> Result<AuthContext, AuthError> {
        self.verify_at(header, id, task, OffsetDateTime::now_utc())
    }

    /// [`verify`](Self::verify) with the request's headers.
    pub fn verify_headers(
        &self,
        headers: &BTreeMap<String, String>,
        id: &str,
        task: &str,
    ) -> Result<AuthContext, AuthError> {
        self.verify(headers.get(AUTH_HEADER).map(String::as_str), id, task)
    }

    /// [`verify`](Self::verify) with `now` as the current time.
    pub fn verify_at(
        &self,
        header: Option<&str>,
        id: &str,
        task: &str,
        now: OffsetDateTime,
    ) -> Result<AuthContext, AuthError> {
        let header = header.ok_or_else(|| {
            AuthError::new(
                AuthFailure::Missing,
                format!("the request has no {AUTH_HEADER} header"),
            )
        })?;
        let token = parse_bearer(header)?;
        self.verify_token_at(token, id, task, now)
    }

    /// Verify a bare JWT (no `Bearer` prefix) for the request `id` and `task`
    /// at `now`; see [`verify`](Self::verify).
    pub fn verify_token_at(
        &self,
        token: &str,
        id: &str,
        task: &str,
        now: OffsetDateTime,
    ) -> Result<AuthContext, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed(format!(
                "the token is longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        self.check_algorithm(token)?;

        let algorithm = self.key.algorithm();
        let mut validation = jsonwebtoken::Validation::new(algorithm.jwt());
        // Times are checked below, against `now` and with our leeway.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        // Left on: a token naming an audience is refused, since jetq uses none.
        validation.validate_aud = true;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, self.key.decoding(), &validation)
                .map_err(|e| decode_error(&e, algorithm.as_str()))?;
        let claims = parse_claims(&data.claims)?;

        let now = now.unix_timestamp();
        let leeway = secs(self.leeway);
        let exp = claims
            .exp
            .ok_or_else(|| malformed("the token has no expiry (exp)"))?;
        if now >= exp.saturating_add(leeway) {
            return Err(AuthError::new(
                AuthFailure::Expired,
                format!(
                    "the token expired at {} (leeway {leeway} s)",
                    format_time(from_unix(exp))
                ),
            ));
        }
        if let Some(nbf) = claims.nbf {
            if now.saturating_add(leeway) < nbf {
                return Err(AuthError::new(
                    AuthFailure::NotYetValid,
                    format!(
                        "the token is not valid before {} (leeway {leeway} s)",
                        format_time(from_unix(nbf))
                    ),
                ));
            }
        }
        if claims.jetq_id != id {
            return Err(AuthError::new(
                AuthFailure::WrongRequest,
                format!(
                    "the token is bound to request {:?}, not to this request {id:?}",
                    claims.jetq_id
                ),
            ));
        }
        if claims.jetq_task != task {
            return Err(AuthError::new(
                AuthFailure::WrongTask,
                format!(
                    "the token is bound to task {:?}, not to {task:?}",
                    claims.jetq_task
                ),
            ));
        }
        let expires_at = OffsetDateTime::from_unix_timestamp(exp)
            .map_err(|_| malformed("the token's expiry (exp) is out of range"))?;
        Ok(AuthContext {
            user: claims.sub,
            roles: claims.roles,
            expires_at: Some(expires_at),
        })
    }

    /// [`verify`](Self::verify), then [`assumed_role`] for a task that
    /// requires `required_roles`.
    pub fn authorize(
        &self,
        header: Option<&str>,
        id: &str,
        task: &str,
        required_roles: &[String],
    ) -> Result<VerifiedAuth, AuthError> {
        self.authorize_at(header, id, task, required_roles, OffsetDateTime::now_utc())
    }

    /// [`authorize`](Self::authorize) with `now` as the current time.
    pub fn authorize_at(
        &self,
        header: Option<&str>,
        id: &str,
        task: &str,
        required_roles: &[String],
        now: OffsetDateTime,
    ) -> Result<VerifiedAuth, AuthError> {
        let context = self.verify_at(header, id, task, now)?;
        let assumed_role = context.assume(required_roles)?;
        Ok(VerifiedAuth {
            context,
            assumed_role,
        })
    }

    /// Refuse a token whose header names another algorithm than the key's,
    /// `none` included, before anything else is looked at.
    fn check_algorithm(&self, token: &str) -> Result<(), AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed(
                "the token is not a JWT (three base64url parts separated by dots)",
            ));
        };
        let header: Map<String, Value> = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| malformed("the token's header is not base64url-encoded JSON"))?;
        let expected = self.key.algorithm().as_str();
        match header.get("alg") {
            Some(Value::String(alg)) if alg == expected => Ok(()),
            Some(Value::String(alg)) => Err(AuthError::new(
                AuthFailure::Algorithm,
                format!(
                    "the token is signed with {}; this key accepts only {expected}",
                    printable_alg(alg)
                ),
            )),
            _ => Err(malformed("the token's header has no algorithm (alg)")),
        }
    }
}

/// The `authorization` header value for a JWT: `Bearer <jwt>`.
pub fn bearer(token: &str) -> String {
    format!("{BEARER_SCHEME} {token}")
}

/// The JWT of a `Bearer <jwt>` header value.
fn parse_bearer(value: &str) -> Result<&str, AuthError> {
    let value = value.trim();
    let (scheme, token) = value.split_once(' ').ok_or_else(|| {
        malformed(format!(
            "the {AUTH_HEADER} header is not \"{BEARER_SCHEME} <token>\""
        ))
    })?;
    if !scheme.eq_ignore_ascii_case(BEARER_SCHEME) {
        return Err(malformed(format!(
            "the {AUTH_HEADER} header does not use the {BEARER_SCHEME} scheme"
        )));
    }
    let token = token.trim_start();
    if token.is_empty() {
        return Err(malformed(format!("the {AUTH_HEADER} header has no token")));
    }
    Ok(token)
}

fn malformed(message: impl Into<String>) -> AuthError {
    AuthError::new(AuthFailure::Malformed, message)
}

fn decode_error(e: &jsonwebtoken::errors::Error, expected: &str) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => AuthError::new(
            AuthFailure::BadSignature,
            "the token's signature does not match this key (tampered, or signed with another key)",
        ),
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm => AuthError::new(
            AuthFailure::Algorithm,
            format!("the token is not signed with {expected}, the only algorithm this key accepts"),
        ),
        K::InvalidAudience => {
            malformed("the token names an audience (aud), which jetq does not accept")
        }
        _ => malformed("the token is not a well-formed JWT"),
    }
}

/// The claims of a verified token, with errors that name the claim but never
/// its value.
fn parse_claims(map: &Map<String, Value>) -> Result<Claims, AuthError> {
    fn string(map: &Map<String, Value>, name: &str) -> Result<String, AuthError> {
        match map.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) => Err(malformed(format!("the token has no {name} claim"))),
            Some(_) => Err(malformed(format!(
                "the token's {name} claim is not a string"
            ))),
        }
    }
    fn date(map: &Map<String, Value>, name: &str) -> Result<Option<i64>, AuthError> {
        match map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => numeric_date(n)
                .map(Some)
                .ok_or_else(|| malformed(format!("the token's {name} claim is out of range"))),
            Some(_) => Err(malformed(format!(
                "the token's {name} claim is not a number of seconds"
            ))),
        }
    }
    let sub = string(map, claims::SUB)?;
    if sub.is_empty() {
        return Err(malformed("the token's sub claim (the user) is empty"));
    }
    let roles = match map.get(claims::ROLES) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| malformed("the token's roles claim is not an array of strings"))?,
        Some(_) => {
            return Err(malformed(
                "the token's roles claim is not an array of strings",
            ))
        }
    };
    Ok(Claims {
        sub,
        roles,
        jetq_id: string(map, claims::JETQ_ID)?,
        jetq_task: string(map, claims::JETQ_TASK)?,
        iat: date(map, claims::IAT)?,
        exp: date(map, claims::EXP)?,
        nbf: date(map, claims::NBF)?,
    })
}

/// A JWT NumericDate as whole seconds (a fraction is rounded down).
fn numeric_date(n: &serde_json::Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let f = n.as_f64()?;
    // The bounds keep the conversion exact enough and in range.
    if f.is_finite() && (-9.0e18..9.0e18).contains(&f) {
        #[allow(clippy::cast_possible_truncation)]
        Some(f.floor() as i64)
    } else {
        None
    }
}

/// An algorithm name fit for a message: the token's own, when it is short
/// and plain.
fn printable_alg(alg: &str) -> String {
    if !alg.is_empty() && alg.len() <= 16 && alg.chars().all(|c| c.is_ascii_alphanumeric()) {
        format!("\"{alg}\"")
    } else {
        "an unsupported algorithm".to_owned()
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn from_unix(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(if secs < 0 {
        OffsetDateTime::UNIX_EPOCH
    } else {
        // The largest time `time` represents without its large-dates feature.
        time::macros::datetime!(9999-12-31 23:59:59 UTC)
    })
}

fn format_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
