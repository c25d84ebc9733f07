//! Requests to Microsoft Graph, with the rules every request follows:
//! - a bearer token from the parser's credential (scope `graph_scope`); a `401` drops the
//!   token once and retries with a new one (a missing permission is a `403`, not a 401);
//! - at most [`MAX_IN_FLIGHT`] requests in flight per credential, across all of its Graph
//!   parsers (Graph's per-app concurrency limit per mailbox is 4);
//! - `429`, `503` and `504` wait for `Retry-After` (seconds or an HTTP date) or, without
//!   one, back off exponentially with jitter; waits up to [`RETRY_HERE_MAX`] are taken
//!   here, longer ones end the pass with the wait for the supervisor (which sleeps
//!   cancellably and honours it);
//! - every request has a connect and a read timeout;
//! - links from Graph (`@odata.nextLink`, `@odata.deltaLink`) are followed only to the
//!   origin of `base_url`: the token is never sent anywhere else;
//! - errors carry Graph's `error.code` and message, and a fix where one is known.

use crate::auth::TokenSource;
use crate::auth::entra::parse_retry_after;
use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests in flight per credential, at most.
pub const MAX_IN_FLIGHT: usize = 4;
/// Throttling waits up to this long are waited out within the request.
const RETRY_HERE_MAX: Duration = Duration::from_secs(60);
/// Throttled answers retried within one request, at most.
const THROTTLE_RETRIES: u32 = 5;
/// Longest wait without `Retry-After`.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Connecting may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Waiting for the next bytes of an answer may take this long.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a Graph request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GraphError {
    /// Graph answered with an error.
    #[error("Microsoft Graph refused {step}: HTTP {status} {code}: {message}{}", fix_text(.fix))]
    Api {
        /// What was asked.
        step: &'static str,
        /// The HTTP status.
        status: u16,
        /// Graph's `error.code`.
        code: String,
        /// Graph's `error.message`.
        message: String,
        /// What to do about it, when known.
        fix: Option<&'static str>,
    },
    /// Graph keeps throttling; the pass ends and is retried after `retry_after`.
    #[error("Microsoft Graph throttled {step} (HTTP {status}); retrying in {} s", .retry_after.as_secs())]
    Throttled {
        /// What was asked.
        step: &'static str,
        /// 429, 503 or 504.
        status: u16,
        /// When to come back.
        retry_after: Duration,
    },
    /// No answer (connection refused or cut, timeout).
    #[error("Microsoft Graph did not answer {step}: {reason}")]
    Unreachable {
        /// What was asked.
        step: &'static str,
        /// Why.
        reason: String,
    },
    /// An answer that is not what Graph documents.
    #[error("Microsoft Graph answered {step} with something unexpected: {reason}")]
    Unexpected {
        /// What was asked.
        step: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// A link pointing away from `base_url` (the token would go to another host).
    #[error(
        "Microsoft Graph sent a link to {link_origin}, not to {base_origin}; not followed (the token goes to base_url's host only)"
    )]
    ForeignLink {
        /// Where the link pointed.
        link_origin: String,
        /// Where `base_url` points.
        base_origin: String,
    },
}

fn fix_text(fix: &Option<&'static str>) -> String {
    fix.map(|f| format!(". Fix: {f}")).unwrap_or_default()
}

impl GraphError {
    /// How long Graph asked us to wait, when it throttled.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GraphError::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// True for a `410 Gone` (the delta sync state is lost: start the round again).
    pub fn is_gone(&self) -> bool {
        matches!(self, GraphError::Api { status: 410, .. })
    }

    /// True for a `404` (the message is gone already).
    pub fn is_not_found(&self) -> bool {
        matches!(self, GraphError::Api { status: 404, .. })
    }
}

