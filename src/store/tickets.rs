//! SQL of the ticket tables: `tickets`, `ticket_messages`, `participants`, `attachments`,
//! `raw_messages`; the threading and loop-protection lookups.

use super::StoreError;
use super::batch_rows::raw_place;
use crate::pipeline::ticket::NewTicket;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::time::Duration;

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
/// bytes, in one statement. The caller checks that the message is not stored yet; a
/// message stored meanwhile by another writer is still caught (the unique key) and nothing
/// is kept.
pub async fn insert_ticket(
    conn: &mut PgConnection,
    ticket: &NewTicket,
    raw: Option<&[u8]>,
    arrived_at: DateTime<Utc>,
) -> Result<TicketInsert, StoreError> {
    let sql = format!(
        "with t as (
            insert into tickets (parser, subject, requester_email, requester_name, arrived_at)
            values ($1, $2, $3, $4, $5) returning id
         ), m as (
            insert into ticket_messages ({MESSAGE_COLUMNS})
            select t.id, {} from t
            on conflict (parser, message_id) do nothing
            returning id
         ), {}, p as (
            insert into participants (ticket_id, email, name, role)
            select t.id, u.email, u.name, u.role
              from t, m, unnest($33::text[], $34::text[], $35::text[]) as u(email, name, role)
            on conflict do nothing
         )
         select t.id, (select id from m) from t",
        message_values(6),
        message_parts(23),
    );
    let parts = Parts::of(ticket, raw);
    let (emails, names) = participant_columns(ticket);
    let roles: Vec<&str> = ticket
        .participants
        .iter()
        .map(|p| p.role.as_str())
        .collect();
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&ticket.parser)
        .bind(&ticket.subject)
        .bind(&ticket.requester_email)
        .bind(&ticket.requester_name)
        .bind(arrived_at);
    let query = parts.bind(bind_message(query, ticket, arrived_at));
    let (ticket_id, message_row_id): (i64, Option<i64>) = query
        .bind(&emails)
        .bind(&names)
        .bind(&roles)
        .fetch_one(&mut *conn)
        .await?;
    let Some(message_row_id) = message_row_id else {
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
    Ok(TicketInsert::Created {
        ticket_id,
        message_row_id,
    })
}

/// Adds the message to an existing ticket, in one statement: its people join as `cc`
/// unless already on the ticket, and the ticket's `updated_at` moves. As with
/// [`insert_ticket`], the caller checks first and a concurrent copy is still caught.
pub async fn append_message(
    conn: &mut PgConnection,
    ticket_id: i64,
    ticket: &NewTicket,
    raw: Option<&[u8]>,
    arrived_at: DateTime<Utc>,
) -> Result<TicketInsert, StoreError> {
    let sql = format!(
        "with m as (
            insert into ticket_messages ({MESSAGE_COLUMNS}) values ($1, {})
            on conflict (parser, message_id) do nothing
            returning id
         ), {}, p as (
            insert into participants (ticket_id, email, name, role)
            select $1, u.email, u.name, 'cc'
              from m, unnest($29::text[], $30::text[]) as u(email, name)
             where not exists
                   (select 1 from participants p where p.ticket_id = $1 and p.email = u.email)
            on conflict do nothing
         ), u as (
            update tickets set updated_at = now() where id = $1 and exists (select 1 from m)
         )
         select (select id from m)",
        message_values(2),
        message_parts(19),
    );
    let parts = Parts::of(ticket, raw);
    let (emails, names) = participant_columns(ticket);
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(ticket_id);
    let query = parts.bind(bind_message(query, ticket, arrived_at));
    let (message_row_id,): (Option<i64>,) = query
        .bind(&emails)
        .bind(&names)
        .fetch_one(&mut *conn)
        .await?;
    let Some(message_row_id) = message_row_id else {
        let ticket_id = message_ticket(conn, &ticket.parser, &ticket.message.message_id)
            .await?
            .unwrap_or(ticket_id);
        return Ok(TicketInsert::Duplicate { ticket_id });
    };
    Ok(TicketInsert::Appended {
        ticket_id,
        message_row_id,
    })
}

/// The attachments and raw bytes of the message inserted by CTE `m`, as two more CTEs;
/// their ten values ([`Parts::bind`] order) are numbered from `first`.
fn message_parts(first: usize) -> String {
    let n = |i: usize| first + i;
    format!(
        "a as (
            insert into attachments (ticket_message_id, filename, content_type, size, sha256,
                 content_id, is_inline, content, raw_offset, raw_length)
            select m.id, a.filename, a.content_type, a.size, a.sha256, a.content_id,
                   a.is_inline, a.content, a.raw_offset, a.raw_length
              from m, unnest(${}::text[], ${}::text[], ${}::bigint[], ${}::text[], ${}::text[],
                   ${}::bool[], ${}::bytea[], ${}::bigint[], ${}::bigint[])
                   with ordinality as a(filename, content_type, size, sha256, content_id,
                                        is_inline, content, raw_offset, raw_length, n)
             order by a.n
         ), r as (
            insert into raw_messages (ticket_message_id, raw)
            select m.id, ${raw}::bytea from m where ${raw}::bytea is not null
         )",
        n(0),
        n(1),
        n(2),
        n(3),
        n(4),
        n(5),
        n(6),
        n(7),
        n(8),
        raw = n(9),
    )
}

