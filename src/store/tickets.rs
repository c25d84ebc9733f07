//! Lookups in the ticket tables: duplicates, threading, subject tags and loop protection
//! (the rows themselves are written by [`super::batch_rows`]).
//!
//! A batch's lookups take a list of IDs or senders and probe an index once per entry
//! (`unnest` of the distinct entries, then a `lateral` subquery with `limit 1` or
//! `offset 0`, which keeps the planner from flattening it). Written as `x = any($2)`, the
//! plan followed the statistics, and a first-day table has none: the plan made during the
//! first batches (a scan with the array as a filter) stayed with the connection's prepared
//! statement, so each batch compared every row stored before it with every entry:
//! quadratic over a backlog (46 ms per batch with 20,000 quarantined rows, now 0.7 ms).

use super::StoreError;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// The ticket named by a subject tag, if it belongs to this parser.
pub async fn tagged_ticket(
    conn: &mut PgConnection,
    parser: &str,
    id: i64,
) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query_scalar("select id from tickets where id = $1 and parser = $2")
            .bind(id)
            .bind(parser)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// The tickets holding those of `message_ids` this parser has stored (one query for a
/// whole batch: its duplicates and its threading).
pub async fn message_tickets(
    conn: &mut PgConnection,
    parser: &str,
    message_ids: &[&str],
) -> Result<std::collections::HashMap<String, i64>, StoreError> {
    if message_ids.is_empty() {
        return Ok(Default::default());
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(
        // One probe of the unique key per Message-ID (see the module doc).
        "select m.id, t.ticket_id
           from (select distinct id from unnest($2::text[]) as u(id)) as m
           cross join lateral (
             select ticket_id from ticket_messages where parser = $1 and message_id = m.id
             limit 1) as t",
    )
    .bind(parser)
    .bind(message_ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// When each of `senders` opened tickets in `parser` that arrived after `after` and no later
/// than `until` (loop protection for a whole batch in one query).
pub async fn ticket_arrivals(
    conn: &mut PgConnection,
    parser: &str,
    senders: &[&str],
    after: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<std::collections::HashMap<String, Vec<DateTime<Utc>>>, StoreError> {
    let mut arrivals: std::collections::HashMap<String, Vec<DateTime<Utc>>> = Default::default();
    if senders.is_empty() {
        return Ok(arrivals);
    }
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        // One index range per sender, (parser, requester_email, arrived_at) (see the
        // module doc; a backlog delivered at once is all in one window).
        "select s.email, t.arrived_at
           from (select distinct email from unnest($2::text[]) as u(email)) as s
           cross join lateral (
             select arrived_at from tickets
              where parser = $1 and requester_email = s.email
                and arrived_at > $3 and arrived_at <= $4
             offset 0) as t",
    )
    .bind(parser)
    .bind(senders)
    .bind(after)
    .bind(until)
    .fetch_all(&mut *conn)
    .await?;
    for (sender, at) in rows {
        arrivals.entry(sender).or_default().push(at);
    }
    Ok(arrivals)
}

/// Which of `message_ids` this parser has stored already, as a ticket message or in
/// quarantine (one query for a whole listing).
pub async fn stored_message_ids(
    conn: &mut PgConnection,
    parser: &str,
    message_ids: &[&str],
) -> Result<std::collections::HashSet<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        // Two index probes per Message-ID (see the module doc).
        "select m.id from (select distinct id from unnest($2::text[]) as u(id)) as m
           cross join lateral (
             select 1 from ticket_messages where parser = $1 and message_id = m.id
             union all
             select 1 from quarantine
              where parser = $1 and message_id = m.id and replayed_at is null
             limit 1) as found",
    )
    .bind(parser)
    .bind(message_ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}
