//! What a batch knows of the messages stored before it, read in one query.

use crate::pipeline::{Decision, Outcome};
use crate::store::StoreError;
use crate::store::tickets;
use sqlx::PgConnection;

/// What the batch knows of stored messages, Message-ID to ticket: read for the whole
/// batch in one query (its messages' own Message-IDs and every one they refer to) and kept
/// current as the batch stores messages, so that a duplicate within the batch is caught and
/// a reply threads onto a message stored earlier in the same batch.
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

    /// The ticket of the first of `refs` that is stored (they come newest first).
    pub(super) fn thread(&self, refs: &[String]) -> Option<i64> {
        refs.iter().find_map(|r| self.ticket_of(r))
    }

    /// Notes a message just stored.
    pub(super) fn stored(&mut self, message_id: &str, outcome: &Outcome) {
        if let Outcome::Created { ticket_id } | Outcome::Appended { ticket_id } = outcome {
            self.0.insert(message_id.to_string(), *ticket_id);
        }
    }
}
