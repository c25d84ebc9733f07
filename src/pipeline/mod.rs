//! The ingest pipeline: raw message bytes to stored rows, exactly once.
//!
//! Every source of mail uses it: the `ingest` command (MTA pipe, .eml backfill), and the
//! IMAP pollers. [`decide`] is pure (size limit, MIME parsing, ticket mapping);
//! [`store_decided`] writes the results inside the caller's transaction; [`ingest_one`]
//! does both in a transaction of its own.
//!
//! The rules, in order: a message already stored for the parser is a duplicate; one that
//! answers a stored message of the same parser (In-Reply-To/References) or carries the
//! ticket tag is appended to that ticket; an automatic one (auto-reply, bounce, own
//! address) that threads nowhere is held back; a sender over `max_tickets_per_sender`
//! within `sender_window` is held back (loop protection); anything else opens a ticket.
//!
//! Nothing is dropped: a message is either a ticket message or a quarantine row with its
//! raw bytes and the reason. Only a database failure returns an error, so the caller can
//! retry the message later.

pub mod attachments;
pub mod boundary;
mod bulk;
mod holds;
pub mod html;
mod known;
pub mod mime;
mod replay;
pub mod ticket;
pub mod tnef;

pub use replay::{Replay, replay};

use crate::config::ParserConfig;
use crate::pipeline::ticket::{NewTicket, TicketRules};
use crate::store::StoreError;
use crate::store::events::{self, Queued};
use crate::store::quarantine::{self, Hold, HoldKind, QuarantineInsert};
use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool};

/// A Date header up to this far in the future still counts as the arrival time (clocks
/// of senders drift); further is not plausible and the ingest time is used.
const DATE_HEADER_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// When a message arrived, for loop protection: a backlog ingested in one go must be
/// judged by when its messages arrived, not by when they were processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Known from the source (IMAP INTERNALDATE, a quarantine row's stored arrival).
    At(DateTime<Utc>),
    /// Unknown (`ingest` of files or a pipe): the Date header when it is plausible (read
    /// and not in the future), else now.
    FromDateHeader,
}

impl Arrival {
    /// The arrival time for `decision`; never later than now.
    pub fn resolve(self, decision: &Decision) -> DateTime<Utc> {
        let now = Utc::now();
        match (self, decision) {
            (Arrival::At(at), _) => at.min(now),
            (Arrival::FromDateHeader, Decision::Ticket(ticket)) => ticket
                .message
                .sent_at
                .filter(|sent| *sent <= now + DATE_HEADER_SKEW)
                .map_or(now, |sent| sent.min(now)),
            (Arrival::FromDateHeader, Decision::Quarantine(_)) => now,
        }
    }
}

/// What one parser does with a message: its ticket rules and its size limit.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Ticket shaping rules.
    pub rules: TicketRules,
    /// Messages larger than this (bytes) are quarantined.
    pub max_message_size: u64,
    /// Keep every message's raw bytes (else only those with warnings).
    pub keep_raw: bool,
    /// Base64 attachments of a message whose raw bytes are kept are stored only there.
    pub attachments_in_raw: bool,
}

impl From<&ParserConfig> for Pipeline {
    fn from(p: &ParserConfig) -> Self {
        Pipeline {
            rules: TicketRules::from(p),
            max_message_size: p.max_message_size,
            keep_raw: p.keep_raw,
            attachments_in_raw: p.attachments_in_raw,
        }
    }
}

/// What the pipeline decided for one message, before touching the database.
#[derive(Debug)]
pub enum Decision {
    /// Open a ticket.
    Ticket(Box<NewTicket>),
    /// Keep the raw bytes in quarantine, for this reason.
    Quarantine(String),
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new ticket.
    Created {
        /// `tickets.id`.
        ticket_id: i64,
    },
    /// Added to an existing ticket (a reply, or an automatic message that threads).
    Appended {
        /// `tickets.id`.
        ticket_id: i64,
    },
    /// Read fine but deliberately not ticketed (automatic, or loop protection); kept in
    /// quarantine with its raw bytes.
    Held {
        /// `quarantine.id`.
        id: i64,
        /// Why.
        reason: String,
    },
    /// Stored before (same parser and Message-ID): nothing written.
    Duplicate {
        /// The ticket that holds it.
        ticket_id: i64,
    },
    /// Kept in quarantine.
    Quarantined {
        /// `quarantine.id`.
        id: i64,
        /// Why.
        reason: String,
    },
    /// The same bytes were already in quarantine: nothing written.
    DuplicateQuarantined {
        /// `quarantine.id`.
        id: i64,
    },
}

