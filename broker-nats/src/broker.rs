//! [`NatsBroker`]: provisioning, publishing, consuming and records.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::header::{
    HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID, NATS_SCHEDULE, NATS_SCHEDULE_TARGET,
};
use async_nats::jetstream::context::{
    CreateKeyValueErrorKind, CreateStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    self, ConsumerCreateStrictErrorKind, DirectGetErrorKind, LastRawMessageErrorKind,
};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, consumer};
use async_nats::{
    Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr, ServerError, Subscriber,
};
use bytes::Bytes;
use futures_util::StreamExt;
use jetq::broker::{
    BoxFuture, BoxStream, Broker, ConsumeOptions, Consumer, Followed, Mail, Notification,
    Notifications, OutgoingRequest, PublishAck, RecordEntry,
};
use jetq::names::{validate_id, validate_queue, validate_task};
use jetq::time::format_description::well_known::Rfc3339;
use jetq::time::OffsetDateTime;
use jetq::{DeadLetter, Error, ErrorInfo, ErrorKind, Result};
use tokio::sync::{watch, OnceCell};

use crate::acks::Acks;
use crate::config::{Auth, NatsConfig, Storage};
use crate::consumer::NatsConsumer;
use crate::error::{
    is_transient_code, jetstream_code, lookup_failure, management, no_jetstream, record, wrap,
    Lookup,
};
use crate::reader::{read_entry, RecordReader};
use crate::write::{publish_acked, write_expecting, WriteFailure};

/// What a publish is and which stream takes it, for its error message
/// (computed only when the publish fails).
type Describe<'a> = dyn Fn() -> (String, String) + Send + Sync + 'a;

/// The headers of a publish, for each of its attempts.
enum AttemptHeaders<'a> {
    /// The same headers, copied for every attempt.
    Kept(HeaderMap),
    /// The headers for the first attempt, and how to build them again for
    /// the next.
    Rebuilt(
        Option<HeaderMap>,
        &'a (dyn Fn() -> Result<HeaderMap> + Sync),
    ),
}

impl AttemptHeaders<'_> {
    /// The headers of the next attempt.
    fn next(&mut self) -> Result<HeaderMap> {
        match self {
            AttemptHeaders::Kept(headers) => Ok(headers.clone()),
            AttemptHeaders::Rebuilt(first, again) => match first.take() {
                Some(headers) => Ok(headers),
                None => again(),
            },
        }
    }
}

// Headers of a dead letter (its payload is the original request).
const DEAD_QUEUE: &str = "Jetq-Queue";
const DEAD_TASK: &str = "Jetq-Task";
const DEAD_KIND: &str = "Jetq-Error-Kind";
const DEAD_REASON: &str = "Jetq-Error";
const DEAD_ATTEMPTS: &str = "Jetq-Attempts";
const DEAD_AT: &str = "Jetq-Died-At";
const DEAD_WORKER: &str = "Jetq-Worker";
const DEAD_SEQUENCE: &str = "Jetq-Sequence";
/// On a dead letter stored without its request (it did not fit): the size
/// of the request left out, in bytes.
const DEAD_OMITTED: &str = "Jetq-Payload-Omitted";

/// Longest header value jetq writes (a reason is cut there).
const MAX_HEADER_VALUE: usize = 2048;

/// A header value without line breaks or other control characters, cut to
/// [`MAX_HEADER_VALUE`] bytes.
fn header_safe(value: &str) -> String {
    let mut out: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_HEADER_VALUE {
        let mut end = MAX_HEADER_VALUE;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// The jetq broker on NATS JetStream. Cheap to clone: clones share one
/// connection and one provisioning cache.
///
/// See the [crate documentation](crate) for the layout it creates.
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    js: jetstream::Context,
    config: NatsConfig,
    tasks: OnceCell<stream::Stream>,
    bucket: OnceCell<kv::Store>,
    dead: OnceCell<stream::Stream>,
    /// The bucket and the dead-letter stream opened for reading only (never
    /// created): set once they were found to exist.
    read_bucket: OnceCell<kv::Store>,
    read_dead: OnceCell<stream::Stream>,
    /// The stream of workflow mailboxes, created on the first send, and
    /// opened for reading only.
    mail: OnceCell<stream::Stream>,
    read_mail: OnceCell<stream::Stream>,
    queues: Mutex<HashSet<String>>,
    /// Counts (re)connections when the broker made the connection itself.
    reconnects: Option<watch::Receiver<u64>>,
    /// The connection's inbox prefix (`_INBOX` unless configured): record
    /// notifications go only to subjects right under it.
    inbox_prefix: String,
    /// Reads of the record bucket, gathered into batches.
    reader: std::sync::OnceLock<RecordReader>,
    /// Publishes waiting for their acknowledgement.
    acks: OnceCell<Acks>,
    /// Task subjects, by queue and task.
    task_subjects: KeptSubjects,
    /// The subjects of the inboxes records are sent to (one per producer
    /// connection), by inbox prefix and token.
    inbox_subjects: KeptSubjects,
    /// Set once the server refused a subscription to a record's subject
    /// (the user may not subscribe there): records are no longer followed,
    /// rather than be refused (and logged by the server) once per wait.
    follow_denied: Arc<std::sync::atomic::AtomicBool>,
}

/// Subjects built (and checked) once, by two names: a clone of one is a
/// reference count, a subject built for each publish two allocations. At
/// most [`KeptSubjects::MAX`] are kept; all are forgotten when there would
/// be more, so that names seen once do not stay for ever.
#[derive(Default)]
struct KeptSubjects(Mutex<HashMap<String, HashMap<String, async_nats::Subject>>>);

impl KeptSubjects {
    const MAX: usize = 1024;

    /// The subject kept for `outer` and `inner`, or the one `build` makes
    /// (kept if it is made).
    fn get_or_build(
        &self,
        outer: &str,
        inner: &str,
        build: impl FnOnce() -> Result<async_nats::Subject>,
    ) -> Result<async_nats::Subject> {
        let kept = self.0.lock().ok().and_then(|subjects| {
            subjects
                .get(outer)
                .and_then(|inners| inners.get(inner))
                .cloned()
        });
        if let Some(subject) = kept {
            return Ok(subject);
        }
        let subject = build()?;
        if let Ok(mut subjects) = self.0.lock() {
            if subjects.values().map(HashMap::len).sum::<usize>() >= Self::MAX {
                subjects.clear();
            }
            subjects
                .entry(outer.to_owned())
                .or_default()
                .insert(inner.to_owned(), subject.clone());
        }
        Ok(subject)
    }
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("servers", &self.inner.config.servers)
            .field("prefix", &self.inner.config.prefix)
            .field("state", &self.inner.client.connection_state())
            .finish_non_exhaustive()
    }
}

fn connect_error(servers: &[String], err: async_nats::ConnectError) -> Error {
    let servers = servers.join(",");
    let (kind, message) = match err.kind() {
        ConnectErrorKind::AuthorizationViolation => (
            ErrorKind::Broker,
            format!("NATS server {servers} refused the credentials (authorization violation); check the user and password, token, NKey or credentials file"),
        ),
        ConnectErrorKind::Authentication => (
            ErrorKind::Config,
            format!("cannot authenticate to NATS server {servers}: the NKey seed or credentials file is invalid"),
        ),
        ConnectErrorKind::TimedOut => (
            ErrorKind::Timeout,
            format!("connecting to NATS server {servers} timed out; check the address and that the server is up"),
        ),
        ConnectErrorKind::Tls => (
            ErrorKind::Config,
            format!("TLS setup for NATS server {servers} failed; check the CA, certificate and key files and whether the server speaks TLS"),
        ),
        // async-nats reports a failed handshake (untrusted server certificate,
        // missing or refused client certificate) as an I/O error.
        ConnectErrorKind::Io if is_tls_failure(&err) => (
            ErrorKind::Config,
            format!("TLS handshake with NATS server {servers} failed; check the CA (root_ca), the client certificate and key, and the server's TLS settings"),
        ),
        ConnectErrorKind::ServerParse => (
            ErrorKind::Config,
            format!("invalid NATS server address {servers:?}; use URLs like nats://host:4222"),
        ),
        ConnectErrorKind::Dns => (
            ErrorKind::Broker,
            format!("cannot resolve the NATS server address {servers}"),
        ),
        _ => (
            ErrorKind::Broker,
            format!("cannot connect to NATS server {servers}; check the address and that the server is up"),
        ),
    };
    wrap(kind, message, err)
}

/// Whether `err` says the server could not be reached (down, refusing
/// connections, not answering, its name not resolving), which may pass;
/// unlike refused credentials, TLS failures and bad addresses.
fn is_unreachable(err: &async_nats::ConnectError) -> bool {
    match err.kind() {
        ConnectErrorKind::Io => !is_tls_failure(err),
        ConnectErrorKind::TimedOut | ConnectErrorKind::Dns => true,
        _ => false,
    }
}

/// `1s`, `0.5s`, `57s`: a duration for a log line, to a tenth of a second.
fn seconds_text(d: Duration) -> String {
    let text = format!("{:.1}", d.as_secs_f64());
    format!("{}s", text.strip_suffix(".0").unwrap_or(&text))
}

