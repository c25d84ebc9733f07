//! Access tokens from Microsoft Entra ID, one cache per `[[credential]]`.
//!
//! Every parser naming a credential shares its [`TokenSource`]: the cache sits behind an
//! async mutex held across the HTTP request, so N pollers asking at once cause one token
//! request, not N (single flight). A token is renewed ahead of its expiry; a token the
//! server rejected is dropped only when the evidence points at the token rather than at
//! the mailbox ([`TokenSource::login_refused`]), so the next call fetches a new one. Errors carry Entra's AADSTS code and description, never the secret.
//!
//! Three flows fill the cache: client credentials (secret or certificate assertion), the
//! resource-owner password grant, and delegated sign-ins refreshed with a refresh token
//! kept encrypted in Postgres (`credential_grants`). A refresh locks its row, so the
//! rotated refresh token is saved, in the same transaction as the new expiry, before any
//! other process can redeem the old one. A dead grant turns into "needs login" for that
//! credential only. A failed request is remembered for [`FAILURE_HOLD`], so many pollers
//! sharing a broken credential ask Entra once, not once each.

pub mod assertion;
pub mod entra;
mod evidence;
pub mod login;
pub mod sealed;
mod sources;

pub use sources::TokenSources;

pub use entra::{
    AuthError, TokenResponse, entra_hint, http_client, is_dead_grant, post_form, post_token,
    token_claims,
};

use crate::auth::sealed::SealingKey;
use crate::config::{ClientAuth, CredentialConfig, CredentialKind, PasswordUser};
use crate::store;
use evidence::Evidence;
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, Notify};
use tracing::Instrument;

/// Renew a token when less than this is left of its life (or a fifth of its lifetime,
/// whichever is smaller, for very short-lived tokens).
const RENEW_MARGIN: Duration = Duration::from_secs(300);
/// A failed token request is answered from memory for this long before Entra is asked
/// again (all pollers of a credential share one failure instead of each asking).
pub const FAILURE_HOLD: Duration = Duration::from_secs(20);

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

/// How a credential's access tokens are obtained.
enum Flow {
    /// Client credentials (secret or certificate).
    App,
    /// Resource-owner password grant.
    Password(PasswordUser),
    /// Refresh token from `credential_grants`.
    Delegated(Delegated),
}

/// What a delegated credential needs to refresh its sign-in.
struct Delegated {
    tenant_id: String,
    pool: Option<sqlx::PgPool>,
    key: Option<Arc<SealingKey>>,
    login_command: String,
}

#[derive(Default)]
struct Cache {
    token: Option<AccessToken>,
    /// What logins with `token` have shown about it.
    evidence: Evidence,
    /// The next token replaces one blamed for a refused login.
    replacing: bool,
    failure: Option<(Instant, AuthError)>,
    /// When the last token was obtained.
    refreshed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A credential as the operations endpoints show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CredentialStatus {
    /// The credential's name.
    pub name: String,
    /// Its `type`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `ok`, `failing` (its last token request failed) or `needs_login`.
    pub state: &'static str,
    /// When the cached token expires.
    pub token_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the last token was obtained.
    pub last_refresh_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why it is failing.
    pub reason: Option<String>,
}

/// The token cache of one credential.
pub struct TokenSource {
    name: String,
    kind: CredentialKind,
    token_url: String,
    client_id: String,
    client_auth: ClientAuth,
    scope: String,
    flow: Flow,
    http: reqwest::Client,
    cache: Mutex<Cache>,
    /// Woken whenever a login with the cached token ends.
    login_ended: Notify,
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
    /// A token source for a `[[credential]]`. A delegated one reads and saves its sign-in
    /// through `pool`, sealed with `key`; `config_path` goes into the "login" hint.
    pub fn new(
        credential: &CredentialConfig,
        scope: &str,
        pool: Option<sqlx::PgPool>,
        key: Option<Arc<SealingKey>>,
        config_path: &std::path::Path,
    ) -> Result<Self, AuthError> {
        let token_url = credential.token_url();
        let http = http_client().map_err(|reason| AuthError::Unreachable {
            credential: credential.name.clone(),
            url: token_url.clone(),
            reason,
        })?;
        let flow = match credential.kind {
            CredentialKind::ClientCredentials => Flow::App,
            CredentialKind::Password => Flow::Password(
                credential
                    .user
                    .clone()
                    .expect("a validated password credential has a user"),
            ),
            CredentialKind::Delegated => Flow::Delegated(Delegated {
                tenant_id: credential.tenant_id.clone(),
                pool,
                key,
                login_command: login_command(config_path, &credential.name),
            }),
        };
        Ok(TokenSource {
            name: credential.name.clone(),
            kind: credential.kind,
            token_url,
            client_id: credential.client_id.clone(),
            client_auth: credential.client_auth.clone(),
            scope: scope.to_string(),
            flow,
            http,
            cache: Mutex::new(Cache::default()),
            login_ended: Notify::new(),
        })
    }

    /// The credential's type: app-only tokens carry roles, user tokens scopes.
    pub fn kind(&self) -> CredentialKind {
        self.kind
    }

