//! Auth keys: a shared secret (HS256) or an Ed25519 key (EdDSA), read from a
//! key file and recognised by its content.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use jsonwebtoken::{DecodingKey, EncodingKey};

/// The shortest shared secret accepted, in bytes: 32 bytes (256 bits), the
/// size of the HS256 hash output, which RFC 7518 §3.2 sets as the minimum key
/// size for HS256.
pub const MIN_SECRET_LEN: usize = 32;

/// The signing algorithm of a key. A verifier accepts only tokens signed with
/// its key's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// HMAC with SHA-256 and a shared secret (`HS256`).
    Hs256,
    /// Ed25519 signatures (`EdDSA`): a private key signs, its public key verifies.
    EdDsa,
}

impl Algorithm {
    /// The JWS name written in the token header's `alg`: `HS256` or `EdDSA`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
            Algorithm::EdDsa => "EdDSA",
        }
    }

    pub(crate) fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::Hs256 => jsonwebtoken::Algorithm::HS256,
            Algorithm::EdDsa => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key that could not be loaded. The message names the file (if any) and
/// the problem, never the key's content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read auth key file {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The key file was read but holds no usable key.
    #[error("auth key file {}: {reason}", path.display())]
    InvalidFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it (never its content).
        reason: String,
    },
    /// The key material holds no usable key.
    #[error("invalid auth key: {reason}")]
    Invalid {
        /// What is wrong with it (never its content).
        reason: String,
    },
}

impl KeyError {
    fn invalid(reason: impl Into<String>) -> Self {
        KeyError::Invalid {
            reason: reason.into(),
        }
    }
}

/// Key material for signing and verifying auth tokens.
///
/// - A shared secret (`HS256`): signs and verifies.
/// - An Ed25519 private key (`EdDSA`): signs, and verifies with the public key
///   derived from it.
/// - An Ed25519 public key (`EdDSA`): verifies only ([`can_sign`](Self::can_sign)
///   is `false`), so a worker can check tokens without being able to mint them.
///
/// Its `Debug` output names the algorithm and whether it can sign, never the
/// secret or the private key.
#[derive(Clone)]
pub struct AuthKey {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Secret {
        encoding: EncodingKey,
        decoding: DecodingKey,
    },
    Ed25519 {
        /// `None` for a public key only.
        encoding: Option<EncodingKey>,
        decoding: DecodingKey,
        public: VerifyingKey,
    },
}

