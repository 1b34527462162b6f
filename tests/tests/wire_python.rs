//! `docs/wire-format.md` proved with a client in another language: the
//! Python program `tests/wire/client.py` (nats-py, no jetq code) publishes
//! requests and reads records against a real nats-server served by
//! `jetq-demo-worker`, following only the document. It runs once before the
//! worker starts (a publish then fails as the document says) and once after,
//! when two more demo workers verify auth tokens (`--auth-key-file`, queues
//! `wire-auth-hs` with a shared secret and `wire-auth-ed` with an Ed25519
//! public key), so that it also signs requests with PyJWT as
//! `docs/middleware.md` (Auth context) says (check k). The first worker runs with
//! `--otlp` to an OTLP receiver of this test, which shows that a
//! `traceparent` set by hand in Python (check l) is continued.
//!
//! It needs `python3` with nats-py, PyJWT and cryptography (`scripts/test`
//! installs them; by hand: `python3 -m pip install nats-py pyjwt
//! cryptography`). Without them the test fails, unless `JETQ_SKIP_PYTHON=1`
//! is set, in which case it is skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use jetq_tests::otlp::OtlpReceiver;
use jetq_tests::{demo_worker_with, demo_worker_with_env, NatsServer, WAIT};

/// What the script imports: nats-py, and PyJWT with cryptography (EdDSA).
const PROBE: &str =
    "import nats, jwt; from cryptography.hazmat.primitives.asymmetric import ed25519";

/// `false` when the test is to be skipped (`JETQ_SKIP_PYTHON=1` and no usable
/// Python); panics when Python, nats-py, PyJWT or cryptography is missing
/// otherwise.
fn python_with_nats() -> bool {
    let skip = std::env::var("JETQ_SKIP_PYTHON").is_ok_and(|v| v == "1");
    let probe = Command::new("python3")
        .args(["-c", PROBE])
        .stdin(Stdio::null())
        .output();
    let problem = match probe {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!(
            "`python3 -c '{PROBE}'` failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => format!("cannot run python3: {e}"),
    };
    if skip {
        eprintln!("skipping the Python wire-format test (JETQ_SKIP_PYTHON=1): {problem}");
        return false;
    }
    panic!(
        "{problem}\nThis test needs python3 with nats-py, PyJWT and cryptography: run \
         `python3 -m pip install nats-py pyjwt cryptography` (scripts/test installs them \
         through jetq_ensure_python_nats in scripts/lib.sh), or set JETQ_SKIP_PYTHON=1 to skip it"
    );
}

#[test]
fn a_python_nats_client_follows_the_wire_format() {
    if !python_with_nats() {
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/wire/client.py");
    assert!(script.exists(), "{} is missing", script.display());

    let server = NatsServer::start();
    // Before any worker ran: the document's "start a worker first" error.
    let early = run_client(&script, &server, &["--before-worker"]);
    // With tracing, so that check l's hand-set `traceparent` shows up at
    // this OTLP receiver.
    let receiver = OtlpReceiver::start();
    let endpoint = receiver.endpoint();
    let _worker = demo_worker_with_env(
        &server,
        &["--concurrency", "4", "--otlp"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    // Check k: workers that verify tokens, with the keys the script signs with.
    let keys = tempfile::tempdir().unwrap();
    let secret: String = (0..48).map(|_| fastrand::alphanumeric()).collect();
    let secret_file = keys.path().join("secret.key");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let seed: [u8; 32] = std::array::from_fn(|_| fastrand::u8(..));
    let ed = ed25519_dalek::SigningKey::from_bytes(&seed);
    let private_file = keys.path().join("ed25519.pem");
    // PKCS#8 v1 (the seed only), as `openssl genpkey -algorithm ed25519`
    // writes it: Python's cryptography does not read the v2 form.
    let v1 = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: seed,
        public_key: None,
    };
    std::fs::write(
        &private_file,
        v1.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    let public_file = keys.path().join("ed25519.pub.pem");
    let public = ed
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    std::fs::write(&public_file, public).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let _hs_worker = demo_worker_with(
        &server,
        &[
            "--queue",
            "wire-auth-hs",
            "--auth-key-file",
            &path(&secret_file),
        ],
    );
    let _ed_worker = demo_worker_with(
        &server,
        &[
            "--queue",
            "wire-auth-ed",
            "--auth-key-file",
            &path(&public_file),
        ],
    );
    let out = run_client(
        &script,
        &server,
        &["--auth", &path(&secret_file), &path(&private_file)],
    );
    assert!(
        out.contains("all wire-format checks passed"),
        "tests/wire/client.py exited 0 without finishing its checks:\n{out}"
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(check_l_was_traced(&out, &receiver));
    // Shown with --nocapture: what was checked.
    println!("{early}{out}");
}

/// Check l published a request with `traceparent=00-<trace>-<span>-01`: the
/// worker's attempt span is in that trace, a child of that span.
async fn check_l_was_traced(out: &str, receiver: &OtlpReceiver) {
    let line = out
        .lines()
        .find(|l| l.starts_with("ok   l."))
        .unwrap_or_else(|| panic!("no line of check l:\n{out}"));
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_owned()
    };
    let (traceparent, id) = (field("traceparent="), field("id="));
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    let (trace, parent) = (parts[1].to_owned(), parts[2].to_owned());
    let spans = receiver
        .wait_for(WAIT, |spans| spans.iter().any(|s| s.trace_id == trace))
        .await;
    let span = spans
        .iter()
        .find(|s| s.trace_id == trace)
        .unwrap_or_else(|| panic!("no span of trace {trace}"));
    assert_eq!(span.parent_span_id, parent, "{span:?}");
    assert_eq!(span.name, "process jetq.tasks.default.demo.add");
    assert_eq!(span.attr("messaging.message.id"), Some(id.as_str()));
    assert_eq!(span.attr("jetq.status"), Some("succeeded"));
    assert_eq!(span.service_name, "jetq-demo-worker");
}

/// Run `python3 client.py URL ARGS...`; panic with its output unless it
/// exits 0; return its stdout.
fn run_client(script: &Path, server: &NatsServer, args: &[&str]) -> String {
    // The script bounds each of its waits (20 s) and its whole run.
    let out = Command::new("python3")
        .arg(script)
        .arg(server.url())
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python3 tests/wire/client.py URL {} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        args.join(" "),
        out.status
    );
    stdout
}
