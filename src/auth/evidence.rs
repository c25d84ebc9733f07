//! Whose fault is a refused IMAP login, the token's or the mailbox's? The evidence the
//! logins made with a cached token have gathered decides whether the token is dropped.

use super::{AccessToken, Cache, TokenSource};
use secrecy::ExposeSecret;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// What the IMAP logins made with the cached token have shown: a refusal is blamed on the
/// token only when the evidence points at the token, not at the mailbox (one ungranted
/// mailbox among many must not cost the others their token, nor Entra a request on each
/// of its retries).
#[derive(Default)]
pub(super) struct Evidence {
    /// Mailboxes that accepted the token.
    pub(super) accepted_by: HashSet<String>,
    /// Logins with the token under way.
    pub(super) in_flight: usize,
    /// When the token was obtained.
    pub(super) obtained_at: Option<Instant>,
    /// The token replaced one that was blamed for a refusal.
    pub(super) replacement: bool,
}

/// A token closer than this to its expiry is blamed for a refusal.
const NEAR_EXPIRY: Duration = Duration::from_secs(60);
/// How long a refused login waits for the other logins under way with the same token, to
/// learn whether any mailbox accepts it.
const VERDICT_WAIT: Duration = Duration::from_secs(60);
/// A replacement token refused by every mailbox tried is blamed again only after this long
/// (it may predate a permission change; asking sooner would only repeat the answer).
const REPLACEMENT_TRUST: Duration = Duration::from_secs(300);

impl TokenSource {
    /// Records that a login with `token` begins (see [`login_refused`](Self::login_refused)).
    pub async fn login_started(&self, token: &AccessToken) {
        let mut cache = self.cache.lock().await;
        if is_current(&cache, token) {
            cache.evidence.in_flight += 1;
        }
    }

    /// Records that `mailbox` accepted `token`.
    pub async fn login_accepted(&self, token: &AccessToken, mailbox: &str) {
        let mut cache = self.cache.lock().await;
        if is_current(&cache, token) {
            let evidence = &mut cache.evidence;
            evidence.in_flight = evidence.in_flight.saturating_sub(1);
            evidence.accepted_by.insert(mailbox.to_ascii_lowercase());
        }
        drop(cache);
        self.login_ended.notify_waiters();
    }

    /// Records that a login with `token` ended without a verdict on it (a network error).
    pub async fn login_failed(&self, token: &AccessToken) {
        let mut cache = self.cache.lock().await;
        if is_current(&cache, token) {
            cache.evidence.in_flight = cache.evidence.in_flight.saturating_sub(1);
        }
        drop(cache);
        self.login_ended.notify_waiters();
    }

    /// Records that `mailbox` refused `token`, and says whether the token is to blame: then
    /// it is dropped (the next [`token`](Self::token) call fetches a new one) and the login
    /// is worth one more try. The token is blamed when this mailbox accepted it before,
    /// when it is about to expire, or when no mailbox accepts it (after waiting for the
    /// logins with it under way) unless it already replaced a blamed token less than
    /// [`REPLACEMENT_TRUST`] ago. A mailbox refusing a token that others accept is the
    /// mailbox's problem (a missing permission): the token stays.
    pub async fn login_refused(&self, token: &AccessToken, mailbox: &str) -> bool {
        let mailbox = mailbox.to_ascii_lowercase();
        let deadline = Instant::now() + VERDICT_WAIT;
        let mut first = true;
        loop {
            let ended = self.login_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let mut cache = self.cache.lock().await;
            if !is_current(&cache, token) {
                // A newer token is cached already: try that one.
                return true;
            }
            let evidence = &mut cache.evidence;
            if std::mem::take(&mut first) {
                evidence.in_flight = evidence.in_flight.saturating_sub(1);
            }
            let blame = if evidence.accepted_by.contains(&mailbox)
                || token.expires_at.saturating_duration_since(Instant::now()) < NEAR_EXPIRY
            {
                Some(true)
            } else if !evidence.accepted_by.is_empty() {
                Some(false)
            } else if evidence.in_flight > 0 && Instant::now() < deadline {
                None // another mailbox may yet accept it
            } else {
                let trusted = evidence.replacement
                    && evidence
                        .obtained_at
                        .is_some_and(|at| at.elapsed() < REPLACEMENT_TRUST);
                Some(!trusted)
            };
            match blame {
                Some(true) => {
                    cache.token = None;
                    cache.evidence = Evidence::default();
                    cache.replacing = true;
                    return true;
                }
                Some(false) => return false,
                None => {
                    drop(cache);
                    let _ = tokio::time::timeout_at(deadline.into(), ended).await;
                }
            }
        }
    }
}

impl TokenSource {
    /// A resource server said this token itself is invalid (Microsoft Graph's 401, where a
    /// missing permission is a 403 instead): it is dropped, so the next
    /// [`token`](Self::token) call fetches a new one.
    pub async fn token_rejected(&self, token: &AccessToken) {
        let mut cache = self.cache.lock().await;
        if is_current(&cache, token) {
            cache.token = None;
            cache.evidence = Evidence::default();
            cache.replacing = true;
        }
    }
}

/// True when `token` is the one in the cache.
fn is_current(cache: &Cache, token: &AccessToken) -> bool {
    cache
        .token
        .as_ref()
        .is_some_and(|t| t.secret.expose_secret() == token.secret.expose_secret())
}
