//! The rules that hold a message back instead of opening a ticket: automatic mail that
//! threads nowhere, and loop protection (a sender over `max_tickets_per_sender` within
//! `sender_window`); held messages are kept in quarantine with their raw bytes.

use super::Outcome;
use crate::pipeline::ticket::{NewTicket, TicketRules};
use crate::store::StoreError;
use crate::store::quarantine::{self, Hold, HoldKind, QuarantineInsert};
use crate::store::tickets;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// Holds back a message that was read fine (automatic, or loop protection), inside the
/// caller's transaction.
pub(super) async fn hold_message(
    conn: &mut PgConnection,
    parser: &str,
    (kind, reason): (HoldKind, String),
    ticket: &NewTicket,
    raw: &[u8],
    arrived_at: DateTime<Utc>,
) -> Result<Outcome, StoreError> {
    let sender = ticket.requester_email.as_str();
    let hold = Hold {
        kind,
        reason: &reason,
        sender: (!sender.is_empty()).then_some(sender),
        message_id: Some(&ticket.message.message_id),
        header_only: false,
        arrived_at,
    };
    Ok(
        match quarantine::insert_quarantine(conn, parser, hold, raw).await? {
            QuarantineInsert::Created { id } => Outcome::Held { id, reason },
            QuarantineInsert::Duplicate { id } => Outcome::DuplicateQuarantined { id },
        },
    )
}

/// Why a message that threads nowhere is held instead of opening a ticket: it is
/// automatic, or its sender is over the loop limit.
pub(super) async fn hold_reason(
    conn: &mut PgConnection,
    rules: &TicketRules,
    ticket: &NewTicket,
    arrived_at: DateTime<Utc>,
) -> Result<Option<(HoldKind, String)>, StoreError> {
    // Loop protection counts the sender's tickets that arrived within the window before
    // this message arrived (not before now: a backlog is not a loop).
    let sender = ticket.requester_email.as_str();
    let window = rules.sender_window;
    Ok(if let Some(held) = automatic_hold(ticket) {
        Some(held)
    } else if !sender.is_empty()
        && tickets::recent_tickets_from(conn, &rules.parser, sender, arrived_at, window).await?
            >= i64::from(rules.max_tickets_per_sender)
    {
        Some(loop_hold(conn, rules, sender, arrived_at).await?)
    } else {
        None
    })
}

/// The hold of an automatic message that threads nowhere.
pub(super) fn automatic_hold(ticket: &NewTicket) -> Option<(HoldKind, String)> {
    let reason = ticket.message.automatic_reason.as_ref()?;
    Some((
        HoldKind::Automatic,
        format!("automatic message that answers no ticket: {reason}"),
    ))
}

/// The hold of a message from a sender over the loop limit; warns once per loop (when no
/// loop hold of this sender is recorded within the window yet).
pub(super) async fn loop_hold(
    conn: &mut PgConnection,
    rules: &TicketRules,
    sender: &str,
    arrived_at: DateTime<Utc>,
) -> Result<(HoldKind, String), StoreError> {
    let window = rules.sender_window;
    if !quarantine::loop_recorded_since(conn, &rules.parser, sender, arrived_at, window).await? {
        tracing::warn!(parser = %rules.parser, sender, window_s = window.as_secs(),
            max = rules.max_tickets_per_sender, "loop protection: holding back new tickets from this sender");
    }
    Ok((
        HoldKind::Loop,
        format!(
            "loop protection: {sender} opened {} tickets that arrived within {} s",
            rules.max_tickets_per_sender,
            window.as_secs()
        ),
    ))
}
