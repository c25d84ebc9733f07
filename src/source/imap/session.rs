//! The commands of a logged-in IMAP session (SELECT, UID SEARCH/FETCH/STORE, MOVE,
//! IDLE), each with a timeout, each checked against what async-imap gets wrong (see
//! [`super::client`]). Folder names go out in modified UTF-7 ([`super::folder_name`]).

use super::client::{COMMAND_TIMEOUT, ImapError, Stream, command_error, timed};
use super::folder_name::to_wire;
use async_imap::Session;
use async_imap::imap_proto::{AttributeValue, MailboxDatum, Response, Status};
use async_imap::types::{Fetch, UnsolicitedResponse};
use futures::TryStreamExt;
use std::time::Duration;

/// A selected folder's identity and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderStatus {
    /// UIDVALIDITY: when it changes, every UID in the folder is new.
    pub uid_validity: u32,
    /// The next UID the server will assign, when it says.
    pub uid_next: Option<u32>,
    /// Messages in the folder.
    pub exists: u32,
}

/// What ended an IDLE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleEnd {
    /// The server reported a change (new mail, expunge, flags).
    Changed,
    /// Our time limit passed (re-IDLE or renew the session).
    TimedOut,
    /// We were asked to stop.
    Cancelled,
}

/// A message waiting on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    /// Its UID.
    pub uid: u32,
    /// RFC822.SIZE in bytes (what a download costs).
    pub size: u32,
    /// INTERNALDATE: when the server received it (loop protection counts by it).
    pub arrived: Option<chrono::DateTime<chrono::Utc>>,
}

/// A logged-in IMAP session.
pub struct ImapSession {
    session: Session<Stream>,
    user: String,
    /// The server announced new mail (`* n EXISTS`) in the answer to some command since
    /// [`Self::take_news`] was last called. The server announces a message once: a wait
    /// that began IDLE without looking here would sleep through mail that arrived while
    /// the last pass was storing (Dovecot does not repeat the EXISTS when IDLE begins).
    news: bool,
}

impl ImapSession {
    /// A session logged in as `user` (made by [`super::client::Connection::login`]).
    pub(super) fn new(session: Session<Stream>, user: String) -> Self {
        ImapSession {
            session,
            user,
            news: false,
        }
    }

