//! SQL of `quarantine`: messages kept with their raw bytes and a reason (errors, and
//! messages held by the rules), their listing and replay.

use super::StoreError;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::time::Duration;

/// What became of a message handed to [`insert_quarantine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineInsert {
    /// A new quarantine row.
    Created {
        /// `quarantine.id`.
        id: i64,
    },
    /// The same bytes were quarantined for this parser before.
    Duplicate {
        /// The existing row.
        id: i64,
    },
}

/// Why a message was kept in `quarantine` instead of becoming a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldKind {
    /// It could not be turned into a ticket.
    Error,
    /// An auto-reply, bounce or own-address message that threads onto no ticket.
    Automatic,
    /// Loop protection: too many new tickets from its sender.
    Loop,
}

impl HoldKind {
    /// The `quarantine.kind` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldKind::Error => "error",
            HoldKind::Automatic => "automatic",
            HoldKind::Loop => "loop",
        }
    }
}

/// A message to keep in `quarantine`.
#[derive(Debug, Clone, Copy)]
pub struct Hold<'a> {
    /// Why.
    pub kind: HoldKind,
    /// In words.
    pub reason: &'a str,
    /// Its sender, when known.
    pub sender: Option<&'a str>,
    /// Its Message-ID, when known.
    pub message_id: Option<&'a str>,
    /// Only the header is kept (the message was too large to download, or the server
    /// never returned it); the message stays on the server.
    pub header_only: bool,
    /// When the message arrived (loop protection counts held loops by it).
    pub arrived_at: DateTime<Utc>,
}

/// Keeps a message that did not become a ticket, with its raw bytes and the reason.
/// The same bytes for the same parser are kept once.
pub async fn insert_quarantine(
    conn: &mut PgConnection,
    parser: &str,
    hold: Hold<'_>,
    raw: &[u8],
) -> Result<QuarantineInsert, StoreError> {
    let sha256 = crate::pipeline::mime::hex_sha256(raw);
    let inserted: Option<i64> = sqlx::query_scalar(
        "insert into quarantine (parser, reason, raw, raw_sha256, raw_size, kind, sender, message_id, header_only, arrived_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         on conflict (parser, raw_sha256) do nothing
         returning id",
    )
    .bind(parser)
    .bind(crate::pipeline::mime::clean(hold.reason))
    .bind(raw)
    .bind(&sha256)
    .bind(raw.len() as i64)
    .bind(hold.kind.as_str())
    .bind(hold.sender)
    .bind(hold.message_id)
    .bind(hold.header_only)
    .bind(hold.arrived_at)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = inserted {
        return Ok(QuarantineInsert::Created { id });
    }
    let id = sqlx::query_scalar("select id from quarantine where parser = $1 and raw_sha256 = $2")
        .bind(parser)
        .bind(&sha256)
        .fetch_one(&mut *conn)
        .await?;
    Ok(QuarantineInsert::Duplicate { id })
}

/// Whether a message from `sender` was already held back as a loop within `window` (the
/// warning is logged once per window).
pub async fn loop_recorded_since(
    conn: &mut PgConnection,
    parser: &str,
    sender: &str,
    arrived_at: DateTime<Utc>,
    window: Duration,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from quarantine
         where parser = $1 and kind = 'loop' and sender = $2
           and arrived_at > $3 - make_interval(secs => $4) and arrived_at <= $3)",
    )
    .bind(parser)
    .bind(sender)
    .bind(arrived_at)
    .bind(window.as_secs_f64())
    .fetch_one(&mut *conn)
    .await?)
}

/// One row of `quarantine`, without its bytes (for listings).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QuarantineEntry {
    /// `quarantine.id`.
    pub id: i64,
    /// Parser.
    pub parser: String,
    /// `error`, `automatic` or `loop`.
    pub kind: String,
    /// Why.
    pub reason: String,
    /// Sender, when known.
    pub sender: Option<String>,
    /// Size of the kept bytes.
    pub raw_size: i64,
    /// Only the header was kept.
    pub header_only: bool,
    /// When it arrived.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// What a replay made of it, if it was replayed.
    pub replay_outcome: Option<String>,
}

/// Quarantine rows, oldest first; replayed ones only when `include_replayed`.
pub async fn list_quarantine(
    conn: &mut PgConnection,
    parser: Option<&str>,
    include_replayed: bool,
) -> Result<Vec<QuarantineEntry>, StoreError> {
    Ok(sqlx::query_as(
        "select id, parser, kind, reason, sender, raw_size, header_only, created_at, replay_outcome
         from quarantine
         where ($1::text is null or parser = $1) and ($2 or replayed_at is null)
         order by id",
    )
    .bind(parser)
    .bind(include_replayed)
    .fetch_all(&mut *conn)
    .await?)
}

/// A quarantined message to replay, locked until the transaction ends (so two replays
/// of the same row cannot both store it).
#[derive(Debug, sqlx::FromRow)]
pub struct QuarantinedMessage {
    /// `quarantine.id`.
    pub id: i64,
    /// Parser.
    pub parser: String,
    /// The kept bytes.
    pub raw: Vec<u8>,
    /// Only the header was kept.
    pub header_only: bool,
    /// Already replayed.
    pub replayed: bool,
    /// When the message arrived.
    pub arrived_at: DateTime<Utc>,
}

/// Loads and locks one quarantine row.
pub async fn lock_quarantined(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Option<QuarantinedMessage>, StoreError> {
    Ok(sqlx::query_as(
        "select id, parser, raw, header_only, replayed_at is not null as replayed, arrived_at
         from quarantine where id = $1 for update",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Records that a quarantine row was replayed and what became of it.
pub async fn mark_replayed(
    conn: &mut PgConnection,
    id: i64,
    outcome: &str,
) -> Result<(), StoreError> {
    sqlx::query("update quarantine set replayed_at = now(), replay_outcome = $2 where id = $1")
        .bind(id)
        .bind(outcome)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Ids of the rows not replayed yet (optionally of one parser), oldest first.
pub async fn pending_quarantine_ids(
    conn: &mut PgConnection,
    parser: Option<&str>,
) -> Result<Vec<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "select id from quarantine where replayed_at is null and ($1::text is null or parser = $1) order by id",
    )
    .bind(parser)
    .fetch_all(&mut *conn)
    .await?)
}

/// Rows not replayed yet, per parser (held and quarantined messages waiting for a person).
pub async fn pending_counts(
    conn: &mut PgConnection,
) -> Result<std::collections::HashMap<String, i64>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select parser, count(*) from quarantine where replayed_at is null group by parser",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}
