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
use crate::pipeline::{self, Arrival, Pipeline};
use crate::source::imap::first_contact::{self, FirstContact};
use crate::source::imap::{self, IdleEnd, ImapError, ImapSession, Login, Pending};
use crate::store::{self, Backlog, Checkpoint, FetchTrouble, StoreError};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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

impl PollError {
    /// How long the other side asked us to wait before trying again, if it did (a
    /// throttled token endpoint's `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PollError::Auth(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// Counters of one run of a poller.
pub type PollStats = crate::pipeline::OutcomeCounts;

/// What `run --once` reports for one parser: the counters, and what `start_at` decided
/// when this run was the first contact with the folder.
#[derive(Debug, Clone, Default)]
pub struct OnceStats {
    /// What became of the messages.
    pub outcomes: PollStats,
    /// Set when this run met the folder for the first time.
    pub first_contact: Option<FirstContact>,
}

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
    pub async fn run_once(&self, cancel: &CancellationToken) -> Result<OnceStats, PollError> {
        let mut connected = self.connect().await?;
        let mut stats = PollStats::default();
        let result = self
            .sync(&mut connected.session, &mut stats, cancel, &|| {})
            .await;
        connected.session.logout().await;
        result.map(|first_contact| OnceStats {
            outcomes: stats,
            first_contact,
        })
    }

