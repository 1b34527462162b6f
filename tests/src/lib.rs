//! Helpers shared by jetq's integration tests: a real nats-server per test,
//! brokers connected to it, and paths of the workspace's binaries.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use jetq_nats::NatsBroker;
pub use jetq_test_server::NatsServer;
use tokio::sync::watch;

pub mod otlp;

/// A generous bound for anything a test waits on; reaching it is a failure.
pub const WAIT: Duration = Duration::from_secs(30);

/// Start a nats-server and connect a broker to it.
pub async fn server_and_broker() -> (NatsServer, NatsBroker) {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    (server, broker)
}

/// Start a nats-server with the configuration file text `conf` (users and
/// their permissions, limits); the directory holding the file goes with the
/// returned one.
pub fn server_with_config(conf: &str) -> (NatsServer, tempfile::TempDir) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("cannot make a temporary directory: {e}"),
    };
    let path = dir.path().join("nats.conf");
    if let Err(e) = std::fs::write(&path, conf) {
        panic!("cannot write {}: {e}", path.display());
    }
    let server = NatsServer::start_with_args(&["-c", &path.to_string_lossy()]);
    (server, dir)
}

/// Connect a broker to `server` as `user`, with a request timeout of 1 s (a
/// read the user may not make fails quickly).
pub async fn connect_as(server: &NatsServer, user: &str, password: &str) -> NatsBroker {
    let config = jetq_nats::NatsConfig::new(&server.url())
        .user_and_password(user, password)
        .request_timeout(Duration::from_secs(1));
    match NatsBroker::connect_with(config).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect to {} as {user}: {e}", server.url()),
    }
}

/// Requests still stored in the task stream `JETQ_TASKS` (a work queue:
/// settled ones are gone), read with plain async-nats.
pub async fn stored_requests(server: &NatsServer) -> u64 {
    let nats = match async_nats::connect(server.url()).await {
        Ok(n) => n,
        Err(e) => panic!("cannot connect to {}: {e}", server.url()),
    };
    let js = async_nats::jetstream::new(nats);
    let mut stream = match js.get_stream("JETQ_TASKS").await {
        Ok(s) => s,
        Err(e) => panic!("no stream JETQ_TASKS: {e}"),
    };
    match stream.info().await {
        Ok(info) => info.state.messages,
        Err(e) => panic!("cannot read the info of JETQ_TASKS: {e}"),
    }
}

/// The arguments of the `demo.add` test task.
#[derive(Debug, serde::Deserialize)]
pub struct AddArgs {
    /// First term.
    pub a: i64,
    /// Second term.
    pub b: i64,
}

/// The `demo.add` test task: the sum of its arguments.
pub async fn add(jetq::Args(args): jetq::Args<AddArgs>) -> Result<i64, jetq::TaskError> {
    Ok(args.a + args.b)
}

/// Publish a `demo.add` request of `a` and `b` with `client`.
pub async fn publish_add(client: &jetq::Client, a: i64, b: i64) -> jetq::TaskHandle {
    match client
        .task("demo.add")
        .args(&serde_json::json!({ "a": a, "b": b }))
        .publish()
        .await
    {
        Ok(h) => h,
        Err(e) => panic!("cannot publish demo.add: {e}"),
    }
}

/// Connect a new broker to `server`.
pub async fn connect(server: &NatsServer) -> NatsBroker {
    match NatsBroker::connect(&server.url()).await {
        Ok(b) => b,
        Err(e) => panic!("cannot connect to the test server at {}: {e}", server.url()),
    }
}

/// The path of a binary of this workspace (`jetq`, `jetq-demo-worker`),
/// built next to the test executables.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current exe: {e}"));
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "binary {} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Wait (watching, not polling) until the record of `id` satisfies `done`;
/// panics after [`WAIT`].
pub async fn wait_for_record(
    broker: &NatsBroker,
    id: &str,
    done: impl Fn(&jetq::Record) -> bool,
) -> jetq::Record {
    use futures_util::StreamExt;
    use jetq::broker::Broker;
    let watch = async {
        let mut stream = match broker.watch_record(id).await {
            Ok(s) => s,
            Err(e) => panic!("cannot watch record {id}: {e}"),
        };
        while let Some(entry) = stream.next().await {
            let entry = entry.unwrap_or_else(|e| panic!("watch of {id} failed: {e}"));
            let record = jetq::Record::from_json(&entry.value)
                .unwrap_or_else(|e| panic!("record {id} does not decode: {e}"));
            if done(&record) {
                return record;
            }
        }
        panic!("the watch of {id} ended")
    };
    match tokio::time::timeout(WAIT, watch).await {
        Ok(r) => r,
        Err(_) => panic!("record {id} did not reach the expected state within {WAIT:?}"),
    }
}

