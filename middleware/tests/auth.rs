//! Auth tokens: every refusal, the binding, roles, child tokens and key files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::SigningKey;
use jetq_middleware::auth::{
    assumed_role, bearer, AuthContext, AuthError, AuthErrorKind, AuthFailure, AuthKey, KeyError,
    SignError, TokenAuth, VerifiedAuth, AUTH_HEADER, DEFAULT_LEEWAY, DEFAULT_LIFETIME,
};
use serde_json::{json, Value};
use time::OffsetDateTime;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
const OTHER_SECRET: &str = "another shared secret, also long enough to use";
const ID: &str = "req-1";
const TASK: &str = "images.resize";

fn secret_key() -> AuthKey {
    AuthKey::from_secret(SECRET.as_bytes()).unwrap()
}

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn private_pem(seed: u8) -> String {
    signing_key(seed)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string()
}

fn public_pem(seed: u8) -> String {
    signing_key(seed)
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap()
}

fn ed_private(seed: u8) -> AuthKey {
    AuthKey::from_pem_or_secret(private_pem(seed).as_bytes()).unwrap()
}

fn ed_public(seed: u8) -> AuthKey {
    AuthKey::from_pem_or_secret(public_pem(seed).as_bytes()).unwrap()
}

fn alice() -> AuthContext {
    AuthContext::new("alice").with_roles(["editor", "viewer"])
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn unix() -> i64 {
    now().unix_timestamp()
}

/// A well-formed claim set for `ID` and `TASK`, valid for an hour.
fn claims() -> Value {
    let now = unix();
    json!({
        "sub": "alice",
        "roles": ["editor"],
        "jetq_id": ID,
        "jetq_task": TASK,
        "iat": now,
        "exp": now + 3600,
    })
}

/// An HS256 token over any claims, signed with any secret.
fn hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

/// An EdDSA token over any claims, signed with the key of `seed`.
fn eddsa(seed: u8, claims: &Value) -> String {
    let der = signing_key(seed).to_pkcs8_der().unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        claims,
        &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
    )
    .unwrap()
}

/// `header.payload.signature`, with an HS256 signature by `SECRET` over
/// whatever the two parts hold.
fn signed(header: &str, payload: &str) -> String {
    let message = format!("{header}.{payload}");
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
        .unwrap();
    format!("{message}.{sig}")
}

fn b64(json: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(json).unwrap())
}

/// The token's parts: header, payload (both decoded) and signature.
fn parts(token: &str) -> (Value, Value, String) {
    let mut it = token.split('.');
    let dec = |s: Option<&str>| -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s.unwrap()).unwrap()).unwrap()
    };
    let header = dec(it.next());
    let payload = dec(it.next());
    (header, payload, it.next().unwrap().to_owned())
}

/// Verify `header` as the header value of request `ID` for `TASK`, and check
/// that a refusal never echoes the token.
fn check(auth: &TokenAuth, header: Option<&str>) -> Result<AuthContext, AuthError> {
    let result = auth.verify(header, ID, TASK);
    if let (Err(e), Some(h)) = (&result, header) {
        assert_no_secret(&e.to_string(), h);
    }
    result
}

fn failure(auth: &TokenAuth, header: Option<&str>) -> AuthFailure {
    check(auth, header).unwrap_err().failure()
}

fn assert_no_secret(message: &str, header: &str) {
    let token = header.rsplit(' ').next().unwrap_or(header);
    assert!(!message.contains(SECRET), "{message}");
    if token.len() > 8 {
        assert!(
            !message.contains(token),
            "message echoes the token: {message}"
        );
        for part in token.split('.').filter(|p| p.len() > 8) {
            assert!(
                !message.contains(part),
                "message echoes a token part: {message}"
            );
        }
    }
}

// ---------------------------------------------------------------- round trips

#[test]
fn hs256_round_trip() {
    let auth = TokenAuth::new(secret_key());
    let token = auth.sign(&alice(), ID, TASK).unwrap();
    let ctx = check(&auth, Some(&bearer(&token))).unwrap();
    assert_eq!(ctx.user, "alice");
    assert_eq!(ctx.roles, ["editor", "viewer"]);
    let exp = ctx.expires_at.unwrap().unix_timestamp();
    let expected = unix() + DEFAULT_LIFETIME.as_secs() as i64;
    assert!(
        (expected - 5..=expected).contains(&exp),
        "{exp} vs {expected}"
    );
}

