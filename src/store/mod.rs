//! The only module that speaks SQL: the connection pool, migrations, and the inserts that
//! make up one stored message.
//!
//! Functions take a `&mut PgConnection` so that the caller owns the transaction: `ingest`
//! wraps one message in one transaction, the IMAP poller adds its UID checkpoint to it.

use crate::config::DatabaseConfig;
use crate::pipeline::ticket::NewTicket;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// The embedded migrations (`migrations/*.sql`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A failure talking to the database. Never holds the connection URL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL could not be read.
    #[error("the database URL is not valid: {0}")]
    BadUrl(String),
    /// Connecting, querying or committing failed.
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// A migration failed.
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// True when Postgres refused this particular message's data (bad bytes, a value too
    /// big for an index): the message belongs in quarantine, and retrying cannot help.
    /// Anything else (connection lost, disk full) must fail the message so it is retried.
    pub fn is_refused_data(&self) -> bool {
        match self {
            StoreError::Sql(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("54")),
            StoreError::Sql(sqlx::Error::Encode(_)) => true,
            _ => false,
        }
    }
}

/// Connects a pool; fails fast (10 s) when the database cannot be reached.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, StoreError> {
    // Parse errors from sqlx may quote the URL: report a fixed text instead.
    let options = PgConnectOptions::from_str(config.url.expose_secret()).map_err(|_| {
        StoreError::BadUrl("expected postgres://user[:password]@host[:port]/database".into())
    })?;
    let options = options.application_name("mail2ticket");
    // One direct connection first: a pool reports only "timed out" after retrying, while
    // this gives the real cause (refused, bad password, unknown database) at once.
    let probe = tokio::time::timeout(
        Duration::from_secs(10),
        PgConnection::connect_with(&options),
    )
    .await
    .map_err(|_| StoreError::Sql(sqlx::Error::PoolTimedOut))??;
    probe.close().await?;
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// What became of a message handed to [`insert_ticket`] or [`append_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketInsert {
    /// A new ticket and its first message were written.
    Created {
        /// `tickets.id`.
        ticket_id: i64,
        /// `ticket_messages.id`.
        message_row_id: i64,
    },
    /// The message was added to an existing ticket.
    Appended {
        /// `tickets.id`.
        ticket_id: i64,
        /// `ticket_messages.id`.
        message_row_id: i64,
    },
    /// The (parser, Message-ID) was stored before: nothing was written.
    Duplicate {
        /// The ticket that already holds it.
        ticket_id: i64,
    },
}

/// Writes a new ticket with its message, participants, attachments and (when given) raw
/// bytes. The caller checks [`message_ticket`] first; a message stored meanwhile by another
/// writer is still caught (the unique key) and nothing is written.
pub async fn insert_ticket(
    conn: &mut PgConnection,
    ticket: &NewTicket,
    raw: Option<&[u8]>,
    arrived_at: DateTime<Utc>,
) -> Result<TicketInsert, StoreError> {
    let ticket_id: i64 = sqlx::query_scalar(
        "insert into tickets (parser, subject, requester_email, requester_name, arrived_at)
         values ($1, $2, $3, $4, $5) returning id",
    )
    .bind(&ticket.parser)
    .bind(&ticket.subject)
    .bind(&ticket.requester_email)
    .bind(&ticket.requester_name)
    .bind(arrived_at)
    .fetch_one(&mut *conn)
    .await?;
    let Some(message_row_id) =
        insert_message_rows(conn, ticket_id, ticket, raw, arrived_at).await?
    else {
        // Another writer stored the same message between our check and our insert.
        sqlx::query("delete from tickets where id = $1")
            .bind(ticket_id)
            .execute(&mut *conn)
            .await?;
        let ticket_id = message_ticket(conn, &ticket.parser, &ticket.message.message_id)
            .await?
            .unwrap_or_default();
        return Ok(TicketInsert::Duplicate { ticket_id });
    };
    if !ticket.participants.is_empty() {
        let emails: Vec<&str> = ticket
            .participants
            .iter()
            .map(|p| p.email.as_str())
            .collect();
        let names: Vec<Option<&str>> = ticket
            .participants
            .iter()
            .map(|p| p.name.as_deref())
            .collect();
        let roles: Vec<&str> = ticket
            .participants
            .iter()
            .map(|p| p.role.as_str())
            .collect();
        sqlx::query(
            "insert into participants (ticket_id, email, name, role)
             select $1, * from unnest($2::text[], $3::text[], $4::text[])
             on conflict do nothing",
        )
        .bind(ticket_id)
        .bind(&emails)
        .bind(&names)
        .bind(&roles)
        .execute(&mut *conn)
        .await?;
    }
    Ok(TicketInsert::Created {
        ticket_id,
        message_row_id,
    })
}