/// What to do about a Graph error code.
pub fn fix_for(status: u16, code: &str) -> Option<&'static str> {
    let code = code.to_ascii_lowercase();
    Some(match (status, code.as_str()) {
        (_, "mailboxnotenabledforrestapi") => {
            "this mailbox cannot be read through Graph (an on-premises or inactive mailbox, or not licensed for Exchange Online); use [parser.imap] or move it to Exchange Online"
        }
        (403, _) | (_, "erroraccessdenied") | (_, "accessdenied") => {
            "grant the app the application permission Mail.ReadWrite with admin consent, and scope it to this mailbox with RBAC for Applications (New-ManagementScope, New-ManagementRoleAssignment -App <id> -Role \"Application Mail.ReadWrite\"; check with Test-ServicePrincipalAuthorization); for a delegated credential the user needs FullAccess and the scope Mail.ReadWrite.Shared"
        }
        (404, "errorinvaliduser") => "check the parser's email: no mailbox has that address",
        (404, _) => {
            "check the parser's email and [parser.graph] folder (a path such as \"Inbox/Support\" is looked up by display name)"
        }
        (401, _) => {
            "the token is not valid for Graph: check the credential's graph_scope (https://graph.microsoft.com/.default for app-only) and the tenant"
        }
        _ => return None,
    })
}

/// The concurrency limit of one credential, shared by all of its Graph parsers.
fn slots_of(credential: &str) -> Arc<Semaphore> {
    static SLOTS: LazyLock<Mutex<HashMap<String, Arc<Semaphore>>>> = LazyLock::new(Mutex::default);
    SLOTS
        .lock()
        .expect("not poisoned")
        .entry(credential.to_string())
        .or_insert_with(|| Arc::new(Semaphore::new(MAX_IN_FLIGHT)))
        .clone()
}

/// A Graph answer that succeeded, holding its concurrency slot until it is read.
pub struct Answer {
    /// The response (status 2xx).
    pub response: reqwest::Response,
    _slot: OwnedSemaphorePermit,
}

/// Requests to one Graph endpoint with one credential's tokens. Cheap to clone.
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base: url::Url,
    tokens: Arc<TokenSource>,
    slots: Arc<Semaphore>,
}

impl GraphClient {
    /// A client for `base_url` with the tokens of `credential`.
    pub fn new(
        base_url: &str,
        credential: &str,
        tokens: Arc<TokenSource>,
    ) -> Result<Self, GraphError> {
        let unexpected = |reason: String| GraphError::Unexpected {
            step: "setup",
            reason,
        };
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("mail2ticket/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| unexpected(format!("cannot build the HTTP client: {e}")))?;
        let base = url::Url::parse(&format!("{}/", base_url.trim_end_matches('/')))
            .map_err(|e| unexpected(format!("base_url {base_url:?}: {e}")))?;
        Ok(GraphClient {
            http,
            base,
            tokens,
            slots: slots_of(credential),
        })
    }

    /// `base_url` + `path` (a path relative to it, such as `users/a@b/mailFolders/inbox`).
    pub fn url(&self, path: &str) -> Result<url::Url, GraphError> {
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| GraphError::Unexpected {
                step: "url",
                reason: format!("{path:?}: {e}"),
            })
    }

    /// A link Graph gave, checked to point at `base_url`'s origin.
    pub fn link(&self, link: &str) -> Result<url::Url, GraphError> {
        let url = url::Url::parse(link).map_err(|e| GraphError::Unexpected {
            step: "link",
            reason: format!("not a URL: {e}"),
        })?;
        if url.origin() != self.base.origin() {
            return Err(GraphError::ForeignLink {
                link_origin: url.origin().ascii_serialization(),
                base_origin: self.base.origin().ascii_serialization(),
            });
        }
        Ok(url)
    }