/// How many messages ended which way (for summaries, logs and `run --once`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutcomeCounts {
    /// New tickets.
    pub created: u64,
    /// Appended to existing tickets.
    pub appended: u64,
    /// Held back (automatic or loop).
    pub held: u64,
    /// Already stored (tickets or quarantine).
    pub duplicate: u64,
    /// Newly quarantined.
    pub quarantined: u64,
}

impl OutcomeCounts {
    /// Counts one outcome.
    pub fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Created { .. } => self.created += 1,
            Outcome::Appended { .. } => self.appended += 1,
            Outcome::Held { .. } => self.held += 1,
            Outcome::Duplicate { .. } | Outcome::DuplicateQuarantined { .. } => self.duplicate += 1,
            Outcome::Quarantined { .. } => self.quarantined += 1,
        }
    }
}

/// Decides what to do with a raw message. Pure.
pub fn decide(pipeline: &Pipeline, raw: &[u8]) -> Decision {
    if raw.len() as u64 > pipeline.max_message_size {
        return Decision::Quarantine(format!(
            "message is {} bytes, over max_message_size ({} bytes)",
            raw.len(),
            pipeline.max_message_size
        ));
    }
    quarantine_on_panic(|| match crate::pipeline::mime::parse(raw) {
        Ok(parsed) => {
            let mut ticket = crate::pipeline::ticket::new_ticket(&pipeline.rules, parsed);
            let in_raw = pipeline.attachments_in_raw && kept_raw(pipeline, &ticket, raw).is_some();
            attachments::place_in_raw(&mut ticket.attachments, raw, in_raw);
            Decision::Ticket(Box::new(ticket))
        }
        Err(e) => Decision::Quarantine(e.to_string()),
    })
}

/// Runs a pure decision; a panic inside it (a bug in the MIME parser or ours, set off by
/// one message) quarantines that message instead of failing its batch on every retry.
fn quarantine_on_panic(decide: impl FnOnce() -> Decision) -> Decision {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decide)).unwrap_or_else(|panic| {
        Decision::Quarantine(format!(
            "reading this message crashed the parser (a bug; please report it with this message): {}",
            crate::panic_message(&*panic)
        ))
    })
}

/// Quarantines a message that could not be ticketed, with the reason, inside the caller's
/// transaction. `header_only`: `raw` is only what could be read of a message that stays on
/// the server (too large, or never returned), so replay skips it.
async fn quarantine_raw(
    tx: &mut PgConnection,
    parser: &str,
    reason: String,
    raw: &[u8],
    header_only: bool,
    arrived_at: DateTime<Utc>,
) -> Result<Outcome, StoreError> {
    let hold = Hold {
        kind: HoldKind::Error,
        reason: &reason,
        sender: None,
        message_id: None,
        header_only,
        arrived_at,
    };
    Ok(
        match quarantine::insert_quarantine(tx, parser, hold, raw).await? {
            QuarantineInsert::Created { id } => Outcome::Quarantined { id, reason },
            QuarantineInsert::Duplicate { id } => Outcome::DuplicateQuarantined { id },
        },
    )
}

/// The event a quarantine outcome announces, if any (a duplicate has none).
fn quarantine_event(outcome: &Outcome) -> Option<Queued> {
    match outcome {
        Outcome::Quarantined { id, .. } => Some(Queued::Quarantine("message.quarantined", *id)),
        Outcome::Held { id, .. } => Some(Queued::Quarantine("message.held", *id)),
        _ => None,
    }
}