impl AuthKey {
    /// A shared secret for `HS256`, used as given (not trimmed). Refused when
    /// shorter than [`MIN_SECRET_LEN`] bytes.
    pub fn from_secret(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(KeyError::invalid(format!(
                "the shared secret is {} bytes long; at least {MIN_SECRET_LEN} are required",
                secret.len()
            )));
        }
        let unusable = |_| KeyError::invalid("the shared secret is not usable");
        Ok(AuthKey {
            inner: Inner::Secret {
                encoding: EncodingKey::from_secret(secret).map_err(unusable)?,
                decoding: DecodingKey::from_secret(secret).map_err(unusable)?,
            },
        })
    }

    /// An Ed25519 key pair from its 32-byte private seed: signs and verifies.
    pub fn from_ed25519_seed(seed: &[u8; 32]) -> Result<Self, KeyError> {
        Self::from_signing_key(&SigningKey::from_bytes(seed))
    }

    /// An Ed25519 public key from its 32 raw bytes: verifies only.
    pub fn from_ed25519_public(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let public = VerifyingKey::from_bytes(bytes)
            .map_err(|_| KeyError::invalid("not a valid Ed25519 public key"))?;
        Ok(Self::from_verifying_key(public))
    }

    /// Key material as found in a key file, recognised by its content:
    ///
    /// - PEM `-----BEGIN PRIVATE KEY-----`: an Ed25519 private key (PKCS#8),
    ///   which signs and verifies;
    /// - PEM `-----BEGIN PUBLIC KEY-----`: an Ed25519 public key (SPKI), which
    ///   verifies only;
    /// - anything else: a shared secret for `HS256`, the text with leading and
    ///   trailing whitespace (such as a final newline) removed, at least
    ///   [`MIN_SECRET_LEN`] bytes long.
    ///
    /// Other PEM documents (RSA, EC, OpenSSH keys, certificates) are refused.
    pub fn from_pem_or_secret(bytes: &[u8]) -> Result<Self, KeyError> {
        let trimmed = bytes.trim_ascii();
        // Any PEM boundary makes it a PEM file, even after explanatory text:
        // a public key file must never be taken for a shared secret.
        let Some(begin) = find(trimmed, PEM_BEGIN) else {
            if trimmed.is_empty() {
                return Err(KeyError::invalid("the key is empty"));
            }
            return Self::from_secret(trimmed);
        };
        let text = std::str::from_utf8(&trimmed[begin..])
            .map_err(|_| KeyError::invalid("the PEM document is not valid UTF-8"))?;
        let label = pem_label(text);
        match label {
            Some("PRIVATE KEY") => {
                let key = SigningKey::from_pkcs8_pem(text).map_err(|e| {
                    KeyError::invalid(format!(
                        "not an Ed25519 private key in PKCS#8 PEM form ({e})"
                    ))
                })?;
                Self::from_signing_key(&key)
            }
            Some("PUBLIC KEY") => {
                let key = VerifyingKey::from_public_key_pem(text).map_err(|e| {
                    KeyError::invalid(format!("not an Ed25519 public key in SPKI PEM form ({e})"))
                })?;
                Ok(Self::from_verifying_key(key))
            }
            Some(other) => Err(KeyError::invalid(format!(
                "unsupported PEM document \"{}\"; expected an Ed25519 key as \
                 \"PRIVATE KEY\" (PKCS#8) or \"PUBLIC KEY\" (SPKI)",
                sanitize_label(other)
            ))),
            None => Err(KeyError::invalid("malformed PEM document")),
        }
    }

    /// Read a key file (the `--auth-key-file` option) and recognise its
    /// content as [`from_pem_or_secret`](Self::from_pem_or_secret) does.
    /// Errors name the path, never the content.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pem_or_secret(&bytes).map_err(|e| match e {
            KeyError::Invalid { reason } => KeyError::InvalidFile {
                path: path.to_owned(),
                reason,
            },
            other => other,
        })
    }

    /// Whether this key can sign tokens: a shared secret or an Ed25519 private
    /// key can; an Ed25519 public key cannot.
    pub fn can_sign(&self) -> bool {
        match &self.inner {
            Inner::Secret { .. } => true,
            Inner::Ed25519 { encoding, .. } => encoding.is_some(),
        }
    }

    /// The algorithm of this key, the only one its verifier accepts.
    pub fn algorithm(&self) -> Algorithm {
        match &self.inner {
            Inner::Secret { .. } => Algorithm::Hs256,
            Inner::Ed25519 { .. } => Algorithm::EdDsa,
        }
    }

    /// A key that only verifies: the public half of an Ed25519 key; `None`
    /// for a shared secret, which cannot be split.
    pub fn verifying_only(&self) -> Option<AuthKey> {
        match &self.inner {
            Inner::Secret { .. } => None,
            Inner::Ed25519 { public, .. } => Some(Self::from_verifying_key(*public)),
        }
    }

    /// The Ed25519 public key as an SPKI PEM document (`-----BEGIN PUBLIC
    /// KEY-----`), for the workers' key files; `None` for a shared secret.
    pub fn public_key_pem(&self) -> Option<String> {
        match &self.inner {
            Inner::Secret { .. } => None,
            Inner::Ed25519 { public, .. } => public.to_public_key_pem(LineEnding::LF).ok(),
        }
    }

    pub(crate) fn encoding(&self) -> Option<&EncodingKey> {
        match &self.inner {
            Inner::Secret { encoding, .. } => Some(encoding),
            Inner::Ed25519 { encoding, .. } => encoding.as_ref(),
        }
    }

    pub(crate) fn decoding(&self) -> &DecodingKey {
        match &self.inner {
            Inner::Secret { decoding, .. } | Inner::Ed25519 { decoding, .. } => decoding,
        }
    }

    fn from_signing_key(key: &SigningKey) -> Result<Self, KeyError> {
        let der = key
            .to_pkcs8_der()
            .map_err(|_| KeyError::invalid("cannot encode the Ed25519 private key"))?;
        let public = key.verifying_key();
        Ok(AuthKey {
            inner: Inner::Ed25519 {
                encoding: Some(EncodingKey::from_ed_der(der.as_bytes())),
                decoding: DecodingKey::from_ed_der(public.as_bytes()),
                public,
            },
        })
    }

    fn from_verifying_key(public: VerifyingKey) -> Self {
        AuthKey {
            inner: Inner::Ed25519 {
                encoding: None,
                decoding: DecodingKey::from_ed_der(public.as_bytes()),
                public,
            },
        }
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("AuthKey");
        d.field("algorithm", &self.algorithm())
            .field("can_sign", &self.can_sign());
        match &self.inner {
            Inner::Secret { .. } => d.field("secret", &"[redacted]"),
            Inner::Ed25519 {
                encoding, public, ..
            } => {
                if encoding.is_some() {
                    d.field("private_key", &"[redacted]");
                }
                // A public key is not secret; it identifies the key pair.
                d.field("public_key", &URL_SAFE_NO_PAD.encode(public.as_bytes()))
            }
        };
        d.finish()
    }
}

const PEM_BEGIN: &[u8] = b"-----BEGIN ";

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The label of a PEM document's first line: `PRIVATE KEY` for
/// `-----BEGIN PRIVATE KEY-----`.
fn pem_label(text: &str) -> Option<&str> {
    let first = text.lines().next()?.trim_end();
    first.strip_prefix("-----BEGIN ")?.strip_suffix("-----")
}

/// A PEM label fit for an error message: printable ASCII, short.
fn sanitize_label(label: &str) -> String {
    label
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == ' ')
        .take(40)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_labels() {
        assert_eq!(
            pem_label("-----BEGIN PRIVATE KEY-----\nabc"),
            Some("PRIVATE KEY")
        );
        assert_eq!(
            pem_label("-----BEGIN PUBLIC KEY-----\r\nabc"),
            Some("PUBLIC KEY")
        );
        assert_eq!(pem_label("-----BEGIN PUBLIC KEY\nabc"), None);
    }

    #[test]
    fn secret_is_used_as_given_by_from_secret() {
        assert!(AuthKey::from_secret(&[b' '; 32]).is_ok());
        assert!(AuthKey::from_secret(&[b'x'; 31]).is_err());
    }
}