    /// Sends a request (with `headers` and an optional JSON body) under the rules above.
    pub async fn send(
        &self,
        step: &'static str,
        method: Method,
        url: url::Url,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, crate::source::SourceError> {
        let mut token_retried = false;
        let mut throttled = 0;
        loop {
            let slot = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let token = self.tokens.token().await?;
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(secrecy::ExposeSecret::expose_secret(&token.secret));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| GraphError::Unreachable {
                step,
                reason: describe(&e),
            })?;
            let status = response.status();
            if status.is_success() {
                return Ok(Answer {
                    response,
                    _slot: slot,
                });
            }
            if status == StatusCode::UNAUTHORIZED && !token_retried {
                token_retried = true;
                self.tokens.token_rejected(&token).await;
                tracing::warn!(
                    step,
                    "Graph refused the token (401); retrying once with a new one"
                );
                continue;
            }
            if matches!(status.as_u16(), 429 | 503 | 504) {
                throttled += 1;
                let wait = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, chrono::Utc::now()))
                    .unwrap_or_else(|| backoff(throttled));
                drop(slot);
                if wait > RETRY_HERE_MAX || throttled > THROTTLE_RETRIES {
                    return Err(GraphError::Throttled {
                        step,
                        status: status.as_u16(),
                        retry_after: wait,
                    }
                    .into());
                }
                tracing::info!(
                    step,
                    status = status.as_u16(),
                    wait_s = wait.as_secs_f32(),
                    "Graph throttled the request; waiting as asked"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(api_error(step, response).await.into());
        }
    }
}

/// Exponential backoff with jitter when Graph gave no `Retry-After`: 1 s, 2 s, 4 s, ...
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.saturating_sub(1).min(10)).min(MAX_BACKOFF);
    let jitter = rand::random_range(0.0..0.5);
    base.mul_f64(1.0 + jitter).min(MAX_BACKOFF)
}

/// Graph's error body (`{"error": {"code", "message"}}`) as an error.
async fn api_error(step: &'static str, response: reqwest::Response) -> GraphError {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<Body>(&text) {
        Ok(body) => (body.error.code, body.error.message),
        Err(_) => (String::new(), text.chars().take(300).collect()),
    };
    GraphError::Api {
        step,
        status,
        fix: fix_for(status, &code),
        code,
        message,
    }
}

/// A transport error without the URL (which may carry a delta token).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "transport error"
    };
    match crate::error_causes(e) {
        causes if causes.is_empty() => kind.to_string(),
        causes => format!("{kind}: {causes}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_followed_only_to_the_origin_of_base_url() {
        let text = "[database]\nurl = \"postgres://x/y\"\n[[credential]]\nname = \"app\"\ntype = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        let config =
            crate::config::Config::from_toml(std::path::Path::new("t.toml"), text).unwrap();
        let tokens = crate::auth::TokenSources::from_config(&config, None).unwrap();
        let client = GraphClient::new(
            "https://graph.microsoft.com/v1.0",
            "app",
            tokens.graph("app").unwrap(),
        )
        .unwrap();
        let same = "https://graph.microsoft.com/v1.0/users/a@b/mailFolders/inbox/messages/delta?$deltatoken=x";
        assert_eq!(client.link(same).unwrap().as_str(), same);
        for foreign in [
            "https://graph.microsoft.com.evil.test/v1.0/x",
            "http://graph.microsoft.com/v1.0/x",
            "https://graph.microsoft.com:8443/v1.0/x",
            "https://evil.test/v1.0/x",
        ] {
            assert!(
                matches!(client.link(foreign), Err(GraphError::ForeignLink { .. })),
                "{foreign}"
            );
        }
        assert_eq!(
            client.url("users/a@b/messages/1").unwrap().as_str(),
            "https://graph.microsoft.com/v1.0/users/a@b/messages/1"
        );
    }

    #[test]
    fn graph_error_codes_get_fixes() {
        assert!(
            fix_for(403, "ErrorAccessDenied")
                .unwrap()
                .contains("RBAC for Applications")
        );
        assert!(fix_for(404, "ErrorInvalidUser").unwrap().contains("email"));
        assert!(
            fix_for(404, "MailboxNotEnabledForRESTAPI")
                .unwrap()
                .contains("[parser.imap]")
        );
        assert!(fix_for(500, "generalException").is_none());
    }
}
