//! NKey, TLS and credentials-file connections against a real nats-server.
//!
//! Every key, certificate and JWT is generated at test time into a temporary
//! directory: nothing secret or expiring is committed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::{pull_all, request, stream_messages};
use jetq::broker::{Broker, ConsumeOptions};
use jetq::ErrorKind;
use jetq_nats::{NatsBroker, NatsConfig};
use jetq_test_server::NatsServer;
use nkeys::KeyPair;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose,
};
use serde_json::json;
use tempfile::TempDir;

/// Write `text` as the server's configuration file and start the server with it.
fn start_with_config(dir: &Path, text: &str) -> NatsServer {
    let conf = dir.join("server.conf");
    std::fs::write(&conf, text).unwrap();
    NatsServer::start_with_args(&["-c", conf.to_str().unwrap()])
}

/// Write `contents` to `dir/name` and return the path.
fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Quote a path for the server configuration file.
fn quoted(path: &Path) -> String {
    format!("{:?}", path.to_str().unwrap())
}

/// The connection really works: provision, publish and receive one task.
async fn assert_works(config: NatsConfig) {
    let broker = NatsBroker::connect_with(config).await.expect("connect");
    broker.ensure_queue("default").await.unwrap();
    broker
        .publish(request("r1", "default", "t", "hello"))
        .await
        .unwrap();
    assert_eq!(stream_messages(&broker).await, 1);
    let mut consumer = broker
        .consume("default", ConsumeOptions::new("w"))
        .await
        .unwrap();
    let got = pull_all(&mut consumer, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload(), b"hello");
}

async fn connect_err(config: NatsConfig) -> jetq::Error {
    NatsBroker::connect_with(config.connection_timeout(Duration::from_secs(3)))
        .await
        .expect_err("the connection must be refused")
}

// ---------------------------------------------------------------- NKey

#[tokio::test]
async fn nkey_seed() {
    let dir = TempDir::new().unwrap();
    let user = KeyPair::new_user();
    let server = start_with_config(
        dir.path(),
        &format!(
            "authorization {{\n  users = [ {{ nkey: {} }} ]\n}}\n",
            user.public_key()
        ),
    );

    assert_works(NatsConfig::new(&server.url()).nkey_seed(user.seed().unwrap())).await;

    // A valid seed the server does not know.
    let stranger = KeyPair::new_user();
    let err = connect_err(NatsConfig::new(&server.url()).nkey_seed(stranger.seed().unwrap())).await;
    assert_eq!(err.kind(), ErrorKind::Broker, "{err:?}");
    assert!(err.message().contains("refused the credentials"), "{err}");

    // No credentials at all.
    let err = connect_err(NatsConfig::new(&server.url())).await;
    assert_eq!(err.kind(), ErrorKind::Broker, "{err:?}");

    // Not a seed: a local configuration problem, not the server's refusal.
    let err = connect_err(NatsConfig::new(&server.url()).nkey_seed("SUnot-a-seed")).await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
    // The public key is not a seed either.
    let err = connect_err(NatsConfig::new(&server.url()).nkey_seed(user.public_key())).await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
}

// ---------------------------------------------------------------- TLS

