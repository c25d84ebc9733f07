//! Storing a whole batch with a few statements: the rules of the module doc applied to
//! every message in memory (what is stored already and the senders' recent tickets are
//! read once for the batch), then the new tickets and messages written together
//! ([`store::batch_rows`]).
//!
//! The outcome is the same as storing the messages one by one in order: a message
//! threads onto, or duplicates, one stored earlier in the same batch; loop protection
//! counts the tickets the batch opens. Quarantine and hold rows (rare) are written as
//! their messages come.

use super::{
    Decision, Incoming, Outcome, Pipeline, automatic_hold, hold_message, kept_raw, known::Known,
    loop_hold, quarantine_event, quarantine_raw,
};
use crate::pipeline::ticket::NewTicket;
use crate::store::StoreError;
use crate::store::batch_rows::{self, MessageRow, TicketRow};
use crate::store::events::Queued;
use crate::store::tickets;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::collections::HashMap;

/// The ticket a message belongs to: one stored before, or the `n`th opened by this batch
/// (its id is taken once the batch's rows are counted).
#[derive(Debug, Clone, Copy)]
enum Target {
    Stored(i64),
    New(usize),
}

/// What became of a message, some ticket and message ids still to be taken.
enum Planned {
    Done(Outcome),
    Duplicate(Target),
    /// Opens ticket `.0` with message `.1` (indexes into the batch's new rows).
    Created(usize, usize),
    /// Message `.1` goes to ticket `.0`.
    Appended(Target, usize),
}

/// A new message before its ids are taken.
struct PendingMessage<'a> {
    target: Target,
    ticket: &'a NewTicket,
    raw: Option<&'a [u8]>,
    arrived_at: DateTime<Utc>,
    /// It opens its ticket (else it is appended).
    opens: bool,
}