#[test]
fn eddsa_private_signs_public_verifies() {
    let signer = TokenAuth::new(ed_private(1));
    let worker = TokenAuth::new(ed_public(1));
    let header = bearer(&signer.sign(&alice(), ID, TASK).unwrap());
    assert_eq!(check(&worker, Some(&header)).unwrap().user, "alice");
    // A private key verifies too, with the public key derived from it.
    assert_eq!(check(&signer, Some(&header)).unwrap().user, "alice");
    // So does its public half.
    let half = TokenAuth::new(ed_private(1).verifying_only().unwrap());
    assert!(!half.can_sign());
    assert!(check(&half, Some(&header)).is_ok());
}

#[test]
fn token_claims_and_header_are_as_documented() {
    let auth = TokenAuth::new(ed_private(1));
    let at = now();
    let exp = at + time::Duration::minutes(5);
    let ctx = alice().with_expires_at(exp);
    let (header, payload, _) = parts(&auth.sign_at(&ctx, ID, TASK, at).unwrap());
    assert_eq!(header, json!({"alg": "EdDSA", "typ": "JWT"}));
    assert_eq!(
        payload,
        json!({
            "sub": "alice",
            "roles": ["editor", "viewer"],
            "jetq_id": ID,
            "jetq_task": TASK,
            "iat": at.unix_timestamp(),
            "exp": exp.unix_timestamp(),
        })
    );
    let hs = TokenAuth::new(secret_key());
    let (header, _, _) = parts(&hs.sign(&alice(), ID, TASK).unwrap());
    assert_eq!(header["alg"], "HS256");
}

#[test]
fn foreign_tokens_with_the_documented_claims_verify() {
    // As another language would sign them: plain claims, float times, no roles.
    let mut c = claims();
    c["exp"] = json!(unix() as f64 + 600.75);
    c.as_object_mut().unwrap().remove("roles");
    c.as_object_mut().unwrap().remove("iat");
    let ctx = check(
        &TokenAuth::new(secret_key()),
        Some(&bearer(&hs256(SECRET.as_bytes(), &c))),
    )
    .unwrap();
    assert!(ctx.roles.is_empty());
    let ctx = check(
        &TokenAuth::new(ed_public(2)),
        Some(&bearer(&eddsa(2, &claims()))),
    )
    .unwrap();
    assert_eq!(ctx.roles, ["editor"]);
}

#[test]
fn verify_headers_reads_the_authorization_header() {
    let auth = TokenAuth::new(secret_key());
    let mut headers = BTreeMap::new();
    assert_eq!(
        auth.verify_headers(&headers, ID, TASK)
            .unwrap_err()
            .failure(),
        AuthFailure::Missing
    );
    headers.insert(
        AUTH_HEADER.to_owned(),
        bearer(&auth.sign(&alice(), ID, TASK).unwrap()),
    );
    assert_eq!(
        auth.verify_headers(&headers, ID, TASK).unwrap().user,
        "alice"
    );
    // The name is matched exactly.
    let value = headers.remove(AUTH_HEADER).unwrap();
    headers.insert("Authorization".to_owned(), value);
    assert_eq!(
        auth.verify_headers(&headers, ID, TASK)
            .unwrap_err()
            .failure(),
        AuthFailure::Missing
    );
}

// ------------------------------------------------------------------ refusals

#[test]
fn missing_token_is_unauthenticated() {
    let e = check(&TokenAuth::new(secret_key()), None).unwrap_err();
    assert_eq!(e.failure(), AuthFailure::Missing);
    assert_eq!(e.kind(), AuthErrorKind::Unauthenticated);
    assert_eq!(e.kind().as_str(), "unauthenticated");
    assert!(e.to_string().starts_with("unauthenticated: "), "{e}");
    assert!(e.message().contains("authorization"), "{e}");
}