    /// Runs until cancelled or until something fails (the supervisor retries with backoff).
    /// `on_progress` is called after each session's first successful pass (login, SELECT,
    /// fetch) and whenever a batch commits, so that the supervisor's backoff starts over
    /// whenever the mailbox makes progress (a link that drops every few seconds during a
    /// long backlog still commits, and must not wait longer and longer).
    pub async fn run(
        &self,
        cancel: &CancellationToken,
        on_progress: &(dyn Fn() + Sync),
    ) -> Result<(), PollError> {
        while !cancel.is_cancelled() {
            let Connected { mut session, token } = self.connect().await?;
            let mut stats = PollStats::default();
            let supports_idle = session.supports_idle().await?;
            let mut first_pass = true;
            loop {
                self.sync(&mut session, &mut stats, cancel, on_progress)
                    .await?;
                if std::mem::take(&mut first_pass) {
                    on_progress();
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
                // A refused token may have been revoked or expired early: when the evidence
                // points at the token (not at this mailbox), it is dropped and the login
                // tried once more with a fresh one.
                for attempt in 0..2 {
                    let token = tokens.token().await?;
                    tokens.login_started(&token).await;
                    let logged_in = async {
                        let connection = imap::connect(&parser.imap).await?;
                        connection
                            .login(Login::OAuth {
                                user,
                                token: &token.secret,
                            })
                            .await
                    };
                    match logged_in.await {
                        Ok(session) => {
                            tokens.login_accepted(&token, user).await;
                            return Ok(Connected {
                                session,
                                token: Some(token),
                            });
                        }
                        Err(e) if e.is_auth_rejected() => {
                            let blamed = tokens.login_refused(&token, user).await;
                            if !blamed || attempt > 0 {
                                return Err(e.into());
                            }
                            tracing::warn!(parser = %parser.name, error = %e, "login refused with a token no mailbox has accepted; retrying once with a new token");
                        }
                        Err(e) => {
                            tokens.login_failed(&token).await;
                            return Err(e.into());
                        }
                    }
                }
                unreachable!("the loop returns on its second attempt")
            }
            (ParserAuth::Credential(name), None) => Err(PollError::UnknownCredential(name.clone())),
        }
    }

    /// SELECTs the folder and stores every message past the checkpoint. Returns what
    /// `start_at` decided when this pass was the first contact with the folder.
    async fn sync(
        &self,
        session: &mut ImapSession,
        stats: &mut PollStats,
        cancel: &CancellationToken,
        on_progress: &(dyn Fn() + Sync),
    ) -> Result<Option<FirstContact>, PollError> {
        let parser = &self.parser;
        let folder = &parser.imap.folder;
        let status = session.select(folder).await?;
        let uidvalidity = i64::from(status.uid_validity);
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        let saved = store::load_mailbox_state(&mut conn, &parser.name, folder).await?;
        let mut first_contact = None;
        let (mut checkpoint, mut trouble, backlog) = match saved {
            Some(state) if state.checkpoint.uidvalidity == uidvalidity => {
                (state.checkpoint, state.trouble, state.backlog)
            }
            Some(old) => {
                tracing::warn!(parser = %parser.name, folder = %folder, old = old.checkpoint.uidvalidity, new = uidvalidity,
                    "UIDVALIDITY changed: rescanning the folder (already stored messages are recognised by Message-ID)");
                let fresh = Checkpoint {
                    uidvalidity,
                    last_uid: 0,
                };
                // (Saving it clears the failed-fetch counter and the first-contact choice.)
                store::save_checkpoint(&mut conn, &parser.name, folder, fresh).await?;
                (fresh, None, None)
            }
            None => {
                let start =
                    first_contact::choose(session, folder, &status, parser.start_at).await?;
                tracing::info!(parser = %parser.name, folder = %folder, start_at = %parser.start_at,
                    existing = start.report.existing, taken = start.report.taken, "first contact: {}", start.report);
                let fresh = Checkpoint {
                    uidvalidity,
                    last_uid: start.last_uid,
                };
                // Recorded at once: the choice holds from now on, whatever happens next.
                store::save_first_contact(
                    &mut conn,
                    &parser.name,
                    folder,
                    fresh,
                    start.backlog.as_ref(),
                )
                .await?;
                first_contact = Some(start.report);
                (fresh, None, start.backlog)
            }
        };
        drop(conn);
        let pending = list_pending(session, checkpoint.last_uid, backlog.as_ref()).await?;
        if !pending.is_empty() {
            tracing::info!(parser = %parser.name, folder = %folder, messages = pending.len(), "new mail");
        }
        let mut rest = pending.as_slice();
        while !rest.is_empty() && !cancel.is_cancelled() {
            let failures = trouble
                .filter(|t| t.uid == i64::from(rest[0].uid))
                .map_or(0, |t| t.failures);
            if failures >= GIVE_UP_AFTER {
                checkpoint = self
                    .give_up_on(session, rest[0], failures, checkpoint, stats)
                    .await?;
                rest = &rest[1..];
                trouble = None;
                on_progress();
                continue;
            }
            let (batch, tail) = split_batch(rest, parser.max_message_size);
            rest = tail;
            if failures >= ISOLATE_AFTER {
                tracing::warn!(parser = %parser.name, folder = %folder, uid = batch[0].uid, failures,
                    "fetches starting here failed repeatedly: fetching these messages one at a time");
                for one in batch {
                    let one = std::slice::from_ref(one);
                    checkpoint = self
                        .store_batch(session, one, checkpoint, stats, trouble, true)
                        .await?;
                    on_progress();
                }
            } else {
                checkpoint = self
                    .store_batch(session, batch, checkpoint, stats, trouble, false)
                    .await?;
                on_progress();
            }
        }
        Ok(first_contact)
    }

    /// Counts a failed fetch of `batch` (kept even though the batch's transaction is
    /// abandoned). A message failing alone while isolating starts just below the limit.
    async fn record_fetch_failure(
        &self,
        batch: &[Pending],
        trouble: Option<FetchTrouble>,
        isolating: bool,
    ) {
        let uid = i64::from(batch[0].uid);
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
        Pending { uid, size, arrived }: Pending,
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
        let arrived_at = arrived.unwrap_or_else(chrono::Utc::now);
        let outcome =
            pipeline::quarantine(&mut tx, &parser.name, reason, &raw, true, arrived_at).await?;
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
        batch: &[Pending],
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
            let listed = batch.iter().find(|p| p.uid == *uid);
            let size = listed.map_or(0, |p| p.size);
            // Loop protection counts by INTERNALDATE (a server that omits it: the Date header).
            let arrival = listed
                .and_then(|p| p.arrived)
                .map_or(Arrival::FromDateHeader, Arrival::At);
            let outcome = if u64::from(size) > max {
                let reason = format!(
                    "message is {size} bytes (IMAP RFC822.SIZE), over max_message_size ({max} bytes); only its header is kept here, the message stays in the mailbox (UID {uid})"
                );
                let decision = pipeline::Decision::Quarantine(String::new());
                let arrived_at = arrival.resolve(&decision);
                pipeline::quarantine(&mut tx, &parser.name, reason, raw, true, arrived_at).await?
            } else {
                let decision = pipeline::decide(&self.pipeline, raw);
                pipeline::store_decision(&mut tx, &self.pipeline, &decision, raw, arrival).await?
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
            .map(|p| i64::from(p.uid))
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

/// The messages to read in this pass: past the checkpoint, and below the first-contact
/// horizon only those `start_at` chose.
async fn list_pending(
    session: &mut ImapSession,
    last_uid: i64,
    backlog: Option<&Backlog>,
) -> Result<Vec<Pending>, ImapError> {
    let (set, wanted) = first_contact::pending_set(last_uid, backlog);
    let mut listed = session.pending_in(&set).await?;
    listed.retain(|p| wanted(p.uid));
    Ok(listed)
}

/// Fetches a batch: whole messages, and only the header of those over `max` bytes.
async fn fetch_batch(
    session: &mut ImapSession,
    batch: &[Pending],
    max: u64,
) -> Result<Vec<(u32, Vec<u8>)>, ImapError> {
    let wanted: Vec<u32> = batch
        .iter()
        .filter(|p| u64::from(p.size) <= max)
        .map(|p| p.uid)
        .collect();
    let mut raws = session.fetch(&wanted).await?;
    for p in batch.iter().filter(|p| u64::from(p.size) > max) {
        raws.push((p.uid, session.fetch_header(p.uid).await?));
    }
    raws.sort_unstable_by_key(|(uid, _)| *uid);
    Ok(raws)
}

/// The next batch: up to [`BATCH_MESSAGES`] messages and [`BATCH_BYTES`] (always at least
/// one message; oversized ones count as nothing, since only their header is fetched).
fn split_batch(pending: &[Pending], max_message_size: u64) -> (&[Pending], &[Pending]) {
    let mut bytes = 0u64;
    let mut end = 0;
    for (i, p) in pending.iter().enumerate() {
        let size = if u64::from(p.size) > max_message_size {
            0
        } else {
            u64::from(p.size)
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

    fn listed(sizes: &[(u32, u32)]) -> Vec<Pending> {
        sizes
            .iter()
            .map(|&(uid, size)| Pending {
                uid,
                size,
                arrived: None,
            })
            .collect()
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let small: Vec<(u32, u32)> = (1..=120).map(|uid| (uid, 1000)).collect();
        let small = listed(&small);
        assert_eq!(split_batch(&small, 1 << 30).0.len(), BATCH_MESSAGES);
        let big = listed(&[(1, 20 << 20), (2, 20 << 20), (3, 1)]);
        assert_eq!(split_batch(&big, 1 << 30).0.len(), 1);
        let huge = listed(&[(1, 100 << 20), (2, 100 << 20)]);
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