/// Whether a rustls error is among the causes of `err`.
fn is_tls_failure(err: &async_nats::ConnectError) -> bool {
    let mut cur = std::error::Error::source(err);
    while let Some(e) = cur {
        // `io::Error::source` skips the error it wraps: look inside explicitly.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        if e.is::<async_nats::rustls::Error>()
            || inner.is_some_and(|i| i.is::<async_nats::rustls::Error>())
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A message larger than the server accepts, naming its limit and `why`.
pub(crate) fn too_large(client: &Client, why: &dyn std::fmt::Display) -> Error {
    let max = client.server_info().max_payload;
    Error::new(
        ErrorKind::PayloadTooLarge,
        format!(
            "the message is larger than the NATS server accepts (max_payload is {max} bytes): {why}; pass large data by reference (e.g. an object store key) or raise max_payload on the server"
        ),
    )
}

pub(crate) fn payload_too_large(
    client: &Client,
    err: &(dyn std::error::Error + 'static),
) -> Option<Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        let exceeded = e
            .downcast_ref::<PublishError>()
            .is_some_and(|p| p.kind() == PublishErrorKind::MaxPayloadExceeded)
            || e.downcast_ref::<async_nats::jetstream::Error>()
                .is_some_and(|js| js.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM);
        if exceeded {
            return Some(too_large(client, e));
        }
        cur = e.source();
    }
    None
}

impl NatsBroker {
    /// Connect to `url` (one URL or a comma-separated list) with default options.
    pub async fn connect(url: &str) -> Result<NatsBroker> {
        Self::connect_with(NatsConfig::new(url)).await
    }

    /// Connect with the given options.
    pub async fn connect_with(config: NatsConfig) -> Result<NatsBroker> {
        config.validate()?;
        let mut addrs = Vec::with_capacity(config.servers.len());
        for server in &config.servers {
            let addr = ServerAddr::from_str(server).map_err(|e| {
                wrap(
                    ErrorKind::Config,
                    format!(
                        "invalid NATS server address {server:?}; use URLs like nats://host:4222"
                    ),
                    e,
                )
            })?;
            addrs.push(addr);
        }
        let mut options = match &config.auth {
            Auth::CredentialsFile(path) => ConnectOptions::with_credentials_file(path.clone())
                .await
                .map_err(|e| {
                    wrap(
                        ErrorKind::Config,
                        format!("cannot read the NATS credentials file {}", path.display()),
                        e,
                    )
                })?,
            _ => ConnectOptions::new(),
        };
        options = match &config.auth {
            Auth::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.clone())
            }
            Auth::Token(token) => options.token(token.clone()),
            Auth::NkeySeed(seed) => options.nkey(seed.clone()),
            Auth::None | Auth::CredentialsFile(_) => options,
        };
        if config.tls_required {
            options = options.require_tls(true);
        }
        if let Some(ca) = &config.tls_root_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &config.tls_client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(name) = &config.name {
            options = options.name(name);
        }
        let (tx, rx) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let follow_denied = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let denied = Arc::clone(&follow_denied);
        let records = format!("{}.records.", config.prefix);
        options = options
            .ping_interval(config.ping_interval)
            .connection_timeout(config.connection_timeout)
            .request_timeout(Some(config.request_timeout))
            .event_callback(move |event| {
                let tx = Arc::clone(&tx);
                let refused_follow = matches!(&event, Event::ServerError(ServerError::Other(text))
                    if text.contains("Permissions Violation for Subscription") && text.contains(records.as_str()));
                if refused_follow {
                    denied.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                async move {
                    match event {
                        Event::Connected => {
                            tracing::info!("connected to NATS");
                            tx.send_modify(|n| *n += 1);
                        }
                        Event::Disconnected => {
                            tracing::warn!("disconnected from NATS; reconnecting")
                        }
                        Event::SlowConsumer(sid) => {
                            tracing::warn!(sid, "NATS slow consumer: messages were dropped")
                        }
                        // async-nats logs these itself at info; repeat them only at debug.
                        other => tracing::debug!(event = %other, "NATS connection event"),
                    }
                }
            });
        let client = Self::connect_waiting(&config, options, addrs).await?;
        Ok(Self::build(client, config, Some(rx), follow_denied))
    }

    /// Connect; while the server cannot be reached, try again with a capped
    /// backoff until [`connect_wait`](NatsConfig::connect_wait) has passed,
    /// logging each failed try.
    async fn connect_waiting(
        config: &NatsConfig,
        options: ConnectOptions,
        addrs: Vec<ServerAddr>,
    ) -> Result<Client> {
        let deadline = tokio::time::Instant::now() + config.connect_wait;
        let mut delay = Duration::from_millis(500);
        loop {
            let err = match options.clone().connect(addrs.clone()).await {
                Ok(client) => return Ok(client),
                Err(err) => err,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !is_unreachable(&err) {
                return Err(connect_error(&config.servers, err));
            }
            let pause = delay.min(left);
            tracing::warn!(
                "NATS server {} not reachable ({err}); retrying in {}, giving up in {}",
                config.servers.join(","),
                seconds_text(pause),
                seconds_text(left),
            );
            tokio::time::sleep(pause).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Use a client you already have. Its connection options (timeouts,
    /// auth, TLS, ping interval) are yours; the server, auth and TLS options
    /// of `config` are ignored. The broker cannot see this client's
    /// reconnections, so record watches re-read only every
    /// [`watch_resync`](NatsConfig::watch_resync) rather than on reconnect.
    pub fn from_client(client: Client, config: NatsConfig) -> Result<NatsBroker> {
        config.validate()?;
        Ok(Self::build(client, config, None, Arc::default()))
    }

    fn build(
        client: Client,
        config: NatsConfig,
        reconnects: Option<watch::Receiver<u64>>,
        follow_denied: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.request_timeout);
        let inbox_prefix = client
            .new_inbox()
            .rsplit_once('.')
            .map(|(prefix, _)| prefix.to_owned())
            .unwrap_or_else(|| "_INBOX".to_owned());
        NatsBroker {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                tasks: OnceCell::new(),
                bucket: OnceCell::new(),
                dead: OnceCell::new(),
                read_bucket: OnceCell::new(),
                read_dead: OnceCell::new(),
                mail: OnceCell::new(),
                read_mail: OnceCell::new(),
                queues: Mutex::new(HashSet::new()),
                reconnects,
                inbox_prefix,
                reader: std::sync::OnceLock::new(),
                acks: OnceCell::new(),
                task_subjects: KeptSubjects::default(),
                inbox_subjects: KeptSubjects::default(),
                follow_denied,
            }),
        }
    }

    /// The underlying NATS client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The options the broker runs with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The prefix of every name the broker uses (default `jetq`).
    pub fn prefix(&self) -> &str {
        &self.inner.config.prefix
    }

    /// Name of the task stream (`{PREFIX}_TASKS`).
    pub fn stream_name(&self) -> String {
        self.inner.config.stream_name()
    }

    /// Name of the record bucket (`{PREFIX}_RESULTS`).
    pub fn bucket_name(&self) -> String {
        self.inner.config.bucket_name()
    }

    /// Name of a queue's durable consumer (`{prefix}-{queue}`).
    pub fn consumer_name(&self, queue: &str) -> Result<String> {
        validate_queue(queue)?;
        Ok(format!("{}-{queue}", self.inner.config.prefix))
    }

    /// Subject a request for `task` on `queue` is published on
    /// (`{prefix}.tasks.{queue}.{task}`).
    pub fn task_subject(&self, queue: &str, task: &str) -> Result<String> {
        validate_queue(queue)?;
        validate_task(task)?;
        // Built by hand: this runs for every request, and `format!` is slower.
        let prefix = &self.inner.config.prefix;
        let mut subject = String::with_capacity(prefix.len() + queue.len() + task.len() + 8);
        for part in [prefix.as_str(), ".tasks.", queue, ".", task] {
            subject.push_str(part);
        }
        Ok(subject)
    }

    /// [`task_subject`](Self::task_subject), built once per queue and task.
    fn task_subject_kept(&self, queue: &str, task: &str) -> Result<async_nats::Subject> {
        self.inner.task_subjects.get_or_build(queue, task, || {
            Ok(async_nats::Subject::from(self.task_subject(queue, task)?))
        })
    }

    /// Subject on which the server republishes every committed change of a
    /// record (`{prefix}.records.{id}`), with its revision in `Nats-Sequence`.
    pub fn record_subject(&self, id: &str) -> Result<String> {
        validate_id(id)?;
        Ok(format!("{}.records.{id}", self.inner.config.prefix))
    }

    fn storage(&self) -> stream::StorageType {
        match self.inner.config.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        }
    }

    fn stream_config(&self) -> stream::Config {
        let c = &self.inner.config;
        stream::Config {
            name: c.stream_name(),
            description: Some("jetq task requests".to_owned()),
            // Delayed requests wait as message schedules on `{p}.delayed.{id}`;
            // the server publishes each to its task subject when due. No
            // consumer filters them, so work-queue retention keeps them.
            subjects: vec![
                format!("{}.tasks.>", c.prefix),
                format!("{}.delayed.>", c.prefix),
            ],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: self.storage(),
            num_replicas: c.replicas,
            duplicate_window: c.duplicate_window,
            allow_message_schedules: true,
            ..Default::default()
        }
    }

    fn dead_stream_config(&self) -> stream::Config {
        let c = &self.inner.config;
        stream::Config {
            name: c.dead_stream_name(),
            description: Some("jetq dead letters".to_owned()),
            subjects: vec![format!("{}.dead.>", c.prefix)],
            retention: stream::RetentionPolicy::Limits,
            storage: self.storage(),
            num_replicas: c.replicas,
            duplicate_window: c.duplicate_window,
            max_age: c.dead_letter_ttl.unwrap_or_default(),
            allow_direct: true,
            ..Default::default()
        }
    }

    fn mail_stream_config(&self) -> stream::Config {
        let c = &self.inner.config;
        let max_age = c.record_ttl.unwrap_or_default();
        let mut duplicate_window = c.mail_duplicate_window;
        if !max_age.is_zero() {
            duplicate_window = duplicate_window.min(max_age);
        }
        stream::Config {
            name: c.mail_stream_name(),
            description: Some("jetq workflow mailboxes".to_owned()),
            subjects: vec![format!("{}.mail.>", c.prefix)],
            retention: stream::RetentionPolicy::Limits,
            storage: self.storage(),
            num_replicas: c.replicas,
            duplicate_window,
            max_age,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// Subject of the mailbox of workflow `id` for `topic`
    /// (`{prefix}.mail.{id}.{topic}`, `_` for messages without a topic).
    pub fn mail_subject(&self, id: &str, topic: Option<&str>) -> Result<String> {
        validate_id(id)?;
        let token = jetq::names::topic_token(topic)?;
        Ok(format!("{}.mail.{id}.{token}", self.inner.config.prefix))
    }

    /// Subject of request `id`'s dead letters (`{prefix}.dead.{id}`).
    pub fn dead_letter_subject(&self, id: &str) -> Result<String> {
        validate_id(id)?;
        Ok(format!("{}.dead.{id}", self.inner.config.prefix))
    }

    /// Subject a delayed request waits on as a message schedule
    /// (`{prefix}.delayed.{id}`).
    pub fn delayed_subject(&self, id: &str) -> Result<String> {
        validate_id(id)?;
        Ok(format!("{}.delayed.{id}", self.inner.config.prefix))
    }

    /// Subject of cancellation signals for request `id` (`{prefix}.cancel.{id}`).
    pub fn cancel_subject(&self, id: &str) -> Result<String> {
        validate_id(id)?;
        Ok(format!("{}.cancel.{id}", self.inner.config.prefix))
    }

    fn bucket_config(&self) -> kv::Config {
        let c = &self.inner.config;
        let bucket = c.bucket_name();
        kv::Config {
            description: "jetq task records".to_owned(),
            history: 1,
            max_age: c.record_ttl.unwrap_or_default(),
            storage: self.storage(),
            num_replicas: c.replicas,
            // Committed changes are republished with their revision, which
            // `watch_record` follows without a server-side consumer per watch.
            republish: Some(stream::Republish {
                source: format!("$KV.{bucket}.>"),
                destination: format!("{}.records.>", c.prefix),
                headers_only: false,
            }),
            bucket,
            ..Default::default()
        }
    }

    fn consumer_config(
        &self,
        queue: &str,
        options: &ConsumeOptions,
    ) -> Result<consumer::pull::Config> {
        let c = &self.inner.config;
        let max_deliver = match options.max_deliver {
            None => -1,
            Some(n) if n >= 1 => n,
            Some(n) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("max_deliver must be at least 1 (or None for unlimited), not {n}"),
                ))
            }
        };
        if options.ack_wait < Duration::from_millis(100) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "ack_wait of {:?} is too short; use at least 100 ms",
                    options.ack_wait
                ),
            ));
        }
        Ok(consumer::pull::Config {
            durable_name: Some(format!("{}-{queue}", c.prefix)),
            description: Some(format!("jetq queue {queue}")),
            filter_subject: format!("{}.tasks.{queue}.>", c.prefix),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            max_deliver,
            max_ack_pending: c.max_ack_pending,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
    }

    /// The task stream, created once per broker (idempotent across processes).
    async fn ensure_stream(&self) -> Result<&stream::Stream> {
        if let Some(stream) = self.inner.tasks.get() {
            return Ok(stream);
        }
        // Boxed, as every first-use path here: the futures that use these
        // lookups on every request keep only a pointer to it.
        Box::pin(
            self.inner.tasks.get_or_try_init(|| {
                self.create_or_update_stream(self.stream_config(), "task stream")
            }),
        )
        .await
    }

    /// The dead-letter stream, created once per broker.
    async fn dead_stream(&self) -> Result<&stream::Stream> {
        if let Some(stream) = self.inner.dead.get() {
            return Ok(stream);
        }
        Box::pin(self.inner.dead.get_or_try_init(|| {
            self.create_or_update_stream(self.dead_stream_config(), "dead-letter stream")
        }))
        .await
    }

    async fn mail_stream(&self) -> Result<&stream::Stream> {
        if let Some(stream) = self.inner.mail.get() {
            return Ok(stream);
        }
        Box::pin(self.inner.mail.get_or_try_init(|| {
            self.create_or_update_stream(self.mail_stream_config(), "mailbox stream")
        }))
        .await
    }

    /// The mailbox stream for reading, as [`existing_bucket`](Self::existing_bucket).
    async fn existing_mail_stream(&self) -> Result<Option<&stream::Stream>> {
        let name = self.inner.config.mail_stream_name();
        self.existing_stream(
            &self.inner.mail,
            &self.inner.read_mail,
            name,
            "mailbox stream",
        )
        .await
    }

    /// Create the stream `config` describes, or bring one that exists with
    /// other settings (a changed duplicate window or replica count) to them;
    /// `what` names it in errors.
    async fn create_or_update_stream(
        &self,
        config: stream::Config,
        what: &str,
    ) -> Result<stream::Stream> {
        let name = config.name.clone();
        let subjects = config.subjects.join(", ");
        match self.inner.js.create_stream(config.clone()).await {
            Ok(stream) => Ok(stream),
            Err(err) if jetstream_code(&err) == Some(ErrorCode::STREAM_NAME_EXIST) => {
                tracing::info!(stream = %name, "updating the {what} to the configured settings");
                self.inner.js.update_stream(config).await.map_err(|e| {
                    wrap(
                        ErrorKind::Config,
                        format!("stream {name} exists with settings jetq cannot change to its own (e.g. another retention policy); delete the stream or choose another prefix"),
                        e,
                    )
                })?;
                self.inner
                    .js
                    .get_stream(&name)
                    .await
                    .map_err(|e| management(format!("cannot open the {what} {name}"), e))
            }
            Err(err) if jetstream_code(&err) == Some(ErrorCode::STREAM_SUBJECT_OVERLAP) => Err(wrap(
                ErrorKind::Config,
                format!("cannot create the {what} {name}: another stream already captures subjects {subjects}; choose another prefix"),
                err,
            )),
            Err(err) if err.kind() == CreateStreamErrorKind::JetStreamUnavailable => Err(wrap(
                ErrorKind::Broker,
                format!("cannot create the {what} {name}: JetStream does not answer; enable it on the server (nats-server -js) and check the account's JetStream limits"),
                err,
            )),
            Err(err) => Err(management(format!("cannot create the {what} {name}"), err)),
        }
    }

    /// Provision with `provision` until it succeeds or `deadline` passes,
    /// riding out a server that is (re)starting; a configuration error is
    /// returned at once.
    async fn provision_retrying<'a, T, F, Fut>(
        what: &str,
        deadline: tokio::time::Instant,
        mut provision: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>> + 'a,
    {
        let mut delay = Duration::from_millis(50);
        loop {
            match provision().await {
                Ok(done) => return Ok(done),
                Err(err)
                    if err.kind() != ErrorKind::Config
                        && tokio::time::Instant::now() + delay <= deadline =>
                {
                    tracing::debug!(error = %err, ?delay, "creating the {what} failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// The record bucket for reading: the one this broker created, else the
    /// existing one opened without creating it; `None` if there is none
    /// yet. Reads have no side effects on the server.
    async fn existing_bucket(&self) -> Result<Option<&kv::Store>> {
        if let Some(store) = self.inner.bucket.get() {
            return Ok(Some(store));
        }
        if let Some(store) = self.inner.read_bucket.get() {
            return Ok(Some(store));
        }
        let name = self.bucket_name();
        match Box::pin(self.inner.js.get_key_value(name.as_str())).await {
            Ok(store) => {
                // Only a bucket that exists is remembered: a later write
                // still creates (or updates) it.
                let _ = self.inner.read_bucket.set(store);
                Ok(self.inner.read_bucket.get())
            }
            Err(err) => match lookup_failure(&err) {
                Lookup::Missing => Ok(None),
                Lookup::NoJetStream => Err(no_jetstream(&self.inner.config, err)),
                Lookup::Other => Err(record(format!("cannot open the record bucket {name}"), err)),
            },
        }
    }

    /// The dead-letter stream for reading, as [`existing_bucket`](Self::existing_bucket).
    async fn existing_dead_stream(&self) -> Result<Option<&stream::Stream>> {
        let name = self.inner.config.dead_stream_name();
        self.existing_stream(
            &self.inner.dead,
            &self.inner.read_dead,
            name,
            "dead-letter stream",
        )
        .await
    }

    /// A stream for reading: the one this broker created (`created`), else
    /// the existing one named `name`, opened without creating it and kept in
    /// `opened`; `None` if there is none yet. `what` names it in errors.
    async fn existing_stream<'a>(
        &self,
        created: &'a OnceCell<stream::Stream>,
        opened: &'a OnceCell<stream::Stream>,
        name: String,
        what: &str,
    ) -> Result<Option<&'a stream::Stream>> {
        if let Some(stream) = created.get().or_else(|| opened.get()) {
            return Ok(Some(stream));
        }
        match Box::pin(self.inner.js.get_stream(name.as_str())).await {
            Ok(stream) => {
                let _ = opened.set(stream);
                Ok(opened.get())
            }
            Err(err) => match lookup_failure(&err) {
                Lookup::Missing => Ok(None),
                Lookup::NoJetStream => Err(no_jetstream(&self.inner.config, err)),
                Lookup::Other => Err(record(format!("cannot open the {what} {name}"), err)),
            },
        }
    }

    /// The record bucket, created once per broker.
    async fn bucket(&self) -> Result<&kv::Store> {
        if let Some(store) = self.inner.bucket.get() {
            return Ok(store);
        }
        Box::pin(
            self.inner
                .bucket
                .get_or_try_init(|| self.provision_bucket()),
        )
        .await
    }

    async fn provision_bucket(&self) -> Result<kv::Store> {
        let config = self.bucket_config();
        let name = config.bucket.clone();
        match self.inner.js.create_key_value(config.clone()).await {
            Ok(store) => Ok(store),
            Err(err)
                if err.kind() == CreateKeyValueErrorKind::BucketCreate
                    && jetstream_code(&err) == Some(ErrorCode::STREAM_NAME_EXIST) =>
            {
                tracing::info!(bucket = %name, "updating the record bucket to the configured settings");
                self.inner.js.update_key_value(config).await.map_err(|e| {
                    wrap(
                        ErrorKind::Config,
                        format!("bucket {name} exists with settings jetq cannot change to its own; delete the bucket or choose another prefix"),
                        e,
                    )
                })
            }
            Err(err) => Err(management(
                format!("cannot create the record bucket {name}"),
                err,
            )),
        }
    }

    /// Create the queue's consumer unless it exists (its settings are left alone).
    async fn ensure_consumer(&self, queue: &str) -> Result<()> {
        let config = self.consumer_config(queue, &ConsumeOptions::new("provisioning"))?;
        let name = config.durable_name.clone().unwrap_or_default();
        match self
            .inner
            .js
            .create_consumer_strict_on_stream(config, self.stream_name())
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if err.kind() == ConsumerCreateStrictErrorKind::AlreadyExists => Ok(()),
            Err(err) if jetstream_code(&err) == Some(ErrorCode::CONSUMER_NAME_EXIST) => Ok(()),
            Err(err) => Err(management(format!("cannot create consumer {name}"), err)),
        }
    }

    fn mark_queue(&self, queue: &str) {
        if let Ok(mut queues) = self.inner.queues.lock() {
            queues.insert(queue.to_owned());
        }
    }

    fn queue_ready(&self, queue: &str) -> bool {
        self.inner
            .queues
            .lock()
            .map(|q| q.contains(queue))
            .unwrap_or(false)
    }

    fn headers(request: &OutgoingRequest) -> Result<HeaderMap> {
        let mut headers = HeaderMap::new();
        for (name, value) in &request.headers {
            if name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-") {
                return Err(Error::new(
                    ErrorKind::InvalidName,
                    format!("header {name:?} is reserved for NATS; use another name"),
                ));
            }
            let header = HeaderName::from_str(name).map_err(|e| {
                wrap(
                    ErrorKind::InvalidName,
                    format!("invalid header name {name:?}"),
                    e,
                )
            })?;
            let value = HeaderValue::from_str(value).map_err(|e| {
                wrap(
                    ErrorKind::InvalidName,
                    format!("invalid value for header {name:?} (no line breaks allowed)"),
                    e,
                )
            })?;
            headers.append(header, value);
        }
        let id = HeaderValue::from_str(request.dedup_key())
            .map_err(|e| wrap(ErrorKind::InvalidName, "invalid deduplication key", e))?;
        headers.insert(NATS_MESSAGE_ID, id);
        Ok(headers)
    }

    /// `request` is boxed: this future keeps its argument (and a copy of
    /// it), and below 1 KiB it is a small allocation.
    async fn publish_impl(&self, request: Box<OutgoingRequest>) -> Result<PublishAck> {
        validate_id(&request.id)?;
        let now = OffsetDateTime::now_utc();
        let (subject, headers) = self.routed(&request, now)?;
        let deadline = tokio::time::Instant::now() + self.inner.config.publish_retry_for;
        // First use: create the stream, riding out a server that is (re)starting.
        if self.inner.tasks.get().is_none() {
            Box::pin(Self::provision_retrying("task stream", deadline, || {
                self.ensure_stream()
            }))
            .await?;
        }
        // A retry builds the headers again (as of the same `now`): cheaper
        // than a copy for every first attempt.
        let again = || self.routed(&request, now).map(|(_, headers)| headers);
        self.publish_retrying(
            subject,
            AttemptHeaders::Rebuilt(Some(headers), &again),
            request.payload.clone(),
            &|| (format!("request {}", request.id), self.stream_name()),
            deadline,
        )
        .await
    }

    /// Where `request` goes and with which headers: its task subject, or
    /// for a request due after `now` the subject of its one-shot message
    /// schedule, which the server publishes to the task subject when due.
    fn routed(
        &self,
        request: &OutgoingRequest,
        now: OffsetDateTime,
    ) -> Result<(async_nats::Subject, HeaderMap)> {
        let target = self.task_subject_kept(&request.queue, &request.task)?;
        let mut headers = Self::headers(request)?;
        let subject = match request.not_before.filter(|at| *at > now) {
            Some(at) => {
                let at = at
                    .to_offset(jetq::time::UtcOffset::UTC)
                    .format(&Rfc3339)
                    .map_err(|e| wrap(ErrorKind::Config, "cannot format the due time", e))?;
                headers.insert(NATS_SCHEDULE, format!("@at {at}").as_str());
                headers.insert(NATS_SCHEDULE_TARGET, target.as_str());
                async_nats::Subject::from(self.delayed_subject(&request.id)?)
            }
            None => target,
        };
        Ok((subject, headers))
    }

    /// Publish to a stream, retrying transient failures (a restarting server,
    /// a leader election) until `deadline`.
    async fn publish_retrying(
        &self,
        subject: async_nats::Subject,
        mut headers: AttemptHeaders<'_>,
        payload: Bytes,
        describe: &Describe<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<PublishAck> {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0u32;
        // Cloned per attempt by reference count, not copied.
        loop {
            attempt += 1;
            let result = match self.acks().await {
                // Boxed: inline, it would make every publish's future an
                // allocation of 1 KiB or more, which glibc's allocator
                // serves slowly (see acks.rs).
                Ok(acks) => {
                    Box::pin(publish_acked(
                        acks,
                        subject.clone(),
                        headers.next()?,
                        payload.clone(),
                        Some(self.inner.config.request_timeout),
                    ))
                    .await
                }
                Err(err) => Err(err),
            };
            let err = match result {
                Ok(stored) => return Ok(PublishAck::new(stored.sequence, stored.duplicate)),
                Err(err) => err,
            };
            if let Some(too_large) = payload_too_large(&self.inner.client, &err) {
                return Err(too_large.with_source(err));
            }
            let transient = match err.kind() {
                PublishErrorKind::TimedOut
                | PublishErrorKind::StreamNotFound
                | PublishErrorKind::BrokenPipe
                | PublishErrorKind::MaxAckPending => true,
                PublishErrorKind::Other => jetstream_code(&err).is_some_and(is_transient_code),
                _ => false,
            };
            let now = tokio::time::Instant::now();
            if !transient || now + delay > deadline {
                // Described only here: a publish that works allocates no text.
                let (what, stream) = describe();
                let (kind, message) = match err.kind() {
                    PublishErrorKind::TimedOut => (
                        ErrorKind::Timeout,
                        format!("publishing {what} to {subject} was not acknowledged after {attempt} attempts; check that the NATS server is up and stream {stream} is healthy"),
                    ),
                    PublishErrorKind::StreamNotFound => (
                        ErrorKind::Broker,
                        format!("no JetStream stream accepted {subject} after {attempt} attempts: stream {stream} is missing or JetStream is unavailable; recreate it (ensure_queue) or check the server"),
                    ),
                    _ => (
                        ErrorKind::Broker,
                        format!("publishing {what} to {subject} failed"),
                    ),
                };
                return Err(wrap(kind, message, err));
            }
            tracing::debug!(error = %err, attempt, ?delay, "publish failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn put_dead_letter_impl(&self, letter: DeadLetter) -> Result<()> {
        letter.validate()?;
        let subject = self.dead_letter_subject(&letter.id)?;
        let deadline = tokio::time::Instant::now() + self.inner.config.publish_retry_for;
        let stream_name =
            Self::provision_retrying("dead-letter stream", deadline, || self.dead_stream())
                .await?
                .cached_info()
                .config
                .name
                .clone();
        let died_at = letter
            .died_at
            .format(&Rfc3339)
            .map_err(|e| wrap(ErrorKind::Config, "cannot format the time of death", e))?;
        let mut headers = HeaderMap::new();
        // The same message dead-lettered twice (its worker died in between)
        // is stored once.
        headers.insert(
            NATS_MESSAGE_ID,
            format!("{}.dead.{}", letter.id, letter.sequence).as_str(),
        );
        let fields = [
            (DEAD_QUEUE, letter.queue.clone()),
            (DEAD_TASK, letter.task.clone()),
            (DEAD_KIND, letter.error.kind.clone()),
            (DEAD_REASON, letter.error.message.clone()),
            (DEAD_ATTEMPTS, letter.attempts.to_string()),
            (DEAD_AT, died_at),
            (DEAD_WORKER, letter.worker.clone()),
            (DEAD_SEQUENCE, letter.sequence.to_string()),
        ];
        for (name, value) in fields {
            let value = HeaderValue::from_str(&header_safe(&value))
                .map_err(|e| wrap(ErrorKind::InvalidName, format!("invalid {name} header"), e))?;
            headers.insert(name, value);
        }
        let describe = || {
            (
                format!("the dead letter of {}", letter.id),
                stream_name.clone(),
            )
        };
        let size = letter.payload.len();
        match self
            .publish_retrying(
                async_nats::Subject::from(subject.clone()),
                AttemptHeaders::Kept(headers.clone()),
                letter.payload,
                &describe,
                deadline,
            )
            .await
        {
            Err(e) if e.kind() == ErrorKind::PayloadTooLarge => {
                // The request fitted on its own but not with the reason in
                // headers: keep the reason, leave the request out (and say
                // so), rather than failing to end the request at all.
                tracing::warn!(id = %letter.id, size, "the dead letter does not fit with its request; storing it without");
                headers.insert(DEAD_OMITTED, size.to_string().as_str());
                self.publish_retrying(
                    async_nats::Subject::from(subject),
                    AttemptHeaders::Kept(headers),
                    Bytes::new(),
                    &describe,
                    deadline,
                )
                .await?;
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    fn decode_dead_letter(&self, message: StreamMessage) -> Option<DeadLetter> {
        let prefix = format!("{}.dead.", self.inner.config.prefix);
        let id = message.subject.as_str().strip_prefix(&prefix)?.to_owned();
        let h = &message.headers;
        let get = |name: &str| {
            h.get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let mut letter = DeadLetter::new(
            id,
            get(DEAD_QUEUE),
            get(DEAD_TASK),
            ErrorInfo::new(get(DEAD_KIND), get(DEAD_REASON)),
            message.payload,
        );
        letter.attempts = get(DEAD_ATTEMPTS).parse().unwrap_or(0);
        letter.died_at = OffsetDateTime::parse(&get(DEAD_AT), &Rfc3339).unwrap_or(message.time);
        letter.worker = get(DEAD_WORKER);
        letter.sequence = get(DEAD_SEQUENCE).parse().unwrap_or(0);
        letter.payload_omitted = get(DEAD_OMITTED).parse().ok();
        letter.dead_sequence = Some(message.sequence);
        Some(letter)
    }

    async fn dead_letters_impl(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let Some(stream) = self.existing_dead_stream().await? else {
            return Ok(Vec::new());
        };
        let filter = format!("{}.dead.>", self.inner.config.prefix);
        let mut letters = Vec::new();
        let mut next = 1u64;
        while letters.len() < limit {
            match stream
                .direct_get_next_for_subject(filter.as_str(), Some(next))
                .await
            {
                Ok(message) => {
                    next = message.sequence + 1;
                    if let Some(letter) = self.decode_dead_letter(message) {
                        letters.push(letter);
                    }
                }
                Err(err) if err.kind() == DirectGetErrorKind::NotFound => break,
                Err(err) => {
                    return Err(record("cannot read the dead letters".to_owned(), err));
                }
            }
        }
        Ok(letters)
    }

    async fn get_dead_letter_impl(&self, id: &str) -> Result<Option<DeadLetter>> {
        let subject = self.dead_letter_subject(id)?;
        let Some(stream) = self.existing_dead_stream().await? else {
            return Ok(None);
        };
        match stream.direct_get_last_for_subject(subject).await {
            Ok(message) => Ok(self.decode_dead_letter(message)),
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(err) => Err(record(format!("cannot read the dead letter of {id}"), err)),
        }
    }

    async fn remove_dead_letter_impl(&self, id: &str) -> Result<u64> {
        let subject = self.dead_letter_subject(id)?;
        let stream = self.dead_stream().await?;
        let purged = stream
            .purge()
            .filter(subject)
            .await
            .map_err(|e| record(format!("cannot remove the dead letters of {id}"), e))?;
        Ok(purged.purged)
    }

    async fn remove_dead_letters_through_impl(&self, id: &str, dead_sequence: u64) -> Result<u64> {
        let subject = self.dead_letter_subject(id)?;
        let Some(stream) = self.existing_dead_stream().await? else {
            return Ok(0);
        };
        // A purge with a sequence removes the subject's messages below it.
        let purged = stream
            .purge()
            .filter(subject)
            .sequence(dead_sequence.saturating_add(1))
            .await
            .map_err(|e| record(format!("cannot remove the dead letters of {id}"), e))?;
        Ok(purged.purged)
    }

    async fn send_mail_impl(
        &self,
        id: &str,
        topic: Option<&str>,
        payload: Bytes,
        key: Option<&str>,
    ) -> Result<u64> {
        let subject = self.mail_subject(id, topic)?;
        let mut headers = HeaderMap::new();
        if let Some(key) = key {
            jetq::names::validate_key("idempotency key", key)?;
            let dedup = HeaderValue::from_str(&format!("{id}.{key}"))
                .map_err(|e| wrap(ErrorKind::InvalidName, "invalid idempotency key", e))?;
            headers.insert(NATS_MESSAGE_ID, dedup);
        }
        let deadline = tokio::time::Instant::now() + self.inner.config.publish_retry_for;
        if self.inner.mail.get().is_none() {
            Box::pin(Self::provision_retrying("mailbox stream", deadline, || {
                self.mail_stream()
            }))
            .await?;
        }
        let ack = self
            .publish_retrying(
                async_nats::Subject::from(subject),
                AttemptHeaders::Kept(headers),
                payload,
                &|| {
                    (
                        format!("a message to workflow {id}"),
                        self.inner.config.mail_stream_name(),
                    )
                },
                deadline,
            )
            .await?;
        Ok(ack.sequence)
    }

    async fn next_mail_impl(
        &self,
        id: &str,
        topic: Option<&str>,
        from: u64,
    ) -> Result<Option<Mail>> {
        let subject = self.mail_subject(id, topic)?;
        let Some(stream) = self.existing_mail_stream().await? else {
            return Ok(None);
        };
        match stream
            .direct_get_next_for_subject(subject, Some(from.max(1)))
            .await
        {
            Ok(message) => Ok(Some(Mail::new(message.sequence, message.payload))),
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(err) => Err(record(
                format!("cannot read the mailbox of workflow {id}"),
                err,
            )),
        }
    }

    async fn watch_mail_impl(
        &self,
        id: &str,
        topic: Option<&str>,
    ) -> Result<BoxStream<'static, ()>> {
        let subject = self.mail_subject(id, topic)?;
        let sub = self.subscribe(&subject).await?;
        Ok(Box::pin(sub.map(|_| ())))
    }

    /// Fire the wake-up message of suspended workflow `id` now: the message
    /// schedule waiting on its delayed subject is published to its target
    /// (under the key `<id>.wake.<token>`), and removed.
    async fn wake_impl(&self, id: &str) -> Result<bool> {
        let subject = self.delayed_subject(id)?;
        let stream = self.ensure_stream().await?;
        let message = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            Err(err) => {
                return match err.kind() {
                    LastRawMessageErrorKind::NoMessageFound => Ok(false),
                    LastRawMessageErrorKind::JetStream(e)
                        if e.error_code() == ErrorCode::NO_MESSAGE_FOUND =>
                    {
                        Ok(false)
                    }
                    _ => Err(record(
                        format!("cannot read the wake-up message of {id}"),
                        err,
                    )),
                };
            }
        };
        let resume_prefix = format!("{id}.resume.");
        let token = message
            .headers
            .get(NATS_MESSAGE_ID)
            .and_then(|k| k.as_str().strip_prefix(resume_prefix.as_str()))
            .map(str::to_owned);
        let target = message
            .headers
            .get(NATS_SCHEDULE_TARGET)
            .map(|t| t.as_str().to_owned());
        let (Some(token), Some(target)) = (token, target) else {
            // A delayed request, not a wake-up: it keeps its time.
            return Ok(false);
        };
        let mut headers = HeaderMap::new();
        for (name, values) in message.headers.iter() {
            let name_str: &str = name.as_ref();
            if name_str.starts_with("Nats-") {
                continue;
            }
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
        let dedup = HeaderValue::from_str(&jetq::Request::wake_dedup_key(id, &token))
            .map_err(|e| wrap(ErrorKind::InvalidName, "invalid wake-up key", e))?;
        headers.insert(NATS_MESSAGE_ID, dedup);
        let deadline = tokio::time::Instant::now() + self.inner.config.publish_retry_for;
        self.publish_retrying(
            async_nats::Subject::from(target),
            AttemptHeaders::Kept(headers),
            message.payload.clone(),
            &|| (format!("the wake-up of workflow {id}"), self.stream_name()),
            deadline,
        )
        .await?;
        // Only this schedule: a newer one (the run suspended again) stays.
        if let Err(e) = stream
            .purge()
            .filter(subject)
            .sequence(message.sequence.saturating_add(1))
            .await
        {
            tracing::debug!(id, error = %e, "cannot remove a fired wake-up schedule; it will be dropped when it fires");
        }
        Ok(true)
    }

    async fn get_events_impl(&self, id: &str) -> Result<Vec<(String, Bytes)>> {
        validate_id(id)?;
        let Some(kv) = self.existing_bucket().await? else {
            return Ok(Vec::new());
        };
        let filter = format!("{}{id}.event.*", kv.prefix);
        let mut subjects = kv
            .stream
            .info_with_subjects(&filter)
            .await
            .map_err(|e| record(format!("cannot list the events of {id}"), e))?;
        let mut keys = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) =
                subject.map_err(|e| record(format!("cannot list the events of {id}"), e))?;
            if let Some(key) = subject.strip_prefix(kv.prefix.as_str()) {
                keys.push(key.to_owned());
            }
        }
        keys.sort();
        let mut events = Vec::with_capacity(keys.len());
        let event_prefix = format!("{id}.event.");
        for key in keys {
            if let Some(entry) = self.get_entry(&key).await? {
                if let Some(name) = key.strip_prefix(event_prefix.as_str()) {
                    events.push((name.to_owned(), entry.value));
                }
            }
        }
        Ok(events)
    }

    async fn remove_delayed_impl(&self, id: &str) -> Result<bool> {
        let subject = self.delayed_subject(id)?;
        let purged = self
            .ensure_stream()
            .await?
            .purge()
            .filter(subject)
            .await
            .map_err(|e| record(format!("cannot remove the delayed request {id}"), e))?;
        Ok(purged.purged > 0)
    }

    async fn signal_cancel_impl(&self, id: &str) -> Result<()> {
        let subject = self.cancel_subject(id)?;
        let client = &self.inner.client;
        client
            .publish(subject.clone(), Bytes::new())
            .await
            .map_err(|e| wrap(ErrorKind::Broker, format!("cannot publish to {subject}"), e))?;
        // Out of the client's buffer before the caller moves on (or exits).
        client
            .flush()
            .await
            .map_err(|e| wrap(ErrorKind::Broker, "cannot flush the cancellation signal", e))
    }

    /// A core NATS subscription to `subject`.
    async fn subscribe(&self, subject: &str) -> Result<Subscriber> {
        self.inner
            .client
            .subscribe(subject.to_owned())
            .await
            .map_err(|e| {
                wrap(
                    ErrorKind::Broker,
                    format!("cannot subscribe to {subject}"),
                    e,
                )
            })
    }

    async fn cancel_signals_impl(&self) -> Result<BoxStream<'static, String>> {
        let subject = format!("{}.cancel.*", self.inner.config.prefix);
        let sub = self.subscribe(&subject).await?;
        let stream = sub.filter_map(|message| async move {
            message
                .subject
                .as_str()
                .rsplit('.')
                .next()
                .filter(|id| validate_id(id).is_ok())
                .map(str::to_owned)
        });
        Ok(Box::pin(stream))
    }

    async fn consume_impl(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Consumer>> {
        validate_queue(queue)?;
        let config = self.consumer_config(queue, &options)?;
        let name = config.durable_name.clone().unwrap_or_default();
        self.ensure_stream().await?;
        self.bucket().await?;
        // A worker needs it for its first failure: find out now whether it
        // can exist (another stream may capture its subjects).
        self.dead_stream().await?;
        // Foreign clients send to workflows before any jetq client did.
        self.mail_stream().await?;
        // The worker's settings apply when it creates the queue's consumer.
        // Every worker of the queue shares that consumer, so one started with
        // another ack wait does not change it under the others (whose
        // running tasks would be redelivered): it says so and follows it.
        let consumer: consumer::PullConsumer = match self
            .inner
            .js
            .create_consumer_strict_on_stream(config.clone(), self.stream_name())
            .await
        {
            Ok(consumer) => consumer,
            Err(err)
                if err.kind() == ConsumerCreateStrictErrorKind::AlreadyExists
                    || jetstream_code(&err) == Some(ErrorCode::CONSUMER_NAME_EXIST) =>
            {
                let existing: consumer::PullConsumer = self
                    .inner
                    .js
                    .get_consumer_from_stream(&name, self.stream_name())
                    .await
                    .map_err(|e| management(format!("cannot open consumer {name}"), e))?;
                let actual = existing.cached_info().config.ack_wait;
                if actual != options.ack_wait {
                    tracing::warn!(
                        queue,
                        worker = %options.worker,
                        "queue `{queue}` has an ack wait of {actual:?}, shared by all its workers; this worker's setting ({:?}) is not applied and its keep-alives follow {actual:?} (to change it, edit consumer {name} of stream {}, e.g. `nats consumer edit`)",
                        options.ack_wait,
                        self.stream_name()
                    );
                }
                existing
            }
            Err(err) => {
                return Err(management(format!("cannot create consumer {name}"), err));
            }
        };
        self.mark_queue(queue);
        tracing::debug!(consumer = %name, worker = %options.worker, "consuming");
        Ok(Box::new(NatsConsumer {
            consumer,
            client: self.inner.client.clone(),
            name,
            worker: options.worker,
            subject_prefix: format!("{}.tasks.{queue}.", self.inner.config.prefix).into(),
            fresh: true,
            pulls: None,
            pulled: 0,
        }))
    }

    async fn get_record_impl(&self, id: &str) -> Result<Option<RecordEntry>> {
        validate_id(id)?;
        self.get_entry(id).await
    }

    /// An entry of the record bucket (a record, a step, an event); `key` is
    /// checked by the caller.
    async fn get_entry(&self, key: &str) -> Result<Option<RecordEntry>> {
        let Some(kv) = self.existing_bucket().await? else {
            return Ok(None);
        };
        let reader = self
            .inner
            .reader
            .get_or_init(|| RecordReader::start(self.inner.client.clone(), kv.clone()));
        let in_flight = reader.enter();
        if !in_flight.alone() {
            if let Some(read) = reader.get(key).await {
                return read;
            }
        }
        // Boxed: the batched reads above keep no room for it.
        Box::pin(read_entry(kv, key)).await
    }

    /// The connection's acknowledged publishes, started at the first.
    async fn acks(&self) -> std::result::Result<&Acks, PublishError> {
        if let Some(acks) = self.inner.acks.get() {
            return Ok(acks);
        }
        // Boxed: only the first publish pays for the subscription's future.
        Box::pin(
            self.inner
                .acks
                .get_or_try_init(|| Acks::start(self.inner.client.clone())),
        )
        .await
        .map_err(|e| PublishError::with_source(PublishErrorKind::BrokenPipe, e))
    }

    async fn create_record_impl(&self, id: &str, value: Bytes, tag: Option<&str>) -> Result<u64> {
        validate_id(id)?;
        let kv = self.bucket().await?;
        // A write expecting no message under the key (revision 0): what
        // `create` tries first, without the larger future of its fallback.
        let what = || format!("cannot create record {id}");
        let acks = self.acks().await.map_err(|e| record(what(), e))?;
        let written = write_expecting(acks, kv, id, value.clone(), tag, 0, &what).await;
        let err = match written {
            Ok(revision) => return Ok(revision),
            Err(WriteFailure::WrongRevision(err)) => err,
            Err(WriteFailure::Failed(err)) => return Err(err),
        };
        // Something is stored under the key: a record (it exists), or a
        // delete marker, which a create writes over (as async-nats' `create`
        // does, without repeating the write that was just refused).
        let exists = format!("record {id} already exists");
        let stored = Box::pin(kv.entry(id))
            .await
            .map_err(|e| record(format!("cannot read record {id}"), e))?;
        match stored {
            Some(entry) if matches!(entry.operation, Operation::Delete | Operation::Purge) => {
                match Box::pin(self.update_record_impl(id, value, entry.revision, tag)).await {
                    Err(e) if e.kind() == ErrorKind::Conflict => {
                        Err(Error::new(ErrorKind::AlreadyExists, exists).with_source(e))
                    }
                    other => other,
                }
            }
            Some(_) => Err(wrap(ErrorKind::AlreadyExists, exists, err)),
            // Refused, yet nothing is stored: gone meanwhile; the caller
            // tries again.
            None => Err(wrap(ErrorKind::Broker, what(), err)),
        }
    }

    async fn update_record_impl(
        &self,
        id: &str,
        value: Bytes,
        revision: u64,
        tag: Option<&str>,
    ) -> Result<u64> {
        validate_id(id)?;
        let kv = self.bucket().await?;
        let what = || format!("cannot update record {id}");
        let acks = self.acks().await.map_err(|e| record(what(), e))?;
        match write_expecting(acks, kv, id, value, tag, revision, &what).await {
            Ok(revision) => Ok(revision),
            Err(WriteFailure::WrongRevision(err)) => Err(wrap(
                ErrorKind::Conflict,
                format!("record {id} changed since revision {revision} was read; read it again and retry"),
                err,
            )),
            Err(WriteFailure::Failed(err)) => Err(err),
        }
    }

    /// A private inbox (`{inbox prefix}.{unique token}`) for the records of
    /// this client's requests; a reconnection yields a resync, since core
    /// NATS messages sent meanwhile are lost.
    async fn notifications_impl(&self) -> Result<Notifications> {
        let address = self.inner.client.new_inbox();
        let sub = self.subscribe(&address).await?;
        let mut reconnects = self.inner.reconnects.clone();
        if let Some(rx) = reconnects.as_mut() {
            rx.mark_unchanged();
        }
        // Ends with the subscription (the connection closed for good).
        let stream: BoxStream<'static, Notification> = Box::pin(futures_util::stream::unfold(
            (sub, reconnects),
            |(mut sub, mut reconnects)| async move {
                let next = tokio::select! {
                    m = sub.next() => m.map(|m| Notification::Record(m.payload)),
                    _ = reconnected(&mut reconnects) => Some(Notification::Resync),
                };
                next.map(|n| (n, (sub, reconnects)))
            },
        ));
        Ok(Notifications::new(address, stream))
    }

    /// Send an ended record to a producer's inbox: only to a subject right
    /// under this connection's inbox prefix with a plain token, so that a
    /// request cannot make workers publish anywhere else (on a task or
    /// record subject, say).
    /// The subject of `address` if it is an inbox of this connection, built
    /// once per inbox (see `Inner::inbox_subjects`).
    fn notify_subject(&self, address: &str) -> Result<async_nats::Subject> {
        // Kept by prefix and token: only a checked address is kept, so one
        // found is an inbox of this connection.
        let (prefix, token) = address.rsplit_once('.').unwrap_or(("", address));
        self.inner
            .inbox_subjects
            .get_or_build(prefix, token, || self.inbox_subject(address))
    }

    /// Check that `address` is an inbox of this connection, and make it a
    /// subject.
    fn inbox_subject(&self, address: &str) -> Result<async_nats::Subject> {
        let token = address
            .strip_prefix(self.inner.inbox_prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'));
        let valid = token.is_some_and(|t| {
            !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric())
        });
        if !valid {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!(
                    "notify address {:?} is not an inbox of this connection ({}.<token>); not sent",
                    jetq::names::escape(address),
                    self.inner.inbox_prefix
                ),
            ));
        }
        Ok(async_nats::Subject::from(address))
    }

    async fn notify_impl(&self, subject: async_nats::Subject, record: Bytes) -> Result<()> {
        self.inner
            .client
            .publish(subject, record)
            .await
            .map_err(|e| wrap(ErrorKind::Broker, "cannot send a record notification", e))
    }

    async fn watch_record_impl(&self, id: &str) -> Result<BoxStream<'static, Result<RecordEntry>>> {
        let subject = self.record_subject(id)?;
        self.watch_entry(id.to_owned(), subject).await
    }

    /// Watch an entry of the record bucket through the subject its changes
    /// are republished on; `key` is checked by the caller.
    async fn watch_entry(
        &self,
        id: String,
        subject: String,
    ) -> Result<BoxStream<'static, Result<RecordEntry>>> {
        let id = id.as_str();
        // A read: the bucket is opened if it exists, never created (until
        // it exists there is no record to see; it is looked up again).
        let kv = match self.existing_bucket().await {
            Ok(kv) => kv.cloned(),
            Err(e) if matches!(e.kind(), ErrorKind::Broker | ErrorKind::Timeout) => None,
            Err(e) => return Err(e),
        };
        // Subscribe first, then read: an update committed in between arrives
        // on the subscription, and revisions drop what was already seen.
        let sub = self.subscribe(&subject).await?;
        // A server that is down (or a leader election) does not end the
        // watch: the record is read again on reconnect, and soon anyway.
        let period = self.inner.config.watch_resync;
        let (current, first_resync) = match self.get_entry(id).await {
            Ok(current) => (current, period),
            Err(e) if matches!(e.kind(), ErrorKind::Broker | ErrorKind::Timeout) => {
                tracing::debug!(id, error = %e, "cannot read the watched record yet; will retry");
                (None, period.min(Duration::from_secs(1)))
            }
            Err(e) => return Err(e),
        };
        let mut resync =
            tokio::time::interval_at(tokio::time::Instant::now() + first_resync, period);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let state = WatchState {
            sub,
            broker: self.clone(),
            kv,
            id: id.to_owned(),
            last: current.as_ref().map_or(0, |e| e.revision),
            pending: current,
            resync,
            reconnects: self.inner.reconnects.clone().map(|mut rx| {
                // Only reconnections after this point call for a re-read.
                rx.mark_unchanged();
                rx
            }),
        };
        Ok(Box::pin(futures_util::stream::unfold(
            state,
            WatchState::step,
        )))
    }
}