#[test]
fn header_must_be_bearer() {
    let auth = TokenAuth::new(secret_key());
    let token = auth.sign(&alice(), ID, TASK).unwrap();
    for header in [
        token.clone(),
        format!("Basic {token}"),
        format!("Bearer{token}"),
        format!("Token {token}"),
        "Bearer".to_owned(),
        "Bearer   ".to_owned(),
        String::new(),
    ] {
        assert_eq!(
            failure(&auth, Some(&header)),
            AuthFailure::Malformed,
            "{header:?}"
        );
    }
    // The scheme is case-insensitive (RFC 6750), and surrounding blanks are fine.
    assert!(check(&auth, Some(&format!("bearer {token}"))).is_ok());
    assert!(check(&auth, Some(&format!(" Bearer  {token} "))).is_ok());
}

#[test]
fn garbage_jwt_is_malformed() {
    let auth = TokenAuth::new(secret_key());
    let good = auth.sign(&alice(), ID, TASK).unwrap();
    let (_, _, sig) = parts(&good);
    let header = b64(&json!({"alg": "HS256", "typ": "JWT"}));
    for token in [
        "garbage".to_owned(),
        "a.b".to_owned(),
        "a.b.c".to_owned(),
        "a.b.c.d".to_owned(),
        format!("{good}.x"),
        // Signed correctly, but the payload is not base64url JSON.
        signed(&header, "!!!"),
        signed(&header, &URL_SAFE_NO_PAD.encode("not json")),
        signed(&header, &b64(&json!(["an", "array"]))),
        format!("{}.{}.{sig}", b64(&json!("not an object")), b64(&claims())),
        format!("{}.{}.{sig}", b64(&json!({"typ": "JWT"})), b64(&claims())),
        "x".repeat(20_000),
    ] {
        assert_eq!(
            failure(&auth, Some(&bearer(&token))),
            AuthFailure::Malformed,
            "{}",
            &token[..token.len().min(60)]
        );
    }
}

#[test]
fn claims_of_the_wrong_shape_are_malformed() {
    let auth = TokenAuth::new(secret_key());
    let cases: Vec<(&str, Value)> = vec![
        ("sub", Value::Null),
        ("sub", json!("")),
        ("sub", json!(7)),
        ("roles", json!("admin")),
        ("roles", json!(["admin", 1])),
        ("jetq_id", Value::Null),
        ("jetq_task", json!(["images.resize"])),
        ("exp", Value::Null),
        ("exp", json!("tomorrow")),
        ("nbf", json!(true)),
        ("aud", json!("some-service")),
    ];
    for (name, value) in cases {
        let mut c = claims();
        if value.is_null() {
            c.as_object_mut().unwrap().remove(name);
        } else {
            c[name] = value.clone();
        }
        let e = check(&auth, Some(&bearer(&hs256(SECRET.as_bytes(), &c)))).unwrap_err();
        assert_eq!(e.failure(), AuthFailure::Malformed, "{name} = {value}: {e}");
        assert!(e.message().contains(name), "{e}");
    }
}

#[test]
fn tampered_token_has_a_bad_signature() {
    let auth = TokenAuth::new(secret_key());
    let token = auth.sign(&AuthContext::new("mallory"), ID, TASK).unwrap();
    let (header, mut payload, sig) = parts(&token);
    payload["sub"] = json!("admin");
    payload["roles"] = json!(["admin"]);
    let forged = format!("{}.{}.{sig}", b64(&header), b64(&payload));
    assert_eq!(
        failure(&auth, Some(&bearer(&forged))),
        AuthFailure::BadSignature
    );
    // A flipped signature byte, too.
    let mut bytes = URL_SAFE_NO_PAD.decode(&sig).unwrap();
    bytes[0] ^= 1;
    let (h, p) = token.rsplit_once('.').unwrap().0.split_once('.').unwrap();
    let flipped = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(bytes));
    assert_eq!(
        failure(&auth, Some(&bearer(&flipped))),
        AuthFailure::BadSignature
    );

    let ed = TokenAuth::new(ed_private(1));
    let token = ed.sign(&AuthContext::new("mallory"), ID, TASK).unwrap();
    let (header, mut payload, sig) = parts(&token);
    payload["sub"] = json!("admin");
    let forged = format!("{}.{}.{sig}", b64(&header), b64(&payload));
    assert_eq!(
        failure(&TokenAuth::new(ed_public(1)), Some(&bearer(&forged))),
        AuthFailure::BadSignature
    );
}

