//! The rules that hold a message back instead of opening a ticket: automatic mail that
//! threads nowhere, and loop protection (a sender over `max_tickets_per_sender` within
//! `sender_window`); held messages are kept in quarantine with their raw bytes.

use super::Outcome;
use crate::pipeline::ticket::{NewTicket, TicketRules};
use crate::store::StoreError;
use crate::store::quarantine::{self, Hold, HoldKind, QuarantineInsert};
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