    /// What this cache knows of its credential's health (no secret in it).
    pub async fn status(&self) -> CredentialStatus {
        let cache = self.cache.lock().await;
        let (state, reason) = match &cache.failure {
            Some((_, e @ AuthError::NeedsLogin { .. })) => ("needs_login", Some(e.to_string())),
            Some((_, e)) => ("failing", Some(e.to_string())),
            None => ("ok", None),
        };
        let token_expires_at = cache.token.as_ref().map(|t| {
            let left = t.expires_at.saturating_duration_since(Instant::now());
            chrono::Utc::now() + left
        });
        CredentialStatus {
            name: self.name.clone(),
            kind: self.kind.as_str(),
            state,
            token_expires_at,
            last_refresh_at: cache.refreshed_at,
            reason,
        }
    }

    /// A token valid for a while yet: the cached one, or a new one.
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        // Its events are logged in a `credential{credential=...}` span.
        let span = tracing::info_span!("credential", credential = %self.name);
        self.cached_or_new().instrument(span).await
    }

    async fn cached_or_new(&self) -> Result<AccessToken, AuthError> {
        let mut cache = self.cache.lock().await;
        if let Some(token) = cache.token.as_ref()
            && Instant::now() < token.renew_at
        {
            return Ok(token.clone());
        }
        // A throttled endpoint is asked again when it said (all pollers share the wait);
        // any other failure is held for FAILURE_HOLD.
        if let Some((at, error)) = cache.failure.as_ref()
            && (at.elapsed() < error.retry_after().unwrap_or(FAILURE_HOLD)
                || self.guards_the_account(error))
        {
            return Err(error.clone());
        }
        let started = Instant::now();
        let result = match &self.flow {
            Flow::App => self.request(&[("grant_type", "client_credentials")]).await,
            Flow::Password(user) => {
                self.request(&[
                    ("grant_type", "password"),
                    ("username", user.username.as_str()),
                    ("password", user.password.expose_secret()),
                ])
                .await
            }
            Flow::Delegated(delegated) => self.refresh(delegated).await,
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        let labels = [
            ("credential", self.name.clone()),
            ("result", outcome.to_string()),
        ];
        metrics::counter!("mail2ticket_token_requests_total", &labels).increment(1);
        match result {
            Ok(response) => {
                tracing::info!(expires_in_s = response.expires_in, "got an access token");
                let token = access_token(&response, started);
                cache.token = Some(token.clone());
                cache.refreshed_at = Some(chrono::Utc::now());
                cache.evidence = Evidence {
                    obtained_at: Some(started),
                    replacement: std::mem::take(&mut cache.replacing),
                    ..Evidence::default()
                };
                cache.failure = None;
                Ok(token)
            }
            Err(error) => {
                if self.guards_the_account(&error) {
                    tracing::error!(
                        "{error}; not asking again until mail2ticket restarts, so that retries cannot lock the account"
                    );
                }
                cache.failure = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    /// True for a password credential refused for the user's own sake (wrong password,
    /// MFA required, account locked, disabled or its password expired): retrying the
    /// same password only counts towards Entra's smart lockout, and only a config change
    /// (a restart) can help, so such a refusal is kept until the process ends.
    fn guards_the_account(&self, error: &AuthError) -> bool {
        matches!(self.flow, Flow::Password(_))
            && matches!(
                error,
                AuthError::Entra {
                    aadsts: Some(50126 | 50053 | 50055 | 50057 | 50076 | 50079),
                    ..
                }
            )
    }

    /// One request to the token endpoint with the grant's fields, the scope and the
    /// application's own proof (secret, assertion, or none).
    async fn request(&self, grant: &[(&str, &str)]) -> Result<TokenResponse, AuthError> {
        let mut form: Vec<(&str, String)> =
            grant.iter().map(|(k, v)| (*k, v.to_string())).collect();
        form.push(("scope", self.scope.clone()));
        post_token(
            &self.http,
            &self.name,
            &self.token_url,
            &self.client_id,
            &self.client_auth,
            form,
        )
        .await
    }

    /// Redeems the stored refresh token under a row lock and saves the rotated one in the
    /// same transaction; a dead grant marks the credential "needs login".
    async fn refresh(&self, d: &Delegated) -> Result<TokenResponse, AuthError> {
        let needs_login = |reason: String| AuthError::NeedsLogin {
            credential: self.name.clone(),
            reason,
            command: d.login_command.clone(),
        };
        let store_error = |e: &dyn std::fmt::Display| AuthError::Store {
            credential: self.name.clone(),
            reason: e.to_string(),
        };
        let (Some(pool), Some(key)) = (&d.pool, &d.key) else {
            return Err(store_error(&"no database connection or [secrets] key"));
        };
        let mut tx = pool.begin().await.map_err(|e| store_error(&e))?;
        let Some(grant) = store::grants::lock_grant(&mut tx, &self.name)
            .await
            .map_err(|e| store_error(&e))?
        else {
            let reason = "nobody has signed in with it yet";
            store::grants::record_missing_sign_in(
                &mut tx,
                &self.name,
                &d.tenant_id,
                &self.client_id,
                reason,
            )
            .await
            .map_err(|e| store_error(&e))?;
            tx.commit().await.map_err(|e| store_error(&e))?;
            return Err(needs_login(reason.to_string()));
        };
        let refresh_token = self.usable_refresh_token(d, key, grant)?;
        let result = self
            .request(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose_secret()),
            ])
            .await;
        match result {
            Ok(response) => {
                let rotated = response.refresh_token.as_ref().unwrap_or(&refresh_token);
                store::grants::save_refreshed_grant(
                    &mut tx,
                    &self.name,
                    &key.seal(&self.name, rotated),
                    Duration::from_secs(response.expires_in),
                )
                .await
                .map_err(|e| store_error(&e))?;
                tx.commit().await.map_err(|e| store_error(&e))?;
                Ok(response)
            }
            Err(error) if is_dead_grant(&error) => {
                let reason = format!("Entra refused the stored sign-in: {error}");
                store::grants::mark_needs_login(&mut tx, &self.name, &reason)
                    .await
                    .map_err(|e| store_error(&e))?;
                tx.commit().await.map_err(|e| store_error(&e))?;
                tracing::error!("{reason}; this credential needs login, the others carry on");
                Err(needs_login(reason))
            }
            Err(error) => Err(error),
        }
    }

    /// The stored refresh token, if the grant is still good for this credential.
    fn usable_refresh_token(
        &self,
        d: &Delegated,
        key: &SealingKey,
        grant: store::grants::Grant,
    ) -> Result<SecretString, AuthError> {
        let needs_login = |reason: String| AuthError::NeedsLogin {
            credential: self.name.clone(),
            reason,
            command: d.login_command.clone(),
        };
        if grant.status != "ok" {
            return Err(needs_login(
                grant
                    .status_reason
                    .unwrap_or_else(|| "the sign-in is no longer valid".into()),
            ));
        }
        if grant.tenant_id != d.tenant_id || grant.client_id != self.client_id {
            return Err(needs_login(format!(
                "the stored sign-in is for application {} in tenant {}, but the credential now names application {} in tenant {}",
                grant.client_id, grant.tenant_id, self.client_id, d.tenant_id
            )));
        }
        grant
            .refresh_token
            .as_deref()
            .ok_or_else(|| needs_login("no refresh token is stored".to_string()))
            .and_then(|sealed| {
                key.open(&self.name, sealed)
                    .map_err(|e| needs_login(e.to_string()))
            })
    }
}

/// The command that signs a delegated credential in again.
pub fn login_command(config_path: &std::path::Path, credential: &str) -> String {
    format!(
        "mail2ticket login --config {} --credential {credential}",
        config_path.display()
    )
}

fn access_token(response: &TokenResponse, started: Instant) -> AccessToken {
    let lifetime = Duration::from_secs(response.expires_in);
    let margin = RENEW_MARGIN.min(lifetime / 5);
    AccessToken {
        secret: response.access_token.clone(),
        expires_at: started + lifetime,
        renew_at: started + lifetime - margin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn one_cache_per_credential_and_scope() {
        let text = "[database]\nurl = \"postgres://x/y\"\n[[credential]]\nname = \"app\"\ntype = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s3cret-value\"\n";
        let config = Config::from_toml(std::path::Path::new("t.toml"), text).unwrap();
        let sources = TokenSources::from_config(&config, None).unwrap();
        let imap = sources.get("app").unwrap();
        let same = sources
            .get_for("app", crate::config::DEFAULT_APP_SCOPE)
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&imap, &same));
        let graph = "https://graph.microsoft.com/.default";
        let other = sources.get_for("app", graph).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&imap, &other));
        assert_eq!(other.scope, graph);
        let again = sources.get_for("app", graph).unwrap().unwrap();
        assert!(Arc::ptr_eq(&other, &again));
        assert!(sources.get("nope").is_none());
    }

    #[test]
    fn a_reload_keeps_the_caches_of_unchanged_credentials_only() {
        let text = |secret: &str| {
            format!(
                "[database]\nurl = \"postgres://x/y\"\n[[credential]]\nname = \"app\"\ntype = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"{secret}\"\n[[credential]]\nname = \"other\"\ntype = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c2\"\nclient_secret = \"same\"\n"
            )
        };
        let path = std::path::Path::new("t.toml");
        let before = Config::from_toml(path, &text("first-secret")).unwrap();
        let sources = TokenSources::from_config(&before, None).unwrap();
        let (app, other) = (sources.get("app").unwrap(), sources.get("other").unwrap());

        let same = Config::from_toml(path, &text("first-secret")).unwrap();
        assert!(sources.reload(&before, &same).unwrap().is_empty());
        assert!(Arc::ptr_eq(&app, &sources.get("app").unwrap()));

        let rotated = Config::from_toml(path, &text("rotated-secret")).unwrap();
        assert_eq!(
            sources.reload(&same, &rotated).unwrap(),
            vec!["app".to_string()]
        );
        assert!(!Arc::ptr_eq(&app, &sources.get("app").unwrap()));
        assert!(Arc::ptr_eq(&other, &sources.get("other").unwrap()));
        assert!(!format!("{sources:?}").contains("secret"));
    }
}
