//! SQL of the events outbox (`ticket_events`, see `migrations/0008_events.sql`): each
//! event is written in the caller's transaction, beside the rows it reports, and
//! announced with `NOTIFY mail2ticket_events` (its id as payload) in that same
//! transaction, so listeners wake exactly when it becomes visible. The table is the truth;
//! NOTIFY is only a wake-up. The same statement writes a delivery row for every active
//! webhook subscription that wants the event (see `migrations/0009_webhooks.sql`).

use super::StoreError;
use sqlx::PgConnection;

/// The NOTIFY channel.
pub const CHANNEL: &str = "mail2ticket_events";

/// A new ticket (`ticket.created`) or a message added to one (`ticket.message_added`),
/// described from the stored rows of ticket message `message_row_id`.
pub async fn ticket_event(
    conn: &mut PgConnection,
    kind: &str,
    message_row_id: i64,
) -> Result<i64, StoreError> {
    let id: i64 = sqlx::query_scalar(
        "with e as (
           insert into ticket_events (kind, parser, ticket_id, ticket_message_id, payload)
           select $1, m.parser, t.id, m.id, jsonb_build_object(
                    'ticket_id', t.id, 'ticket_message_id', m.id, 'parser', m.parser,
                    'subject', m.subject, 'requester_email', t.requester_email,
                    'requester_name', t.requester_name, 'from_email', m.from_email,
                    'from_name', m.from_name, 'message_id', m.message_id,
                    'arrived_at', m.arrived_at)
             from ticket_messages m join tickets t on t.id = m.ticket_id
            where m.id = $2
           returning id, kind, parser),
         d as (
           insert into webhook_deliveries (event_id, webhook)
           select e.id, w.name from e join webhook_subscriptions w
             on w.active and (w.kinds is null or e.kind = any(w.kinds))
            and (w.parsers is null or e.parser = any(w.parsers)))
         select id from e, lateral (select pg_notify($3, e.id::text)) n",
    )
    .bind(kind)
    .bind(message_row_id)
    .bind(CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// A message held by the rules (`message.held`) or quarantined (`message.quarantined`),
/// described from quarantine row `quarantine_id`.
pub async fn quarantine_event(
    conn: &mut PgConnection,
    kind: &str,
    quarantine_id: i64,
) -> Result<i64, StoreError> {
    let id: i64 = sqlx::query_scalar(
        "with e as (
           insert into ticket_events (kind, parser, quarantine_id, payload)
           select $1, q.parser, q.id, jsonb_build_object(
                    'quarantine_id', q.id, 'parser', q.parser, 'reason', q.reason,
                    'hold_kind', q.kind, 'sender', q.sender, 'message_id', q.message_id,
                    'header_only', q.header_only, 'raw_size', q.raw_size,
                    'arrived_at', q.arrived_at)
             from quarantine q
            where q.id = $2
           returning id, kind, parser),
         d as (
           insert into webhook_deliveries (event_id, webhook)
           select e.id, w.name from e join webhook_subscriptions w
             on w.active and (w.kinds is null or e.kind = any(w.kinds))
            and (w.parsers is null or e.parser = any(w.parsers)))
         select id from e, lateral (select pg_notify($3, e.id::text)) n",
    )
    .bind(kind)
    .bind(quarantine_id)
    .bind(CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// An event about the daemon itself (`mailbox.state_changed`, `credential.needs_login`),
/// in a transaction of its own.
pub async fn state_event(
    conn: &mut PgConnection,
    kind: &str,
    parser: &str,
    payload: &serde_json::Value,
) -> Result<i64, StoreError> {
    let id: i64 = sqlx::query_scalar(
        "with e as (
           insert into ticket_events (kind, parser, payload) values ($1, $2, $3)
           returning id, kind, parser),
         d as (
           insert into webhook_deliveries (event_id, webhook)
           select e.id, w.name from e join webhook_subscriptions w
             on w.active and (w.kinds is null or e.kind = any(w.kinds))
            and (w.parsers is null or e.parser = any(w.parsers)))
         select id from e, lateral (select pg_notify($4, e.id::text)) n",
    )
    .bind(kind)
    .bind(parser)
    .bind(payload)
    .bind(CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// One event, as `events list` and the webhook dispatcher read it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Event {
    /// Its id (increasing in commit order within one writer).
    pub id: i64,
    /// What happened.
    pub kind: String,
    /// The parser it concerns.
    pub parser: String,
    /// What it says.
    pub payload: serde_json::Value,
    /// When it was written.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Events after `since`, oldest first, at most `limit`.
pub async fn list(
    conn: &mut PgConnection,
    since: i64,
    limit: i64,
) -> Result<Vec<Event>, StoreError> {
    Ok(sqlx::query_as(
        "select id, kind, parser, payload, created_at from ticket_events
          where id > $1 order by id limit $2",
    )
    .bind(since)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?)
}