/// Adds the message to an existing ticket: its people join as `cc` unless already on the
/// ticket, and the ticket's `updated_at` moves. As with [`insert_ticket`], the caller checks
/// [`message_ticket`] first and a concurrent copy is still caught.
pub async fn append_message(
    conn: &mut PgConnection,
    ticket_id: i64,
    ticket: &NewTicket,
    raw: Option<&[u8]>,
    arrived_at: DateTime<Utc>,
) -> Result<TicketInsert, StoreError> {
    let Some(message_row_id) =
        insert_message_rows(conn, ticket_id, ticket, raw, arrived_at).await?
    else {
        let ticket_id = message_ticket(conn, &ticket.parser, &ticket.message.message_id)
            .await?
            .unwrap_or(ticket_id);
        return Ok(TicketInsert::Duplicate { ticket_id });
    };
    let emails: Vec<&str> = ticket
        .participants
        .iter()
        .map(|p| p.email.as_str())
        .collect();
    let names: Vec<Option<&str>> = ticket
        .participants
        .iter()
        .map(|p| p.name.as_deref())
        .collect();
    sqlx::query(
        "insert into participants (ticket_id, email, name, role)
         select $1, u.email, u.name, 'cc' from unnest($2::text[], $3::text[]) as u(email, name)
         where not exists (select 1 from participants p where p.ticket_id = $1 and p.email = u.email)
         on conflict do nothing",
    )
    .bind(ticket_id)
    .bind(&emails)
    .bind(&names)
    .execute(&mut *conn)
    .await?;
    sqlx::query("update tickets set updated_at = now() where id = $1")
        .bind(ticket_id)
        .execute(&mut *conn)
        .await?;
    Ok(TicketInsert::Appended {
        ticket_id,
        message_row_id,
    })
}

/// Inserts the `ticket_messages` row with its attachments and raw bytes; `None` when the
/// (parser, Message-ID) already exists.
async fn insert_message_rows(
    conn: &mut PgConnection,
    ticket_id: i64,
    ticket: &NewTicket,
    raw: Option<&[u8]>,
    arrived_at: DateTime<Utc>,
) -> Result<Option<i64>, StoreError> {
    let m = &ticket.message;
    let message_row_id: Option<i64> = sqlx::query_scalar(
        "insert into ticket_messages (ticket_id, parser, message_id, message_id_derived,
             in_reply_to, references_ids, subject, from_email, from_name, to_emails, cc_emails,
             sent_at, body_text, body_html, raw_size, warnings, automatic_reason, arrived_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
         on conflict (parser, message_id) do nothing
         returning id",
    )
    .bind(ticket_id)
    .bind(&ticket.parser)
    .bind(&m.message_id)
    .bind(m.message_id_derived)
    .bind(&m.in_reply_to)
    .bind(&m.references)
    .bind(&m.subject)
    .bind(&m.from_email)
    .bind(&m.from_name)
    .bind(&m.to)
    .bind(&m.cc)
    .bind(m.sent_at)
    .bind(&m.body_text)
    .bind(&m.body_html)
    .bind(m.raw_size)
    .bind(&m.warnings)
    .bind(&m.automatic_reason)
    .bind(arrived_at)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(message_row_id) = message_row_id else {
        return Ok(None);
    };
    for a in &ticket.attachments {
        sqlx::query(
            "insert into attachments (ticket_message_id, filename, content_type, size, sha256,
                 content_id, is_inline, content)
             values ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(message_row_id)
        .bind(&a.filename)
        .bind(&a.content_type)
        .bind(a.size as i64)
        .bind(&a.sha256)
        .bind(&a.content_id)
        .bind(a.is_inline)
        .bind(&a.content)
        .execute(&mut *conn)
        .await?;
    }
    if let Some(raw) = raw {
        sqlx::query("insert into raw_messages (ticket_message_id, raw) values ($1, $2)")
            .bind(message_row_id)
            .bind(raw)
            .execute(&mut *conn)
            .await?;
    }
    Ok(Some(message_row_id))
}

