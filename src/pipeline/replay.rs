//! Quarantine replay: a held or quarantined message pushed through the current rules of
//! its parser, exactly once.

use crate::pipeline::{Arrival, Incoming, Outcome, Pipeline, store_batch};
use crate::store::StoreError;
use crate::store::quarantine;
use sqlx::PgPool;

/// What a replay of one quarantine row did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Stored through the current pipeline (the row is marked replayed).
    Stored(Outcome),
    /// The current pipeline would keep it in quarantine again: nothing changed.
    StillHeld,
    /// Not replayable (already replayed, header only, unknown parser, no such row).
    Skipped(String),
}

/// Pushes one quarantine row through the current pipeline of its parser, exactly once:
/// the row is locked, and marked replayed in the transaction that stores the message.
pub async fn replay(
    pool: &PgPool,
    pipelines: &std::collections::HashMap<String, Pipeline>,
    id: i64,
) -> Result<Replay, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(row) = quarantine::lock_quarantined(&mut tx, id).await? else {
        return Ok(Replay::Skipped(format!("no quarantine row #{id}")));
    };
    if row.replayed {
        return Ok(Replay::Skipped("already replayed".into()));
    }
    if row.header_only {
        return Ok(Replay::Skipped(
            "only the header was kept (too large, or the server never returned it); the message is still in the mailbox"
                .into(),
        ));
    }
    let Some(pipeline) = pipelines.get(&row.parser) else {
        return Ok(Replay::Skipped(format!(
            "parser {:?} is not in the configuration",
            row.parser
        )));
    };
    let item = Incoming::whole(&row.raw, Arrival::At(row.arrived_at));
    let outcome = store_batch(&mut tx, pipeline, &[item]).await?.remove(0);
    let description = match &outcome {
        Outcome::Created { ticket_id } => format!("created ticket {ticket_id}"),
        Outcome::Appended { ticket_id } => format!("appended to ticket {ticket_id}"),
        Outcome::Duplicate { ticket_id } => format!("already in ticket {ticket_id}"),
        Outcome::Quarantined { .. }
        | Outcome::Held { .. }
        | Outcome::DuplicateQuarantined { .. } => {
            return Ok(Replay::StillHeld);
        }
    };
    quarantine::mark_replayed(&mut tx, id, &description).await?;
    tx.commit().await?;
    Ok(Replay::Stored(outcome))
}