    /// True when the server announced new mail since the last call (see `news`).
    pub fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }

    /// SELECTs a folder.
    pub async fn select(&mut self, folder: &str) -> Result<FolderStatus, ImapError> {
        let result =
            tokio::time::timeout(COMMAND_TIMEOUT, self.session.select(to_wire(folder))).await;
        let mailbox = match result {
            Err(_) => {
                return Err(ImapError::Timeout {
                    step: "SELECT",
                    after: COMMAND_TIMEOUT,
                });
            }
            Ok(Ok(m)) => m,
            Ok(Err(
                async_imap::error::Error::Bad(reason) | async_imap::error::Error::No(reason),
            )) if reason.to_ascii_lowercase().contains("not connected") => {
                return Err(ImapError::NotConnected {
                    user: self.user.clone(),
                    reason,
                });
            }
            Ok(Err(
                async_imap::error::Error::Bad(reason) | async_imap::error::Error::No(reason),
            )) => {
                return Err(ImapError::Select {
                    folder: folder.to_string(),
                    reason,
                });
            }
            Ok(Err(e)) => return Err(command_error("SELECT", e)),
        };
        self.drain_unsolicited()?;
        let uid_validity = mailbox.uid_validity.ok_or_else(|| ImapError::Select {
            folder: folder.to_string(),
            reason: "the server sent no UIDVALIDITY".into(),
        })?;
        Ok(FolderStatus {
            uid_validity,
            uid_next: mailbox.uid_next,
            exists: mailbox.exists,
        })
    }

    /// The messages with UID >= `from`, in UID order.
    pub async fn pending_from(&mut self, from: u32) -> Result<Vec<Listed>, ImapError> {
        let from = from.max(1);
        let mut listed = self.pending_in(&format!("{from}:*")).await?;
        // `n:*` always includes the last message, even when its UID is below n.
        listed.retain(|p| p.uid >= from);
        Ok(listed)
    }

    /// The messages in a UID set (`"3,7,10:*"`), in UID order: UID, RFC822.SIZE and
    /// INTERNALDATE. A `n:*` range also returns the last message when n is past it: the
    /// caller filters.
    pub async fn pending_in(&mut self, set: &str) -> Result<Vec<Listed>, ImapError> {
        let mut listed = Vec::new();
        let command = format!("UID FETCH {set} (UID RFC822.SIZE INTERNALDATE)");
        self.run_checked(
            "UID FETCH (RFC822.SIZE INTERNALDATE)",
            command,
            |response| {
                if let Response::Fetch(_, attributes) = response {
                    listed.extend(listed_from(attributes));
                }
            },
        )
        .await?;
        // A flag change announced meanwhile comes as a FETCH too: keep the listing's entry.
        listed.sort_unstable_by_key(|p| (p.uid, std::cmp::Reverse(p.size)));
        listed.dedup_by_key(|p| p.uid);
        Ok(listed)
    }

    /// `UID SEARCH` with `criteria` (`"UNSEEN"`, `"SINCE 1-Nov-2026"`): the UIDs, sorted.
    /// A refused or cut search is an error, never "nothing found" (at first contact that
    /// would skip the folder's unread mail for good).
    pub async fn search(&mut self, criteria: &str) -> Result<Vec<u32>, ImapError> {
        let mut uids = Vec::new();
        let command = format!("UID SEARCH {criteria}");
        self.run_checked("UID SEARCH", command, |response| {
            if let Response::MailboxData(MailboxDatum::Search(found)) = response {
                uids.extend(found);
            }
        })
        .await?;
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }

    /// The raw bytes of these messages (BODY.PEEK[], so \Seen is not set), in UID order.
    /// Fails when the server returns fewer than asked.
    pub async fn fetch(&mut self, uids: &[u32]) -> Result<Vec<(u32, Vec<u8>)>, ImapError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let set = uid_set(uids);
        let fetches: Vec<Fetch> = timed("UID FETCH (BODY.PEEK[])", async {
            self.session
                .uid_fetch(&set, "(UID BODY.PEEK[])")
                .await?
                .try_collect()
                .await
        })
        .await?;
        self.drain_unsolicited()?;
        let mut bodies: Vec<(u32, Vec<u8>)> = fetches
            .iter()
            .filter_map(|f| Some((f.uid?, f.body()?.to_vec())))
            .filter(|(uid, _)| uids.binary_search(uid).is_ok())
            .collect();
        bodies.sort_unstable_by_key(|(uid, _)| *uid);
        bodies.dedup_by_key(|(uid, _)| *uid);
        if bodies.len() != uids.len() {
            return Err(ImapError::ShortFetch {
                asked: uids.len(),
                got: bodies.len(),
            });
        }
        Ok(bodies)
    }

    /// The header section of one message (BODY.PEEK[HEADER]): what is kept of a message too
    /// large to download.
    pub async fn fetch_header(&mut self, uid: u32) -> Result<Vec<u8>, ImapError> {
        let set = uid.to_string();
        let fetches: Vec<Fetch> = timed("UID FETCH (BODY.PEEK[HEADER])", async {
            self.session
                .uid_fetch(&set, "(UID BODY.PEEK[HEADER])")
                .await?
                .try_collect()
                .await
        })
        .await?;
        self.drain_unsolicited()?;
        fetches
            .iter()
            .find(|f| f.uid == Some(uid))
            .and_then(|f| f.header().map(<[u8]>::to_vec))
            .ok_or(ImapError::ShortFetch { asked: 1, got: 0 })
    }

    /// Adds `\Seen` to these messages.
    pub async fn mark_seen(&mut self, uids: &[u32]) -> Result<(), ImapError> {
        self.store_flags(uids, "+FLAGS.SILENT (\\Seen)").await
    }

    /// Creates `folder` unless it exists (the target of `after = "move:..."`).
    pub async fn ensure_folder(&mut self, folder: &str) -> Result<(), ImapError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, self.session.create(to_wire(folder))).await {
            Err(_) => Err(ImapError::Timeout {
                step: "CREATE",
                after: COMMAND_TIMEOUT,
            }),
            // NO: it exists already (servers word this differently; a real problem shows at MOVE).
            Ok(Ok(())) | Ok(Err(async_imap::error::Error::No(_))) => self.drain_unsolicited(),
            Ok(Err(e)) => Err(command_error("CREATE", e)),
        }
    }

    /// Moves these messages to `folder` (MOVE, or COPY + delete when MOVE is missing).
    pub async fn move_to(&mut self, uids: &[u32], folder: &str) -> Result<(), ImapError> {
        if uids.is_empty() {
            return Ok(());
        }
        let set = uid_set(uids);
        let caps = timed("CAPABILITY", self.session.capabilities()).await?;
        if caps.has_str("MOVE") {
            timed("UID MOVE", self.session.uid_mv(&set, to_wire(folder))).await?;
        } else {
            timed("UID COPY", self.session.uid_copy(&set, to_wire(folder))).await?;
            self.delete(uids).await?;
        }
        self.drain_unsolicited()
    }

    /// Marks these messages `\Deleted` and expunges them (only them, with UIDPLUS).
    pub async fn delete(&mut self, uids: &[u32]) -> Result<(), ImapError> {
        if uids.is_empty() {
            return Ok(());
        }
        self.store_flags(uids, "+FLAGS.SILENT (\\Deleted)").await?;
        let set = uid_set(uids);
        let caps = timed("CAPABILITY", self.session.capabilities()).await?;
        if caps.has_str("UIDPLUS") {
            let command = format!("UID EXPUNGE {set}");
            self.run_checked("UID EXPUNGE", command, |_| {}).await
        } else {
            self.run_checked("EXPUNGE", "EXPUNGE".into(), |_| {}).await
        }
    }

    async fn store_flags(&mut self, uids: &[u32], change: &str) -> Result<(), ImapError> {
        if uids.is_empty() {
            return Ok(());
        }
        let set = uid_set(uids);
        let command = format!("UID STORE {set} {change}");
        self.run_checked("UID STORE", command, |_| {}).await
    }

    /// Runs `command` and reads its answer through its tagged status, which must be OK;
    /// `take` sees every untagged response on the way (an EXISTS there is also news, a BYE
    /// a lost connection).
    ///
    /// Written here rather than taken from async-imap: its `uid_fetch`, `uid_search`,
    /// `uid_store` and `expunge` stop at the tagged answer without looking at it, and end
    /// quietly when the server closes the connection, so a refused or cut command reads as
    /// success with less data (upstream #95; the connection-cutting tests showed a cut
    /// `UID STORE` passing as done, and a cut `UID SEARCH` as "nothing found").
    async fn run_checked(
        &mut self,
        step: &'static str,
        command: String,
        mut take: impl FnMut(&Response<'_>) + Send,
    ) -> Result<(), ImapError> {
        use async_imap::error::Error;
        let mut news = false;
        let session = &mut self.session;
        let answer = async {
            let id = session.run_command(&command).await?;
            loop {
                let Some(response) = session.read_response().await? else {
                    return Err(Error::ConnectionLost);
                };
                match response.parsed() {
                    Response::Done {
                        tag,
                        status,
                        outcome,
                    } if *tag == id => {
                        let words = || outcome.information.as_deref().unwrap_or("").to_string();
                        return match status {
                            Status::Ok => Ok(()),
                            Status::No => Err(Error::No(words())),
                            _ => Err(Error::Bad(words())),
                        };
                    }
                    Response::Data {
                        status: Status::Bye,
                        ..
                    } => return Err(Error::ConnectionLost),
                    Response::MailboxData(MailboxDatum::Exists(_)) => news = true,
                    other => take(other),
                }
            }
        };
        timed(step, answer).await?;
        self.news |= news;
        self.drain_unsolicited()
    }

    /// Whether the server offers IDLE.
    pub async fn supports_idle(&mut self) -> Result<bool, ImapError> {
        let caps = timed("CAPABILITY", self.session.capabilities()).await?;
        Ok(caps.has_str("IDLE"))
    }

    /// Waits in IDLE until the server reports a change, `limit` passes, or `cancel` fires.
    pub async fn idle(
        self,
        limit: Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(ImapSession, IdleEnd), ImapError> {
        let ImapSession {
            session,
            user,
            news: _,
        } = self;
        let mut handle = session.idle();
        timed("IDLE", handle.init()).await?;
        let end = {
            // The inner timeout restarts at each "still here"; the outer one bounds the whole wait.
            let (wait, _stop) = handle.wait_with_timeout(limit);
            tokio::select! {
                result = tokio::time::timeout(limit, wait) => match result {
                    Err(_) | Ok(Ok(async_imap::extensions::idle::IdleResponse::Timeout)) => IdleEnd::TimedOut,
                    Ok(Ok(async_imap::extensions::idle::IdleResponse::NewData(data))) => {
                        let text = String::from_utf8_lossy(data.borrow_owner()).to_string();
                        if text.starts_with("* BYE") {
                            return Err(ImapError::ConnectionLost { step: "IDLE", reason: text.trim().to_string() });
                        }
                        IdleEnd::Changed
                    }
                    // We never interrupt this wait ourselves: the stream ended.
                    Ok(Ok(async_imap::extensions::idle::IdleResponse::ManualInterrupt)) => {
                        return Err(ImapError::ConnectionLost { step: "IDLE", reason: "the server ended the connection".into() });
                    }
                    Ok(Err(e)) => return Err(command_error("IDLE", e)),
                },
                _ = cancel.cancelled() => IdleEnd::Cancelled,
            }
        };
        let session = timed("IDLE DONE", handle.done()).await?;
        let mut session = ImapSession::new(session, user);
        session.drain_unsolicited()?;
        Ok((session, end))
    }

    /// Sends NOOP (lets the server report new mail when IDLE is not offered).
    pub async fn noop(&mut self) -> Result<(), ImapError> {
        timed("NOOP", self.session.noop()).await?;
        self.drain_unsolicited()
    }

    /// Logs out politely; errors are ignored (the connection is going away anyway).
    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session.logout()).await;
    }

    /// Empties the unsolicited-response channel, noting news (EXISTS); a BYE there means
    /// the connection is gone.
    fn drain_unsolicited(&mut self) -> Result<(), ImapError> {
        while let Ok(response) = self.session.unsolicited_responses.try_recv() {
            if let UnsolicitedResponse::Exists(_) = &response {
                self.news = true;
            }
            if let UnsolicitedResponse::Other(data) = &response {
                let text = String::from_utf8_lossy(data.borrow_owner());
                if text.starts_with("* BYE") {
                    return Err(ImapError::ConnectionLost {
                        step: "command",
                        reason: text.trim().to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// A listed message from the attributes of a FETCH response, if it carries a UID.
fn listed_from(attributes: &[AttributeValue<'_>]) -> Option<Listed> {
    let (mut uid, mut size, mut arrived) = (None, 0, None);
    for attribute in attributes {
        match attribute {
            AttributeValue::Uid(u) => uid = Some(*u),
            AttributeValue::Rfc822Size(s) => size = *s,
            // RFC 3501's date-time, its day space-padded below 10.
            AttributeValue::InternalDate(text) => {
                arrived = chrono::DateTime::parse_from_str(text.trim(), "%d-%b-%Y %H:%M:%S %z")
                    .ok()
                    .map(|d| d.with_timezone(&chrono::Utc));
            }
            _ => {}
        }
    }
    Some(Listed {
        uid: uid?,
        size,
        arrived,
    })
}

/// "1:3,7,9:10" for sorted UIDs.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_are_compact() {
        assert_eq!(uid_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        assert_eq!(uid_set(&[5]), "5");
        assert_eq!(uid_set(&[]), "");
    }

    #[test]
    fn a_listing_entry_needs_a_uid_and_reads_size_and_arrival() {
        use std::borrow::Cow;
        let entry = |date: &'static str| {
            listed_from(&[
                AttributeValue::Uid(42),
                AttributeValue::Rfc822Size(1234),
                AttributeValue::InternalDate(Cow::Borrowed(date)),
            ])
        };
        let arrived = chrono::DateTime::parse_from_rfc3339("2026-12-07T08:00:00Z").unwrap();
        for date in ["07-Dec-2026 09:00:00 +0100", " 7-Dec-2026 09:00:00 +0100"] {
            let listed = entry(date).unwrap();
            assert_eq!((listed.uid, listed.size), (42, 1234));
            assert_eq!(
                listed.arrived,
                Some(arrived.with_timezone(&chrono::Utc)),
                "{date}"
            );
        }
        assert_eq!(entry("yesterday").unwrap().arrived, None);
        assert!(listed_from(&[AttributeValue::Rfc822Size(1)]).is_none());
    }
}
