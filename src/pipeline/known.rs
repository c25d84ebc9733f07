//! What a batch knows of the messages stored before it, read in one query.

use crate::pipeline::Decision;
use crate::store::StoreError;
use crate::store::tickets;
use sqlx::PgConnection;

/// What the batch knows of stored messages, Message-ID to ticket: read for the whole
/// batch in one query (its messages' own Message-IDs and every one they refer to); what
/// the batch itself stores is kept beside it (see `bulk`).
pub(super) struct Known(std::collections::HashMap<String, i64>);

impl Known {
    /// Reads what the messages of `decisions` need.
    pub(super) async fn read(
        conn: &mut PgConnection,
        parser: &str,
        decisions: &[Option<Decision>],
    ) -> Result<Known, StoreError> {
        let mut ids: Vec<&str> = Vec::new();
        for decision in decisions {
            if let Some(Decision::Ticket(ticket)) = decision {
                ids.push(&ticket.message.message_id);
                ids.extend(ticket.thread_refs.iter().map(String::as_str));
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(Known(tickets::message_tickets(conn, parser, &ids).await?))
    }

    /// The ticket holding `message_id`, if it is stored.
    pub(super) fn ticket_of(&self, message_id: &str) -> Option<i64> {
        self.0.get(message_id).copied()
    }
}
