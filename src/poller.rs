//! One mailbox's loop: connect, log in, SELECT, fetch what is new, store it exactly once,
//! post-process on the server, wait (IDLE or poll), and again.
//!
//! Exactly-once rests on two rules: the UID checkpoint moves only in the transaction that
//! stored the messages it covers, and a message is flagged/moved/deleted on the server only
//! after that commit. A crash anywhere re-fetches at most the uncommitted batch, and
//! re-storing a committed message is a no-op (the (parser, Message-ID) key).
//!
//! A message the server never manages to return (the connection is cut, or the FETCH
//! comes back short, each time it is sent) must not block the mailbox: failed fetches are
//! counted in `mailbox_state`; after [`ISOLATE_AFTER`] failures the batch is fetched one
//! message at a time, and a message that fails alone until [`GIVE_UP_AFTER`] is
//! quarantined by its header (or a placeholder) with the reason, and left on the server.

use crate::auth::{AccessToken, TokenSource};
use crate::config::{AfterIngest, ParserAuth, ParserConfig};
use crate::imap::{self, IdleEnd, ImapError, ImapSession, Login};
use crate::ingest::{self, Pipeline};
use crate::store::{self, Checkpoint, FetchTrouble, StoreError};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// (UID, RFC822.SIZE) of a message waiting on the server.
type UidSize = (u32, u32);

/// Messages fetched per batch (and per transaction).
const BATCH_MESSAGES: usize = 50;
/// Bytes fetched per batch, at most (async-imap buffers a whole response in memory).
const BATCH_BYTES: u64 = 24 << 20;
/// After this many failed fetches starting at the same UID, fetch one message at a time.
const ISOLATE_AFTER: i32 = 2;
/// A message whose fetch has failed this often (twice of them alone) is given up on.
const GIVE_UP_AFTER: i32 = 4;
/// IDLE is re-issued at least this often (RFC 2177 asks for under 29 minutes).
const IDLE_LIMIT: Duration = Duration::from_secs(25 * 60);

/// Why a poll cycle failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// No token.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// IMAP failed.
    #[error(transparent)]
    Imap(#[from] ImapError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The parser names a credential that does not exist (config validation prevents it).
    #[error("parser {0:?} names an unknown credential")]
    UnknownCredential(String),
    /// A pass panicked (a bug here or in a dependency); the supervisor retries it.
    #[error("the poller panicked (a bug, please report it): {0}")]
    Panicked(String),
}

/// Counters of one run of a poller.
pub type PollStats = crate::ingest::OutcomeCounts;

/// Everything one parser's loop needs.
pub struct Poller {
    parser: Arc<ParserConfig>,
    pipeline: Pipeline,
    pool: PgPool,
    tokens: Option<Arc<TokenSource>>,
}

/// A logged-in session and the token it was opened with (to renew before it expires).
struct Connected {
    session: ImapSession,
    token: Option<AccessToken>,
}

impl Poller {
    /// A poller for one parser; `tokens` is the parser's credential source (None for a
    /// password parser).
    pub fn new(
        parser: Arc<ParserConfig>,
        pool: PgPool,
        tokens: Option<Arc<TokenSource>>,
    ) -> Result<Self, PollError> {
        if matches!(parser.auth, ParserAuth::Credential(_)) && tokens.is_none() {
            return Err(PollError::UnknownCredential(parser.name.clone()));
        }
        Ok(Poller {
            pipeline: Pipeline::from(parser.as_ref()),
            parser,
            pool,
            tokens,
        })
    }

    /// The parser's name.
    pub fn name(&self) -> &str {
        &self.parser.name
    }

    /// Connects, ingests everything new, logs out.
    pub async fn run_once(&self, cancel: &CancellationToken) -> Result<PollStats, PollError> {
        let mut connected = self.connect().await?;
        let mut stats = PollStats::default();
        let result = self.sync(&mut connected.session, &mut stats, cancel).await;
        connected.session.logout().await;
        result.map(|_| stats)
    }

