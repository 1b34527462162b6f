//! Helpers shared by jetq's integration tests: a real nats-server per test,
//! brokers connected to it, and paths of the workspace's binaries.

use std::path::PathBuf;
use std::time::Duration;

use jetq_nats::NatsBroker;
pub use jetq_test_server::NatsServer;

/// A generous bound for anything a test waits on; reaching it is a failure.
pub const WAIT: Duration = Duration::from_secs(30);

/// Start a nats-server and connect a broker to it.
pub async fn server_and_broker() -> (NatsServer, NatsBroker) {
    let server = NatsServer::start();
    let broker = connect(&server).await;
    (server, broker)
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
    let child = std::process::Command::new(workspace_bin("jetq-demo-worker"))
        .args(["--nats", &server.url(), "--concurrency", "4"])
        .env(
            "RUST_LOG",
            std::env::var("JETQ_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start jetq-demo-worker: {e}"));
    ChildProcess(child)
}
