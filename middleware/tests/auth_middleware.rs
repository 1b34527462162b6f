//! The auth middleware on a worker and a client, with the in-memory broker:
//! every refusal ends the request at once with its kind and a dead letter,
//! the handler never runs and the worker goes on; a verified request gives
//! the handler its `Auth`; child requests get tokens of their own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::SigningKey;
use jetq::memory::MemoryBroker;
use jetq::middleware::{publish_from_fn, Publish, PublishNext};
use jetq::{Client, Context, ErrorKind, Record, State, Status, TaskError, Worker};
use jetq_middleware::auth::{
    bearer, Auth, AuthContext, AuthError, AuthKey, RequireAuth, SignAuth, SignError, TokenAuth,
    AUTH_HEADER,
};
use serde_json::{json, Value};
use time::OffsetDateTime;

const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
const OTHER_SECRET: &str = "another shared secret, also long enough to use";

fn secret_auth() -> TokenAuth {
    TokenAuth::new(AuthKey::from_secret(SECRET.as_bytes()).unwrap())
}

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn public_pem(seed: u8) -> String {
    signing_key(seed)
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap()
}

fn ed_private(seed: u8) -> TokenAuth {
    let pem = signing_key(seed).to_pkcs8_pem(LineEnding::LF).unwrap();
    TokenAuth::new(AuthKey::from_pem_or_secret(pem.as_bytes()).unwrap())
}

fn ed_public(seed: u8) -> TokenAuth {
    TokenAuth::new(AuthKey::from_pem_or_secret(public_pem(seed).as_bytes()).unwrap())
}

fn unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Claims for request `id` of `task`, valid for an hour.
fn claims(id: &str, task: &str, roles: &[&str]) -> Value {
    let now = unix();
    json!({
        "sub": "alice", "roles": roles, "jetq_id": id, "jetq_task": task,
        "iat": now, "exp": now + 3600,
    })
}

fn jwt(alg: jsonwebtoken::Algorithm, key: &jsonwebtoken::EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).unwrap()
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret).unwrap();
    jwt(jsonwebtoken::Algorithm::HS256, &key, claims)
}

fn eddsa(seed: u8, claims: &Value) -> String {
    let der = signing_key(seed).to_pkcs8_der().unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes());
    jwt(jsonwebtoken::Algorithm::EdDSA, &key, claims)
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// Counts the runs of the handlers.
#[derive(Clone, Default)]
struct Ran(Arc<AtomicUsize>);

