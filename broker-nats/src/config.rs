//! Connection and layout options.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use jetq::{Error, ErrorKind, Result};

/// Where JetStream keeps the stream and the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Storage {
    /// On disk (the default): survives server restarts.
    #[default]
    File,
    /// In memory: faster, lost when the server stops. For tests and caches.
    Memory,
}

/// How the client authenticates.
#[derive(Clone, Default)]
pub(crate) enum Auth {
    #[default]
    None,
    UserPassword(String, String),
    Token(String),
    NkeySeed(String),
    CredentialsFile(PathBuf),
}

impl fmt::Debug for Auth {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword(user, _) => write!(f, "UserPassword({user:?}, \"***\")"),
            Auth::Token(_) => f.write_str("Token(\"***\")"),
            Auth::NkeySeed(_) => f.write_str("NkeySeed(\"***\")"),
            Auth::CredentialsFile(path) => write!(f, "CredentialsFile({path:?})"),
        }
    }
}

/// Options of a [`NatsBroker`](crate::NatsBroker): how to connect, and how to
/// lay jetq out on JetStream.
///
/// ```
/// use std::time::Duration;
/// use jetq_nats::NatsConfig;
///
/// let config = NatsConfig::new("nats://a:4222,nats://b:4222")
///     .user_and_password("worker", "secret")
///     .prefix("billing")
///     .replicas(3)
///     .record_ttl(Duration::from_secs(7 * 24 * 3600));
/// assert_eq!(config.stream_name(), "BILLING_TASKS");
/// ```
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub(crate) servers: Vec<String>,
    pub(crate) auth: Auth,
    pub(crate) tls_required: bool,
    pub(crate) tls_root_ca: Option<PathBuf>,
    pub(crate) tls_client_cert: Option<(PathBuf, PathBuf)>,
    pub(crate) name: Option<String>,
    pub(crate) prefix: String,
    pub(crate) replicas: usize,
    pub(crate) record_ttl: Option<Duration>,
    pub(crate) dead_letter_ttl: Option<Duration>,
    pub(crate) duplicate_window: Duration,
    pub(crate) mail_duplicate_window: Duration,
    pub(crate) max_ack_pending: i64,
    pub(crate) storage: Storage,
    pub(crate) request_timeout: Duration,
    pub(crate) ping_interval: Duration,
    pub(crate) connection_timeout: Duration,
    pub(crate) connect_wait: Duration,
    pub(crate) publish_retry_for: Duration,
    pub(crate) watch_resync: Duration,
}

/// Default prefix of every name jetq creates on NATS.
pub const DEFAULT_PREFIX: &str = "jetq";

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: vec!["nats://127.0.0.1:4222".to_owned()],
            auth: Auth::None,
            tls_required: false,
            tls_root_ca: None,
            tls_client_cert: None,
            name: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            replicas: 1,
            record_ttl: None,
            dead_letter_ttl: None,
            duplicate_window: Duration::from_secs(120),
            mail_duplicate_window: Duration::from_secs(24 * 3600),
            max_ack_pending: 10_000,
            storage: Storage::File,
            request_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(5),
            connect_wait: Duration::ZERO,
            publish_retry_for: Duration::from_secs(20),
            watch_resync: Duration::from_secs(30),
        }
    }
}

impl NatsConfig {
    /// Options for `servers`: one URL or a comma-separated list
    /// (`nats://a:4222,nats://b:4222`); everything else has its default.
    pub fn new(servers: &str) -> Self {
        NatsConfig::default().servers(servers)
    }

    /// The servers to connect to: one URL or a comma-separated list.
    pub fn servers(mut self, servers: &str) -> Self {
        self.servers = servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        self
    }

    /// Authenticate with a user name and password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.auth = Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Authenticate with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Authenticate with an NKey seed (`SU...`).
    pub fn nkey_seed(mut self, seed: impl Into<String>) -> Self {
        self.auth = Auth::NkeySeed(seed.into());
        self
    }

