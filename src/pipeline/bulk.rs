//! Storing a whole batch with a few statements: the rules of the module doc applied to
//! every message in memory (what is stored already and the senders' recent tickets are
//! read once for the batch), then the new tickets and messages written together
//! ([`crate::store::batch_rows`]).
//!
//! The outcome is the same as storing the messages one by one in order: a message
//! threads onto, or duplicates, one stored earlier in the same batch; loop protection
//! counts the tickets the batch opens. Quarantine and hold rows (rare) are written as
//! their messages come.

use super::holds::{automatic_hold, hold_message, loop_hold};
use super::{
    Decision, Incoming, Outcome, Pipeline, kept_raw, known::Known, quarantine_event, quarantine_raw,
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

/// A batch decided in memory: what becomes of each message, and the new rows.
#[derive(Default)]
struct Plan<'a> {
    planned: Vec<Planned>,
    /// The tickets the batch opens, with the arrival of their first message.
    opened: Vec<(&'a NewTicket, DateTime<Utc>)>,
    messages: Vec<PendingMessage<'a>>,
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
    let plan = plan(tx, pipeline, items, decisions).await?;
    let (ticket_ids, message_ids) = plan.write(tx).await?;
    Ok(plan.outcomes(&ticket_ids, &message_ids, events))
}

/// Applies the rules to every message in order; quarantine and hold rows are written
/// as their messages come, the rest is planned.
async fn plan<'a>(
    tx: &mut PgConnection,
    pipeline: &Pipeline,
    items: &[Incoming<'a>],
    decisions: &'a [Option<Decision>],
) -> Result<Plan<'a>, StoreError> {
    let parser = &pipeline.rules.parser;
    let mut planner = Planner {
        known: Known::read(tx, parser, decisions).await?,
        senders: SenderTickets::read(tx, pipeline, items, decisions).await?,
        in_batch: HashMap::new(),
        plan: Plan::default(),
    };
    for (item, decision) in items.iter().zip(decisions) {
        let planned = match decision {
            Some(decision @ Decision::Ticket(ticket)) => {
                let arrived_at = item.arrival.resolve(decision);
                planner
                    .ticket(tx, pipeline, ticket, item.raw, arrived_at)
                    .await?
            }
            _ => Planned::Done(quarantine_item(tx, parser, item, decision).await?),
        };
        planner.plan.planned.push(planned);
    }
    Ok(planner.plan)
}

/// Quarantines a message that is not a ticket: unreadable, or only its header was read.
async fn quarantine_item(
    tx: &mut PgConnection,
    parser: &str,
    item: &Incoming<'_>,
    decision: &Option<Decision>,
) -> Result<Outcome, StoreError> {
    let (reason, header_only) = match decision {
        Some(Decision::Quarantine(reason)) => (reason.clone(), false),
        _ => (item.header_only.unwrap_or_default().to_string(), true),
    };
    let arrived_at = item.arrival.resolve(&Decision::Quarantine(reason.clone()));
    quarantine_raw(tx, parser, reason, item.raw, header_only, arrived_at).await
}

/// The state of planning a batch: what is stored, what the batch stores, who opened
/// tickets lately.
struct Planner<'a> {
    known: Known,
    senders: SenderTickets,
    /// The messages this batch stores, by Message-ID.
    in_batch: HashMap<&'a str, Target>,
    plan: Plan<'a>,
}

impl<'a> Planner<'a> {
    /// The ticket holding `message_id`: stored by this batch or before it.
    fn lookup(&self, message_id: &str) -> Option<Target> {
        let stored = || self.known.ticket_of(message_id).map(Target::Stored);
        self.in_batch.get(message_id).copied().or_else(stored)
    }