/// Wait (on an ordered consumer of its subject, not polling) for the dead
/// letter stored under `key`; panics after [`WAIT`].
///
/// A consumer, not a core subscription: a letter published before a
/// subscription reaches the server, but stored only after a read, would
/// escape both.
pub async fn wait_for_dead_letter(broker: &NatsBroker, key: &str) -> jetq::DeadLetter {
    use futures_util::StreamExt;
    use jetq::broker::Broker;
    let subject = broker
        .dead_letter_subject(key)
        .unwrap_or_else(|e| panic!("invalid dead letter key {key}: {e}"));
    let wait = async {
        let js = async_nats::jetstream::new(broker.client().clone());
        let stream = js
            .get_stream(broker.config().dead_stream_name())
            .await
            .unwrap_or_else(|e| panic!("no dead-letter stream: {e}"));
        let mut stored = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("cannot follow dead letter {key}: {e}"))
            .messages()
            .await
            .unwrap_or_else(|e| panic!("cannot follow dead letter {key}: {e}"));
        loop {
            match broker.get_dead_letter(key).await {
                Ok(Some(letter)) => return letter,
                Ok(None) => {}
                Err(e) => panic!("cannot read dead letter {key}: {e}"),
            }
            if stored.next().await.is_none() {
                panic!("the consumer for dead letter {key} ended");
            }
        }
    };
    match tokio::time::timeout(WAIT, wait).await {
        Ok(letter) => letter,
        Err(_) => panic!(
            "no dead letter {key} within {WAIT:?}; {}",
            streams_state(broker).await
        ),
    }
}

/// What the broker's streams and consumers hold, for a test's failure
/// message: where a request that did not arrive was left.
pub async fn streams_state(broker: &NatsBroker) -> String {
    use futures_util::TryStreamExt;
    let js = async_nats::jetstream::new(broker.client().clone());
    let names: Vec<String> = match js.stream_names().try_collect().await {
        Ok(names) => names,
        Err(e) => return format!("cannot list the streams: {e}"),
    };
    let mut out = Vec::new();
    for name in names {
        let mut stream = match js.get_stream(&name).await {
            Ok(stream) => stream,
            Err(e) => {
                out.push(format!("{name}: {e}"));
                continue;
            }
        };
        let state = match stream.info().await {
            Ok(info) => info.state.clone(),
            Err(e) => {
                out.push(format!("{name}: {e}"));
                continue;
            }
        };
        out.push(format!(
            "stream {name}: {} messages, sequences {}..={}",
            state.messages, state.first_sequence, state.last_sequence
        ));
        let consumers: Vec<async_nats::jetstream::consumer::Info> =
            match stream.consumers().try_collect().await {
                Ok(consumers) => consumers,
                Err(e) => {
                    out.push(format!("  its consumers: {e}"));
                    continue;
                }
            };
        for c in consumers {
            out.push(format!(
                "  consumer {}: delivered up to {}, acknowledged up to {}, {} pending, {} awaiting acknowledgement, {} redelivered",
                c.name,
                c.delivered.stream_sequence,
                c.ack_floor.stream_sequence,
                c.num_pending,
                c.num_ack_pending,
                c.num_redelivered
            ));
        }
    }
    out.join("\n")
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildProcess(pub std::process::Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `jetq-demo-worker` against `server` (concurrency 4). It logs warnings
/// only, or what `JETQ_TEST_LOG` says (a `RUST_LOG` filter, e.g. `jetq=debug`).
pub fn demo_worker(server: &NatsServer) -> ChildProcess {
    demo_worker_with(server, &["--concurrency", "4"])
}

/// Start `jetq-demo-worker` against `server` with these arguments after
/// `--nats URL` (e.g. `--name`, `--concurrency`, `--ack-wait`,
/// `--shutdown-timeout`); logging as for [`demo_worker`].
pub fn demo_worker_with(server: &NatsServer, args: &[&str]) -> ChildProcess {
    let child = std::process::Command::new(workspace_bin("jetq-demo-worker"))
        .args(["--nats", &server.url()])
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("JETQ_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start jetq-demo-worker: {e}"));
    ChildProcess(child)
}

/// Like [`demo_worker_with`], with these environment variables set as
/// well (e.g. the `OTEL_*` variables of `--otlp`).
pub fn demo_worker_with_env(
    server: &NatsServer,
    args: &[&str],
    env: &[(&str, &str)],
) -> ChildProcess {
    let child = std::process::Command::new(workspace_bin("jetq-demo-worker"))
        .args(["--nats", &server.url()])
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("JETQ_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start jetq-demo-worker: {e}"));
    ChildProcess(child)
}

