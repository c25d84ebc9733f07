//! One mailbox's loop, for any [`MailSource`]: open a session, list what is pending after
//! the saved cursor, fetch it in bounded batches, store each batch exactly once, settle it
//! on the server, wait for news, and again.
//!
//! The exactly-once rules live here, once for every source:
//! - the cursor moves only in the transaction that stored the messages it covers;
//! - a message is settled on the server (read, moved, deleted) only after that commit,
//!   which records the settle it owes; should the pass end first (a crash, a cut
//!   connection), the next pass settles what is recorded before anything else (`settle`);
//! - a crash anywhere re-fetches at most the uncommitted batch, and re-storing a committed
//!   message is a no-op (the (parser, Message-ID) key);
//! - a message the server never manages to return (the connection is cut, or the fetch
//!   comes back short, each time) must not block the mailbox: failed fetches are counted
//!   in `mailbox_state`; after [`ISOLATE_AFTER`] failures the batch is fetched one message
//!   at a time, and a message that fails alone until [`GIVE_UP_AFTER`] is quarantined by
//!   its header (or a placeholder) with the reason, and left on the server;
//! - a message over `max_message_size` is not downloaded: its header is quarantined and
//!   the message is left on the server untouched;
//! - every write for the mailbox (rows, cursor, failed-fetch counter) is a transaction that
//!   checks this replica's lease ([`Fence`]) last, so a replica that lost the lease (paused,
//!   cut off from the database) cannot commit anything for the mailbox again.

use crate::config::ParserConfig;
use crate::pipeline::{self, Arrival, Incoming, Pipeline};
use crate::runtime::batch::{self, FetchedBatch};
use crate::runtime::leases::Fence;
use crate::runtime::state::{MailboxState, Registry};
use crate::source::imap::first_contact::FirstContact;
use crate::source::{MailSource, Pending, SourceError, SourceSession, WaitEnd};
use crate::store::StoreError;
use crate::store::mailbox::{self, FetchTrouble};
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

mod settle;

/// After this many failed fetches starting at the same message, fetch one at a time.
const ISOLATE_AFTER: i32 = 2;
/// A message whose fetch has failed this often (twice of them alone) is given up on.
const GIVE_UP_AFTER: i32 = 4;

/// Why a pass over a mailbox failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The mail source failed (no token, IMAP).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A pass panicked (a bug here or in a dependency); the supervisor retries it.
    #[error("the poller panicked (a bug, please report it): {0}")]
    Panicked(String),
}

impl From<sqlx::Error> for PollError {
    fn from(e: sqlx::Error) -> Self {
        PollError::Store(StoreError::from(e))
    }
}

impl PollError {
    /// How long the other side asked us to wait before trying again, if it did (a
    /// throttled token endpoint's `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PollError::Source(e) => e.retry_after(),
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
pub struct Poller<S: MailSource> {
    parser: Arc<ParserConfig>,
    pipeline: Pipeline,
    pool: PgPool,
    source: S,
    /// Where the loop reports what it is doing.
    states: Registry,
    /// The lease every commit shows.
    fence: Fence,
}

impl<S: MailSource> Poller<S> {
    /// The loop of `parser` over `source` under the lease `fence`, reporting its state to
    /// `states`.
    pub fn new(
        parser: Arc<ParserConfig>,
        pool: PgPool,
        source: S,
        states: Registry,
        fence: Fence,
    ) -> Self {
        Poller {
            pipeline: Pipeline::from(parser.as_ref()),
            parser,
            pool,
            source,
            states,
            fence,
        }
    }

