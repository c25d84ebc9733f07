//! Settling on the server (`after`: mark read, move, delete), and the settle a commit
//! still owes.
//!
//! A batch is settled only after its commit, so a crash, a cut connection or a refused
//! command between the two would leave committed messages unsettled for good (the cursor
//! is past them): still unread, or still in the folder with `after = "move"`. The commit
//! therefore records the keys it owes a settle (`mailbox_state.unsettled`), a successful
//! settle forgets them, and each pass first settles what is still recorded, provided the
//! saved cursor holds (after a UIDVALIDITY change or a first contact the recorded UIDs
//! name other messages, or none, and the record is dropped with the reset).

use super::{PollError, Poller};
use crate::config::AfterIngest;
use crate::runtime::batch::FetchedBatch;
use crate::source::{Cursor, MailSource, Pending, SourceSession};
use crate::store::mailbox;

impl<S: MailSource> Poller<S> {
    /// Settles a committed batch on the server: only now, with its rows committed, may its
    /// messages leave the "new" state. Those kept only by their header stay untouched.
    pub(super) async fn settle(
        &self,
        session: &mut S::Session,
        fetched: &FetchedBatch<'_>,
    ) -> Result<(), PollError> {
        let done = self.owed(fetched);
        if done.is_empty() {
            return Ok(());
        }
        session.settle(&done).await?;
        let keys: Vec<&str> = done.iter().map(|m| m.key.as_str()).collect();
        self.forget(&keys).await
    }

    /// The messages of a committed batch to settle: none with `after = "none"`, else
    /// those not kept only by their header.
    pub(super) fn owed<'p>(&self, fetched: &FetchedBatch<'p>) -> Vec<&'p Pending> {
        match self.parser.after {
            AfterIngest::Nothing => Vec::new(),
            _ => fetched.settled(),
        }
    }

    /// Settles the messages an earlier pass committed and did not get to settle (`keys`,
    /// under the saved `cursor`, which still holds). A server that refuses the settle (a
    /// NO to the MOVE, a 4xx from Graph) is reported and not asked again, so that new
    /// mail keeps flowing; a lost connection ends the pass and the next one tries again.
    pub(super) async fn settle_owed(
        &self,
        session: &mut S::Session,
        keys: &[String],
        cursor: &Cursor,
    ) -> Result<(), PollError> {
        let owed: Vec<Pending> = keys.iter().map(|key| owed_message(key, cursor)).collect();
        let refs: Vec<&Pending> = owed.iter().collect();
        match session.settle(&refs).await {
            Ok(()) => tracing::info!(
                messages = keys.len(),
                "settled messages committed before the last pass was interrupted"
            ),
            Err(e) if e.is_refusal() => tracing::error!(
                messages = keys.len(),
                error = %e,
                "the server refused to settle messages committed before the last pass was interrupted; they stay as they are"
            ),
            Err(e) => return Err(e.into()),
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.forget(&keys).await
    }

    /// Clears the record of `keys` owed a settle.
    async fn forget(&self, keys: &[&str]) -> Result<(), PollError> {
        let mut conn = self.pool.acquire().await?;
        let key = self.source.cursor_key();
        mailbox::forget_unsettled(&mut conn, &self.parser.name, key, keys).await?;
        Ok(())
    }
}

/// A message owed a settle, as the source's `settle` takes it: only its key counts.
fn owed_message(key: &str, cursor: &Cursor) -> Pending {
    Pending {
        key: key.to_owned(),
        size: 0,
        message_id: None,
        arrived: None,
        location: format!("committed earlier, key {key}"),
        after: cursor.clone(),
    }
}