impl Ran {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Who the handler was told it runs for.
async fn whoami(auth: Auth, State(ran): State<Ran>) -> Result<Value, TaskError> {
    ran.0.fetch_add(1, Ordering::SeqCst);
    Ok(json!({
        "user": auth.user(),
        "roles": auth.roles(),
        "assumed_role": auth.assumed_role(),
        "exp": auth.expires_at().map(|t| t.unix_timestamp()),
    }))
}

/// A worker serving `whoami` (a valid token) and `admin` (role `admin` or
/// `ops`), checking tokens with `auth`.
fn worker(broker: &MemoryBroker, auth: TokenAuth, ran: &Ran) -> jetq::RunningWorker {
    Worker::builder(broker.clone())
        .middleware(RequireAuth::new(auth).require("admin", ["admin", "ops"]))
        .state(ran.clone())
        .task("whoami", whoami)
        .task("admin", whoami)
        .spawn()
        .unwrap()
}

async fn run(client: &Client, task: &str, id: &str, header: Option<&str>) -> Record {
    let mut request = client.task(task).id(id);
    if let Some(h) = header {
        request = request.header(AUTH_HEADER, h);
    }
    request.publish().await.unwrap().wait(WAIT).await.unwrap()
}

/// The request ended `failed` at once, with `kind`, a message containing
/// `needle` and none of `secrets`, and a dead letter of the same kind.
async fn assert_refused(
    client: &Client,
    record: &Record,
    kind: &str,
    needle: &str,
    secrets: &[&str],
) {
    let label = &record.id;
    assert_eq!(record.status, Status::Failed, "{label}: {record:?}");
    assert_eq!(record.attempts, 1, "{label}: permanent, never retried");
    let error = record.error.as_ref().unwrap();
    assert_eq!(error.kind, kind, "{label}: {}", error.message);
    assert!(
        error.message.contains(needle),
        "{label}: {:?} lacks {needle:?}",
        error.message
    );
    for secret in secrets {
        for part in secret.split('.').filter(|p| p.len() > 8) {
            assert!(
                !error.message.contains(part),
                "{label}: the message quotes a secret: {}",
                error.message
            );
        }
    }
    let letter = client.dead_letter(&record.id).await.unwrap().unwrap();
    assert_eq!(letter.error.kind, kind, "{label}: dead letter");
}

#[tokio::test]
async fn every_bad_token_is_refused_before_the_handler_and_the_worker_goes_on() {
    let broker = MemoryBroker::new();
    let ran = Ran::default();
    let w = worker(&broker, secret_auth(), &ran);
    let client = Client::new(broker.clone());
    let auth = secret_auth();
    let viewer = AuthContext::new("alice").with_roles(["viewer"]);

    let good = |id: &str, task: &str| bearer(&auth.sign(&viewer, id, task).unwrap());
    // The payload of a valid token swapped for one that grants `admin`,
    // keeping the signature.
    let tampered = {
        let token = auth.sign(&viewer, "r-tampered", "admin").unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged = b64(&claims("r-tampered", "admin", &["admin"]));
        format!("Bearer {}.{forged}.{}", parts[0], parts[2])
    };
    let none = format!(
        "Bearer {}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("r-none", "whoami", &[]))
    );
    let mut expired = claims("r-expired", "whoami", &[]);
    expired["exp"] = json!(unix() - 120);

    let cases: Vec<(&str, &str, Option<String>, &str, &str)> = vec![
        (
            "r-missing",
            "whoami",
            None,
            "unauthenticated",
            "no authorization header",
        ),
        (
            "r-malformed",
            "whoami",
            Some("Bearer not-a-jwt".into()),
            "unauthenticated",
            "not a JWT",
        ),
        (
            "r-scheme",
            "whoami",
            Some(good("r-scheme", "whoami").replace("Bearer", "Basic")),
            "unauthenticated",
            "Bearer scheme",
        ),
        (
            "r-other-key",
            "whoami",
            Some(bearer(&hs256(
                OTHER_SECRET.as_bytes(),
                &claims("r-other-key", "whoami", &[]),
            ))),
            "unauthenticated",
            "signature",
        ),
        (
            "r-tampered",
            "admin",
            Some(tampered),
            "unauthenticated",
            "signature",
        ),
        (
            "r-none",
            "whoami",
            Some(none),
            "unauthenticated",
            "\"none\"",
        ),
        (
            "r-eddsa",
            "whoami",
            Some(bearer(&eddsa(1, &claims("r-eddsa", "whoami", &[])))),
            "unauthenticated",
            "accepts only HS256",
        ),
        (
            "r-expired",
            "whoami",
            Some(bearer(&hs256(SECRET.as_bytes(), &expired))),
            "unauthenticated",
            "expired",
        ),
        (
            // A token lifted from another request.
            "r-lifted",
            "whoami",
            Some(good("r-original", "whoami")),
            "unauthenticated",
            "bound to request \"r-original\"",
        ),
        (
            "r-task",
            "whoami",
            Some(good("r-task", "admin")),
            "unauthenticated",
            "bound to task \"admin\"",
        ),
        (
            "r-role",
            "admin",
            Some(good("r-role", "admin")),
            "forbidden",
            "requires one of the roles \"admin\", \"ops\"",
        ),
    ];
    for (id, task, header, kind, needle) in &cases {
        let record = run(&client, task, id, header.as_deref()).await;
        let mut secrets = vec![SECRET];
        if let Some(h) = header {
            secrets.push(h.trim_start_matches("Bearer ").trim_start_matches("Basic "));
        }
        assert_refused(&client, &record, kind, needle, &secrets).await;
    }
    assert_eq!(ran.count(), 0, "the handler never ran");

    // The worker lives on: a good token is served.
    let record = run(&client, "whoami", "r-good", Some(&good("r-good", "whoami"))).await;
    assert_eq!(record.status, Status::Succeeded, "{record:?}");
    assert_eq!(ran.count(), 1);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_ed25519_worker_refuses_other_keys_and_the_algorithm_confusion() {
    let broker = MemoryBroker::new();
    let ran = Ran::default();
    // The worker holds the public key only.
    let w = worker(&broker, ed_public(1), &ran);
    let client = Client::new(broker.clone());
    let pem = public_pem(1);
    let raw = signing_key(1).verifying_key().to_bytes();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "e-other-key",
            bearer(&eddsa(2, &claims("e-other-key", "whoami", &[]))),
            "signature",
        ),
        (
            // HS256 with the worker's public key (PEM) as the HMAC secret.
            "e-confused-pem",
            bearer(&hs256(
                pem.as_bytes(),
                &claims("e-confused-pem", "whoami", &[]),
            )),
            "accepts only EdDSA",
        ),
        (
            "e-confused-raw",
            bearer(&hs256(&raw, &claims("e-confused-raw", "whoami", &[]))),
            "accepts only EdDSA",
        ),
        (
            "e-secret",
            bearer(
                &secret_auth()
                    .sign(&AuthContext::new("alice"), "e-secret", "whoami")
                    .unwrap(),
            ),
            "accepts only EdDSA",
        ),
    ];
    for (id, header, needle) in &cases {
        let record = run(&client, "whoami", id, Some(header)).await;
        assert_refused(&client, &record, "unauthenticated", needle, &[header]).await;
    }
    assert_eq!(ran.count(), 0, "the handler never ran");