/// Stores the batch inside the caller's transaction; outcomes in input order, events
/// queued in the same order. An error leaves the transaction to be rolled back (the
/// caller then stores the batch message by message).
pub(super) async fn store(
    tx: &mut PgConnection,
    pipeline: &Pipeline,
    items: &[Incoming<'_>],
    decisions: &[Option<Decision>],
    events: &mut Vec<Queued>,
) -> Result<Vec<Outcome>, StoreError> {
    let parser = &pipeline.rules.parser;
    let known = Known::read(tx, parser, decisions).await?;
    let mut senders = SenderTickets::read(tx, pipeline, items, decisions).await?;
    let mut in_batch: HashMap<&str, Target> = HashMap::new();
    let mut opened: Vec<(&NewTicket, DateTime<Utc>)> = Vec::new();
    let mut messages: Vec<PendingMessage> = Vec::new();
    let mut planned = Vec::with_capacity(items.len());
    for (item, decision) in items.iter().zip(decisions) {
        let ticket = match (decision, item.header_only) {
            (Some(Decision::Ticket(ticket)), _) => ticket,
            (Some(Decision::Quarantine(reason)), _) => {
                let at = item.arrival.resolve(decision.as_ref().expect("matched"));
                let outcome = quarantine_raw(tx, parser, reason.clone(), item.raw, false, at);
                planned.push(Planned::Done(outcome.await?));
                continue;
            }
            (None, reason) => {
                let reason = reason.unwrap_or_default().to_string();
                let at = item.arrival.resolve(&Decision::Quarantine(reason.clone()));
                let outcome = quarantine_raw(tx, parser, reason, item.raw, true, at);
                planned.push(Planned::Done(outcome.await?));
                continue;
            }
        };
        let decision = decision.as_ref().expect("matched");
        let arrived_at = item.arrival.resolve(decision);
        let message_id = ticket.message.message_id.as_str();
        let lookup = |id: &str| {
            (in_batch.get(id).copied()).or_else(|| known.ticket_of(id).map(Target::Stored))
        };
        if let Some(target) = lookup(message_id) {
            planned.push(Planned::Duplicate(target));
            continue;
        }
        let mut thread = ticket.thread_refs.iter().find_map(|r| lookup(r));
        if let (None, Some(tagged)) = (thread, ticket.tagged_ticket) {
            thread = tickets::tagged_ticket(tx, parser, tagged)
                .await?
                .map(Target::Stored);
        }
        let raw = kept_raw(pipeline, ticket, item.raw);
        let message = PendingMessage {
            target: Target::New(opened.len()),
            ticket,
            raw,
            arrived_at,
            opens: true,
        };
        if let Some(target) = thread {
            in_batch.insert(message_id, target);
            planned.push(Planned::Appended(target, messages.len()));
            messages.push(PendingMessage {
                target,
                opens: false,
                ..message
            });
            continue;
        }
        let sender = ticket.requester_email.as_str();
        let held = match automatic_hold(ticket) {
            Some(held) => Some(held),
            None if senders.over_limit(pipeline, sender, arrived_at) => {
                Some(loop_hold(tx, &pipeline.rules, sender, arrived_at).await?)
            }
            None => None,
        };
        if let Some(held) = held {
            let outcome = hold_message(tx, parser, held, ticket, item.raw, arrived_at).await?;
            planned.push(Planned::Done(outcome));
            continue;
        }
        senders.opened(sender, arrived_at);
        in_batch.insert(message_id, Target::New(opened.len()));
        planned.push(Planned::Created(opened.len(), messages.len()));
        opened.push((ticket, arrived_at));
        messages.push(message);
    }
    let (ticket_ids, message_ids) = if messages.is_empty() {
        Default::default()
    } else {
        batch_rows::allocate_ids(tx, opened.len(), messages.len()).await?
    };
    let id_of = |target: Target| match target {
        Target::Stored(id) => id,
        Target::New(n) => ticket_ids[n],
    };
    if !messages.is_empty() {
        let ticket_rows: Vec<TicketRow> = opened
            .iter()
            .zip(&ticket_ids)
            .map(|(&(ticket, arrived_at), &id)| TicketRow {
                id,
                ticket,
                arrived_at,
            })
            .collect();
        let message_rows: Vec<MessageRow> = messages
            .iter()
            .zip(&message_ids)
            .map(|(m, &id)| MessageRow {
                id,
                ticket_id: id_of(m.target),
                ticket: m.ticket,
                raw: m.raw,
                arrived_at: m.arrived_at,
                appended: !m.opens,
            })
            .collect();
        batch_rows::insert(tx, &ticket_rows, &message_rows).await?;
    }
    Ok(planned
        .into_iter()
        .map(|p| {
            let (outcome, event) = match p {
                Planned::Done(outcome) => {
                    let event = quarantine_event(&outcome);
                    (outcome, event)
                }
                Planned::Duplicate(target) => (
                    Outcome::Duplicate {
                        ticket_id: id_of(target),
                    },
                    None,
                ),
                Planned::Created(ticket, message) => (
                    Outcome::Created {
                        ticket_id: ticket_ids[ticket],
                    },
                    Some(Queued::Message("ticket.created", message_ids[message])),
                ),
                Planned::Appended(target, message) => (
                    Outcome::Appended {
                        ticket_id: id_of(target),
                    },
                    Some(Queued::Message(
                        "ticket.message_added",
                        message_ids[message],
                    )),
                ),
            };
            events.extend(event);
            outcome
        })
        .collect())
}

/// Loop protection for a batch: when each sender's tickets arrived, read once for the
/// batch's time span and kept current as the batch opens tickets.
struct SenderTickets(HashMap<String, Vec<DateTime<Utc>>>);

impl SenderTickets {
    async fn read(
        conn: &mut PgConnection,
        pipeline: &Pipeline,
        items: &[Incoming<'_>],
        decisions: &[Option<Decision>],
    ) -> Result<SenderTickets, StoreError> {
        let window = window(pipeline);
        let mut senders: Vec<&str> = Vec::new();
        let mut span: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
        for (item, decision) in items.iter().zip(decisions) {
            if let Some(decision @ Decision::Ticket(ticket)) = decision
                && !ticket.requester_email.is_empty()
            {
                senders.push(&ticket.requester_email);
                let at = item.arrival.resolve(decision);
                span = Some(span.map_or((at, at), |(lo, hi)| (lo.min(at), hi.max(at))));
            }
        }
        let Some((first, last)) = span else {
            return Ok(SenderTickets(HashMap::new()));
        };
        senders.sort_unstable();
        senders.dedup();
        let parser = &pipeline.rules.parser;
        let after = since(first, window);
        let arrivals = tickets::ticket_arrivals(conn, parser, &senders, after, last);
        Ok(SenderTickets(arrivals.await?))
    }

    /// True when `sender` opened `max_tickets_per_sender` tickets that arrived within the
    /// window before `at` (as [`tickets::recent_tickets_from`] counts).
    fn over_limit(&self, pipeline: &Pipeline, sender: &str, at: DateTime<Utc>) -> bool {
        if sender.is_empty() {
            return false;
        }
        let after = since(at, window(pipeline));
        let recent = self.0.get(sender).map_or(0, |arrivals| {
            arrivals.iter().filter(|&&t| t > after && t <= at).count()
        });
        recent >= pipeline.rules.max_tickets_per_sender as usize
    }

    /// Notes a ticket the batch opens.
    fn opened(&mut self, sender: &str, at: DateTime<Utc>) {
        if !sender.is_empty() {
            self.0.entry(sender.to_string()).or_default().push(at);
        }
    }
}

/// The loop-protection window.
fn window(pipeline: &Pipeline) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(pipeline.rules.sender_window).unwrap_or(chrono::TimeDelta::MAX)
}

/// The start of the window that ends at `at` (the epoch for a window longer than time).
fn since(at: DateTime<Utc>, window: chrono::TimeDelta) -> DateTime<Utc> {
    at.checked_sub_signed(window)
        .unwrap_or(DateTime::UNIX_EPOCH)
}