struct WatchState {
    sub: Subscriber,
    broker: NatsBroker,
    kv: Option<kv::Store>,
    id: String,
    last: u64,
    pending: Option<RecordEntry>,
    resync: tokio::time::Interval,
    reconnects: Option<watch::Receiver<u64>>,
}

async fn reconnected(rx: &mut Option<watch::Receiver<u64>>) {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                *rx = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

impl WatchState {
    /// Accept an entry if it is newer than what was yielded.
    fn accept(&mut self, entry: RecordEntry) -> Option<RecordEntry> {
        (entry.revision > self.last).then(|| {
            self.last = entry.revision;
            entry
        })
    }

    /// Read the record back (after a reconnect, or periodically).
    async fn read_back(&mut self) -> Option<RecordEntry> {
        if self.kv.is_none() {
            self.kv = self.broker.existing_bucket().await.ok().flatten().cloned();
        }
        let kv = self.kv.as_ref()?;
        match kv.entry(self.id.as_str()).await {
            Ok(Some(e)) if e.operation == Operation::Put => {
                self.accept(RecordEntry::new(e.value, e.revision))
            }
            Ok(_) => None,
            Err(err) => {
                tracing::debug!(id = %self.id, error = %err, "re-reading a watched record failed; will retry");
                None
            }
        }
    }

    /// A notification on the record's subject is only a hint that it
    /// changed: anyone allowed to publish there could forge one (a fake
    /// `succeeded`, or a huge revision that would hide every real update).
    /// The record is read back from the bucket, and that is what is yielded.
    async fn on_message(&mut self, _message: async_nats::Message) -> Option<RecordEntry> {
        self.read_back().await
    }

    async fn step(mut self) -> Option<(Result<RecordEntry>, WatchState)> {
        if let Some(entry) = self.pending.take() {
            return Some((Ok(entry), self));
        }
        loop {
            let found = tokio::select! {
                message = self.sub.next() => match message {
                    Some(message) => self.on_message(message).await,
                    None => return None,
                },
                _ = self.resync.tick() => self.read_back().await,
                _ = reconnected(&mut self.reconnects) => self.read_back().await,
            };
            if let Some(entry) = found {
                return Some((Ok(entry), self));
            }
        }
    }
}

impl Broker for NatsBroker {
    fn ensure_queue(&self, queue: &str) -> BoxFuture<'_, Result<()>> {
        let queue = queue.to_owned();
        Box::pin(async move {
            validate_queue(&queue)?;
            if self.queue_ready(&queue) {
                return Ok(());
            }
            self.ensure_stream().await?;
            self.bucket().await?;
            // Workers need it for their first failure: find out now whether
            // it can exist (another stream may capture its subjects).
            self.dead_stream().await?;
            self.mail_stream().await?;
            self.ensure_consumer(&queue).await?;
            self.mark_queue(&queue);
            Ok(())
        })
    }

    fn publish(&self, request: OutgoingRequest) -> BoxFuture<'_, Result<PublishAck>> {
        Box::pin(self.publish_impl(Box::new(request)))
    }

    fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>>> {
        let queue = queue.to_owned();
        Box::pin(async move { self.consume_impl(&queue, options).await })
    }

    fn stored_request(&self, sequence: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        Box::pin(async move {
            let stream = self.ensure_stream().await?;
            match stream.get_raw_message(sequence).await {
                Ok(message) => Ok(Some(message.payload)),
                Err(err) => match err.kind() {
                    LastRawMessageErrorKind::NoMessageFound => Ok(None),
                    LastRawMessageErrorKind::JetStream(e)
                        if e.error_code() == ErrorCode::NO_MESSAGE_FOUND =>
                    {
                        Ok(None)
                    }
                    _ => Err(record(
                        format!("cannot read message {sequence} of the task stream"),
                        err,
                    )),
                },
            }
        })
    }

    fn get_record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<RecordEntry>>> {
        Box::pin(async move { self.get_record_impl(id).await })
    }

    fn create_record<'a>(&'a self, id: &'a str, value: Bytes) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move { self.create_record_impl(id, value, None).await })
    }

    fn update_record<'a>(
        &'a self,
        id: &'a str,
        value: Bytes,
        revision: u64,
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move { self.update_record_impl(id, value, revision, None).await })
    }

    fn write_ended_record<'a>(
        &'a self,
        id: &'a str,
        value: Bytes,
        revision: Option<u64>,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<(u64, bool)>> {
        Box::pin(async move {
            // A bucket reached through another domain's API prefix is
            // written without headers (see `write_expecting`).
            let tagged = !self.bucket().await?.use_jetstream_prefix;
            let revision = match revision {
                None => self.create_record_impl(id, value, Some(tag)).await?,
                Some(revision) => {
                    self.update_record_impl(id, value, revision, Some(tag))
                        .await?
                }
            };
            Ok((revision, tagged))
        })
    }

    fn follow_record<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BoxStream<'static, Followed>>>> {
        Box::pin(async move {
            if self
                .inner
                .follow_denied
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                return Ok(None);
            }
            let sub = self.subscribe(&self.record_subject(id)?).await?;
            let stream: BoxStream<'static, Followed> = Box::pin(sub.map(|message| {
                let tag = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(jetq::tag::TAG_HEADER))
                    .map(|v| v.as_str().to_owned());
                Followed::new(message.payload, tag)
            }));
            Ok(Some(stream))
        })
    }

    fn delete_record<'a>(&'a self, id: &'a str, revision: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            validate_id(id)?;
            let kv = self.bucket().await?;
            match kv.delete_expect_revision(id, Some(revision)).await {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => Err(wrap(
                    ErrorKind::Conflict,
                    format!("record {id} changed since revision {revision}"),
                    err,
                )),
                Err(err) => Err(record(format!("cannot delete record {id}"), err)),
            }
        })
    }

    fn notifications(&self) -> BoxFuture<'_, Result<Option<Notifications>>> {
        Box::pin(async move { self.notifications_impl().await.map(Some) })
    }

    fn notify(&self, address: &str, record: Bytes) -> BoxFuture<'_, Result<()>> {
        // The address is checked (once per inbox) and its subject taken at
        // once: the future does not borrow it.
        let subject = self.notify_subject(address);
        Box::pin(async move { self.notify_impl(subject?, record).await })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner
                .client
                .flush()
                .await
                .map_err(|e| wrap(ErrorKind::Broker, "cannot flush the NATS connection", e))
        })
    }

    fn max_payload(&self) -> Option<usize> {
        // An atomic load; `server_info()` would clone the whole INFO.
        Some(self.inner.client.max_payload()).filter(|m| *m > 0)
    }

    fn remove_delayed(&self, id: &str) -> BoxFuture<'_, Result<bool>> {
        let id = id.to_owned();
        Box::pin(async move { self.remove_delayed_impl(&id).await })
    }

    fn put_dead_letter(&self, letter: DeadLetter) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.put_dead_letter_impl(letter))
    }

    fn dead_letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>>> {
        Box::pin(self.dead_letters_impl(limit))
    }

    fn get_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<Option<DeadLetter>>> {
        let id = id.to_owned();
        Box::pin(async move { self.get_dead_letter_impl(&id).await })
    }

    fn remove_dead_letter(&self, id: &str) -> BoxFuture<'_, Result<u64>> {
        let id = id.to_owned();
        Box::pin(async move { self.remove_dead_letter_impl(&id).await })
    }

    fn remove_dead_letters_through(
        &self,
        id: &str,
        dead_sequence: u64,
    ) -> BoxFuture<'_, Result<u64>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.remove_dead_letters_through_impl(&id, dead_sequence)
                .await
        })
    }

    fn signal_cancel(&self, id: &str) -> BoxFuture<'_, Result<()>> {
        let id = id.to_owned();
        Box::pin(async move { self.signal_cancel_impl(&id).await })
    }

    fn cancel_signals(&self) -> BoxFuture<'_, Result<BoxStream<'static, String>>> {
        Box::pin(self.cancel_signals_impl())
    }

    fn watch_record(
        &self,
        id: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RecordEntry>>>> {
        let id = id.to_owned();
        Box::pin(async move { self.watch_record_impl(&id).await })
    }

    fn get_step(&self, id: &str, position: u32) -> BoxFuture<'_, Result<Option<Bytes>>> {
        let key = step_key(id, position);
        Box::pin(async move { Ok(self.get_entry(&key?).await?.map(|e| e.value)) })
    }

    fn create_step(&self, id: &str, position: u32, value: Bytes) -> BoxFuture<'_, Result<()>> {
        let key = step_key(id, position);
        Box::pin(async move {
            let key = key?;
            let kv = self.bucket().await?;
            match kv.create(key.as_str(), value).await {
                Ok(_) => Ok(()),
                Err(err) if err.kind() == CreateErrorKind::AlreadyExists => Err(wrap(
                    ErrorKind::AlreadyExists,
                    format!("step {key} is already recorded"),
                    err,
                )),
                Err(err) => Err(payload_too_large(&self.inner.client, &err)
                    .unwrap_or_else(|| record(format!("cannot record step {key}"), err))),
            }
        })
    }

    fn put_event(&self, id: &str, key: &str, value: Bytes) -> BoxFuture<'_, Result<u64>> {
        let key = event_key(id, key);
        Box::pin(async move {
            let key = key?;
            let kv = self.bucket().await?;
            kv.put(key.as_str(), value).await.map_err(|err| {
                payload_too_large(&self.inner.client, &err)
                    .unwrap_or_else(|| record(format!("cannot set event {key}"), err))
            })
        })
    }

    fn get_event(&self, id: &str, key: &str) -> BoxFuture<'_, Result<Option<RecordEntry>>> {
        let key = event_key(id, key);
        Box::pin(async move { self.get_entry(&key?).await })
    }

    fn watch_event(
        &self,
        id: &str,
        key: &str,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<RecordEntry>>>> {
        let key = event_key(id, key);
        Box::pin(async move {
            let key = key?;
            let subject = format!("{}.records.{key}", self.inner.config.prefix);
            self.watch_entry(key, subject).await
        })
    }
    fn send_mail(
        &self,
        id: &str,
        topic: Option<&str>,
        payload: Bytes,
        key: Option<&str>,
    ) -> BoxFuture<'_, Result<u64>> {
        let (id, topic, key) = (
            id.to_owned(),
            topic.map(str::to_owned),
            key.map(str::to_owned),
        );
        Box::pin(async move {
            self.send_mail_impl(&id, topic.as_deref(), payload, key.as_deref())
                .await
        })
    }

    fn next_mail(
        &self,
        id: &str,
        topic: Option<&str>,
        from: u64,
    ) -> BoxFuture<'_, Result<Option<Mail>>> {
        let (id, topic) = (id.to_owned(), topic.map(str::to_owned));
        Box::pin(async move { self.next_mail_impl(&id, topic.as_deref(), from).await })
    }

    fn watch_mail(
        &self,
        id: &str,
        topic: Option<&str>,
    ) -> BoxFuture<'_, Result<BoxStream<'static, ()>>> {
        let (id, topic) = (id.to_owned(), topic.map(str::to_owned));
        Box::pin(async move { self.watch_mail_impl(&id, topic.as_deref()).await })
    }

    fn wake(&self, id: &str) -> BoxFuture<'_, Result<bool>> {
        let id = id.to_owned();
        Box::pin(async move { self.wake_impl(&id).await })
    }

    fn get_events(&self, id: &str) -> BoxFuture<'_, Result<Vec<(String, Bytes)>>> {
        let id = id.to_owned();
        Box::pin(async move { self.get_events_impl(&id).await })
    }
}

/// The bucket key of step `position` of workflow `id`: `{id}.step.{position}`
/// (a record's key is a bare id, which has no `.`).
fn step_key(id: &str, position: u32) -> Result<String> {
    validate_id(id)?;
    Ok(format!("{id}.step.{position}"))
}

/// The bucket key of event `key` of workflow `id`: `{id}.event.{key}`.
fn event_key(id: &str, key: &str) -> Result<String> {
    validate_id(id)?;
    jetq::names::validate_key("event key", key)?;
    Ok(format!("{id}.event.{key}"))
}
