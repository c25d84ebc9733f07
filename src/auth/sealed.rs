//! Encryption of the refresh tokens kept in the database (`[secrets] key`).
//!
//! The configured key is stretched with HKDF-SHA256 into a ChaCha20-Poly1305 key. Each
//! sealed value is `version (1 byte) || nonce (12 bytes) || ciphertext+tag`, with the
//! credential's name as associated data, so a row copied onto another credential does not
//! open. Built on ring (already the TLS provider) rather than a further crypto crate.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use secrecy::{ExposeSecret, SecretString};

const VERSION: u8 = 1;
const SALT: &[u8] = b"mail2ticket sealed v1";
const INFO: &[u8] = b"refresh token";

/// A key that seals and opens values for one purpose.
pub struct SealingKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey([REDACTED])")
    }
}

/// A sealed value that does not open: another key, another credential, or damage.
#[derive(Debug, thiserror::Error)]
#[error(
    "the stored value cannot be decrypted: [secrets] key is not the one it was saved with, or the row belongs to another credential"
)]
pub struct OpenError;

impl SealingKey {
    /// Derives the AEAD key from the configured secret.
    pub fn new(secret: &SecretString) -> SealingKey {
        let prk = Salt::new(HKDF_SHA256, SALT).extract(secret.expose_secret().as_bytes());
        let okm = prk
            .expand(&[INFO], &CHACHA20_POLY1305)
            .expect("a 32-byte output is within HKDF-SHA256's limit");
        SealingKey {
            key: LessSafeKey::new(UnboundKey::from(okm)),
        }
    }

    /// Encrypts `plain`, bound to `context` (the credential name).
    pub fn seal(&self, context: &str, plain: &SecretString) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut buffer = plain.expose_secret().as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(context.as_bytes()),
                &mut buffer,
            )
            .expect("sealing in memory cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buffer.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&buffer);
        out
    }

    /// Decrypts what [`seal`](Self::seal) made for the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<SecretString, OpenError> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != VERSION {
            return Err(OpenError);
        }
        let nonce =
            Nonce::try_assume_unique_for_key(&sealed[1..1 + NONCE_LEN]).map_err(|_| OpenError)?;
        let mut buffer = sealed[1 + NONCE_LEN..].to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buffer)
            .map_err(|_| OpenError)?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| OpenError)?;
        Ok(SecretString::from(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_context() {
        let key = SealingKey::new(&SecretString::from("k".repeat(32)));
        let token = SecretString::from("refresh-token-value");
        let sealed = key.seal("cred-a", &token);
        assert!(
            !sealed.windows(7).any(|w| w == b"refresh"),
            "plaintext visible"
        );
        assert_eq!(
            key.open("cred-a", &sealed).unwrap().expose_secret(),
            "refresh-token-value"
        );
        assert!(key.open("cred-b", &sealed).is_err());
        let other = SealingKey::new(&SecretString::from("x".repeat(32)));
        assert!(other.open("cred-a", &sealed).is_err());
        let mut damaged = sealed.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert!(key.open("cred-a", &damaged).is_err());
        assert_ne!(
            sealed,
            key.seal("cred-a", &token),
            "a fresh nonce every time"
        );
    }
}
