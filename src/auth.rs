//! Access tokens from Microsoft Entra ID, one cache per `[[credential]]`.
//!
//! Every parser naming a credential shares its [`TokenSource`]: the cache sits behind an
//! async mutex held across the HTTP request, so N pollers asking at once cause one token
//! request, not N (single flight). A token is renewed ahead of its expiry; a token the
//! server rejected is dropped with [`TokenSource::invalidate`] so the next call fetches a
//! new one. Errors carry Entra's AADSTS code and description, never the secret.

use crate::config::CredentialConfig;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Renew a token when less than this is left of its life (or a fifth of its lifetime,
/// whichever is smaller, for very short-lived tokens).
const RENEW_MARGIN: Duration = Duration::from_secs(300);
/// Give up on a token request after this long.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A bearer token and when to stop using it.
#[derive(Clone)]
pub struct AccessToken {
    /// The token itself.
    pub secret: SecretString,
    /// When it expires.
    pub expires_at: Instant,
    /// When to renew it (a margin before `expires_at`).
    pub renew_at: Instant,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"[REDACTED]")
            .field(
                "expires_in",
                &self.expires_at.saturating_duration_since(Instant::now()),
            )
            .finish()
    }
}

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
        700082 | 50173 => {
            " Fix: the refresh token expired or the grant was revoked; sign in again with mail2ticket login."
        }
        _ => "",
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// The token cache of one credential.
pub struct TokenSource {
    name: String,
    token_url: String,
    client_id: String,
    client_secret: SecretString,
    scope: String,
    http: reqwest::Client,
    cache: Mutex<Option<AccessToken>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("name", &self.name)
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// A token source for a client-credentials `[[credential]]`.
    pub fn new(credential: &CredentialConfig) -> Result<Self, AuthError> {
        crate::tls::install_crypto_provider();
        let token_url = format!(
            "{}/{}/oauth2/v2.0/token",
            credential.authority, credential.tenant_id
        );
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .user_agent(concat!("mail2ticket/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AuthError::Unreachable {
                credential: credential.name.clone(),
                url: token_url.clone(),
                reason: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(TokenSource {
            name: credential.name.clone(),
            token_url,
            client_id: credential.client_id.clone(),
            client_secret: credential.client_secret.clone(),
            scope: credential.scope.clone(),
            http,
            cache: Mutex::new(None),
        })
    }

    /// A token valid for a while yet: the cached one, or a new one.
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        let mut cache = self.cache.lock().await;
        if let Some(token) = cache.as_ref()
            && Instant::now() < token.renew_at
        {
            return Ok(token.clone());
        }
        let token = self.request().await?;
        *cache = Some(token.clone());
        Ok(token)
    }

    /// Forgets `rejected` (a token the server refused) so the next [`token`](Self::token)
    /// call fetches a new one. A newer token fetched meanwhile is kept.
    pub async fn invalidate(&self, rejected: &AccessToken) {
        let mut cache = self.cache.lock().await;
        if cache
            .as_ref()
            .is_some_and(|t| t.secret.expose_secret() == rejected.secret.expose_secret())
        {
            *cache = None;
        }
    }

    async fn request(&self) -> Result<AccessToken, AuthError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose_secret()),
            ("scope", self.scope.as_str()),
        ];
        let unreachable = |reason: String| AuthError::Unreachable {
            credential: self.name.clone(),
            url: self.token_url.clone(),
            reason,
        };
        let started = Instant::now();
        let response = self
            .http
            .post(&self.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| unreachable(e.without_url().to_string()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| unreachable(e.without_url().to_string()))?;
        if status.is_success() {
            let parsed: TokenResponse =
                serde_json::from_slice(&body).map_err(|e| AuthError::BadResponse {
                    credential: self.name.clone(),
                    url: self.token_url.clone(),
                    reason: format!("not a token response: {e}"),
                })?;
            let lifetime = Duration::from_secs(parsed.expires_in);
            let margin = RENEW_MARGIN.min(lifetime / 5);
            tracing::info!(credential = %self.name, expires_in_s = parsed.expires_in, "got an access token");
            return Ok(AccessToken {
                secret: SecretString::from(parsed.access_token),
                expires_at: started + lifetime,
                renew_at: started + lifetime - margin,
            });
        }
        match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(e) => Err(AuthError::Entra {
                credential: self.name.clone(),
                status: status.as_u16(),
                aadsts: aadsts_code(&e.error_description),
                description: strip_trace(&e.error_description),
                error: e.error,
            }),
            Err(_) => Err(AuthError::BadResponse {
                credential: self.name.clone(),
                url: self.token_url.clone(),
                reason: format!("HTTP {status} without an OAuth error body"),
            }),
        }
    }
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

/// The token sources of every credential in the configuration, by name.
#[derive(Debug, Default, Clone)]
pub struct TokenSources {
    by_name: HashMap<String, Arc<TokenSource>>,
}

impl TokenSources {
    /// One source per `[[credential]]`.
    pub fn from_config(credentials: &[CredentialConfig]) -> Result<Self, AuthError> {
        let mut by_name = HashMap::new();
        for c in credentials {
            by_name.insert(c.name.clone(), Arc::new(TokenSource::new(c)?));
        }
        Ok(TokenSources { by_name })
    }

    /// The source of that credential.
    pub fn get(&self, name: &str) -> Option<Arc<TokenSource>> {
        self.by_name.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entra_descriptions_are_parsed() {
        let d = "AADSTS7000215: Invalid client secret provided. Trace ID: abc Correlation ID: def";
        assert_eq!(aadsts_code(d), Some(7000215));
        assert_eq!(strip_trace(d), "Invalid client secret provided.");
        assert_eq!(aadsts_code("no code"), None);
    }
}
