//! The rows of a batch of new tickets and messages, written with a few multi-row
//! statements instead of one statement per message (a batch stored message by message is
//! a series of batches of one).
//!
//! Row ids are taken from the tables' own identity sequences first ([`allocate_ids`]), so
//! that messages, attachments, raw bytes and events can name their ticket and message rows
//! without relying on the order of `RETURNING`.

use super::StoreError;
use crate::pipeline::mime::Attachment;
use crate::pipeline::ticket::{NewTicket, Role};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, QueryBuilder};

/// Postgres takes at most this many parameters in one statement.
const MAX_PARAMETERS: usize = 65_535;

/// A multi-row statement carries at most about this many bytes of parameters (more rows
/// go to another statement): both sides hold one statement's parameters whole in memory.
const STATEMENT_BYTES: usize = 8 << 20;

/// Raw messages are sent to `COPY` in pieces of about this many bytes (one message larger
/// than this is sent from its own buffer).
const COPY_CHUNK: usize = 256 << 10;

/// A new ticket: its id (from [`allocate_ids`]), the message that opens it, its arrival.
pub struct TicketRow<'a> {
    /// `tickets.id`.
    pub id: i64,
    /// The first message, whose subject and requester the ticket takes.
    pub ticket: &'a NewTicket,
    /// When that message arrived.
    pub arrived_at: DateTime<Utc>,
}

/// A new ticket message, opening its ticket or appended to one.
pub struct MessageRow<'a> {
    /// `ticket_messages.id`.
    pub id: i64,
    /// `tickets.id` it belongs to.
    pub ticket_id: i64,
    /// The message.
    pub ticket: &'a NewTicket,
    /// Its raw bytes, when they are kept.
    pub raw: Option<&'a [u8]>,
    /// When it arrived.
    pub arrived_at: DateTime<Utc>,
    /// Added to an existing ticket (its people join as `cc`, the ticket's `updated_at`
    /// moves) rather than opening one.
    pub appended: bool,
}

/// Takes `tickets` ids from `tickets` and `messages` ids from `ticket_messages`, in one
/// round trip.
pub async fn allocate_ids(
    conn: &mut PgConnection,
    tickets: usize,
    messages: usize,
) -> Result<(Vec<i64>, Vec<i64>), StoreError> {
    Ok(sqlx::query_as(
        "select array(select nextval(pg_get_serial_sequence('tickets', 'id'))
                        from generate_series(1, $1)),
                array(select nextval(pg_get_serial_sequence('ticket_messages', 'id'))
                        from generate_series(1, $2))",
    )
    .bind(tickets as i64)
    .bind(messages as i64)
    .fetch_one(&mut *conn)
    .await?)
}