    /// Commits `tx` if this replica still holds the mailbox's lease, checked inside the
    /// transaction (last, so the lease row stays locked only for the commit itself);
    /// otherwise rolls it back.
    async fn commit_fenced(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> Result<(), StoreError> {
        use crate::store::leases;
        if !leases::check_fence(&mut tx, &self.parser.name, &self.fence).await? {
            tx.rollback().await?;
            return Err(StoreError::LeaseLost(leases::LeaseLost {
                owner: self.fence.owner.clone(),
                epoch: self.fence.epoch,
            }));
        }
        tx.commit().await?;
        Ok(())
    }

    /// The parser's name.
    pub fn name(&self) -> &str {
        &self.parser.name
    }

    /// Opens a session, stores everything pending, closes it.
    pub async fn run_once(&self, cancel: &CancellationToken) -> Result<OnceStats, PollError> {
        let mut session = self.source.open().await?;
        let mut stats = PollStats::default();
        let result = self.sync(&mut session, &mut stats, cancel, &|| {}).await;
        session.close().await;
        result.map(|first_contact| OnceStats {
            outcomes: stats,
            first_contact,
        })
    }

    /// Runs until cancelled or until something fails (the supervisor retries with backoff).
    /// `on_progress` is called after each session's first successful pass and whenever a
    /// batch commits, so that the supervisor's backoff starts over whenever the mailbox
    /// makes progress (a link that drops every few seconds during a long backlog still
    /// commits, and must not wait longer and longer).
    pub async fn run(
        &self,
        cancel: &CancellationToken,
        on_progress: &(dyn Fn() + Sync),
    ) -> Result<(), PollError> {
        while !cancel.is_cancelled() {
            self.states.set(&self.parser.name, MailboxState::Connecting);
            let mut session = self.source.open().await?;
            let result = self.serve(&mut session, cancel, on_progress).await;
            session.close().await;
            result?;
        }
        Ok(())
    }

    /// One session: pass, wait, pass, ... until cancelled or the session must be renewed.
    async fn serve(
        &self,
        session: &mut S::Session,
        cancel: &CancellationToken,
        on_progress: &(dyn Fn() + Sync),
    ) -> Result<(), PollError> {
        let mut stats = PollStats::default();
        self.sync(session, &mut stats, cancel, on_progress).await?;
        on_progress();
        while !cancel.is_cancelled() {
            match session.wait(cancel).await? {
                WaitEnd::Changed => self.states.ok(&self.parser.name),
                WaitEnd::Cancelled => break,
                WaitEnd::Renew => {
                    // Exchange ends sessions whose token has expired.
                    tracing::info!("renewing the session before the access token expires");
                    break;
                }
            }
            self.sync(session, &mut stats, cancel, on_progress).await?;
        }
        Ok(())
    }

    /// Stores every message pending after the saved cursor. Returns what `start_at`
    /// decided when this pass was the first contact with the mailbox.
    ///
    /// Ordinary batches are pipelined: the next batch downloads while the one before it is
    /// parsed and committed, and the one before is settled on the server once both are
    /// done. The cursor still moves only with a commit, so at most the two batches in hand
    /// are fetched again after a failure.
    async fn sync(
        &self,
        session: &mut S::Session,
        stats: &mut PollStats,
        cancel: &CancellationToken,
        on_progress: &(dyn Fn() + Sync),
    ) -> Result<Option<FirstContact>, PollError> {
        let (name, key) = (&self.parser.name, self.source.cursor_key());
        self.states.set(name, MailboxState::Fetching);
        let (listing, known, mut trouble) = self.pending(session).await?;
        let mut rest = listing.pending.as_slice();
        // Downloaded, not yet stored.
        let mut ahead: Option<FetchedBatch> = None;
        while !rest.is_empty() && !cancel.is_cancelled() {
            // Stored already: only the cursor moves (so a failing message is always first).
            let stored = rest
                .iter()
                .take_while(|m| batch::is_known(m, &known))
                .count();
            let failures = trouble
                .as_ref()
                .filter(|t| t.key == rest[0].key)
                .map_or(0, |t| t.failures);
            if stored > 0 || failures >= ISOLATE_AFTER {
                // Out of the ordinary: whatever is in hand is stored first.
                self.store_and_settle(session, ahead.take(), stats, on_progress)
                    .await?;
            }
            if stored > 0 {
                let (passed, tail) = rest.split_at(stored);
                let fetched = Some(FetchedBatch::stored_already(passed));
                self.store_and_settle(session, fetched, stats, on_progress)
                    .await?;
                rest = tail;
                continue;
            }
            if failures >= GIVE_UP_AFTER {
                self.give_up_on(session, &rest[0], failures, stats).await?;
                rest = &rest[1..];
                trouble = None;
                on_progress();
                continue;
            }
            let (next, _) = batch::split(rest, self.parser.max_message_size);
            if failures >= ISOLATE_AFTER {
                let trouble = trouble.as_ref();
                self.store_one_by_one(session, next, &known, trouble, stats, on_progress)
                    .await?;
                rest = &rest[next.len()..];
                continue;
            }
            let fetched = match ahead.take() {
                None => {
                    self.fetch(session, next, &known, trouble.as_ref(), false)
                        .await?
                }
                Some(previous) => {
                    let fresh = batch::fresh(next, &known);
                    let trouble = trouble.as_ref();
                    let both = (previous, next, fresh);
                    self.store_while_fetching(session, both, trouble, stats, on_progress)
                        .await?
                }
            };
            // A download of messages of unknown size may stop early (bytes in hand).
            rest = &rest[fetched.batch.len()..];
            ahead = Some(fetched);
        }
        self.store_and_settle(session, ahead, stats, on_progress)
            .await?;
        if !cancel.is_cancelled() {
            if let Some(cursor) = &listing.save_after {
                let mut tx = self.pool.begin().await?;
                mailbox::save(&mut tx, name, key, cursor, &[]).await?;
                self.commit_fenced(tx).await?;
            }
            self.states.ok(name);
            self.states.set(name, MailboxState::Idle);
        }
        Ok(listing.first_contact)
    }

    /// What is pending after the saved cursor (a first contact's cursor is saved at once),
    /// which of it is stored already, and the failed-fetch counter that still applies.
    async fn pending(
        &self,
        session: &mut S::Session,
    ) -> Result<
        (
            crate::source::Listing,
            HashSet<String>,
            Option<FetchTrouble>,
        ),
        PollError,
    > {
        let (name, key) = (&self.parser.name, self.source.cursor_key());
        // A connection is never held across the network or while waiting for another:
        // with hundreds of mailboxes starting at once, a task holding one connection and
        // waiting for a second would starve the pool (each one holding, none getting).
        let saved = mailbox::load(&mut *self.pool.acquire().await?, name, key).await?;
        let listing = session.list(saved.as_ref().map(|s| &s.cursor)).await?;
        let mut trouble = saved.as_ref().and_then(|s| s.trouble.clone());
        if let Some(cursor) = &listing.save_first {
            // Recorded at once: a first contact's choice holds whatever happens next.
            let mut tx = self.pool.begin().await?;
            mailbox::save_start(&mut tx, name, key, cursor).await?;
            self.commit_fenced(tx).await?;
            trouble = None;
        } else if let Some(saved) = saved.filter(|s| !s.unsettled.is_empty()) {
            // The saved cursor holds, so the recorded keys still name those messages.
            self.settle_owed(session, &saved.unsettled, &saved.cursor)
                .await?;
        }
        // Messages whose Message-ID the source told and that are stored already (a Graph
        // round returns a message again when it changed, e.g. once marked read) are not
        // downloaded again; only the cursor moves past them.
        let known =
            stored_already(&mut *self.pool.acquire().await?, name, &listing.pending).await?;
        let new = listing
            .pending
            .iter()
            .filter(|m| !batch::is_known(m, &known))
            .count();
        if new > 0 {
            tracing::info!(messages = new, "new mail");
        }
        self.states.backlog(name, new as u64);
        Ok((listing, known, trouble))
    }

    /// Counts a failed fetch of `batch` (kept even though the batch's transaction is
    /// abandoned). A message failing alone while isolating starts just below the limit.
    async fn record_fetch_failure(
        &self,
        batch: &[&Pending],
        trouble: Option<&FetchTrouble>,
        isolating: bool,
    ) {
        let key = batch[0].key.clone();
        let failures = match trouble {
            Some(t) if t.key == key => t.failures + 1,
            _ if isolating => ISOLATE_AFTER + 1,
            _ => 1,
        };
        let saved = async {
            let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
            let trouble = FetchTrouble {
                key: key.clone(),
                failures,
            };
            let cursor_key = self.source.cursor_key();
            mailbox::save_fetch_trouble(&mut tx, &self.parser.name, cursor_key, trouble).await?;
            self.commit_fenced(tx).await
        };
        match saved.await {
            Ok(()) => {
                tracing::warn!(
                    key = %key,
                    failures,
                    "the server failed to return the messages from here on"
                )
            }
            Err(e) => tracing::warn!(key = %key, error = %e, "cannot record a failed fetch"),
        }
    }

    /// Quarantines a message the server failed to return [`GIVE_UP_AFTER`] times: its
    /// header if the server gives that, else a placeholder naming it; the message stays in
    /// the mailbox, and the cursor moves past it.
    async fn give_up_on(
        &self,
        session: &mut S::Session,
        message: &Pending,
        failures: i32,
        stats: &mut PollStats,
    ) -> Result<(), PollError> {
        let header = session.fetch_header(message).await;
        let (raw, kept) = match &header {
            Ok(raw) => (raw.clone(), "only its header is kept here"),
            Err(_) => (
                format!(
                    "X-Mail2ticket-Unreadable: {}; size {}\r\n\r\n",
                    message.location, message.size
                )
                .into_bytes(),
                "not even its header could be read",
            ),
        };
        let reason = format!(
            "the server failed {failures} times to return this message (the connection was cut or the fetch came back short while sending it; {} bytes by the server's count); {kept}; the message stays in the mailbox ({}): open it there, and forward it again if it matters",
            message.size, message.location
        );
        let items = [batch::incoming(message, &raw, Some(&reason))];
        let decisions = pipeline::decide_batch(&self.pipeline, &items);
        // Left on the server: nothing to settle.
        let outcomes = self.commit(&items, &decisions, message, &[]).await?;
        tracing::error!(key = %message.key, failures, outcome = ?outcomes[0],
            "gave up on a message the server does not return; quarantined, left in the mailbox");
        stats.count(&outcomes[0]);
        // The session may have died with the header fetch: reconnect (progress is saved).
        header.map(|_| ()).map_err(PollError::from)
    }

    /// Fetches and stores `next` one message at a time, after fetches starting at its first
    /// message failed [`ISOLATE_AFTER`] times.
    async fn store_one_by_one(
        &self,
        session: &mut S::Session,
        next: &[Pending],
        known: &HashSet<String>,
        trouble: Option<&FetchTrouble>,
        stats: &mut PollStats,
        on_progress: &(dyn Fn() + Sync),
    ) -> Result<(), PollError> {
        tracing::warn!(
            key = %next[0].key,
            failures = trouble.map_or(0, |t| t.failures),
            "fetches starting here failed repeatedly: fetching these messages one at a time"
        );
        for one in next.chunks(1) {
            let fetched = self.fetch(session, one, known, trouble, true).await?;
            self.store_and_settle(session, Some(fetched), stats, on_progress)
                .await?;
        }
        Ok(())
    }

    /// Stores `previous` while `fresh` (the messages of `next` to store) downloads and is
    /// parsed, then settles `previous` (`on_progress` is called once it is committed). A
    /// failed commit stores nothing of either batch (both are fetched
    /// again on the next pass); a failed download is counted against `next`, after the
    /// commit, so that it is the first message pending when it is counted.
    async fn store_while_fetching<'p>(
        &self,
        session: &mut S::Session,
        (previous, next, fresh): (FetchedBatch<'_>, &'p [Pending], Vec<&'p Pending>),
        trouble: Option<&FetchTrouble>,
        stats: &mut PollStats,
        on_progress: &(dyn Fn() + Sync),
    ) -> Result<FetchedBatch<'p>, PollError> {
        let max = self.parser.max_message_size;
        let fetch_and_decide = async {
            let mut fetched = batch::fetch(session, next, fresh.clone(), max).await?;
            fetched.decide_ahead(&self.pipeline).await;
            Ok::<_, SourceError>(fetched)
        };
        let (stored, fetched) = tokio::join!(self.store(previous, stats), fetch_and_decide);
        let previous = stored?;
        // Progress, even if the download failed: the backoff starts over.
        on_progress();
        let settled = self.settle(session, &previous).await;
        match fetched {
            Ok(fetched) => {
                settled?;
                Ok(fetched)
            }
            Err(e) => {
                self.record_fetch_failure(&fresh, trouble, false).await;
                Err(e.into())
            }
        }
    }

