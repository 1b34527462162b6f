//! Signed requests with the real binaries: `jetq publish --user --roles
//! --auth-key-file` against `jetq-demo-worker --auth-key-file`, with a shared
//! secret and with an Ed25519 key pair (the worker holding only the public
//! key), on a real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::SigningKey;
use jetq_tests::{demo_worker_with, workspace_bin, ChildProcess, NatsServer};
use serde_json::{json, Value};

/// Key files in a temporary directory.
struct Keys {
    _dir: tempfile::TempDir,
    secret: PathBuf,
    secret_text: String,
    other_secret: PathBuf,
    ed_private: PathBuf,
    ed_public: PathBuf,
    other_ed_private: PathBuf,
    short_secret: PathBuf,
}

fn random_seed() -> [u8; 32] {
    std::array::from_fn(|_| fastrand::u8(..))
}

fn random_secret() -> String {
    (0..48).map(|_| fastrand::alphanumeric()).collect()
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let secret_text = random_secret();
        let ed = SigningKey::from_bytes(&random_seed());
        let other_ed = SigningKey::from_bytes(&random_seed());
        let private_pem = |key: &SigningKey| key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
        Keys {
            secret: write("secret.key", &format!("{secret_text}\n")),
            other_secret: write("other-secret.key", &format!("{}\n", random_secret())),
            ed_private: write("ed25519.pem", &private_pem(&ed)),
            ed_public: write(
                "ed25519.pub.pem",
                &ed.verifying_key()
                    .to_public_key_pem(LineEnding::LF)
                    .unwrap(),
            ),
            other_ed_private: write("other-ed25519.pem", &private_pem(&other_ed)),
            short_secret: write("short.key", "too-short-a-secret\n"),
            secret_text,
            _dir: dir,
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn jetq_at(url: &str, args: &[&str]) -> Output {
    Command::new(workspace_bin("jetq"))
        .arg("--nats")
        .arg(url)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run jetq: {e}"))
}

fn auth_worker(server: &NatsServer, key_file: &Path) -> ChildProcess {
    demo_worker_with(
        server,
        &["--concurrency", "4", "--auth-key-file", path(key_file)],
    )
}

/// `jetq publish TASK --wait 20 ARGS...`: the exit code and the record.
fn publish(server: &NatsServer, task: &str, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["publish", task, "--wait", "20"];
    all.extend_from_slice(args);
    let out = jetq_at(&server.url(), &all);
    let text = String::from_utf8_lossy(&out.stdout);
    let record: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "jetq {all:?} printed no record ({e}): stdout {text}, stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), record)
}

/// Signed as `user` with `roles`, with `key`.
fn signed<'a>(user: &'a str, roles: &'a str, key: &'a Path) -> Vec<&'a str> {
    vec![
        "--user",
        user,
        "--roles",
        roles,
        "--auth-key-file",
        path(key),
    ]
}

/// The record ended `failed` with `kind` after one attempt, its message
/// containing `needle`, and is in the dead letters.
fn assert_refused(
    server: &NatsServer,
    (code, record): &(Option<i32>, Value),
    kind: &str,
    needle: &str,
) {
    assert_eq!(*code, Some(1), "{record}");
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["attempts"], 1, "refused at once: {record}");
    assert_eq!(record["value"], Value::Null, "{record}");
    assert_eq!(record["error"]["kind"], kind, "{record}");
    let message = record["error"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    let out = jetq_at(&server.url(), &["dead", "list", "--json"]);
    assert!(out.status.success());
    let id = record["id"].as_str().unwrap();
    let letter: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["id"] == id)
        .unwrap_or_else(|| panic!("no dead letter for {id}"));
    assert_eq!(letter["error"]["kind"], kind);
}

fn whoami_value(user: &str, roles: &[&str]) -> Value {
    json!({"user": user, "roles": roles, "assumed_role": null})
}

#[test]
fn a_worker_with_a_shared_secret_serves_signed_requests_and_refuses_the_rest() {
    let keys = Keys::new();
    let server = NatsServer::start();
    let mut worker = auth_worker(&server, &keys.secret);

    // Signed with the worker's key: runs, for alice.
    let (code, record) = publish(
        &server,
        "demo.whoami",
        &signed("alice", "viewer", &keys.secret),
    );
    assert_eq!(code, Some(0), "{record}");
    assert_eq!(record["status"], "succeeded");
    assert_eq!(record["value"], whoami_value("alice", &["viewer"]));
    // `jetq get` prints the record as before.
    let out = jetq_at(&server.url(), &["get", record["id"].as_str().unwrap()]);
    assert!(out.status.success());
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got, record);

    // Unsigned, or signed with another key: refused without running.
    let unsigned = publish(&server, "demo.whoami", &[]);
    assert_refused(
        &server,
        &unsigned,
        "unauthenticated",
        "no authorization header",
    );
    let other = publish(
        &server,
        "demo.whoami",
        &signed("alice", "viewer", &keys.other_secret),
    );
    assert_refused(&server, &other, "unauthenticated", "signature");
    let ed = publish(
        &server,
        "demo.whoami",
        &signed("alice", "viewer", &keys.ed_private),
    );
    assert_refused(&server, &ed, "unauthenticated", "accepts only HS256");

    // demo.admin: forbidden for a viewer, served for an admin.
    let viewer = publish(
        &server,
        "demo.admin",
        &signed("alice", "viewer", &keys.secret),
    );
    assert_refused(&server, &viewer, "forbidden", "\"admin\"");
    let (code, record) = publish(
        &server,
        "demo.admin",
        &signed("root", "viewer,admin", &keys.secret),
    );
    assert_eq!(code, Some(0), "{record}");
    assert_eq!(record["value"], "ok");

    // Nothing printed quotes the secret; the worker lived through it all.
    for record in [&unsigned.1, &other.1, &ed.1, &viewer.1] {
        assert!(!record.to_string().contains(&keys.secret_text));
    }
    assert!(worker.0.try_wait().unwrap().is_none(), "the worker died");
}