/// A message's attachments as columns (for `unnest`) and its raw bytes, to bind after the
/// message's own columns.
struct Parts<'a> {
    filenames: Vec<&'a str>,
    types: Vec<&'a str>,
    sizes: Vec<i64>,
    hashes: Vec<&'a str>,
    ids: Vec<Option<&'a str>>,
    inline: Vec<bool>,
    contents: Vec<Option<&'a [u8]>>,
    offsets: Vec<Option<i64>>,
    lengths: Vec<Option<i64>>,
    raw: Option<&'a [u8]>,
}

impl<'a> Parts<'a> {
    fn of(ticket: &'a NewTicket, raw: Option<&'a [u8]>) -> Parts<'a> {
        let all = &ticket.attachments;
        Parts {
            filenames: all.iter().map(|a| a.filename.as_str()).collect(),
            types: all.iter().map(|a| a.content_type.as_str()).collect(),
            sizes: all.iter().map(|a| a.size as i64).collect(),
            hashes: all.iter().map(|a| a.sha256.as_str()).collect(),
            ids: all.iter().map(|a| a.content_id.as_deref()).collect(),
            inline: all.iter().map(|a| a.is_inline).collect(),
            contents: all.iter().map(|a| a.stored_content()).collect(),
            offsets: all.iter().map(|a| raw_place(a).0).collect(),
            lengths: all.iter().map(|a| raw_place(a).1).collect(),
            raw,
        }
    }

    /// Binds the nine attachment arrays and the raw bytes, in [`message_parts`] order.
    fn bind<'q, T>(&'q self, query: PgQueryAs<'q, T>) -> PgQueryAs<'q, T> {
        query
            .bind(&self.filenames)
            .bind(&self.types)
            .bind(&self.sizes)
            .bind(&self.hashes)
            .bind(&self.ids)
            .bind(&self.inline)
            .bind(&self.contents)
            .bind(&self.offsets)
            .bind(&self.lengths)
            .bind(self.raw)
    }
}

/// The participants' addresses and names as two columns (for `unnest`).
fn participant_columns(ticket: &NewTicket) -> (Vec<&str>, Vec<Option<&str>>) {
    let people = &ticket.participants;
    let emails = people.iter().map(|p| p.email.as_str()).collect();
    let names = people.iter().map(|p| p.name.as_deref()).collect();
    (emails, names)
}

/// The columns of a `ticket_messages` row as [`message_values`] and [`bind_message`] fill
/// them (the ticket id first).
const MESSAGE_COLUMNS: &str = "ticket_id, parser, message_id, message_id_derived, in_reply_to,
    references_ids, subject, from_email, from_name, to_emails, cc_emails, sent_at, body_text,
    body_html, raw_size, warnings, automatic_reason, arrived_at";

/// The placeholders of a message row's columns after `ticket_id`, numbered from `first`.
fn message_values(first: usize) -> String {
    (first..first + 17)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

type PgQueryAs<'q, T> = sqlx::query::QueryAs<'q, sqlx::Postgres, T, sqlx::postgres::PgArguments>;

/// Binds a message row's columns after `ticket_id`, in [`MESSAGE_COLUMNS`] order.
fn bind_message<'q, T>(
    query: PgQueryAs<'q, T>,
    ticket: &'q NewTicket,
    arrived_at: DateTime<Utc>,
) -> PgQueryAs<'q, T> {
    let m = &ticket.message;
    query
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
}

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
        "select message_id, ticket_id from ticket_messages
          where parser = $1 and message_id = any($2)",
    )
    .bind(parser)
    .bind(message_ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
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
        "select requester_email, arrived_at from tickets
          where parser = $1 and requester_email = any($2) and arrived_at > $3 and arrived_at <= $4",
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

/// Which of `message_ids` this parser has stored already, as a ticket message or in
/// quarantine (one query for a whole listing).
pub async fn stored_message_ids(
    conn: &mut PgConnection,
    parser: &str,
    message_ids: &[&str],
) -> Result<std::collections::HashSet<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "select message_id from ticket_messages where parser = $1 and message_id = any($2)
         union
         select message_id from quarantine
          where parser = $1 and message_id = any($2) and replayed_at is null",
    )
    .bind(parser)
    .bind(message_ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}
