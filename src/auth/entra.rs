//! Speaking to Entra ID's token endpoint: the form POST with the application's proof
//! (secret or certificate assertion), the answer, and errors that carry the AADSTS code,
//! a fix, and never a secret; `Retry-After` of a throttled endpoint.

use crate::config::ClientAuth;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::time::Duration;

/// Give up on a token request after this long.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// Entra ID answered with an OAuth error.
    #[error("Entra ID refused the token request for credential {credential:?}: {}", describe_entra(.error, .aadsts, .description))]
    Entra {
        /// The credential's name.
        credential: String,
        /// HTTP status.
        status: u16,
        /// OAuth error code (`invalid_client`, ...).
        error: String,
        /// The AADSTS number, when the description has one.
        aadsts: Option<u32>,
        /// The description, without trace and correlation ids.
        description: String,
    },
    /// The endpoint asked us to slow down (HTTP 429, or 503 while unavailable).
    #[error("the token endpoint {url} is throttling credential {credential:?} (HTTP {status}){}", retry_hint(.retry_after))]
    Throttled {
        /// The credential's name.
        credential: String,
        /// Token URL.
        url: String,
        /// 429 or 503.
        status: u16,
        /// The endpoint's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// The endpoint could not be reached or did not answer.
    #[error("cannot reach the token endpoint {url} for credential {credential:?}: {reason}")]
    Unreachable {
        /// The credential's name.
        credential: String,
        /// Token URL (holds no secret).
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A delegated credential has no usable sign-in: someone must run `mail2ticket login`.
    #[error("credential {credential:?} needs login: {reason}; sign in again with: {command}")]
    NeedsLogin {
        /// The credential's name.
        credential: String,
        /// Why (never signed in, grant expired or revoked, key changed, ...).
        reason: String,
        /// The command that fixes it.
        command: String,
    },
    /// The database holding a delegated credential's sign-in failed.
    #[error(
        "cannot read or save the sign-in of credential {credential:?} in the database: {reason}"
    )]
    Store {
        /// The credential's name.
        credential: String,
        /// What went wrong.
        reason: String,
    },
    /// The client assertion could not be made from the certificate and key.
    #[error("cannot make the certificate assertion of credential {credential:?}: {reason}")]
    Certificate {
        /// The credential's name.
        credential: String,
        /// What went wrong.
        reason: String,
    },
    /// The endpoint answered something that is not a token response.
    #[error(
        "the token endpoint {url} gave an unexpected answer for credential {credential:?}: {reason}"
    )]
    BadResponse {
        /// The credential's name.
        credential: String,
        /// Token URL.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
}

fn retry_hint(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(after) => format!("; it asks to retry after {} s", after.as_secs()),
        None => String::new(),
    }
}

impl AuthError {
    /// How long the server asked us to wait before asking again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AuthError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The longest `Retry-After` obeyed as given; a larger one (or a date far ahead) is capped
/// so that a mistaken header cannot silence a mailbox for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Reads a `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 section 10.2.3).
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let after = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(after.min(MAX_RETRY_AFTER))
}

fn describe_entra(error: &str, aadsts: &Option<u32>, description: &str) -> String {
    match aadsts {
        Some(code) => format!("AADSTS{code} ({error}): {description}{}", entra_hint(*code)),
        None => format!("{error}: {description}"),
    }
}

/// A short fix for the AADSTS codes admins meet most.
pub fn entra_hint(code: u32) -> &'static str {
    match code {
        7000215 => {
            " Fix: the client_secret is wrong or expired; create a new secret in the App Registration (Certificates & secrets) and use its Value, not its ID."
        }
        700016 => {
            " Fix: client_id is not an application in this tenant; check the Application (client) ID and tenant_id, and that the app was consented in this tenant."
        }
        90002 => " Fix: tenant_id does not exist; use the Directory (tenant) ID of your tenant.",
        1002012 | 70011 => {
            " Fix: the scope is wrong; app-only IMAP uses https://outlook.office365.com/.default, delegated uses https://outlook.office.com/IMAP.AccessAsUser.All."
        }
        70003 => " Fix: the application is not allowed this grant type.",
        50126 => " Fix: the username or password is wrong.",
        50076 | 50079 => {
            " Fix: multi-factor authentication is required for this user; the password flow cannot do MFA: use a delegated login or app-only access."
        }
        65001 => {
            " Fix: consent is missing; an admin must grant consent to the application's API permissions."
        }
        7000218 => {
            " Fix: the redirect is registered as Web; register http://localhost under 'Mobile and desktop applications' or allow public client flows."
        }
        700082 | 50173 | 70008 => {
            " Fix: the refresh token expired or the grant was revoked (password change, admin revocation); sign in again with mail2ticket login."
        }
        700027 => {
            " Fix: the certificate is not registered on the App Registration, or the private key does not belong to it; upload the certificate (Certificates & secrets > Certificates) and check the key pair."
        }
        700024 => {
            " Fix: the machine's clock is wrong (the client assertion is outside its valid time range); enable NTP."
        }
        501481 => {
            " Fix: the PKCE code verifier did not match; start mail2ticket login again and use the URL it prints this time."
        }
        50011 => {
            " Fix: the redirect URI is not registered; add http://localhost under Authentication > Mobile and desktop applications."
        }
        _ => "",
    }
}