/// The ticket a message threads onto within its parser: the newest stored message among
/// `refs`, else the ticket named by the subject tag (if it belongs to this parser).
pub async fn find_thread(
    conn: &mut PgConnection,
    parser: &str,
    refs: &[String],
    tagged: Option<i64>,
) -> Result<Option<i64>, StoreError> {
    if !refs.is_empty() {
        let found: Option<i64> = sqlx::query_scalar(
            "select ticket_id from ticket_messages
             where parser = $1 and message_id = any($2)
             order by array_position($2, message_id) limit 1",
        )
        .bind(parser)
        .bind(refs)
        .fetch_optional(&mut *conn)
        .await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    let Some(id) = tagged else { return Ok(None) };
    Ok(
        sqlx::query_scalar("select id from tickets where id = $1 and parser = $2")
            .bind(id)
            .bind(parser)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// How many tickets `requester` opened in `parser` within the last `window`.
pub async fn recent_tickets_from(
    conn: &mut PgConnection,
    parser: &str,
    requester: &str,
    arrived_at: DateTime<Utc>,
    window: Duration,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "select count(*) from tickets
         where parser = $1 and requester_email = $2
           and arrived_at > $3 - make_interval(secs => $4) and arrived_at <= $3",
    )
    .bind(parser)
    .bind(requester)
    .bind(arrived_at)
    .bind(window.as_secs_f64())
    .fetch_one(&mut *conn)
    .await?)
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

/// The ticket holding (parser, Message-ID), if that message is stored.
pub async fn message_ticket(
    conn: &mut PgConnection,
    parser: &str,
    message_id: &str,
) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "select ticket_id from ticket_messages where parser = $1 and message_id = $2",
    )
    .bind(parser)
    .bind(message_id)
    .fetch_optional(&mut *conn)
    .await?)
}

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

/// The committed position of a parser in a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The folder's UIDVALIDITY when `last_uid` was recorded.
    pub uidvalidity: i64,
    /// Every message with a UID up to this one is stored or quarantined.
    pub last_uid: i64,
}

/// The messages at or below `until` that `start_at` chose at first contact: only those
/// listed in `uids` are taken (see `migrations/0006_arrival_and_first_contact.sql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    /// The highest UID that existed at first contact.
    pub until: i64,
    /// The UIDs up to `until` to take, sorted.
    pub uids: Vec<i64>,
}

/// What `mailbox_state` holds for (parser, folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxState {
    /// The committed position.
    pub checkpoint: Checkpoint,
    /// Failed fetches counted against one UID, if any.
    pub trouble: Option<FetchTrouble>,
    /// The first-contact choice, while the checkpoint is below its end.
    pub backlog: Option<Backlog>,
}