    let signer = ed_private(1);
    let ctx = AuthContext::new("bob").with_roles(["ops"]);
    let header = bearer(&signer.sign(&ctx, "e-good", "admin").unwrap());
    let record = run(&client, "admin", "e-good", Some(&header)).await;
    assert_eq!(record.status, Status::Succeeded, "{record:?}");
    let value: Value = record.value_as().unwrap();
    assert_eq!(value["user"], "bob");
    assert_eq!(value["assumed_role"], "ops");
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_verified_request_gives_the_handler_user_roles_and_assumed_role() {
    let broker = MemoryBroker::new();
    let ran = Ran::default();
    let w = worker(&broker, secret_auth(), &ran);
    // The producer signs with the middleware.
    let who = AuthContext::new("alice").with_roles(["viewer", "ops", "admin"]);
    let client = Client::new(broker.clone()).middleware(
        SignAuth::new(secret_auth(), who)
            .unwrap()
            .with_ttl(Duration::from_secs(600)),
    );

    let value: Value = client
        .task("admin")
        .publish()
        .await
        .unwrap()
        .result(WAIT)
        .await
        .unwrap();
    assert_eq!(value["user"], "alice");
    assert_eq!(value["roles"], json!(["viewer", "ops", "admin"]));
    // The first required role the user holds, in the task's order.
    assert_eq!(value["assumed_role"], "admin");
    let exp = value["exp"].as_i64().unwrap();
    assert!((unix() + 590..=unix() + 600).contains(&exp), "ttl: {exp}");

    let value: Value = client
        .task("whoami")
        .publish()
        .await
        .unwrap()
        .result(WAIT)
        .await
        .unwrap();
    assert_eq!(value["user"], "alice");
    assert_eq!(
        value["assumed_role"],
        Value::Null,
        "whoami requires no role"
    );
    assert_eq!(ran.count(), 2);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_auth_extractor_without_the_middleware_is_unauthenticated() {
    let broker = MemoryBroker::new();
    let ran = Ran::default();
    let w = Worker::builder(broker.clone())
        .state(ran.clone())
        .task("whoami", whoami)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let record = run(&client, "whoami", "x-1", None).await;
    assert_refused(&client, &record, "unauthenticated", "RequireAuth", &[]).await;
    assert_eq!(ran.count(), 0);
    w.shutdown().await.unwrap();
}

#[test]
fn an_auth_error_becomes_a_permanent_task_error_of_its_kind() {
    let err: AuthError = secret_auth().verify(None, "id", "task").unwrap_err();
    let task_error = err.to_task_error();
    assert_eq!(task_error.kind(), "unauthenticated");
    assert_eq!(task_error.message(), err.message());
    assert!(!task_error.is_retryable());
}

// ---------------------------------------------------------------- children

/// Publishes a `whoami` child through the attempt's client; returns the
/// child's id and its own token's expiry.
async fn parent(ctx: Context, auth: Auth) -> Result<Value, TaskError> {
    let child = ctx
        .client()
        .task("whoami")
        .publish()
        .await
        .map_err(|e| TaskError::permanent(e.to_string()))?;
    Ok(json!({
        "child": child.id(),
        "exp": auth.expires_at().map(|t| t.unix_timestamp()),
    }))
}

/// A worker checking tokens with `verify`, whose client signs children with
/// `sign`.
fn parent_worker(
    broker: &MemoryBroker,
    verify: TokenAuth,
    sign: TokenAuth,
    ran: &Ran,
) -> jetq::RunningWorker {
    Worker::builder(broker.clone())
        .middleware(RequireAuth::new(verify))
        .client(Client::new(broker.clone()).middleware(SignAuth::children(sign)))
        .state(ran.clone())
        .task("parent", parent)
        .task("whoami", whoami)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_signing_worker_signs_each_child_for_the_parents_user_never_for_longer() {
    let broker = MemoryBroker::new();
    let ran = Ran::default();
    // Child tokens live at most 60 s, less than the parent's 600 s.
    let w = parent_worker(
        &broker,
        secret_auth(),
        secret_auth().with_default_lifetime(Duration::from_secs(60)),
        &ran,
    );
    let who = AuthContext::new("carol").with_roles(["editor", "viewer"]);
    let client = Client::new(broker.clone()).middleware(
        SignAuth::new(secret_auth(), who)
            .unwrap()
            .with_ttl(Duration::from_secs(600)),
    );
    let out: Value = client
        .task("parent")
        .publish()
        .await
        .unwrap()
        .result(WAIT)
        .await
        .unwrap();
    let child_id = out["child"].as_str().unwrap();
    let parent_exp = out["exp"].as_i64().unwrap();
    let value: Value = client
        .wait(child_id, WAIT)
        .await
        .unwrap()
        .value_as()
        .unwrap();
    assert_eq!(value["user"], "carol");
    assert_eq!(value["roles"], json!(["editor", "viewer"]));
    let child_exp = value["exp"].as_i64().unwrap();
    assert!(child_exp <= unix() + 60, "capped by the signer's lifetime");
    assert!(child_exp < parent_exp);

    // With a longer signer lifetime, the child expires with its parent.
    w.shutdown().await.unwrap();
    let w = parent_worker(&broker, secret_auth(), secret_auth(), &ran);
    let who = AuthContext::new("carol").with_roles(["editor"]);
    let client = Client::new(broker.clone()).middleware(
        SignAuth::new(secret_auth(), who)
            .unwrap()
            .with_ttl(Duration::from_secs(120)),
    );
    let out: Value = client
        .task("parent")
        .publish()
        .await
        .unwrap()
        .result(WAIT)
        .await
        .unwrap();
    let value: Value = client
        .wait(out["child"].as_str().unwrap(), WAIT)
        .await
        .unwrap()
        .value_as()
        .unwrap();
    assert_eq!(value["exp"], out["exp"], "never outlives the parent");
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_verify_only_worker_publishes_children_without_a_token_and_they_are_refused() {
    let broker = MemoryBroker::new();
    let ran = Ran::default();
    // The worker holds the public key: it verifies, and cannot sign.
    let w = parent_worker(&broker, ed_public(3), ed_public(3), &ran);
    let who = AuthContext::new("dave").with_roles(["viewer"]);
    let client = Client::new(broker.clone()).middleware(SignAuth::new(ed_private(3), who).unwrap());
    let handle = client.task("parent").publish().await.unwrap();
    let out: Value = handle.result(WAIT).await.unwrap();
    let child_id = out["child"].as_str().unwrap();
    let record = client.wait(child_id, WAIT).await.unwrap();
    assert_refused(
        &client,
        &record,
        "unauthenticated",
        "no authorization header",
        &[],
    )
    .await;
    // The child was published with no token at all.
    let letter = client.dead_letter(child_id).await.unwrap().unwrap();
    let request: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(request["parent"], handle.id());
    assert!(request["headers"].get(AUTH_HEADER).is_none(), "{request}");
    assert_eq!(ran.count(), 0, "the child's handler never ran");
    w.shutdown().await.unwrap();
}

async fn peek(ctx: Context) -> Result<Value, TaskError> {
    if ctx.task() == "peek.parent" {
        let child = ctx
            .client()
            .task("peek")
            .publish()
            .await
            .map_err(|e| TaskError::permanent(e.to_string()))?;
        return Ok(json!(child.id()));
    }
    Ok(json!(ctx.header(AUTH_HEADER).is_some()))
}

#[tokio::test]
async fn a_child_of_an_attempt_without_verified_auth_gets_no_token() {
    let broker = MemoryBroker::new();
    // No RequireAuth: the parent has no verified auth, so its child is not
    // signed, even though the worker's client holds a signing key and a
    // context of its own.
    let sign = SignAuth::new(secret_auth(), AuthContext::new("service")).unwrap();
    let w = Worker::builder(broker.clone())
        .client(Client::new(broker.clone()).middleware(sign))
        .task("peek.parent", peek)
        .task("peek", peek)
        .spawn()
        .unwrap();
    let client = Client::new(broker.clone());
    let child: String = client
        .task("peek.parent")
        .publish()
        .await
        .unwrap()
        .result(WAIT)
        .await
        .unwrap();
    let has_token: bool = client.wait(&child, WAIT).await.unwrap().value_as().unwrap();
    assert!(!has_token);
    w.shutdown().await.unwrap();
}

/// Waits past its token's expiry, then publishes a child.
async fn late_parent(ctx: Context, auth: Auth) -> Result<String, TaskError> {
    let exp = auth.expires_at().unwrap();
    let wait = exp - OffsetDateTime::now_utc() + time::Duration::milliseconds(200);
    tokio::time::sleep(wait.try_into().unwrap_or_default()).await;
    match ctx.client().task("whoami").publish().await {
        Ok(_) => Ok("published".into()),
        Err(e) if e.kind() == ErrorKind::Config => Ok(e.to_string()),
        Err(e) => Err(TaskError::permanent(e.to_string())),
    }
}

#[tokio::test]
async fn a_parent_whose_token_expired_cannot_publish_children() {
    let broker = MemoryBroker::new();
    let ran = Ran::default();
    let strict = secret_auth().with_leeway(Duration::ZERO);
    let w = Worker::builder(broker.clone())
        .middleware(RequireAuth::new(strict.clone()))
        .client(Client::new(broker.clone()).middleware(SignAuth::children(strict)))
        .state(ran.clone())
        .task("late", late_parent)
        .task("whoami", whoami)
        .spawn()
        .unwrap();
    let who = AuthContext::new("erin")
        .with_expires_at(OffsetDateTime::now_utc() + time::Duration::seconds(3));
    let client = Client::new(broker.clone()).middleware(SignAuth::new(secret_auth(), who).unwrap());
    let text: String = client
        .task("late")
        .publish()
        .await
        .unwrap()
        .result(WAIT)
        .await
        .unwrap();
    assert!(
        text.contains("cannot sign an auth token for child request"),
        "{text}"
    );
    assert!(text.contains("not in the future"), "{text}");
    assert_eq!(ran.count(), 0, "no child ran");
    w.shutdown().await.unwrap();
}

// ---------------------------------------------------------------- producer

/// Capture the request as the chain leaves it, and publish nothing.
fn capture(
    into: Arc<std::sync::Mutex<Vec<jetq::Request>>>,
) -> impl jetq::middleware::PublishMiddleware {
    publish_from_fn(move |publish: Publish, _next: PublishNext| {
        let into = Arc::clone(&into);
        async move {
            into.lock().unwrap().push(*publish.request);
            Err(jetq::Error::new(ErrorKind::Config, "captured"))
        }
    })
}

#[tokio::test]
async fn the_producer_signs_each_request_for_its_id_and_task_with_its_ttl() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let who = AuthContext::new("alice").with_roles(["viewer"]);
    let client = Client::new(MemoryBroker::new())
        .middleware(
            SignAuth::new(secret_auth(), who)
                .unwrap()
                .with_ttl(Duration::from_secs(300)),
        )
        .middleware(capture(Arc::clone(&seen)));
    let _ = client.task("reports.run").id("p-1").publish().await;
    let _ = client
        .task("reports.run")
        .id("p-2")
        .header(AUTH_HEADER, "Bearer replaced")
        .delay(Duration::from_secs(3600))
        .publish()
        .await;
    let requests = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(requests.len(), 2);
    let verifier = secret_auth();
    let now = unix();
    let check = |request: &jetq::Request| {
        let header = request.headers.get(AUTH_HEADER).unwrap();
        let ctx = verifier
            .verify(Some(header), &request.id, &request.task)
            .unwrap();
        assert_eq!(ctx.user, "alice");
        assert_eq!(ctx.roles, ["viewer"]);
        ctx.expires_at.unwrap().unix_timestamp()
    };
    let exp = check(&requests[0]);
    assert!((now + 295..=now + 300).contains(&exp), "{exp}");
    // A delayed request's token lives its ttl from when it is due.
    let exp = check(&requests[1]);
    assert!(
        (now + 3595 + 300..=now + 3600 + 300).contains(&exp),
        "{exp}"
    );
    // Bound to its own request only.
    let header = requests[0].headers.get(AUTH_HEADER).unwrap();
    assert!(verifier.verify(Some(header), "p-2", "reports.run").is_err());
}

#[test]
fn a_producer_needs_a_signing_key_and_a_user() {
    let who = AuthContext::new("alice");
    assert_eq!(
        SignAuth::new(ed_public(1), who).unwrap_err(),
        SignError::CannotSign
    );
    assert_eq!(
        SignAuth::new(secret_auth(), AuthContext::new("")).unwrap_err(),
        SignError::NoUser
    );
    assert!(SignAuth::new(ed_private(1), AuthContext::new("alice")).is_ok());
}
