//! IMAP as a mail source: [`ImapSource`] implements the [`MailSource`] seam on top of the
//! guarded async-imap client ([`client`]), with the first-contact policy
//! ([`first_contact`]).
//!
//! IMAP's cursor is the folder's UIDVALIDITY and the last UID done. A changed UIDVALIDITY
//! resets it (the folder is rescanned; the Message-ID key prevents duplicates); no cursor
//! at all is a first contact, where `start_at` chooses what existing mail to take.

pub mod client;
pub mod first_contact;
pub mod folder_name;
pub mod session;

pub use client::{COMMAND_TIMEOUT, Connection, ImapError, Io, Login, Stream, connect};
pub use session::{FolderStatus, IdleEnd, ImapSession, Listed, uid_set};

use crate::auth::{AccessToken, TokenSource};
use crate::config::{AfterIngest, ImapConfig, ParserAuth, ParserConfig};
use crate::source::{
    Cursor, Fetched, Listing, MailSource, Pending, SourceError, SourceSession, WaitEnd,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// IDLE is re-issued at least this often (RFC 2177 asks for under 29 minutes).
const IDLE_LIMIT: Duration = Duration::from_secs(25 * 60);

/// IMAP sessions being opened at once in this process, at most. A thousand mailboxes
/// starting together would otherwise open a thousand TCP connections, TLS handshakes
/// (CPU-heavy on both sides) and logins in the same instant, and Exchange Online throttles
/// bursts of logins. On a loopback Dovecot the bound costs nothing measurable: 1,000
/// mailboxes were all idle 5.6 s after start with it, 5.1 s without (the server's login
/// rate is the bound either way).
static LOGINS_AT_ONCE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(64);

/// One parser's IMAP folder.
pub struct ImapSource {
    parser: Arc<ParserConfig>,
    /// Its `[parser.imap]`.
    imap: ImapConfig,
    /// The credential's token source (None for a password parser).
    tokens: Option<Arc<TokenSource>>,
}

impl ImapSource {
    /// The source of `parser`, on the server `imap`; `tokens` is its credential's token
    /// source.
    pub fn new(
        parser: Arc<ParserConfig>,
        imap: ImapConfig,
        tokens: Option<Arc<TokenSource>>,
    ) -> Self {
        ImapSource {
            parser,
            imap,
            tokens,
        }
    }

    /// Logs in with the parser's password, or with a token of its credential. A refused
    /// token may have been revoked or expired early: when the evidence points at the token
    /// (not at this mailbox), it is dropped and the login tried once more with a new one.
    async fn login(&self) -> Result<(ImapSession, Option<AccessToken>), SourceError> {
        let parser = &self.parser;
        let user = parser.login_user();
        let tokens = match (&parser.auth, &self.tokens) {
            (ParserAuth::Password(password), _) => {
                let connection = connect(&self.imap).await?;
                let session = connection.login(Login::Password { user, password }).await?;
                return Ok((session, None));
            }
            (ParserAuth::Credential(_), Some(tokens)) => tokens,
            (ParserAuth::Credential(name), None) => {
                unreachable!("the supervisor checks that credential {name:?} exists")
            }
        };
        for attempt in 0..2 {
            let token = tokens.token().await?;
            tokens.login_started(&token).await;
            let logged_in = async {
                let connection = connect(&self.imap).await?;
                let oauth = Login::OAuth {
                    user,
                    token: &token.secret,
                };
                connection.login(oauth).await
            };
            match logged_in.await {
                Ok(session) => {
                    tokens.login_accepted(&token, user).await;
                    return Ok((session, Some(token)));
                }
                Err(e) if e.is_auth_rejected() => {
                    let blamed = tokens.login_refused(&token, user).await;
                    if !blamed || attempt > 0 {
                        return Err(e.into());
                    }
                    tracing::warn!(error = %e, "login refused with a token no mailbox has accepted; retrying once with a new token");
                }
                Err(e) => {
                    tokens.login_failed(&token).await;
                    return Err(e.into());
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

impl MailSource for ImapSource {
    type Session = ImapMailbox;

    fn cursor_key(&self) -> &str {
        &self.imap.folder
    }

    /// Logs in, creates the `after = "move:..."` folder, and asks whether IDLE is offered.
    async fn open(&self) -> Result<ImapMailbox, SourceError> {
        // The permit is held until the session is ready (connect, TLS, login, capabilities).
        let _permit = LOGINS_AT_ONCE
            .acquire()
            .await
            .expect("the login semaphore is never closed");
        let (mut session, token) = self.login().await?;
        if let AfterIngest::Move(target) = &self.parser.after {
            session.ensure_folder(target).await?;
        }
        let supports_idle = session.supports_idle().await?;
        Ok(ImapMailbox {
            parser: self.parser.clone(),
            folder: self.imap.folder.clone(),
            session: Some(session),
            renew_at: token.map(|t| t.renew_at),
            supports_idle,
        })
    }
}

/// A logged-in IMAP session on the parser's folder.
pub struct ImapMailbox {
    parser: Arc<ParserConfig>,
    /// The folder read.
    folder: String,
    /// `None` only after a failed IDLE took the connection with it.
    session: Option<ImapSession>,
    /// When the token runs out (Exchange ends sessions whose token has expired).
    renew_at: Option<Instant>,
    supports_idle: bool,
}

impl ImapMailbox {
    fn session(&mut self) -> Result<&mut ImapSession, ImapError> {
        self.session.as_mut().ok_or(ImapError::ConnectionLost {
            step: "command",
            reason: "the session ended in IDLE".into(),
        })
    }

    /// The cursor to use for this pass: the saved one, or a reset one, or the first
    /// contact's choice (to be saved before reading).
    async fn position(
        &mut self,
        saved: Option<&Cursor>,
    ) -> Result<(Cursor, Option<Listing>), ImapError> {
        let folder = self.folder.clone();
        let status = self.session()?.select(&folder).await?;
        let uidvalidity = i64::from(status.uid_validity);
        match saved {
            Some(cursor @ Cursor::Imap { uidvalidity: v, .. }) if *v == uidvalidity => {
                Ok((cursor.clone(), None))
            }
            Some(Cursor::Imap {
                uidvalidity: old, ..
            }) => {
                tracing::warn!(folder = %folder, old, new = uidvalidity,
                    "UIDVALIDITY changed: rescanning the folder (already stored messages are recognised by Message-ID)");
                let fresh = Cursor::Imap {
                    uidvalidity,
                    last_uid: 0,
                    backlog: None,
                };
                Ok((fresh.clone(), Some(listing_saving(fresh, None))))
            }
            // No IMAP cursor (another source's cursor counts as none): a first contact.
            None | Some(Cursor::Graph { .. }) => {
                let start_at = self.parser.start_at;
                let start =
                    first_contact::choose(self.session()?, &folder, &status, start_at).await?;
                tracing::info!(folder = %folder, start_at = %start_at, existing = start.report.existing,
                    taken = start.report.taken, "first contact: {}", start.report);
                let fresh = Cursor::Imap {
                    uidvalidity,
                    last_uid: start.last_uid,
                    backlog: start.backlog,
                };
                Ok((
                    fresh.clone(),
                    Some(listing_saving(fresh, Some(start.report))),
                ))
            }
        }
    }
}

/// A listing (still without its messages) that saves `cursor` before reading.
fn listing_saving(cursor: Cursor, first_contact: Option<first_contact::FirstContact>) -> Listing {
    Listing {
        pending: Vec::new(),
        save_first: Some(cursor),
        save_after: None,
        first_contact,
    }
}

impl SourceSession for ImapMailbox {
    /// SELECTs the folder, checks UIDVALIDITY, and lists the messages past the cursor
    /// (below the first-contact horizon, only those `start_at` chose).
    async fn list(&mut self, saved: Option<&Cursor>) -> Result<Listing, SourceError> {
        // What the server announced before now is covered by this listing.
        self.session()?.take_news();
        let (cursor, listing) = self.position(saved).await?;
        let mut listing = listing.unwrap_or_else(|| Listing {
            pending: Vec::new(),
            save_first: None,
            save_after: None,
            first_contact: None,
        });
        let Cursor::Imap {
            uidvalidity,
            last_uid,
            backlog,
        } = cursor
        else {
            unreachable!("position returns an IMAP cursor")
        };
        let (set, wanted) = first_contact::pending_set(last_uid, backlog.as_ref());
        let mut listed = self.session()?.pending_in(&set).await?;
        listed.retain(|m| wanted(m.uid));
        let folder = &self.folder;
        listing.pending = listed
            .into_iter()
            .map(|m| pending(m, folder, uidvalidity, last_uid))
            .collect();
        Ok(listing)
    }

    /// IMAP knows sizes before downloading: the loop asks only for messages within the
    /// limit, so every one comes back whole.
    async fn fetch(
        &mut self,
        messages: &[&Pending],
        _max_size: u64,
    ) -> Result<Vec<Fetched>, SourceError> {
        let uids: Vec<u32> = messages.iter().map(|m| uid(m)).collect();
        let fetched = self.session()?.fetch(&uids).await?;
        Ok(fetched
            .into_iter()
            .map(|(_, raw)| Fetched::Whole(raw))
            .collect())
    }

    async fn fetch_header(&mut self, message: &Pending) -> Result<Vec<u8>, SourceError> {
        Ok(self.session()?.fetch_header(uid(message)).await?)
    }

    async fn settle(&mut self, messages: &[&Pending]) -> Result<(), SourceError> {
        let uids: Vec<u32> = messages.iter().map(|m| uid(m)).collect();
        let after = self.parser.after.clone();
        let session = self.session()?;
        match &after {
            AfterIngest::MarkSeen => session.mark_seen(&uids).await?,
            AfterIngest::Nothing => {}
            AfterIngest::Move(folder) => session.move_to(&uids, folder).await?,
            AfterIngest::Delete => session.delete(&uids).await?,
        }
        Ok(())
    }

    /// IDLE when offered (at most [`IDLE_LIMIT`]), else NOOP after `poll_interval`; either
    /// way no longer than until the session must be renewed, nor half of `stale_after`.
    async fn wait(&mut self, cancel: &CancellationToken) -> Result<WaitEnd, SourceError> {
        let until_renewal = self
            .renew_at
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::MAX);
        if until_renewal.is_zero() {
            return Ok(WaitEnd::Renew);
        }
        // A wait completes well within stale_after, so a healthy mailbox is never stale.
        let until_renewal = until_renewal.min(self.parser.stale_after / 2);
        // Mail announced while the last pass was storing: no IDLE would announce it again.
        if self.session()?.take_news() {
            return Ok(WaitEnd::Changed);
        }
        if self.supports_idle {
            let session = self.session.take().ok_or(ImapError::ConnectionLost {
                step: "IDLE",
                reason: "the session ended in IDLE".into(),
            })?;
            let (session, end) = session.idle(IDLE_LIMIT.min(until_renewal), cancel).await?;
            self.session = Some(session);
            return Ok(match end {
                IdleEnd::Cancelled => WaitEnd::Cancelled,
                IdleEnd::Changed | IdleEnd::TimedOut => WaitEnd::Changed,
            });
        }
        let wait = self.parser.poll_interval.min(until_renewal);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return Ok(WaitEnd::Cancelled),
        }
        self.session()?.noop().await?;
        Ok(WaitEnd::Changed)
    }

    async fn close(self) {
        if let Some(session) = self.session {
            session.logout().await;
        }
    }
}

/// A listed message as the loop sees it: keyed by UID, with the cursor past it. That
/// cursor carries no first-contact choice: the store keeps the saved one while it matters
/// (copying a large choice into every message's cursor would cost memory and writes).
fn pending(m: Listed, folder: &str, uidvalidity: i64, last_uid: i64) -> Pending {
    Pending {
        key: m.uid.to_string(),
        size: u64::from(m.size),
        message_id: None,
        arrived: m.arrived,
        location: format!("folder {folder}; UID {}; UIDVALIDITY {uidvalidity}", m.uid),
        after: Cursor::Imap {
            uidvalidity,
            last_uid: i64::from(m.uid).max(last_uid),
            backlog: None,
        },
    }
}

/// The UID of a message this source listed.
fn uid(message: &Pending) -> u32 {
    message.key.parse().expect("IMAP keys are UIDs")
}