/// Writes the tickets, then their messages, participants, attachments and raw bytes, and
/// moves `updated_at` of the tickets that messages were appended to. A message stored
/// meanwhile by another writer fails the whole call (the unique key), as does data
/// Postgres refuses: the caller then stores the batch message by message.
pub async fn insert(
    conn: &mut PgConnection,
    tickets: &[TicketRow<'_>],
    messages: &[MessageRow<'_>],
) -> Result<(), StoreError> {
    insert_tickets(conn, tickets).await?;
    insert_messages(conn, messages).await?;
    insert_participants(conn, messages).await?;
    let mut touched: Vec<i64> = messages
        .iter()
        .filter(|m| m.appended)
        .map(|m| m.ticket_id)
        .collect();
    touched.sort_unstable();
    touched.dedup();
    if !touched.is_empty() {
        sqlx::query("update tickets set updated_at = now() where id = any($1)")
            .bind(&touched)
            .execute(&mut *conn)
            .await?;
    }
    insert_attachments(conn, messages).await?;
    insert_raw(conn, messages).await
}

async fn insert_tickets(conn: &mut PgConnection, rows: &[TicketRow<'_>]) -> Result<(), StoreError> {
    run_chunked(
        conn,
        "insert into tickets (id, parser, subject, requester_email, requester_name, arrived_at)
         overriding system value ",
        rows,
        6,
        |_| 0,
        |mut b, row| {
            let t = row.ticket;
            b.push_bind(row.id)
                .push_bind(&t.parser)
                .push_bind(&t.subject)
                .push_bind(&t.requester_email)
                .push_bind(&t.requester_name)
                .push_bind(row.arrived_at);
        },
    )
    .await
}

async fn insert_messages(
    conn: &mut PgConnection,
    rows: &[MessageRow<'_>],
) -> Result<(), StoreError> {
    run_chunked(
        conn,
        "insert into ticket_messages (id, ticket_id, parser, message_id, message_id_derived,
             in_reply_to, references_ids, subject, from_email, from_name, to_emails, cc_emails,
             sent_at, body_text, body_html, raw_size, warnings, automatic_reason, arrived_at)
         overriding system value ",
        rows,
        19,
        |row| {
            row.ticket.message.body_text.len()
                + row.ticket.message.body_html.as_ref().map_or(0, String::len)
        },
        |mut b, row| {
            let m = &row.ticket.message;
            b.push_bind(row.id)
                .push_bind(row.ticket_id)
                .push_bind(&row.ticket.parser)
                .push_bind(&m.message_id)
                .push_bind(m.message_id_derived)
                .push_bind(&m.in_reply_to)
                .push_bind(&m.references)
                .push_bind(&m.subject)
                .push_bind(&m.from_email)
                .push_bind(&m.from_name)
                .push_bind(&m.to)
                .push_bind(&m.cc)
                .push_bind(m.sent_at)
                .push_bind(&m.body_text)
                .push_bind(&m.body_html)
                .push_bind(m.raw_size)
                .push_bind(&m.warnings)
                .push_bind(&m.automatic_reason)
                .push_bind(row.arrived_at);
        },
    )
    .await
}

/// A new ticket's people with their roles; an appended message's people as `cc`, unless
/// already on the ticket (in any role). Two statements, because rows written by one
/// statement are not visible to its own `not exists`: a reply within the batch to a ticket
/// opened in the batch must see that ticket's requester.
async fn insert_participants(
    conn: &mut PgConnection,
    rows: &[MessageRow<'_>],
) -> Result<(), StoreError> {
    for appended in [false, true] {
        let mut tickets = Vec::new();
        let mut emails = Vec::new();
        let mut names = Vec::new();
        let mut roles = Vec::new();
        for row in rows.iter().filter(|r| r.appended == appended) {
            for p in &row.ticket.participants {
                tickets.push(row.ticket_id);
                emails.push(p.email.as_str());
                names.push(p.name.as_deref());
                roles.push(if appended { Role::Cc } else { p.role }.as_str());
            }
        }
        if tickets.is_empty() {
            continue;
        }
        sqlx::query(
            "insert into participants (ticket_id, email, name, role)
             select u.ticket_id, u.email, u.name, u.role
               from unnest($1::bigint[], $2::text[], $3::text[], $4::text[])
                    with ordinality as u(ticket_id, email, name, role, n)
              where not $5 or not exists (select 1 from participants p
                                           where p.ticket_id = u.ticket_id and p.email = u.email)
              order by u.n
             on conflict do nothing",
        )
        .bind(&tickets)
        .bind(&emails)
        .bind(&names)
        .bind(&roles)
        .bind(appended)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn insert_attachments(
    conn: &mut PgConnection,
    rows: &[MessageRow<'_>],
) -> Result<(), StoreError> {
    let all: Vec<(i64, &Attachment)> = rows
        .iter()
        .flat_map(|r| r.ticket.attachments.iter().map(move |a| (r.id, a)))
        .collect();
    run_chunked(
        conn,
        "insert into attachments (ticket_message_id, filename, content_type, size, sha256,
             content_id, is_inline, content, raw_offset, raw_length) ",
        &all,
        10,
        |(_, a)| a.stored_content().map_or(0, <[u8]>::len),
        |mut b, (message_id, a)| {
            let (offset, length) = raw_place(a);
            b.push_bind(*message_id)
                .push_bind(&a.filename)
                .push_bind(&a.content_type)
                .push_bind(a.size as i64)
                .push_bind(&a.sha256)
                .push_bind(&a.content_id)
                .push_bind(a.is_inline)
                .push_bind(a.stored_content())
                .push_bind(offset)
                .push_bind(length);
        },
    )
    .await
}

/// `attachments.raw_offset` and `raw_length`: where the attachment's base64 text lies in
/// the raw message, when it is stored only there.
pub fn raw_place(attachment: &Attachment) -> (Option<i64>, Option<i64>) {
    let range = attachment.raw_range.as_ref();
    (
        range.map(|r| r.start as i64),
        range.map(|r| (r.end - r.start) as i64),
    )
}

/// Writes the batch's raw messages: by binary `COPY` when they are more than
/// [`COPY_CHUNK`] bytes (a backlog's batches), else in one statement.
///
/// `COPY` streams the bytes to Postgres in chunks of [`COPY_CHUNK`] (a large message
/// straight from its buffer) instead of holding them as one statement's parameters of up
/// to [`STATEMENT_BYTES`], copied once more into the connection's buffer. A small batch (a
/// daemon's usual batch of one new message) takes the statement: `COPY` ends with a
/// separate small `CopyDone` write right after a small data write, and sqlx's sockets do
/// not set TCP_NODELAY, so Nagle held it until Postgres' delayed ACK, ~40 ms per batch
/// (measured: delivery to row p50 0.557 s instead of 0.513 s over 1,000 mailboxes). sqlx
/// has no binary COPY encoder, hence the few lines of the format below (PostgreSQL docs,
/// "COPY", Binary Format: signature, flags, header extension, tuples of length-prefixed
/// fields, trailer).
async fn insert_raw(conn: &mut PgConnection, rows: &[MessageRow<'_>]) -> Result<(), StoreError> {
    let kept: Vec<(i64, &[u8])> = rows
        .iter()
        .filter_map(|r| r.raw.map(|raw| (r.id, raw)))
        .collect();
    if kept.iter().map(|(_, raw)| raw.len()).sum::<usize>() <= COPY_CHUNK {
        let insert = "insert into raw_messages (ticket_message_id, raw) ";
        return run_chunked(
            conn,
            insert,
            &kept,
            2,
            |(_, raw)| raw.len(),
            |mut b, (id, raw)| {
                b.push_bind(*id).push_bind(*raw);
            },
        )
        .await;
    }
    let mut copy = conn
        .copy_in_raw("copy raw_messages (ticket_message_id, raw) from stdin (format binary)")
        .await?;
    let mut chunk = Vec::with_capacity(COPY_CHUNK);
    chunk.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    chunk.extend_from_slice(&[0; 8]); // flags, header extension length
    for &(id, raw) in &kept {
        let length = i32::try_from(raw.len()).map_err(|_| {
            let too_large = format!("{} bytes of raw message: over Postgres' limit", raw.len());
            StoreError::Sql(sqlx::Error::Encode(too_large.into()))
        })?;
        chunk.extend_from_slice(&2i16.to_be_bytes());
        chunk.extend_from_slice(&8i32.to_be_bytes());
        chunk.extend_from_slice(&id.to_be_bytes());
        chunk.extend_from_slice(&length.to_be_bytes());
        if raw.len() >= COPY_CHUNK {
            copy.send(chunk.as_slice()).await?;
            chunk.clear();
            copy.send(raw).await?;
        } else {
            chunk.extend_from_slice(raw);
        }
        if chunk.len() >= COPY_CHUNK {
            copy.send(chunk.as_slice()).await?;
            chunk.clear();
        }
    }
    chunk.extend_from_slice(&(-1i16).to_be_bytes());
    copy.send(chunk).await?;
    copy.finish().await?;
    Ok(())
}

/// Runs `insert` + `values (...), (...)` over `rows`, as many statements as the parameter
/// limit and [`STATEMENT_BYTES`] (by `bytes` per row) ask for; rows keep their order.
async fn run_chunked<'r, R>(
    conn: &mut PgConnection,
    insert: &str,
    rows: &'r [R],
    columns: usize,
    bytes: impl Fn(&R) -> usize,
    bind: impl Fn(sqlx::query_builder::Separated<'_, Postgres, &'static str>, &'r R) + Copy,
) -> Result<(), StoreError> {
    let mut start = 0;
    while start < rows.len() {
        let mut end = start;
        let mut size = 0;
        while end < rows.len()
            && (end - start + 1) * columns <= MAX_PARAMETERS
            && (end == start || size + bytes(&rows[end]) <= STATEMENT_BYTES)
        {
            size += bytes(&rows[end]);
            end += 1;
        }
        let mut builder: QueryBuilder<Postgres> = QueryBuilder::new(insert);
        builder.push_values(&rows[start..end], bind);
        builder.build().execute(&mut *conn).await?;
        start = end;
    }
    Ok(())
}