#[test]
fn token_signed_with_another_key_is_refused() {
    let other = TokenAuth::new(AuthKey::from_secret(OTHER_SECRET.as_bytes()).unwrap());
    let header = bearer(&other.sign(&alice(), ID, TASK).unwrap());
    assert_eq!(
        failure(&TokenAuth::new(secret_key()), Some(&header)),
        AuthFailure::BadSignature
    );

    let other = TokenAuth::new(ed_private(9));
    let header = bearer(&other.sign(&alice(), ID, TASK).unwrap());
    assert_eq!(
        failure(&TokenAuth::new(ed_public(1)), Some(&header)),
        AuthFailure::BadSignature
    );
    assert_eq!(
        failure(&TokenAuth::new(ed_private(1)), Some(&header)),
        AuthFailure::BadSignature
    );
}

#[test]
fn alg_none_is_refused() {
    let header = b64(&json!({"alg": "none", "typ": "JWT"}));
    let payload = b64(&claims());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}.AAAA"),
    ] {
        for auth in [
            TokenAuth::new(secret_key()),
            TokenAuth::new(ed_public(1)),
            TokenAuth::new(ed_private(1)),
        ] {
            let e = check(&auth, Some(&bearer(&token))).unwrap_err();
            assert_eq!(e.failure(), AuthFailure::Algorithm, "{e}");
            assert!(e.message().contains("\"none\""), "{e}");
        }
    }
    // Other spellings and algorithms the key does not use.
    for alg in [
        json!("None"),
        json!("NONE"),
        json!("HS512"),
        json!("RS256"),
        json!("x".repeat(100)),
    ] {
        let header = b64(&json!({"alg": alg, "typ": "JWT"}));
        let token = format!("{header}.{payload}.AAAA");
        assert_eq!(
            failure(&TokenAuth::new(secret_key()), Some(&bearer(&token))),
            AuthFailure::Algorithm,
            "{alg}"
        );
    }
}

#[test]
fn hs256_signed_with_the_public_key_is_refused_by_an_ed25519_worker() {
    // The classic confusion: an attacker who knows the public key signs an
    // HS256 token using that key as the HMAC secret, hoping the worker feeds
    // its key to whatever algorithm the token names.
    let pem = public_pem(1);
    let raw = signing_key(1).verifying_key().to_bytes();
    for secret in [pem.as_bytes(), pem.trim().as_bytes(), &raw[..]] {
        let forged = bearer(&hs256(secret, &claims()));
        // The forgery is a valid HS256 token for that secret...
        let as_secret = TokenAuth::new(AuthKey::from_secret(secret).unwrap());
        assert!(check(&as_secret, Some(&forged)).is_ok());
        // ...and refused by workers holding the Ed25519 key.
        for auth in [TokenAuth::new(ed_public(1)), TokenAuth::new(ed_private(1))] {
            let e = check(&auth, Some(&forged)).unwrap_err();
            assert_eq!(e.failure(), AuthFailure::Algorithm, "{e}");
            assert!(e.message().contains("EdDSA"), "{e}");
        }
    }
    // And the reverse: an EdDSA token at a worker holding a shared secret.
    let header = bearer(&eddsa(1, &claims()));
    assert_eq!(
        failure(&TokenAuth::new(secret_key()), Some(&header)),
        AuthFailure::Algorithm
    );
}