/// Send SIGTERM to a child process (with the `kill` command).
pub fn sigterm(child: &ChildProcess) {
    let pid = child.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(status.success(), "kill -TERM {pid} failed: {status}");
}

/// Wait (off the async threads) for a child process to exit; panics after [`WAIT`].
pub async fn wait_exit(mut child: ChildProcess) -> std::process::ExitStatus {
    let waited = tokio::task::spawn_blocking(move || child.0.wait());
    match tokio::time::timeout(WAIT, waited).await {
        Ok(Ok(Ok(status))) => status,
        Ok(Ok(Err(e))) => panic!("cannot wait for the child process: {e}"),
        Ok(Err(e)) => panic!("the waiting thread failed: {e}"),
        Err(_) => panic!("the child process did not exit within {WAIT:?}"),
    }
}

/// One committed revision of a record, as a [`RecordLog`] saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The record's KV revision.
    pub revision: u64,
    /// The record at that revision.
    pub record: jetq::Record,
    /// When the log received it (this machine's clock).
    pub seen_at: jetq::time::OffsetDateTime,
}

/// Every revision a [`RecordLog`] saw, by record id, in revision order.
pub type Revisions = HashMap<String, Vec<Seen>>;

/// Follows every committed revision of every record of the default prefix,
/// from the subject the server republishes them on (`jetq.records.>`, with
/// the revision in `Nats-Sequence`): a test can look at each state a record
/// went through, not only the last one, and wait for any condition over all
/// records without polling. Revisions published while the log's own
/// connection is down (a server restart) are missed.
#[derive(Debug)]
pub struct RecordLog {
    rx: watch::Receiver<Revisions>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordLog {
    /// Subscribe; every record revision committed after this returns is seen.
    pub async fn start(server: &NatsServer) -> RecordLog {
        use futures_util::StreamExt;
        let nats = async_nats::connect(server.url())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", server.url()));
        let mut sub = nats
            .subscribe("jetq.records.>")
            .await
            .unwrap_or_else(|e| panic!("cannot subscribe to jetq.records.>: {e}"));
        // The subscription is registered on the server once the flush returns.
        nats.flush()
            .await
            .unwrap_or_else(|e| panic!("cannot flush: {e}"));
        let (tx, rx) = watch::channel(Revisions::new());
        let task = tokio::spawn(async move {
            let _keep = nats;
            while let Some(message) = sub.next().await {
                let Some(headers) = message.headers.as_ref() else {
                    continue;
                };
                if headers.get("KV-Operation").is_some() {
                    continue; // a delete or purge marker, not a record
                }
                let Some(revision) = headers
                    .get(async_nats::header::NATS_SEQUENCE)
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                else {
                    continue;
                };
                let record = jetq::Record::from_json(&message.payload).unwrap_or_else(|e| {
                    panic!(
                        "a republished record does not decode: {e}: {:?}",
                        message.payload
                    )
                });
                let seen = Seen {
                    revision,
                    record,
                    seen_at: jetq::time::OffsetDateTime::now_utc(),
                };
                tx.send_modify(|all| {
                    let list = all.entry(seen.record.id.clone()).or_default();
                    if list.last().is_none_or(|last| last.revision < revision) {
                        list.push(seen);
                    }
                });
            }
        });
        RecordLog { rx, task }
    }

    /// The revisions of record `id` seen so far, oldest first.
    pub fn history(&self, id: &str) -> Vec<Seen> {
        self.rx.borrow().get(id).cloned().unwrap_or_default()
    }

    /// Everything seen so far.
    pub fn snapshot(&self) -> Revisions {
        self.rx.borrow().clone()
    }

    /// Wait (on each new revision, not polling) until `check` returns a
    /// value for what has been seen; panics after [`WAIT`], naming `what`.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        mut check: impl FnMut(&Revisions) -> Option<T>,
    ) -> T {
        let mut rx = self.rx.clone();
        let mut found = None;
        let waited = tokio::time::timeout(
            WAIT,
            rx.wait_for(|all| {
                found = check(all);
                found.is_some()
            }),
        )
        .await;
        match waited {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => panic!("the record log stopped while waiting for {what}"),
            Err(_) => panic!("{what}: not seen within {WAIT:?}"),
        }
        found.unwrap_or_else(|| panic!("{what}: the condition held but gave no value"))
    }
}

impl Drop for RecordLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The latest revision of `id` in `all`, if any.
pub fn latest<'a>(all: &'a Revisions, id: &str) -> Option<&'a jetq::Record> {
    all.get(id).and_then(|l| l.last()).map(|s| &s.record)
}

/// Whether `task` is still running `within` from now (it is polled to its
/// end meanwhile if it ends): to assert that something did not end a wait.
pub async fn still_running_after<T>(task: &tokio::task::JoinHandle<T>, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        while !task.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .is_err()
}