/// A successful answer of the token endpoint.
#[derive(Deserialize)]
pub struct TokenResponse {
    /// The bearer token.
    pub access_token: SecretString,
    /// Its lifetime in seconds.
    pub expires_in: u64,
    /// A new refresh token (delegated flows with offline_access).
    #[serde(default)]
    pub refresh_token: Option<SecretString>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .field("refresh_token", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// The HTTP client for token requests (timeouts, user agent, ring TLS).
pub fn http_client() -> Result<reqwest::Client, String> {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .user_agent(concat!("mail2ticket/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// True when Entra says the refresh token itself is finished (expired, revoked, consent
/// withdrawn, a new MFA or password needed): only a new sign-in helps.
pub fn is_dead_grant(error: &AuthError) -> bool {
    matches!(error, AuthError::Entra { error, .. } if error == "invalid_grant" || error == "interaction_required")
}

/// POSTs `form` plus the application's proof of identity to a token endpoint and reads
/// the answer; also used by `mail2ticket login` for the code and device-code grants.
pub async fn post_token(
    http: &reqwest::Client,
    credential: &str,
    token_url: &str,
    client_id: &str,
    client_auth: &ClientAuth,
    mut form: Vec<(&str, String)>,
) -> Result<TokenResponse, AuthError> {
    form.push(("client_id", client_id.to_string()));
    match client_auth {
        ClientAuth::Public => {}
        ClientAuth::Secret(secret) => {
            form.push(("client_secret", secret.expose_secret().to_string()))
        }
        ClientAuth::Certificate(certificate) => {
            let assertion =
                crate::auth::assertion::client_assertion(certificate, client_id, token_url)
                    .map_err(|reason| AuthError::Certificate {
                        credential: credential.to_string(),
                        reason,
                    })?;
            form.push((
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
            ));
            form.push(("client_assertion", assertion.expose_secret().to_string()));
        }
    }
    let (status, body) = post_form(http, credential, token_url, &form).await?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| AuthError::BadResponse {
            credential: credential.to_string(),
            url: token_url.to_string(),
            reason: format!("not a token response: {e}"),
        });
    }
    Err(entra_error(credential, token_url, status, &body))
}

/// POSTs a form and returns the status and body; errors never include the URL's query
/// or the form.
pub async fn post_form(
    http: &reqwest::Client,
    credential: &str,
    url: &str,
    form: &[(&str, String)],
) -> Result<(reqwest::StatusCode, Vec<u8>), AuthError> {
    let unreachable = |reason: String| AuthError::Unreachable {
        credential: credential.to_string(),
        url: url.to_string(),
        reason,
    };
    let response = http
        .post(url)
        .form(form)
        .send()
        .await
        .map_err(|e| unreachable(e.without_url().to_string()))?;
    let status = response.status();
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::SERVICE_UNAVAILABLE
    {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        return Err(AuthError::Throttled {
            credential: credential.to_string(),
            url: url.to_string(),
            status: status.as_u16(),
            retry_after,
        });
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| unreachable(e.without_url().to_string()))?;
    Ok((status, body.to_vec()))
}

/// The OAuth error in an unsuccessful answer, as an [`AuthError`].
pub fn entra_error(
    credential: &str,
    url: &str,
    status: reqwest::StatusCode,
    body: &[u8],
) -> AuthError {
    match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(e) => AuthError::Entra {
            credential: credential.to_string(),
            status: status.as_u16(),
            aadsts: aadsts_code(&e.error_description),
            description: strip_trace(&e.error_description),
            error: e.error,
        },
        Err(_) => AuthError::BadResponse {
            credential: credential.to_string(),
            url: url.to_string(),
            reason: format!("HTTP {status} without an OAuth error body"),
        },
    }
}

/// The claims of a JWT (the middle part), without checking its signature: for saying
/// who a token is for, never for trusting it.
pub fn token_claims(token: &str) -> Result<serde_json::Value, String> {
    use base64::Engine;
    let payload = token.split('.').nth(1).ok_or("no payload")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// The number after "AADSTS" in an Entra error description.
pub fn aadsts_code(description: &str) -> Option<u32> {
    let rest = &description[description.find("AADSTS")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// "AADSTS7000215: Invalid client secret provided. Trace ID: ..." to
/// "Invalid client secret provided."
fn strip_trace(description: &str) -> String {
    let text = description
        .split(" Trace ID:")
        .next()
        .unwrap_or(description);
    let text = match text.find(": ") {
        Some(pos) if text.starts_with("AADSTS") => &text[pos + 2..],
        _ => text,
    };
    text.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after("Thu, 03 Dec 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Thu, 03 Dec 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn entra_descriptions_are_parsed() {
        let d = "AADSTS7000215: Invalid client secret provided. Trace ID: abc Correlation ID: def";
        assert_eq!(aadsts_code(d), Some(7000215));
        assert_eq!(strip_trace(d), "Invalid client secret provided.");
        assert_eq!(aadsts_code("no code"), None);
    }
}