#[test]
fn expiry_is_checked_with_the_leeway() {
    let auth = TokenAuth::new(secret_key());
    assert_eq!(auth.leeway(), DEFAULT_LEEWAY);
    assert_eq!(DEFAULT_LEEWAY, Duration::from_secs(30));
    let exp = now().replace_nanosecond(0).unwrap();
    let signed_at = exp - time::Duration::hours(1);
    let token = bearer(
        &auth
            .sign_at(&alice().with_expires_at(exp), ID, TASK, signed_at)
            .unwrap(),
    );
    let at = |s: i64| exp + time::Duration::seconds(s);

    assert!(auth.verify_at(Some(&token), ID, TASK, at(-1)).is_ok());
    assert!(
        auth.verify_at(Some(&token), ID, TASK, at(0)).is_ok(),
        "within leeway"
    );
    assert!(
        auth.verify_at(Some(&token), ID, TASK, at(29)).is_ok(),
        "within leeway"
    );
    for s in [30, 31, 3600] {
        let e = auth.verify_at(Some(&token), ID, TASK, at(s)).unwrap_err();
        assert_eq!(e.failure(), AuthFailure::Expired, "{s}");
        assert!(e.message().contains("expired"), "{e}");
    }

    let strict = TokenAuth::new(secret_key()).with_leeway(Duration::ZERO);
    assert!(strict.verify_at(Some(&token), ID, TASK, at(-1)).is_ok());
    assert_eq!(
        strict
            .verify_at(Some(&token), ID, TASK, at(0))
            .unwrap_err()
            .failure(),
        AuthFailure::Expired
    );

    // Against the real clock, with a foreign token.
    let mut c = claims();
    c["exp"] = json!(unix() - 10);
    assert!(check(&auth, Some(&bearer(&hs256(SECRET.as_bytes(), &c)))).is_ok());
    c["exp"] = json!(unix() - 120);
    assert_eq!(
        failure(&auth, Some(&bearer(&hs256(SECRET.as_bytes(), &c)))),
        AuthFailure::Expired
    );
}

#[test]
fn not_before_is_checked_with_the_leeway() {
    let auth = TokenAuth::new(secret_key());
    let mut c = claims();
    c["nbf"] = json!(unix() + 120);
    assert_eq!(
        failure(&auth, Some(&bearer(&hs256(SECRET.as_bytes(), &c)))),
        AuthFailure::NotYetValid
    );
    c["nbf"] = json!(unix() + 10);
    assert!(check(&auth, Some(&bearer(&hs256(SECRET.as_bytes(), &c)))).is_ok());
}

#[test]
fn token_is_bound_to_its_request_id() {
    let auth = TokenAuth::new(secret_key());
    let header = bearer(&auth.sign(&alice(), "req-other", TASK).unwrap());
    let e = check(&auth, Some(&header)).unwrap_err();
    assert_eq!(e.failure(), AuthFailure::WrongRequest);
    assert_eq!(e.kind(), AuthErrorKind::Unauthenticated);
    assert!(
        e.message().contains("req-other") && e.message().contains(ID),
        "{e}"
    );
}

#[test]
fn token_is_bound_to_its_task() {
    let auth = TokenAuth::new(ed_private(1));
    let header = bearer(&auth.sign(&alice(), ID, "images.delete").unwrap());
    let e = check(&TokenAuth::new(ed_public(1)), Some(&header)).unwrap_err();
    assert_eq!(e.failure(), AuthFailure::WrongTask);
    assert_eq!(e.kind(), AuthErrorKind::Unauthenticated);
}

// --------------------------------------------------------------------- roles