#[test]
fn a_worker_with_the_ed25519_public_key_serves_requests_signed_with_the_private_key() {
    let keys = Keys::new();
    let server = NatsServer::start();
    let mut worker = auth_worker(&server, &keys.ed_public);

    let (code, record) = publish(
        &server,
        "demo.whoami",
        &signed("alice", "viewer", &keys.ed_private),
    );
    assert_eq!(code, Some(0), "{record}");
    assert_eq!(record["value"], whoami_value("alice", &["viewer"]));

    let unsigned = publish(&server, "demo.whoami", &[]);
    assert_refused(
        &server,
        &unsigned,
        "unauthenticated",
        "no authorization header",
    );
    let other = publish(
        &server,
        "demo.whoami",
        &signed("alice", "viewer", &keys.other_ed_private),
    );
    assert_refused(&server, &other, "unauthenticated", "signature");
    let hs = publish(
        &server,
        "demo.whoami",
        &signed("alice", "viewer", &keys.secret),
    );
    assert_refused(&server, &hs, "unauthenticated", "accepts only EdDSA");

    let viewer = publish(
        &server,
        "demo.admin",
        &signed("alice", "viewer", &keys.ed_private),
    );
    assert_refused(&server, &viewer, "forbidden", "\"admin\"");
    let (code, record) = publish(
        &server,
        "demo.admin",
        &signed("root", "admin", &keys.ed_private),
    );
    assert_eq!(code, Some(0), "{record}");
    assert_eq!(record["value"], "ok");

    // The CLI cannot sign with the public key.
    let out = jetq_at(
        &server.url(),
        &[
            "publish",
            "demo.whoami",
            "--user",
            "alice",
            "--auth-key-file",
            path(&keys.ed_public),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("can only verify"), "{err}");
    assert!(worker.0.try_wait().unwrap().is_none(), "the worker died");
}

#[test]
fn the_auth_flags_are_checked_before_connecting_with_one_clear_line() {
    let keys = Keys::new();
    // No server listens here: every case fails before connecting.
    let url = "nats://127.0.0.1:1";
    let key = path(&keys.secret);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--user", "alice"], "--user needs --auth-key-file"),
        (vec!["--auth-key-file", key], "--auth-key-file needs --user"),
        (vec!["--roles", "admin"], "--roles needs --user"),
        (vec!["--auth-ttl", "60"], "--auth-ttl needs --user"),
        (
            vec!["--user", "", "--auth-key-file", key],
            "--user must not be empty",
        ),
        (
            vec!["--user", "alice", "--auth-key-file", "/no/such/key"],
            "cannot read auth key file /no/such/key",
        ),
        (
            vec![
                "--user",
                "alice",
                "--auth-key-file",
                path(&keys.short_secret),
            ],
            "at least 32 are required",
        ),
        (
            vec!["--user", "alice", "--auth-key-file", key, "--auth-ttl", "0"],
            "too small",
        ),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["publish", "demo.whoami"];
        args.extend_from_slice(&flags);
        let out = jetq_at(url, &args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{flags:?}: one line: {err}");
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!err.contains("too-short-a-secret"), "{flags:?}: {err}");
        assert!(out.stdout.is_empty(), "{flags:?}");
    }
    // The demo worker reads its key file before connecting too.
    let out = Command::new(workspace_bin("jetq-demo-worker"))
        .args(["--nats", url, "--connect-wait", "0"])
        .args(["--auth-key-file", path(&keys.short_secret)])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("short.key") && err.contains("at least 32"),
        "{err}"
    );
    assert!(!err.contains("too-short-a-secret"), "{err}");
}

#[test]
fn without_the_flag_the_demo_worker_refuses_the_auth_tasks_as_unauthenticated() {
    let keys = Keys::new();
    let server = NatsServer::start();
    let _worker = demo_worker_with(&server, &["--concurrency", "4"]);
    // Signed or not: nothing on this worker verifies who the request runs for.
    let record = publish(
        &server,
        "demo.whoami",
        &signed("alice", "admin", &keys.secret),
    );
    assert_refused(
        &server,
        &record,
        "unauthenticated",
        "does not check auth tokens",
    );
    let record = publish(&server, "demo.admin", &[]);
    assert_refused(
        &server,
        &record,
        "unauthenticated",
        "does not check auth tokens",
    );
    // The other demo tasks need no token there.
    let (code, record) = publish(&server, "demo.add", &["--args", r#"{"a":1,"b":2}"#]);
    assert_eq!(code, Some(0), "{record}");
}