    /// Authenticate with a credentials file (JWT and NKey seed, `.creds`).
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::CredentialsFile(path.into());
        self
    }

    /// Refuse to connect without TLS.
    pub fn require_tls(mut self, required: bool) -> Self {
        self.tls_required = required;
        self
    }

    /// Trust the CA certificate(s) in this PEM file for the server's certificate.
    pub fn root_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_root_ca = Some(path.into());
        self
    }

    /// Present this client certificate and key (PEM files) to the server.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_client_cert = Some((cert.into(), key.into()));
        self
    }

    /// The connection name the server shows in its monitoring (`connz`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Prefix of every name jetq creates (default `jetq`): one token of
    /// letters, digits, `-` and `_`. Applications with different prefixes
    /// share a server without seeing each other's tasks.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Replicas of the stream, the bucket and the consumers (default 1; 3 or 5 in a cluster).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// How long records are kept after their last update (default: forever).
    pub fn record_ttl(mut self, ttl: Duration) -> Self {
        self.record_ttl = Some(ttl);
        self
    }

    /// How long dead letters are kept (default: until requeued or removed).
    pub fn dead_letter_ttl(mut self, ttl: Duration) -> Self {
        self.dead_letter_ttl = Some(ttl);
        self
    }

    /// Window in which the server drops a second request with the same id (default 2 min).
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Window in which a second message sent to a workflow with the same
    /// idempotency key is dropped (default 24 h; at most the record TTL).
    pub fn mail_duplicate_window(mut self, window: Duration) -> Self {
        self.mail_duplicate_window = window;
        self
    }

    /// Most deliveries of one queue that may be unacknowledged at once, across
    /// all workers (default 10 000).
    pub fn max_ack_pending(mut self, max: i64) -> Self {
        self.max_ack_pending = max;
        self
    }

    /// Storage of the stream and the bucket (default [`Storage::File`]).
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// Timeout of one JetStream API request and of acknowledgements (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Interval of the client's pings, which detect a dead server (default 5 s).
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Timeout of establishing one connection (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long [`NatsBroker::connect_with`](crate::NatsBroker::connect_with)
    /// keeps trying to reach a server that is down or unreachable before it
    /// fails (default zero: it fails at once). While it waits it retries with
    /// a backoff of 0.5 s doubling up to 5 s, and logs a warning on every
    /// failed try. Refused credentials, TLS failures and bad addresses fail at
    /// once. For a worker started together with its server (a service manager,
    /// containers): it waits instead of exiting. Once connected, the client
    /// reconnects by itself whatever this says.
    pub fn connect_wait(mut self, wait: Duration) -> Self {
        self.connect_wait = wait;
        self
    }

    /// How long a publish keeps retrying transient failures (server restart,
    /// leader election) before it fails (default 20 s).
    pub fn publish_retry_for(mut self, duration: Duration) -> Self {
        self.publish_retry_for = duration;
        self
    }

    /// How often a record watch re-reads the record in case an update
    /// notification was lost (default 30 s). Reconnects trigger a re-read too.
    pub fn watch_resync(mut self, interval: Duration) -> Self {
        self.watch_resync = interval;
        self
    }

    /// The configured prefix.
    pub fn prefix_str(&self) -> &str {
        &self.prefix
    }

    /// Name of the task stream: `{PREFIX}_TASKS`.
    pub fn stream_name(&self) -> String {
        format!("{}_TASKS", self.prefix.to_uppercase())
    }

    /// Name of the dead-letter stream: `{PREFIX}_DEAD`.
    pub fn dead_stream_name(&self) -> String {
        format!("{}_DEAD", self.prefix.to_uppercase())
    }

    /// Name of the stream of workflow mailboxes: `{PREFIX}_MAIL`.
    pub fn mail_stream_name(&self) -> String {
        format!("{}_MAIL", self.prefix.to_uppercase())
    }

    /// Name of the record bucket: `{PREFIX}_RESULTS`.
    pub fn bucket_name(&self) -> String {
        format!("{}_RESULTS", self.prefix.to_uppercase())
    }

    /// Check the options; every problem is an [`ErrorKind::Config`] error.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::new(ErrorKind::Config, msg));
        if self.prefix.is_empty()
            || self.prefix.len() > 32
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "prefix {:?} is invalid: use 1 to 32 letters, digits, `-` or `_` (one subject token)",
                self.prefix
            ));
        }
        if self.servers.is_empty() {
            return bad(
                "no NATS server given: pass a URL such as nats://127.0.0.1:4222".to_owned(),
            );
        }
        if !(1..=5).contains(&self.replicas) {
            return bad(format!(
                "replicas must be between 1 and 5, not {}",
                self.replicas
            ));
        }
        if self.max_ack_pending < 1 {
            return bad(format!(
                "max_ack_pending must be at least 1, not {}",
                self.max_ack_pending
            ));
        }
        if self.duplicate_window.is_zero() {
            return bad("duplicate_window must be longer than zero; it is what makes publishing with an id idempotent".to_owned());
        }
        if let Some(ttl) = self.record_ttl {
            if ttl < Duration::from_secs(1) {
                return bad(format!(
                    "record_ttl of {ttl:?} is too short; use at least one second"
                ));
            }
        }
        for (what, d) in [
            ("request_timeout", self.request_timeout),
            ("ping_interval", self.ping_interval),
            ("connection_timeout", self.connection_timeout),
            ("watch_resync", self.watch_resync),
        ] {
            if d.is_zero() {
                return bad(format!("{what} must be longer than zero"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_and_validation() {
        let c = NatsConfig::new(" nats://a:1 , nats://b:2,");
        assert_eq!(c.servers, ["nats://a:1", "nats://b:2"]);
        assert_eq!(c.stream_name(), "JETQ_TASKS");
        assert_eq!(c.bucket_name(), "JETQ_RESULTS");
        assert!(c.validate().is_ok());
        for bad in ["", "a.b", "a*", ">", "a b"] {
            let err = NatsConfig::default().prefix(bad).validate().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{bad:?}");
        }
        assert!(NatsConfig::default().replicas(0).validate().is_err());
        assert!(NatsConfig::default().max_ack_pending(0).validate().is_err());
        assert!(NatsConfig::new("").validate().is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let c = NatsConfig::default().user_and_password("u", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = NatsConfig::default().token("tok-secret");
        assert!(!format!("{c:?}").contains("tok-secret"));
    }
}
