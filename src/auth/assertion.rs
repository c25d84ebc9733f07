//! Certificate credentials: the signed client assertion an application sends instead of a
//! client secret (RFC 7523 `private_key_jwt`, as Entra ID expects it).
//!
//! The assertion is a short-lived RS256 JWT with `aud` = the token URL, `iss` = `sub` =
//! the application id, a random `jti`, and the certificate's SHA-256 thumbprint in the
//! `x5t#S256` header so that Entra knows which registered certificate to verify it with.

use crate::config::ClientCertificate;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// How long an assertion is valid: long enough for one request, short enough to be
/// useless if it leaks.
const ASSERTION_LIFETIME_SECS: i64 = 300;

/// Which of the two files is unusable, and why.
#[derive(Debug)]
pub enum CertificateError {
    /// The certificate file.
    Certificate(String),
    /// The private key file.
    PrivateKey(String),
}

/// Reads a PEM certificate and an RSA private key into a [`ClientCertificate`].
pub fn load_certificate(
    certificate_pem: &str,
    private_key_pem: SecretString,
) -> Result<ClientCertificate, CertificateError> {
    let der = CertificateDer::from_pem_slice(certificate_pem.as_bytes()).map_err(|e| {
        CertificateError::Certificate(format!(
            "not a PEM certificate (-----BEGIN CERTIFICATE-----): {e}; use the .pem/.crt uploaded to the App Registration"
        ))
    })?;
    jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem.expose_secret().as_bytes()).map_err(
        |_| {
            CertificateError::PrivateKey(
                "not an RSA private key in PEM (PKCS#1 or PKCS#8, unencrypted); Entra certificates are RSA; from a .pfx: openssl pkcs12 -in app.pfx -nocerts -nodes -out app.key".to_string(),
            )
        },
    )?;
    Ok(ClientCertificate {
        thumbprint_s256: URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_ref())),
        private_key_pem,
    })
}

/// A fresh client assertion for one token request to `token_url`.
pub fn client_assertion(
    certificate: &ClientCertificate,
    client_id: &str,
    token_url: &str,
) -> Result<SecretString, String> {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(
        certificate.private_key_pem.expose_secret().as_bytes(),
    )
    .map_err(|e| format!("the private key cannot sign: {e}"))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.x5t_s256 = Some(certificate.thumbprint_s256.clone());
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "aud": token_url,
        "iss": client_id,
        "sub": client_id,
        "jti": hex::encode(rand::random::<[u8; 16]>()),
        "nbf": now,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    jsonwebtoken::encode(&header, &claims, &key)
        .map(SecretString::from)
        .map_err(|e| format!("cannot sign the client assertion: {e}"))
}