fn roles(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn no_required_roles_grants_access_without_a_role() {
    assert_eq!(assumed_role(&[], &[]), Ok(None));
    assert_eq!(assumed_role(&[], &roles(&["admin"])), Ok(None));
}

#[test]
fn assumed_role_is_the_first_required_role_the_user_holds() {
    let required = roles(&["admin", "editor", "viewer"]);
    assert_eq!(
        assumed_role(&required, &roles(&["viewer", "editor"])),
        Ok(Some("editor".to_owned()))
    );
    assert_eq!(
        assumed_role(&required, &roles(&["viewer", "admin"])),
        Ok(Some("admin".to_owned()))
    );
    assert_eq!(
        assumed_role(&required, &roles(&["viewer"])),
        Ok(Some("viewer".to_owned()))
    );
}

#[test]
fn missing_role_is_forbidden() {
    let required = roles(&["admin", "ops"]);
    for user in [roles(&[]), roles(&["editor", "Admin"])] {
        let e = assumed_role(&required, &user).unwrap_err();
        assert_eq!(e.failure(), AuthFailure::MissingRole);
        assert_eq!(e.kind(), AuthErrorKind::Forbidden);
        assert_eq!(e.kind().as_str(), "forbidden");
        assert!(e.to_string().starts_with("forbidden: "), "{e}");
        assert!(e.message().contains("\"admin\", \"ops\""), "{e}");
    }
}

#[test]
fn authorize_verifies_then_checks_roles() {
    let auth = TokenAuth::new(secret_key());
    let header = bearer(&auth.sign(&alice(), ID, TASK).unwrap());
    let verified = auth
        .authorize(
            Some(&header),
            ID,
            TASK,
            &roles(&["admin", "viewer", "editor"]),
        )
        .unwrap();
    assert_eq!(verified.assumed_role.as_deref(), Some("viewer"));
    assert_eq!(verified.context.user, "alice");
    let e = auth
        .authorize(Some(&header), ID, TASK, &roles(&["admin"]))
        .unwrap_err();
    assert_eq!(e.kind(), AuthErrorKind::Forbidden);
    assert_no_secret(&e.to_string(), &header);
    // Authentication comes first: a bad token is unauthenticated, not forbidden.
    let e = auth
        .authorize(None, ID, TASK, &roles(&["admin"]))
        .unwrap_err();
    assert_eq!(e.kind(), AuthErrorKind::Unauthenticated);
}

#[test]
fn results_serialise() {
    let verified = VerifiedAuth {
        context: alice().with_expires_at(time::macros::datetime!(2030-01-02 03:04:05 UTC)),
        assumed_role: Some("editor".to_owned()),
    };
    let json = serde_json::to_value(&verified).unwrap();
    assert_eq!(
        json,
        json!({
            "context": {"user": "alice", "roles": ["editor", "viewer"], "expires_at": "2030-01-02T03:04:05Z"},
            "assumed_role": "editor",
        })
    );
    assert_eq!(
        serde_json::from_value::<VerifiedAuth>(json).unwrap(),
        verified
    );
    assert_eq!(
        serde_json::to_value(AuthErrorKind::Forbidden).unwrap(),
        json!("forbidden")
    );
    assert_eq!(AuthFailure::BadSignature.as_str(), "bad_signature");
}

// -------------------------------------------------------------- child tokens

#[test]
fn child_token_keeps_user_and_roles_and_is_bound_to_the_child() {
    let auth = TokenAuth::new(ed_private(1));
    let parent_header = bearer(&auth.sign(&alice(), ID, TASK).unwrap());
    let parent = check(&auth, Some(&parent_header)).unwrap();
    let child = bearer(
        &auth
            .sign_child(&parent, "req-1.child", "images.thumb")
            .unwrap(),
    );
    let ctx = TokenAuth::new(ed_public(1))
        .verify(Some(&child), "req-1.child", "images.thumb")
        .unwrap();
    assert_eq!(
        (ctx.user.as_str(), ctx.roles.clone()),
        ("alice", parent.roles.clone())
    );
    // Neither token serves for the other request.
    assert_eq!(failure(&auth, Some(&child)), AuthFailure::WrongRequest);
    assert_eq!(
        auth.verify(Some(&parent_header), "req-1.child", "images.thumb")
            .unwrap_err()
            .failure(),
        AuthFailure::WrongRequest
    );
}

#[test]
fn child_token_never_outlives_its_parent() {
    let auth = TokenAuth::new(secret_key());
    let at = now().replace_nanosecond(0).unwrap();
    let exp_of = |token: &str| parts(token).1["exp"].as_i64().unwrap();

    // A parent expiring sooner than the default lifetime caps the child.
    let parent = alice().with_expires_at(at + time::Duration::minutes(10));
    let child = auth.sign_child_at(&parent, "c1", "t", at).unwrap();
    assert_eq!(
        exp_of(&child),
        (at + time::Duration::minutes(10)).unix_timestamp()
    );

    // A parent living longer: the child gets the default lifetime.
    let parent = alice().with_expires_at(at + time::Duration::hours(5));
    let child = auth.sign_child_at(&parent, "c1", "t", at).unwrap();
    assert_eq!(exp_of(&child), at.unix_timestamp() + 3600);
    let short = auth.clone().with_default_lifetime(Duration::from_secs(60));
    let child = short.sign_child_at(&parent, "c1", "t", at).unwrap();
    assert_eq!(exp_of(&child), at.unix_timestamp() + 60);

    // An expired parent signs no child.
    let parent = alice().with_expires_at(at - time::Duration::seconds(1));
    assert!(matches!(
        auth.sign_child_at(&parent, "c1", "t", at),
        Err(SignError::Expired(_))
    ));
    let parent = alice().with_expires_at(at);
    assert!(matches!(
        auth.sign_child_at(&parent, "c1", "t", at),
        Err(SignError::Expired(_))
    ));
}

#[test]
fn signing_refuses_expired_or_anonymous_contexts() {
    let auth = TokenAuth::new(secret_key());
    let past = alice().with_expires_at(now() - time::Duration::seconds(5));
    assert!(matches!(
        auth.sign(&past, ID, TASK),
        Err(SignError::Expired(_))
    ));
    assert_eq!(
        auth.sign(&AuthContext::new(""), ID, TASK),
        Err(SignError::NoUser)
    );
}

#[test]
fn verify_only_key_cannot_sign() {
    let key = ed_public(1);
    assert!(!key.can_sign());
    let auth = TokenAuth::new(key);
    assert!(!auth.can_sign());
    assert_eq!(auth.sign(&alice(), ID, TASK), Err(SignError::CannotSign));
    let parent = alice().with_expires_at(now() + time::Duration::minutes(5));
    assert_eq!(
        auth.sign_child(&parent, "c", "t"),
        Err(SignError::CannotSign)
    );
    assert!(secret_key().can_sign());
    assert!(ed_private(1).can_sign());
}

// ----------------------------------------------------------------- key files

/// An X25519 key pair (test only): right PEM labels, wrong algorithm.
const X25519_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VuBCIEIAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE
-----END PRIVATE KEY-----
";
const X25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VuAyEArAGyIJ6GNU+4UyN7XeD0+rE8f8v0M6YcAZNpYX/s8Qs=
-----END PUBLIC KEY-----
";

fn key_file(content: &[u8]) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), content).unwrap();
    file
}