    /// Runs until cancelled or until something fails (the supervisor retries with backoff).
    /// `on_connected` is called after each session's first successful pass (login, SELECT,
    /// fetch), so that the supervisor's backoff starts over only when the mailbox works.
    pub async fn run(
        &self,
        cancel: &CancellationToken,
        on_connected: &(dyn Fn() + Sync),
    ) -> Result<(), PollError> {
        while !cancel.is_cancelled() {
            let Connected { mut session, token } = self.connect().await?;
            let mut stats = PollStats::default();
            let supports_idle = session.supports_idle().await?;
            let mut first_pass = true;
            loop {
                self.sync(&mut session, &mut stats, cancel).await?;
                if std::mem::take(&mut first_pass) {
                    on_connected();
                }
                if cancel.is_cancelled() {
                    break;
                }
                // Renew the session (and token) before the token expires: Exchange ends
                // sessions whose token has expired.
                let until_renewal = token
                    .as_ref()
                    .map(|t| t.renew_at.saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::MAX);
                if until_renewal.is_zero() {
                    tracing::info!(parser = %self.parser.name, "renewing the session before the access token expires");
                    break;
                }
                if supports_idle {
                    let (s, end) = session.idle(IDLE_LIMIT.min(until_renewal), cancel).await?;
                    session = s;
                    if end == IdleEnd::Cancelled {
                        break;
                    }
                } else {
                    let wait = self.parser.poll_interval.min(until_renewal);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => break,
                    }
                    session.noop().await?;
                }
            }
            session.logout().await;
        }
        Ok(())
    }

    /// Logs in, and creates the `after = "move:..."` folder once per session.
    async fn connect(&self) -> Result<Connected, PollError> {
        let mut connected = self.login().await?;
        if let AfterIngest::Move(target) = &self.parser.after {
            connected.session.ensure_folder(target).await?;
        }
        Ok(connected)
    }

    async fn login(&self) -> Result<Connected, PollError> {
        let parser = &self.parser;
        let user = parser.login_user();
        match (&parser.auth, &self.tokens) {
            (ParserAuth::Password(password), _) => {
                let connection = imap::connect(&parser.imap).await?;
                let session = connection.login(Login::Password { user, password }).await?;
                Ok(Connected {
                    session,
                    token: None,
                })
            }
            (ParserAuth::Credential(_), Some(tokens)) => {
                // A rejected token may have been revoked or expired early: drop it and try
                // once more with a fresh one before giving up.
                for attempt in 0..2 {
                    let token = tokens.token().await?;
                    let connection = imap::connect(&parser.imap).await?;
                    match connection
                        .login(Login::OAuth {
                            user,
                            token: &token.secret,
                        })
                        .await
                    {
                        Ok(session) => {
                            return Ok(Connected {
                                session,
                                token: Some(token),
                            });
                        }
                        Err(e) if e.is_auth_rejected() && attempt == 0 => {
                            tracing::warn!(parser = %parser.name, error = %e, "login refused; retrying once with a new token");
                            tokens.invalidate(&token).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                unreachable!("the loop returns on its second attempt")
            }
            (ParserAuth::Credential(name), None) => Err(PollError::UnknownCredential(name.clone())),
        }
    }

    /// SELECTs the folder and stores every message past the checkpoint.
    async fn sync(
        &self,
        session: &mut ImapSession,
        stats: &mut PollStats,
        cancel: &CancellationToken,
    ) -> Result<(), PollError> {
        let parser = &self.parser;
        let folder = &parser.imap.folder;
        let status = session.select(folder).await?;
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        let saved = store::load_checkpoint(&mut conn, &parser.name, folder).await?;
        let uidvalidity = i64::from(status.uid_validity);
        let (mut checkpoint, mut trouble) = match saved {
            Some((c, trouble)) if c.uidvalidity == uidvalidity => (c, trouble),
            other => {
                if let Some((old, _)) = other {
                    tracing::warn!(parser = %parser.name, folder = %folder, old = old.uidvalidity, new = uidvalidity,
                        "UIDVALIDITY changed: rescanning the folder (already stored messages are recognised by Message-ID)");
                }
                // Record the folder's identity at once, so the state is visible before mail arrives.
                let fresh = Checkpoint {
                    uidvalidity,
                    last_uid: 0,
                };
                // (Saving it clears a failed-fetch counter of the old UIDVALIDITY.)
                store::save_checkpoint(&mut conn, &parser.name, folder, fresh).await?;
                (fresh, None)
            }
        };
        drop(conn);
        let from = u32::try_from(checkpoint.last_uid + 1).unwrap_or(u32::MAX);
        let pending = session.sizes_from(from).await?;
        if !pending.is_empty() {
            tracing::info!(parser = %parser.name, folder = %folder, messages = pending.len(), "new mail");
        }
        let mut rest = pending.as_slice();
        while !rest.is_empty() && !cancel.is_cancelled() {
            let failures = trouble
                .filter(|t| t.uid == i64::from(rest[0].0))
                .map_or(0, |t| t.failures);
            if failures >= GIVE_UP_AFTER {
                checkpoint = self
                    .give_up_on(session, rest[0], failures, checkpoint, stats)
                    .await?;
                rest = &rest[1..];
                trouble = None;
                continue;
            }
            let (batch, tail) = split_batch(rest, parser.max_message_size);
            rest = tail;
            if failures >= ISOLATE_AFTER {
                tracing::warn!(parser = %parser.name, folder = %folder, uid = batch[0].0, failures,
                    "fetches starting here failed repeatedly: fetching these messages one at a time");
                for one in batch {
                    checkpoint = self
                        .store_batch(
                            session,
                            std::slice::from_ref(one),
                            checkpoint,
                            stats,
                            trouble,
                            true,
                        )
                        .await?;
                }
            } else {
                checkpoint = self
                    .store_batch(session, batch, checkpoint, stats, trouble, false)
                    .await?;
            }
        }
        Ok(())
    }

    /// Counts a failed fetch of `batch` (kept even though the batch's transaction is
    /// abandoned). A message failing alone while isolating starts just below the limit.
    async fn record_fetch_failure(
        &self,
        batch: &[UidSize],
        trouble: Option<FetchTrouble>,
        isolating: bool,
    ) {
        let uid = i64::from(batch[0].0);
        let failures = match trouble {
            Some(t) if t.uid == uid => t.failures + 1,
            _ if isolating => ISOLATE_AFTER + 1,
            _ => 1,
        };
        let parser = &self.parser;
        let saved = async {
            let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
            let trouble = FetchTrouble { uid, failures };
            store::save_fetch_trouble(&mut conn, &parser.name, &parser.imap.folder, trouble).await
        };
        match saved.await {
            Ok(()) => {
                tracing::warn!(parser = %parser.name, uid, failures, "the server failed to return the messages from this UID on")
            }
            Err(e) => {
                tracing::warn!(parser = %parser.name, uid, error = %e, "cannot record a failed fetch")
            }
        }
    }

    /// Quarantines a message the server failed to return [`GIVE_UP_AFTER`] times: its
    /// header if the server gives that, else a placeholder naming it; the message stays in
    /// the mailbox, and the checkpoint moves past it.
    async fn give_up_on(
        &self,
        session: &mut ImapSession,
        (uid, size): UidSize,
        failures: i32,
        checkpoint: Checkpoint,
        stats: &mut PollStats,
    ) -> Result<Checkpoint, PollError> {
        let parser = &self.parser;
        let header = session.fetch_header(uid).await;
        let (raw, kept) = match &header {
            Ok(raw) => (raw.clone(), "only its header is kept here"),
            Err(_) => (
                format!(
                    "X-Mail2ticket-Unreadable: folder {}; UID {uid}; UIDVALIDITY {}; RFC822.SIZE {size}\r\n\r\n",
                    parser.imap.folder, checkpoint.uidvalidity
                )
                .into_bytes(),
                "not even its header could be read",
            ),
        };
        let reason = format!(
            "the server failed {failures} times to return this message (the connection was cut or the FETCH came back short while sending it; {size} bytes by RFC822.SIZE); {kept}; the message stays in the mailbox (UID {uid}): open it there, and forward it again if it matters"
        );
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let outcome = ingest::quarantine(&mut tx, &parser.name, reason, &raw, true).await?;
        let next = Checkpoint {
            uidvalidity: checkpoint.uidvalidity,
            last_uid: i64::from(uid).max(checkpoint.last_uid),
        };
        store::save_checkpoint(&mut tx, &parser.name, &parser.imap.folder, next).await?;
        tx.commit().await.map_err(StoreError::from)?;
        tracing::error!(parser = %parser.name, uid, failures, ?outcome, "gave up on a message the server does not return; quarantined, left in the mailbox");
        stats.count(&outcome);
        // The session may have died with the header fetch: reconnect (progress is saved).
        header.map(|_| next).map_err(PollError::from)
    }

    /// Fetches, stores and post-processes one batch; returns the new checkpoint.
    async fn store_batch(
        &self,
        session: &mut ImapSession,
        batch: &[UidSize],
        checkpoint: Checkpoint,
        stats: &mut PollStats,
        trouble: Option<FetchTrouble>,
        isolating: bool,
    ) -> Result<Checkpoint, PollError> {
        let parser = &self.parser;
        let max = parser.max_message_size;
        let raws = match fetch_batch(session, batch, max).await {
            Ok(raws) => raws,
            Err(e) => {
                self.record_fetch_failure(batch, trouble, isolating).await;
                return Err(e.into());
            }
        };

        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let mut done = Vec::with_capacity(raws.len());
        for (uid, raw) in &raws {
            let size = batch.iter().find(|(u, _)| u == uid).map_or(0, |(_, s)| *s);
            let outcome = if u64::from(size) > max {
                let reason = format!(
                    "message is {size} bytes (IMAP RFC822.SIZE), over max_message_size ({max} bytes); only its header is kept here, the message stays in the mailbox (UID {uid})"
                );
                ingest::quarantine(&mut tx, &parser.name, reason, raw, true).await?
            } else {
                let decision = ingest::decide(&self.pipeline, raw);
                ingest::store_decision(&mut tx, &self.pipeline, &decision, raw).await?
            };
            tracing::debug!(parser = %parser.name, uid, ?outcome, "stored");
            stats.count(&outcome);
            // Oversized messages stay on the server untouched.
            if u64::from(size) <= max {
                done.push(*uid);
            }
        }
        let last_uid = batch
            .iter()
            .map(|(uid, _)| i64::from(*uid))
            .max()
            .unwrap_or(checkpoint.last_uid);
        let next = Checkpoint {
            uidvalidity: checkpoint.uidvalidity,
            last_uid: last_uid.max(checkpoint.last_uid),
        };
        store::save_checkpoint(&mut tx, &parser.name, &parser.imap.folder, next).await?;
        tx.commit().await.map_err(StoreError::from)?;
        tracing::info!(parser = %parser.name, messages = raws.len(), last_uid = next.last_uid, "committed");

        // Only now, with the rows committed, may the messages leave the "new" state.
        match &parser.after {
            AfterIngest::MarkSeen => session.mark_seen(&done).await?,
            AfterIngest::Nothing => {}
            AfterIngest::Move(folder) => session.move_to(&done, folder).await?,
            AfterIngest::Delete => session.delete(&done).await?,
        }
        Ok(next)
    }
}

/// Fetches a batch: whole messages, and only the header of those over `max` bytes.
async fn fetch_batch(
    session: &mut ImapSession,
    batch: &[UidSize],
    max: u64,
) -> Result<Vec<(u32, Vec<u8>)>, ImapError> {
    let wanted: Vec<u32> = batch
        .iter()
        .filter(|(_, size)| u64::from(*size) <= max)
        .map(|(uid, _)| *uid)
        .collect();
    let mut raws = session.fetch(&wanted).await?;
    for &(uid, _) in batch.iter().filter(|(_, size)| u64::from(*size) > max) {
        raws.push((uid, session.fetch_header(uid).await?));
    }
    raws.sort_unstable_by_key(|(uid, _)| *uid);
    Ok(raws)
}

/// The next batch: up to [`BATCH_MESSAGES`] messages and [`BATCH_BYTES`] (always at least
/// one message; oversized ones count as nothing, since only their header is fetched).
fn split_batch(pending: &[UidSize], max_message_size: u64) -> (&[UidSize], &[UidSize]) {
    let mut bytes = 0u64;
    let mut end = 0;
    for (i, (_, size)) in pending.iter().enumerate() {
        let size = if u64::from(*size) > max_message_size {
            0
        } else {
            u64::from(*size)
        };
        if i >= BATCH_MESSAGES || (i > 0 && bytes + size > BATCH_BYTES) {
            break;
        }
        bytes += size;
        end = i + 1;
    }
    pending.split_at(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let small: Vec<(u32, u32)> = (1..=120).map(|uid| (uid, 1000)).collect();
        assert_eq!(split_batch(&small, 1 << 30).0.len(), BATCH_MESSAGES);
        let big = vec![(1, 20 << 20), (2, 20 << 20), (3, 1)];
        assert_eq!(split_batch(&big, 1 << 30).0.len(), 1);
        let huge = vec![(1, 100 << 20), (2, 100 << 20)];
        assert_eq!(
            split_batch(&huge, 1 << 30).0.len(),
            1,
            "one message always fits"
        );
        assert_eq!(
            split_batch(&huge, 1 << 20).0.len(),
            2,
            "oversized count as nothing"
        );
    }
}