/// The raw bytes to keep with a ticket message: all with `keep_raw`, else only those of a
/// message read with warnings.
fn kept_raw<'a>(pipeline: &Pipeline, ticket: &NewTicket, raw: &'a [u8]) -> Option<&'a [u8]> {
    (pipeline.keep_raw || !ticket.message.warnings.is_empty()).then_some(raw)
}

/// One message handed to [`store_batch`].
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// The raw bytes (or, with `header_only`, what could be read of the message).
    pub raw: &'a [u8],
    /// When it arrived.
    pub arrival: Arrival,
    /// Only the header could be read (too large, or never returned by the server): the
    /// reason; the message is quarantined by its header and stays in the mailbox.
    pub header_only: Option<&'a str>,
}

impl<'a> Incoming<'a> {
    /// A whole message.
    pub fn whole(raw: &'a [u8], arrival: Arrival) -> Self {
        Incoming {
            raw,
            arrival,
            header_only: None,
        }
    }
}

/// The one path by which every caller stores messages (`ingest`, the mailbox loop,
/// quarantine replay): decides each message (pure) and stores it inside the caller's open
/// transaction, so the caller can add its own rows (a source's cursor, a replay mark) to
/// the same commit. Outcomes come back in input order; on error the caller's transaction
/// is to be abandoned, and running the batch again is harmless (the Message-ID key holds).
///
/// The batch is stored at once under one savepoint: its lookups done for the whole batch,
/// the rules applied in memory, its rows written with a few statements (`bulk`). Only
/// when Postgres refuses some message's data, or another writer stored one of its messages
/// meanwhile, is the batch rolled back to that savepoint and stored again one message at
/// a time, each in a savepoint of its own, so that the refused message alone is
/// quarantined and nothing else is lost.
pub async fn store_batch(
    tx: &mut PgConnection,
    pipeline: &Pipeline,
    items: &[Incoming<'_>],
) -> Result<Vec<Outcome>, StoreError> {
    let decisions = decide_batch(pipeline, items);
    store_decided(tx, pipeline, items, &decisions).await
}

/// The decisions for a batch, in order: none for a header-only item (it is quarantined
/// as it is). Pure and CPU-bound (MIME parsing): the mailbox loop runs it on a blocking
/// thread while the next batch downloads.
pub fn decide_batch(pipeline: &Pipeline, items: &[Incoming<'_>]) -> Vec<Option<Decision>> {
    items
        .iter()
        .map(|item| {
            item.header_only
                .is_none()
                .then(|| decide(pipeline, item.raw))
        })
        .collect()
}

/// [`store_batch`] with the decisions made already (by [`decide_batch`] on the same items).
pub async fn store_decided(
    tx: &mut PgConnection,
    pipeline: &Pipeline,
    items: &[Incoming<'_>],
    decisions: &[Option<Decision>],
) -> Result<Vec<Outcome>, StoreError> {
    assert_eq!(items.len(), decisions.len(), "one decision per item");
    let mut queued = Vec::new();
    let mut batch = tx.begin().await?;
    match bulk::store(&mut batch, pipeline, items, decisions, &mut queued).await {
        Ok(outcomes) => {
            batch.commit().await?;
            // The batch's events, in message order, in one statement of the transaction.
            events::write(tx, &queued).await?;
            return Ok(outcomes);
        }
        Err(e) if e.is_refused_data() || e.is_unique_violation() => {
            batch.rollback().await?;
            tracing::info!(error = %e, messages = items.len(),
                "the database refused the batch (bad data, or a message stored meanwhile): storing its messages one by one");
        }
        Err(e) => return Err(e),
    }
    queued.clear();
    let outcomes = store_each(tx, pipeline, items, decisions, &mut queued).await?;
    events::write(tx, &queued).await?;
    Ok(outcomes)
}

/// Stores every item in order, each in a savepoint of its own, by the same rules
/// ([`bulk::store`] of that one message), so that a message whose data Postgres refuses
/// is quarantined alone and nothing else is lost.
async fn store_each(
    tx: &mut PgConnection,
    pipeline: &Pipeline,
    items: &[Incoming<'_>],
    decisions: &[Option<Decision>],
    queued: &mut Vec<Queued>,
) -> Result<Vec<Outcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(items.len());
    for (item, decision) in items.iter().zip(decisions) {
        outcomes.push(store_alone(tx, pipeline, item, decision, queued).await?);
    }
    Ok(outcomes)
}

/// One message in a savepoint of its own. A unique key that refuses it means another
/// writer committed the same message meanwhile: looked at again, it is a duplicate.
async fn store_alone(
    tx: &mut PgConnection,
    pipeline: &Pipeline,
    item: &Incoming<'_>,
    decision: &Option<Decision>,
    queued: &mut Vec<Queued>,
) -> Result<Outcome, StoreError> {
    let (one, decided) = (std::slice::from_ref(item), std::slice::from_ref(decision));
    let mut looked_again = false;
    loop {
        let mut savepoint = tx.begin().await?;
        let mut events = Vec::new();
        match bulk::store(&mut savepoint, pipeline, one, decided, &mut events).await {
            Ok(mut outcome) => {
                savepoint.commit().await?;
                queued.extend(events);
                return Ok(outcome.remove(0));
            }
            Err(e) if e.is_unique_violation() && !looked_again => {
                savepoint.rollback().await?;
                looked_again = true;
            }
            Err(e) if e.is_refused_data() => {
                savepoint.rollback().await?;
                let reason = format!("the database refused the message: {e}");
                let arrived_at = match decision {
                    Some(decision) => item.arrival.resolve(decision),
                    None => item.arrival.resolve(&Decision::Quarantine(reason.clone())),
                };
                let parser = &pipeline.rules.parser;
                let header_only = item.header_only.is_some();
                let outcome = quarantine_raw(tx, parser, reason, item.raw, header_only, arrived_at);
                let outcome = outcome.await?;
                queued.extend(quarantine_event(&outcome));
                return Ok(outcome);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Stores messages read from files or a pipe in one transaction: one commit (one fsync)
/// for the lot. Their arrival is their Date header when plausible.
pub async fn ingest_batch(
    pool: &PgPool,
    pipeline: &Pipeline,
    raws: &[Vec<u8>],
) -> Result<Vec<Outcome>, StoreError> {
    let items: Vec<Incoming> = raws
        .iter()
        .map(|raw| Incoming::whole(raw, Arrival::FromDateHeader))
        .collect();
    commit(pool, pipeline, &items).await
}

/// Stores one message read from a file or a pipe in a transaction of its own.
pub async fn ingest_one(
    pool: &PgPool,
    pipeline: &Pipeline,
    raw: &[u8],
) -> Result<Outcome, StoreError> {
    let item = Incoming::whole(raw, Arrival::FromDateHeader);
    Ok(commit(pool, pipeline, &[item]).await?.remove(0))
}

/// [`store_batch`] in a transaction of its own.
async fn commit(
    pool: &PgPool,
    pipeline: &Pipeline,
    items: &[Incoming<'_>],
) -> Result<Vec<Outcome>, StoreError> {
    commit_decided(pool, pipeline, items, &decide_batch(pipeline, items)).await
}

/// [`store_decided`] in a transaction of its own (for `ingest`, which decides the next
/// batch while this one commits).
pub async fn commit_decided(
    pool: &PgPool,
    pipeline: &Pipeline,
    items: &[Incoming<'_>],
    decisions: &[Option<Decision>],
) -> Result<Vec<Outcome>, StoreError> {
    let mut tx = pool.begin().await?;
    let outcomes = store_decided(&mut tx, pipeline, items, decisions).await?;
    tx.commit().await?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_deciding_quarantines_the_message() {
        let decision = quarantine_on_panic(|| panic!("index out of bounds"));
        match decision {
            Decision::Quarantine(reason) => {
                assert!(
                    reason.contains("crashed the parser") && reason.contains("index out of bounds"),
                    "{reason}"
                )
            }
            Decision::Ticket(_) => panic!("expected quarantine"),
        }
    }
}