fn load(content: &[u8]) -> (Result<AuthKey, KeyError>, tempfile::NamedTempFile) {
    let file = key_file(content);
    (AuthKey::from_file(file.path()), file)
}

#[test]
fn secret_file_is_trimmed() {
    let (key, _file) = load(format!("{SECRET}\n").as_bytes());
    let key = key.unwrap();
    assert_eq!(key.algorithm().as_str(), "HS256");
    assert!(key.can_sign());
    assert!(key.public_key_pem().is_none());
    // Same key as the trimmed secret: tokens cross.
    let header = bearer(&TokenAuth::new(key).sign(&alice(), ID, TASK).unwrap());
    assert!(check(&TokenAuth::new(secret_key()), Some(&header)).is_ok());
    let (key, _file) = load(format!("  {SECRET}\r\n\n").as_bytes());
    let header = bearer(
        &TokenAuth::new(secret_key())
            .sign(&alice(), ID, TASK)
            .unwrap(),
    );
    assert!(check(&TokenAuth::new(key.unwrap()), Some(&header)).is_ok());
}

#[test]
fn private_pem_file_signs_and_verifies() {
    let (key, _file) = load(private_pem(3).as_bytes());
    let key = key.unwrap();
    assert_eq!(key.algorithm().as_str(), "EdDSA");
    assert!(key.can_sign());
    assert_eq!(key.public_key_pem().unwrap(), public_pem(3));
    let header = bearer(&TokenAuth::new(key).sign(&alice(), ID, TASK).unwrap());
    assert!(check(&TokenAuth::new(ed_public(3)), Some(&header)).is_ok());
}

#[test]
fn public_pem_file_verifies_only() {
    let (key, _file) = load(public_pem(3).as_bytes());
    let key = key.unwrap();
    assert_eq!(key.algorithm().as_str(), "EdDSA");
    assert!(!key.can_sign());
    let header = bearer(
        &TokenAuth::new(ed_private(3))
            .sign(&alice(), ID, TASK)
            .unwrap(),
    );
    assert!(check(&TokenAuth::new(key), Some(&header)).is_ok());
}

#[test]
fn pem_after_explanatory_text_is_still_pem() {
    // Never a shared secret: that would make the public key an HMAC secret.
    let text = format!("Worker key for jetq\n{}", public_pem(3));
    let key = AuthKey::from_pem_or_secret(text.as_bytes()).unwrap();
    assert!(!key.can_sign());
    assert_eq!(key.algorithm().as_str(), "EdDSA");
}