/// The state of (parser, folder), if a checkpoint was ever recorded (one read per pass).
pub async fn load_mailbox_state(
    conn: &mut PgConnection,
    parser: &str,
    folder: &str,
) -> Result<Option<MailboxState>, StoreError> {
    type Row = (i64, i64, Option<i64>, i32, Option<i64>, Option<Vec<i64>>);
    let row: Option<Row> = sqlx::query_as(
        "select uidvalidity, last_uid, fetch_trouble_uid, fetch_failures, backlog_until, backlog_uids
         from mailbox_state where parser = $1 and folder = $2",
    )
    .bind(parser)
    .bind(folder)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(
        |(uidvalidity, last_uid, trouble_uid, failures, until, uids)| MailboxState {
            checkpoint: Checkpoint {
                uidvalidity,
                last_uid,
            },
            trouble: trouble_uid.map(|uid| FetchTrouble { uid, failures }),
            backlog: until
                .filter(|until| *until > last_uid)
                .map(|until| Backlog {
                    until,
                    uids: uids.unwrap_or_default(),
                }),
        },
    ))
}

/// Records the first contact with a folder: the checkpoint and what `start_at` chose.
pub async fn save_first_contact(
    conn: &mut PgConnection,
    parser: &str,
    folder: &str,
    checkpoint: Checkpoint,
    backlog: Option<&Backlog>,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into mailbox_state (parser, folder, uidvalidity, last_uid, updated_at, backlog_until, backlog_uids)
         values ($1, $2, $3, $4, now(), $5, $6)
         on conflict (parser, folder) do update
         set uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, updated_at = now(),
             fetch_trouble_uid = null, fetch_failures = 0,
             backlog_until = excluded.backlog_until, backlog_uids = excluded.backlog_uids",
    )
    .bind(parser)
    .bind(folder)
    .bind(checkpoint.uidvalidity)
    .bind(checkpoint.last_uid)
    .bind(backlog.map(|b| b.until))
    .bind(backlog.map(|b| b.uids.as_slice()))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records the checkpoint; call it in the transaction that stored the messages it covers.
