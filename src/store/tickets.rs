//! SQL of the ticket tables: `tickets`, `ticket_messages`, `participants`, `attachments`,
//! `raw_messages`; the threading and loop-protection lookups.

use super::StoreError;
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
/// bytes: the ticket and its message in one statement. The caller checks that the message
/// is not stored yet; a message stored meanwhile by another writer is still caught (the
/// unique key) and nothing is written.
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
         )
         select t.id, (select id from m) from t",
        message_values(6)
    );
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&ticket.parser)
        .bind(&ticket.subject)
        .bind(&ticket.requester_email)
        .bind(&ticket.requester_name)
        .bind(arrived_at);
    let (ticket_id, message_row_id): (i64, Option<i64>) = bind_message(query, ticket, arrived_at)
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
    insert_message_parts(conn, message_row_id, ticket, raw).await?;
    if !ticket.participants.is_empty() {
        let (emails, names) = participant_columns(ticket);
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
    let (emails, names) = participant_columns(ticket);
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

/// Inserts the `ticket_messages` row with its attachments and raw bytes; `None` when the
/// (parser, Message-ID) already exists.
async fn insert_message_rows(
    conn: &mut PgConnection,
    ticket_id: i64,
    ticket: &NewTicket,
    raw: Option<&[u8]>,
    arrived_at: DateTime<Utc>,
) -> Result<Option<i64>, StoreError> {
    let sql = format!(
        "insert into ticket_messages ({MESSAGE_COLUMNS}) values ($1, {})
         on conflict (parser, message_id) do nothing
         returning id",
        message_values(2)
    );
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(ticket_id);
    let row: Option<(i64,)> = bind_message(query, ticket, arrived_at)
        .fetch_optional(&mut *conn)
        .await?;
    let Some((message_row_id,)) = row else {
        return Ok(None);
    };
    insert_message_parts(conn, message_row_id, ticket, raw).await?;
    Ok(Some(message_row_id))
}

/// A message's attachments (all in one statement) and raw bytes.
async fn insert_message_parts(
    conn: &mut PgConnection,
    message_row_id: i64,
    ticket: &NewTicket,
    raw: Option<&[u8]>,
) -> Result<(), StoreError> {
    let all = &ticket.attachments;
    if !all.is_empty() {
        let filenames: Vec<&str> = all.iter().map(|a| a.filename.as_str()).collect();
        let types: Vec<&str> = all.iter().map(|a| a.content_type.as_str()).collect();
        let sizes: Vec<i64> = all.iter().map(|a| a.size as i64).collect();
        let hashes: Vec<&str> = all.iter().map(|a| a.sha256.as_str()).collect();
        let ids: Vec<Option<&str>> = all.iter().map(|a| a.content_id.as_deref()).collect();
        let inline: Vec<bool> = all.iter().map(|a| a.is_inline).collect();
        let contents: Vec<Option<&[u8]>> = all.iter().map(|a| a.content.as_deref()).collect();
        sqlx::query(
            "insert into attachments (ticket_message_id, filename, content_type, size, sha256,
                 content_id, is_inline, content)
             select $1, a.filename, a.content_type, a.size, a.sha256, a.content_id,
                    a.is_inline, a.content
               from unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                    $7::bool[], $8::bytea[])
                    with ordinality as a(filename, content_type, size, sha256, content_id,
                                         is_inline, content, n)
              order by a.n",
        )
        .bind(message_row_id)
        .bind(&filenames)
        .bind(&types)
        .bind(&sizes)
        .bind(&hashes)
        .bind(&ids)
        .bind(&inline)
        .bind(&contents)
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
    Ok(())
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