    /// The rules for one readable message, in the order of the module doc.
    async fn ticket(
        &mut self,
        tx: &mut PgConnection,
        pipeline: &Pipeline,
        ticket: &'a NewTicket,
        raw: &'a [u8],
        arrived_at: DateTime<Utc>,
    ) -> Result<Planned, StoreError> {
        let parser = &pipeline.rules.parser;
        let message_id = ticket.message.message_id.as_str();
        if let Some(target) = self.lookup(message_id) {
            return Ok(Planned::Duplicate(target));
        }
        let mut thread = ticket.thread_refs.iter().find_map(|r| self.lookup(r));
        if let (None, Some(tagged)) = (thread, ticket.tagged_ticket) {
            let found = tickets::tagged_ticket(tx, parser, tagged).await?;
            thread = found.map(Target::Stored);
        }
        let kept = kept_raw(pipeline, ticket, raw);
        if let Some(target) = thread {
            self.in_batch.insert(message_id, target);
            let message = self.message(target, ticket, kept, arrived_at, false);
            return Ok(Planned::Appended(target, message));
        }
        let sender = ticket.requester_email.as_str();
        let held = match automatic_hold(ticket) {
            Some(held) => Some(held),
            None if self.senders.over_limit(pipeline, sender, arrived_at) => {
                Some(loop_hold(tx, &pipeline.rules, sender, arrived_at).await?)
            }
            None => None,
        };
        if let Some(held) = held {
            let held = hold_message(tx, parser, held, ticket, raw, arrived_at).await?;
            return Ok(Planned::Done(held));
        }
        self.senders.opened(sender, arrived_at);
        let opened = self.plan.opened.len();
        self.plan.opened.push((ticket, arrived_at));
        self.in_batch.insert(message_id, Target::New(opened));
        let message = self.message(Target::New(opened), ticket, kept, arrived_at, true);
        Ok(Planned::Created(opened, message))
    }

    /// Plans a new message row; its index among the batch's new messages.
    fn message(
        &mut self,
        target: Target,
        ticket: &'a NewTicket,
        raw: Option<&'a [u8]>,
        arrived_at: DateTime<Utc>,
        opens: bool,
    ) -> usize {
        self.plan.messages.push(PendingMessage {
            target,
            ticket,
            raw,
            arrived_at,
            opens,
        });
        self.plan.messages.len() - 1
    }
}

impl Plan<'_> {
    /// Takes the ids of the new rows and writes them; the ticket and message ids.
    async fn write(&self, tx: &mut PgConnection) -> Result<(Vec<i64>, Vec<i64>), StoreError> {
        if self.messages.is_empty() {
            return Ok(Default::default());
        }
        let (ticket_ids, message_ids) =
            batch_rows::allocate_ids(tx, self.opened.len(), self.messages.len()).await?;
        let tickets: Vec<TicketRow> = (self.opened.iter().zip(&ticket_ids))
            .map(|(&(ticket, arrived_at), &id)| TicketRow {
                id,
                ticket,
                arrived_at,
            })
            .collect();
        let messages: Vec<MessageRow> = (self.messages.iter().zip(&message_ids))
            .map(|(m, &id)| MessageRow {
                id,
                ticket_id: ticket_id(m.target, &ticket_ids),
                ticket: m.ticket,
                raw: m.raw,
                arrived_at: m.arrived_at,
                appended: !m.opens,
            })
            .collect();
        batch_rows::insert(tx, &tickets, &messages).await?;
        Ok((ticket_ids, message_ids))
    }

    /// The outcomes in input order, their events queued in the same order.
    fn outcomes(self, tickets: &[i64], messages: &[i64], events: &mut Vec<Queued>) -> Vec<Outcome> {
        let ticket_id = |target| ticket_id(target, tickets);
        let outcome = |planned| match planned {
            Planned::Done(outcome) => {
                let event = quarantine_event(&outcome);
                (outcome, event)
            }
            Planned::Duplicate(target) => (
                Outcome::Duplicate {
                    ticket_id: ticket_id(target),
                },
                None,
            ),
            Planned::Created(ticket, message) => (
                Outcome::Created {
                    ticket_id: tickets[ticket],
                },
                Some(Queued::Message("ticket.created", messages[message])),
            ),
            Planned::Appended(target, message) => (
                Outcome::Appended {
                    ticket_id: ticket_id(target),
                },
                Some(Queued::Message("ticket.message_added", messages[message])),
            ),
        };
        (self.planned.into_iter().map(outcome))
            .map(|(outcome, event)| {
                events.extend(event);
                outcome
            })
            .collect()
    }
}

/// The id of a target ticket, `opened` being the ids of the tickets the batch opens.
fn ticket_id(target: Target, opened: &[i64]) -> i64 {
    match target {
        Target::Stored(id) => id,
        Target::New(n) => opened[n],
    }
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
    /// window before `at`.
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
