//! Where mail comes from: the [`MailSource`] seam the per-mailbox loop drives, and its
//! implementations. `imap` is the only code that speaks IMAP.
//!
//! A source knows its protocol: how to open a session, what is pending after a cursor, how
//! to fetch a message (or only its header), how to settle a committed message on the
//! server (`after`), and how to wait for news. It knows nothing of the database: the
//! exactly-once rules (the cursor moves only with its rows, server side effects only after
//! the commit, failed-fetch isolation and give-up) live once, in `runtime::mailbox`.
//! A new source implements the two traits here and is chosen in `runtime::supervisor`.

pub mod graph;
pub mod imap;

use crate::auth::AuthError;
use crate::store::mailbox::Backlog;
use chrono::{DateTime, Utc};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A position in a mailbox: every message before it is stored or quarantined. Opaque to
/// the loop, which only hands it to the store in the transaction of the rows it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// IMAP: the folder's UIDVALIDITY, the last UID covered, and what `start_at` chose at
    /// first contact.
    Imap {
        /// UIDVALIDITY when `last_uid` was recorded.
        uidvalidity: i64,
        /// Every UID up to this one is done.
        last_uid: i64,
        /// The first-contact choice, while `last_uid` is below its end.
        backlog: Option<Backlog>,
    },
    /// Microsoft Graph: where the delta round goes on, and when the mailbox was first met.
    Graph {
        /// The `@odata.nextLink` or `@odata.deltaLink` to resume from; `None` starts a round
        /// from the beginning (first contact, or after `410 Gone`).
        link: Option<String>,
        /// When mail2ticket first met the folder: `start_at` decides about older mail.
        first_contact_at: DateTime<Utc>,
    },
}

/// A message waiting in the mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Identifies the message in the source (IMAP: its UID; Graph: its immutable id);
    /// failed fetches are counted against it.
    pub key: String,
    /// Its size in bytes, as the server reports it (0: unknown until downloaded).
    pub size: u64,
    /// Its Message-ID (normalized, without brackets), when the source knows it before
    /// downloading: a message already stored is then not downloaded again.
    pub message_id: Option<String>,
    /// When the server received it (loop protection counts by it), if known.
    pub arrived: Option<DateTime<Utc>>,
    /// Where it is, for people (IMAP: folder, UID and UIDVALIDITY).
    pub location: String,
    /// The cursor once this message (and every one before it) is done.
    pub after: Cursor,
}

/// A downloaded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Its raw bytes.
    Whole(Vec<u8>),
    /// The download passed the size limit and was cut off (sources that cannot tell the
    /// size before downloading); only the header is kept.
    TooLarge {
        /// Bytes received before the cut.
        at_least: u64,
    },
}

/// What a session found pending.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The messages to read, in order.
    pub pending: Vec<Pending>,
    /// A cursor to save before reading (first contact, or a reset such as a UIDVALIDITY
    /// change); `None` when the saved cursor still holds.
    pub save_first: Option<Cursor>,
    /// A cursor to save once every pending message is done (Graph: the round's
    /// `deltaLink`, past messages that were not taken); `None` when the last message's
    /// cursor says all.
    pub save_after: Option<Cursor>,
    /// What `start_at` decided, when this was the first contact.
    pub first_contact: Option<crate::source::imap::first_contact::FirstContact>,
}

/// What ended a wait for news.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// The server reported a change, or the poll interval passed: look again.
    Changed,
    /// The session must be renewed (its token is about to expire).
    Renew,
    /// Cancellation.
    Cancelled,
}

/// Why a source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No token.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// IMAP failed.
    #[error(transparent)]
    Imap(#[from] imap::ImapError),
    /// Microsoft Graph failed.
    #[error(transparent)]
    Graph(#[from] graph::GraphError),
}

impl SourceError {
    /// How long the other side asked us to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Auth(e) => e.retry_after(),
            SourceError::Imap(_) => None,
            SourceError::Graph(e) => e.retry_after(),
        }
    }

    /// True when the server answered and refused (IMAP NO/BAD, a Graph 4xx other than an
    /// expired token): asking again the same way will not help.
    pub fn is_refusal(&self) -> bool {
        match self {
            SourceError::Imap(e) => matches!(e, imap::ImapError::Command { .. }),
            SourceError::Graph(graph::GraphError::Api { status, .. }) => {
                (400..500).contains(status) && *status != 401
            }
            _ => false,
        }
    }
}

/// One mailbox reached through some protocol.
pub trait MailSource: Send + Sync {
    /// An open session.
    type Session: SourceSession;

    /// The key of this mailbox's cursor in the store (IMAP: the folder).
    fn cursor_key(&self) -> &str;

    /// Opens a session: connect, authenticate, prepare what `settle` needs.
    fn open(&self) -> impl Future<Output = Result<Self::Session, SourceError>> + Send;
}

/// A session with a mailbox.
pub trait SourceSession: Send {
    /// What is pending after `saved` (`None`: the first contact with the mailbox).
    fn list(
        &mut self,
        saved: Option<&Cursor>,
    ) -> impl Future<Output = Result<Listing, SourceError>> + Send;

    /// These messages, in order (each whole, or found over `max_size` bytes while
    /// downloading); fails unless every one comes back.
    fn fetch(
        &mut self,
        messages: &[&Pending],
        max_size: u64,
    ) -> impl Future<Output = Result<Vec<Fetched>, SourceError>> + Send;

    /// The header section of one message (what is kept of one too large to download).
    fn fetch_header(
        &mut self,
        message: &Pending,
    ) -> impl Future<Output = Result<Vec<u8>, SourceError>> + Send;

    /// Applies `after` (mark read, move, delete) to messages whose rows are committed.
    fn settle(
        &mut self,
        messages: &[&Pending],
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Waits for news until the session must be renewed, or cancellation.
    fn wait(
        &mut self,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<WaitEnd, SourceError>> + Send;

    /// Ends the session politely (errors are ignored).
    fn close(self) -> impl Future<Output = ()> + Send;
}
