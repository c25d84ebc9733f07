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

/// The end of every statement that writes events (after a CTE `e` returning the new rows'
/// `id, kind, parser`): a delivery row per matching active webhook subscription, and a
/// NOTIFY on `$4` per event. Selects the new ids.
macro_rules! fan_out_and_notify {
    () => {
        "d as (
           insert into webhook_deliveries (event_id, webhook)
           select e.id, w.name from e join webhook_subscriptions w
             on w.active and (w.kinds is null or e.kind = any(w.kinds))
            and (w.parsers is null or e.parser = any(w.parsers)))
         select e.id from e, lateral (select pg_notify($4, e.id::text)) n"
    };
}

/// An event the pipeline queues while it stores a batch: the kind and the row it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// `ticket.created` or `ticket.message_added`, about ticket message row `.1`.
    Message(&'static str, i64),
    /// `message.held` or `message.quarantined`, about quarantine row `.1`.
    Quarantine(&'static str, i64),
}

/// Writes a batch's events in one statement of the caller's transaction, in order, each
/// described from the rows it reports (ticket and message, or quarantine row), with a
/// delivery row per matching webhook subscription and a NOTIFY each.
pub async fn write(conn: &mut PgConnection, events: &[Queued]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut kinds = Vec::with_capacity(events.len());
    let mut messages = Vec::with_capacity(events.len());
    let mut quarantined = Vec::with_capacity(events.len());
    for event in events {
        let (kind, message, quarantine) = match *event {
            Queued::Message(kind, id) => (kind, Some(id), None),
            Queued::Quarantine(kind, id) => (kind, None, Some(id)),
        };
        kinds.push(kind);
        messages.push(message);
        quarantined.push(quarantine);
    }
    sqlx::query(concat!(
        "with input as (
           select * from unnest($1::text[], $2::bigint[], $3::bigint[]) with ordinality
             as i(kind, message_row_id, quarantine_id, ord)),
         e as (
           insert into ticket_events (kind, parser, ticket_id, ticket_message_id, quarantine_id, payload)
           select i.kind, coalesce(m.parser, q.parser), t.id, m.id, q.id,
                  case when m.id is not null then jsonb_build_object(
                    'ticket_id', t.id, 'ticket_message_id', m.id, 'parser', m.parser,
                    'subject', m.subject, 'requester_email', t.requester_email,
                    'requester_name', t.requester_name, 'from_email', m.from_email,
                    'from_name', m.from_name, 'message_id', m.message_id,
                    'arrived_at', m.arrived_at)
                  else jsonb_build_object(
                    'quarantine_id', q.id, 'parser', q.parser, 'reason', q.reason,
                    'hold_kind', q.kind, 'sender', q.sender, 'message_id', q.message_id,
                    'header_only', q.header_only, 'raw_size', q.raw_size,
                    'arrived_at', q.arrived_at) end
             from input i
             left join ticket_messages m on m.id = i.message_row_id
             left join tickets t on t.id = m.ticket_id
             left join quarantine q on q.id = i.quarantine_id
            order by i.ord
           returning id, kind, parser), ",
        fan_out_and_notify!()
    ),
    )
    .bind(&kinds)
    .bind(&messages)
    .bind(&quarantined)
    .bind(CHANNEL)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// An event about the daemon itself (`mailbox.state_changed`, `credential.needs_login`),
/// in a transaction of its own.
pub async fn state_event(
    conn: &mut PgConnection,
    kind: &str,
    parser: &str,
    payload: &serde_json::Value,
) -> Result<i64, StoreError> {
    let id: i64 = sqlx::query_scalar(concat!(
        "with e as (
           insert into ticket_events (kind, parser, payload) values ($1, $2, $3)
           returning id, kind, parser), ",
        fan_out_and_notify!()
    ))
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