    /// Downloads the messages of `next` not stored already; a failed download is counted
    /// against the batch's first message.
    async fn fetch<'p>(
        &self,
        session: &mut S::Session,
        next: &'p [Pending],
        known: &HashSet<String>,
        trouble: Option<&FetchTrouble>,
        isolating: bool,
    ) -> Result<FetchedBatch<'p>, PollError> {
        let fresh = batch::fresh(next, known);
        let max = self.parser.max_message_size;
        match batch::fetch(session, next, fresh.clone(), max).await {
            Ok(fetched) => Ok(fetched),
            Err(e) => {
                self.record_fetch_failure(&fresh, trouble, isolating).await;
                Err(e.into())
            }
        }
    }

    /// Stores a downloaded batch (if there is one), reports the progress, then settles the
    /// batch on the server.
    async fn store_and_settle(
        &self,
        session: &mut S::Session,
        fetched: Option<FetchedBatch<'_>>,
        stats: &mut PollStats,
        on_progress: &(dyn Fn() + Sync),
    ) -> Result<(), PollError> {
        let Some(fetched) = fetched else {
            return Ok(());
        };
        let fetched = self.store(fetched, stats).await?;
        on_progress();
        self.settle(session, &fetched).await
    }

    /// Parses (on a blocking thread) and stores a downloaded batch, moving the cursor past
    /// it in the same transaction. Returns the batch, for settling.
    async fn store<'p>(
        &self,
        mut fetched: FetchedBatch<'p>,
        stats: &mut PollStats,
    ) -> Result<FetchedBatch<'p>, PollError> {
        let decisions = fetched
            .decide(&self.pipeline)
            .await
            .map_err(|e| PollError::Panicked(format!("parsing a batch was cut short: {e}")))?;
        let last = fetched.last();
        let settle = self.owed(&fetched);
        for outcome in self
            .commit(&fetched.items(), &decisions, last, &settle)
            .await?
        {
            tracing::debug!(?outcome, "stored");
            stats.count(&outcome);
        }
        if !fetched.fresh.is_empty() {
            tracing::info!(messages = fetched.fresh.len(), key = %last.key, "committed");
        }
        Ok(fetched)
    }

    /// Stores `items` (decided as `decisions`), moves the cursor past `last` and records
    /// that `settle` is owed to the server, in one transaction.
    async fn commit(
        &self,
        items: &[Incoming<'_>],
        decisions: &[Option<pipeline::Decision>],
        last: &Pending,
        settle: &[&Pending],
    ) -> Result<Vec<pipeline::Outcome>, PollError> {
        let owed: Vec<&str> = settle.iter().map(|m| m.key.as_str()).collect();
        let started = std::time::Instant::now();
        let stored = async {
            let mut tx = self.pool.begin().await?;
            let outcomes =
                pipeline::store_decided(&mut tx, &self.pipeline, items, decisions).await?;
            let key = self.source.cursor_key();
            mailbox::save(&mut tx, &self.parser.name, key, &last.after, &owed).await?;
            self.commit_fenced(tx).await?;
            Ok::<_, StoreError>(outcomes)
        };
        match stored.await {
            Ok(outcomes) => {
                metrics::histogram!("mail2ticket_batch_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                let now = chrono::Utc::now();
                let name = self.parser.name.clone();
                for item in items {
                    if let Arrival::At(arrived) = item.arrival {
                        let waited = (now - arrived).to_std().unwrap_or_default();
                        metrics::histogram!("mail2ticket_ingest_latency_seconds", "parser" => name.clone())
                            .record(waited.as_secs_f64());
                    }
                }
                self.states.committed(&self.parser.name, &outcomes);
                Ok(outcomes)
            }
            Err(e) => {
                self.states
                    .not_stored(&self.parser.name, items.len() as u64);
                Err(e.into())
            }
        }
    }
}

/// The Message-IDs among `pending` (those the source told) that are stored already.
async fn stored_already(
    conn: &mut sqlx::PgConnection,
    parser: &str,
    pending: &[Pending],
) -> Result<HashSet<String>, StoreError> {
    let ids: Vec<&str> = pending
        .iter()
        .filter_map(|m| m.message_id.as_deref())
        .collect();
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    crate::store::tickets::stored_message_ids(conn, parser, &ids).await
}