#[test]
fn bad_key_files_are_refused_without_their_content() {
    let short = "tooshort-secret-0123456789";
    let body = "MC4CAQAwBQYDK2VwBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let garbage_pem =
        format!("-----BEGIN PRIVATE KEY-----\nAAAA{body}\n-----END PRIVATE KEY-----\n");
    let wrong_kind = format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n");
    let rsa = format!("-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----\n");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", b"".to_vec(), "empty"),
        ("blank", b" \n\n".to_vec(), "empty"),
        (
            "short secret",
            format!("{short}\n").into_bytes(),
            "at least 32",
        ),
        ("garbage PEM", garbage_pem.into_bytes(), "PKCS#8"),
        (
            "public garbage",
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec(),
            "SPKI",
        ),
        ("certificate", wrong_kind.into_bytes(), "CERTIFICATE"),
        ("rsa", rsa.into_bytes(), "RSA PRIVATE KEY"),
        (
            "half a boundary",
            b"-----BEGIN PRIVATE KEY\nAAAA".to_vec(),
            "malformed",
        ),
    ];
    for (what, content, expect) in cases {
        let (result, file) = load(&content);
        let e = result.unwrap_err();
        let message = e.to_string();
        assert!(matches!(e, KeyError::InvalidFile { .. }), "{what}: {e:?}");
        assert!(
            message.contains(&file.path().display().to_string()),
            "{what}: {message}"
        );
        assert!(message.contains(expect), "{what}: {message}");
        assert!(
            !message.contains(short) && !message.contains(body),
            "{what}: {message}"
        );
    }
    // Well-formed PKCS#8 and SPKI keys, but X25519 ones, not Ed25519.
    for pem in [X25519_PRIVATE, X25519_PUBLIC] {
        let e = AuthKey::from_pem_or_secret(pem.as_bytes()).unwrap_err();
        assert!(matches!(e, KeyError::Invalid { .. }), "{e:?}");
        assert!(e.to_string().contains("not an Ed25519"), "{e}");
    }

    let missing = std::env::temp_dir().join("jetq-no-such-key-file");
    let e = AuthKey::from_file(&missing).unwrap_err();
    assert!(matches!(e, KeyError::Read { .. }), "{e:?}");
    assert!(e.to_string().contains("jetq-no-such-key-file"), "{e}");
}

// ------------------------------------------------------------------- secrets

#[test]
fn debug_output_redacts_keys() {
    let pem = private_pem(5);
    let pem_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let seed_b64 = URL_SAFE_NO_PAD.encode([5u8; 32]);
    for (key, secret) in [
        (secret_key(), SECRET.to_owned()),
        (
            AuthKey::from_pem_or_secret(pem.as_bytes()).unwrap(),
            pem_body.clone(),
        ),
        (
            AuthKey::from_ed25519_seed(&[5; 32]).unwrap(),
            seed_b64.clone(),
        ),
    ] {
        let auth = TokenAuth::new(key.clone());
        for text in [format!("{key:?}"), format!("{key:#?}"), format!("{auth:?}")] {
            assert!(text.contains("redacted"), "{text}");
            assert!(!text.contains(&secret), "{text}");
            assert!(!text.contains(&seed_b64), "{text}");
            assert!(!text.contains("[5, 5, 5"), "{text}");
            assert!(!text.contains("5, 5, 5"), "{text}");
        }
    }
    // Nothing to hide in a public key; still no private part.
    let text = format!("{:?}", ed_public(5));
    assert!(
        text.contains("can_sign: false") && !text.contains("redacted"),
        "{text}"
    );
}

#[test]
fn raw_key_constructors_match_the_pem_forms() {
    let from_seed = AuthKey::from_ed25519_seed(&[7; 32]).unwrap();
    assert_eq!(from_seed.public_key_pem().unwrap(), public_pem(7));
    let public = AuthKey::from_ed25519_public(&signing_key(7).verifying_key().to_bytes()).unwrap();
    assert!(!public.can_sign());
    let header = bearer(&TokenAuth::new(from_seed).sign(&alice(), ID, TASK).unwrap());
    assert!(check(&TokenAuth::new(public), Some(&header)).is_ok());
    assert!(AuthKey::from_secret(&[b'k'; 31]).is_err());
}