/// A CA, and the PEM files of certificates it signed, in a temporary directory.
struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = TempDir::new().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("jetq test CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        write(dir.path(), "ca.pem", &ca.pem());
        Pki { dir, ca }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issue a certificate; returns the paths of the certificate and the key.
    fn issue(
        &self,
        name: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &*self.ca).unwrap();
        (
            write(self.dir.path(), &format!("{name}-cert.pem"), &cert.pem()),
            write(
                self.dir.path(),
                &format!("{name}-key.pem"),
                &key.serialize_pem(),
            ),
        )
    }

    fn server_cert(&self) -> (PathBuf, PathBuf) {
        self.issue(
            "server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client_cert(&self) -> (PathBuf, PathBuf) {
        self.issue("client", &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A server that requires TLS; with `verify` it also requires a client
/// certificate signed by the same CA.
fn start_tls_server(pki: &Pki, verify: bool) -> NatsServer {
    let (cert, key) = pki.server_cert();
    let mut tls = format!(
        "  cert_file: {}\n  key_file: {}\n  timeout: 5\n",
        quoted(&cert),
        quoted(&key)
    );
    if verify {
        tls.push_str(&format!(
            "  ca_file: {}\n  verify: true\n",
            quoted(&pki.ca_file())
        ));
    }
    start_with_config(pki.dir.path(), &format!("tls {{\n{tls}}}\n"))
}

#[tokio::test]
async fn tls_with_root_ca() {
    let pki = Pki::new("a");
    let server = start_tls_server(&pki, false);

    assert_works(
        NatsConfig::new(&server.url())
            .require_tls(true)
            .root_ca(pki.ca_file()),
    )
    .await;
    // The tls:// scheme asks for TLS too.
    let tls_url = format!("tls://127.0.0.1:{}", server.port());
    let broker = NatsBroker::connect_with(NatsConfig::new(&tls_url).root_ca(pki.ca_file()))
        .await
        .unwrap();
    broker.ensure_queue("default").await.unwrap();

    // Without our CA the server's certificate is not trusted.
    let err = connect_err(NatsConfig::new(&server.url()).require_tls(true)).await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
    assert!(err.message().contains("TLS"), "{err}");

    // Nor with another CA.
    let other = Pki::new("b");
    let err = connect_err(
        NatsConfig::new(&server.url())
            .require_tls(true)
            .root_ca(other.ca_file()),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");

    // A CA file that does not exist.
    let err = connect_err(
        NatsConfig::new(&server.url())
            .require_tls(true)
            .root_ca(pki.dir.path().join("missing.pem")),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
}

#[tokio::test]
async fn require_tls_refuses_a_plaintext_server() {
    let pki = Pki::new("a");
    let server = NatsServer::start();
    // Sanity: the same server accepts plaintext.
    NatsBroker::connect(&server.url()).await.unwrap();
    let err = connect_err(
        NatsConfig::new(&server.url())
            .require_tls(true)
            .root_ca(pki.ca_file()),
    )
    .await;
    // The client starts a handshake the server does not answer in TLS.
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
    assert!(err.message().contains("TLS handshake"), "{err}");
}

#[tokio::test]
async fn tls_with_client_certificate() {
    let pki = Pki::new("a");
    let server = start_tls_server(&pki, true);
    let (cert, key) = pki.client_cert();

    assert_works(
        NatsConfig::new(&server.url())
            .require_tls(true)
            .root_ca(pki.ca_file())
            .client_cert(&cert, &key),
    )
    .await;

    // No client certificate: the server refuses the handshake.
    let err = connect_err(
        NatsConfig::new(&server.url())
            .require_tls(true)
            .root_ca(pki.ca_file()),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");

    // A client certificate from a CA the server does not trust.
    let other = Pki::new("b");
    let (cert_b, key_b) = other.client_cert();
    let err = connect_err(
        NatsConfig::new(&server.url())
            .require_tls(true)
            .root_ca(pki.ca_file())
            .client_cert(&cert_b, &key_b),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");

    // The key of another certificate.
    let err = connect_err(
        NatsConfig::new(&server.url())
            .require_tls(true)
            .root_ca(pki.ca_file())
            .client_cert(&cert, &key_b),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
}

// ---------------------------------------------------------------- credentials file

/// Encode and sign NATS JWT claims (`ed25519-nkey`, as the server expects).
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "jti": format!("{}{iat}", name.to_uppercase()),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// An account JWT without limits; JetStream is enabled unless `system`
/// (the server refuses JetStream in the system account).
fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, system: bool) -> String {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if !system {
        for limit in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[limit] = json!(-1);
        }
    }
    jwt(
        operator,
        &account.public_key(),
        name,
        json!({
            "type": "account",
            "version": 2,
            "limits": limits,
            "default_permissions": { "pub": {}, "sub": {} },
        }),
    )
}

/// A `.creds` file for a new user of `account`.
fn creds_file(dir: &Path, name: &str, account: &KeyPair) -> PathBuf {
    let user = KeyPair::new_user();
    let user_jwt = jwt(
        account,
        &user.public_key(),
        name,
        json!({
            "type": "user",
            "version": 2,
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        }),
    );
    let seed = user.seed().unwrap();
    write(
        dir,
        &format!("{name}.creds"),
        &format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        ),
    )
}

#[tokio::test]
async fn credentials_file() {
    let dir = TempDir::new().unwrap();
    let operator = KeyPair::new_operator();
    let system = KeyPair::new_account();
    let account = KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "jetq-test-operator",
        json!({ "type": "operator", "version": 2, "system_account": system.public_key() }),
    );
    let operator_file = write(dir.path(), "operator.jwt", &operator_jwt);
    let server = start_with_config(
        dir.path(),
        &format!(
            "operator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
            quoted(&operator_file),
            system.public_key(),
            system.public_key(),
            account_jwt(&operator, &system, "SYS", true),
            account.public_key(),
            account_jwt(&operator, &account, "APP", false),
        ),
    );

    let creds = creds_file(dir.path(), "worker", &account);
    assert_works(NatsConfig::new(&server.url()).credentials_file(&creds)).await;

    // A user of an account the server does not know.
    let unknown = creds_file(dir.path(), "stranger", &KeyPair::new_account());
    let err = connect_err(NatsConfig::new(&server.url()).credentials_file(&unknown)).await;
    assert_eq!(err.kind(), ErrorKind::Broker, "{err:?}");
    assert!(err.message().contains("refused the credentials"), "{err}");

    // A file that is not there, and one that is not a credentials file.
    let err = connect_err(
        NatsConfig::new(&server.url()).credentials_file(dir.path().join("missing.creds")),
    )
    .await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
    assert!(err.message().contains("missing.creds"), "{err}");
    let garbage = write(dir.path(), "garbage.creds", "not a credentials file\n");
    let err = connect_err(NatsConfig::new(&server.url()).credentials_file(&garbage)).await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
}