/// A new UIDVALIDITY clears the failed-fetch counter and the first-contact choice (a
/// rescan takes everything; the Message-ID key prevents duplicates).
pub async fn save_checkpoint(
    conn: &mut PgConnection,
    parser: &str,
    folder: &str,
    checkpoint: Checkpoint,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into mailbox_state (parser, folder, uidvalidity, last_uid, updated_at)
         values ($1, $2, $3, $4, now())
         on conflict (parser, folder) do update
         set uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, updated_at = now(),
             fetch_trouble_uid = case
               when mailbox_state.uidvalidity = excluded.uidvalidity
                and mailbox_state.fetch_trouble_uid > excluded.last_uid
               then mailbox_state.fetch_trouble_uid end,
             fetch_failures = case
               when mailbox_state.uidvalidity = excluded.uidvalidity
                and mailbox_state.fetch_trouble_uid > excluded.last_uid
               then mailbox_state.fetch_failures else 0 end,
             backlog_until = case
               when mailbox_state.uidvalidity = excluded.uidvalidity
                and mailbox_state.backlog_until > excluded.last_uid
               then mailbox_state.backlog_until end,
             backlog_uids = case
               when mailbox_state.uidvalidity = excluded.uidvalidity
                and mailbox_state.backlog_until > excluded.last_uid
               then mailbox_state.backlog_uids end",
    )
    .bind(parser)
    .bind(folder)
    .bind(checkpoint.uidvalidity)
    .bind(checkpoint.last_uid)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Failed fetches counted against one UID (see `migrations/0005_fetch_trouble.sql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchTrouble {
    /// The first UID of the fetch that failed.
    pub uid: i64,
    /// How many fetches starting there failed.
    pub failures: i32,
}

/// Records a failed fetch; call it outside the batch's transaction (which is abandoned).
pub async fn save_fetch_trouble(
    conn: &mut PgConnection,
    parser: &str,
    folder: &str,
    trouble: FetchTrouble,
) -> Result<(), StoreError> {
    sqlx::query(
        "update mailbox_state set fetch_trouble_uid = $3, fetch_failures = $4, updated_at = now()
         where parser = $1 and folder = $2",
    )
    .bind(parser)
    .bind(folder)
    .bind(trouble.uid)
    .bind(trouble.failures)
    .execute(&mut *conn)
    .await?;
    Ok(())
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

/// A delegated credential's sign-in, as `credential_grants` holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Grant {
    /// Tenant the sign-in was made in.
    pub tenant_id: String,
    /// Application the sign-in was made for.
    pub client_id: String,
    /// Who signed in (from the token), for messages.
    pub signed_in_as: Option<String>,
    /// The sealed refresh token (see `sealed`).
    pub refresh_token: Option<Vec<u8>>,
    /// `ok` or `needs_login`.
    pub status: String,
    /// Why it needs a login.
    pub status_reason: Option<String>,
}

/// The grant of `credential`, locked until the transaction ends so that two processes
/// never redeem the same refresh token (a rotated token would be lost).
pub async fn lock_grant(
    conn: &mut PgConnection,
    credential: &str,
) -> Result<Option<Grant>, StoreError> {
    Ok(sqlx::query_as(
        "select tenant_id, client_id, signed_in_as, refresh_token, status, status_reason
         from credential_grants where credential = $1 for update",
    )
    .bind(credential)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Records a successful refresh: the (possibly rotated) sealed refresh token and the new
/// access token's expiry, in one statement.
pub async fn save_refreshed_grant(
    conn: &mut PgConnection,
    credential: &str,
    sealed_refresh_token: &[u8],
    access_expires_in: Duration,
) -> Result<(), StoreError> {
    sqlx::query(
        "update credential_grants
         set refresh_token = $2, access_expires_at = now() + $3 * interval '1 second',
             refreshed_at = now(), status = 'ok', status_reason = null
         where credential = $1",
    )
    .bind(credential)
    .bind(sealed_refresh_token)
    .bind(access_expires_in.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks the credential as needing `mail2ticket login`, with the reason.
pub async fn mark_needs_login(
    conn: &mut PgConnection,
    credential: &str,
    reason: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "update credential_grants
         set status_since = case when status = 'needs_login' then status_since else now() end,
             status = 'needs_login', status_reason = $2
         where credential = $1",
    )
    .bind(credential)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records a delegated credential nobody has signed in with yet as needing a login, so
/// the state is visible in the database (an existing row is left alone).
pub async fn record_missing_sign_in(
    conn: &mut PgConnection,
    credential: &str,
    tenant_id: &str,
    client_id: &str,
    reason: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into credential_grants (credential, tenant_id, client_id, status, status_reason)
         values ($1, $2, $3, 'needs_login', $4)
         on conflict (credential) do nothing",
    )
    .bind(credential)
    .bind(tenant_id)
    .bind(client_id)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Stores a new sign-in (from `mail2ticket login`), replacing any earlier one.
pub async fn save_sign_in(
    conn: &mut PgConnection,
    credential: &str,
    tenant_id: &str,
    client_id: &str,
    signed_in_as: Option<&str>,
    sealed_refresh_token: &[u8],
    access_expires_in: Duration,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into credential_grants
           (credential, tenant_id, client_id, signed_in_as, refresh_token, access_expires_at,
            refreshed_at, signed_in_at, status, status_reason, status_since)
         values ($1, $2, $3, $4, $5, now() + $6 * interval '1 second', now(), now(), 'ok', null, now())
         on conflict (credential) do update set
           tenant_id = excluded.tenant_id, client_id = excluded.client_id,
           signed_in_as = excluded.signed_in_as, refresh_token = excluded.refresh_token,
           access_expires_at = excluded.access_expires_at, refreshed_at = now(),
           signed_in_at = now(), status = 'ok', status_reason = null, status_since = now()",
    )
    .bind(credential)
    .bind(tenant_id)
    .bind(client_id)
    .bind(signed_in_as)
    .bind(sealed_refresh_token)
    .bind(access_expires_in.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
