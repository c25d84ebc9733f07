//! `start_at`: what the mail already in a folder becomes the first time a parser meets it.
//!
//! Pointing mail2ticket at a shared mailbox that holds years of mail must not turn all of
//! it into tickets unless asked to. At first contact (no checkpoint for the parser and
//! folder) the policy picks, once, which existing messages to take; the choice is saved
//! with the checkpoint (`mailbox_state.backlog_*`), so a restart or a `\Seen` flag set
//! meanwhile cannot change it. Skipped messages are never touched on the server. Mail that
//! arrives later is always taken, and a UIDVALIDITY change is not a first contact.

use crate::config::StartAt;
use crate::source::imap::{FolderStatus, ImapError, ImapSession};
use crate::store::mailbox::Backlog;

/// The longest UID set sent in one command (see [`pending_set`]).
const MAX_SET_LEN: usize = 4000;

/// What the policy decided at first contact (for logs, `run --once` and `doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstContact {
    /// The folder.
    pub folder: String,
    /// The policy.
    pub start_at: StartAt,
    /// Messages in the folder at first contact.
    pub existing: usize,
    /// How many of them are taken.
    pub taken: usize,
}

impl std::fmt::Display for FirstContact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "start_at = {} takes {} of the {} messages already in {} and leaves {}",
            self.start_at,
            self.taken,
            self.existing,
            self.folder,
            self.existing - self.taken
        )
    }
}

/// Where reading starts: the checkpoint's UID and the backlog to take below the horizon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The first checkpoint (`last_uid`).
    pub last_uid: i64,
    /// Existing messages to take, when not simply all or none of them.
    pub backlog: Option<Backlog>,
    /// The report.
    pub report: FirstContact,
}

/// Applies `start_at` to the selected `folder` (read-only: SEARCH commands only).
pub async fn choose(
    session: &mut ImapSession,
    folder: &str,
    status: &FolderStatus,
    start_at: StartAt,
) -> Result<Start, ImapError> {
    let all = session.search("ALL").await?;
    // Messages below UIDNEXT existed when the folder was selected; one arriving between
    // SELECT and this SEARCH is new mail, taken whatever the policy.
    let horizon = match status.uid_next {
        Some(next) => next.saturating_sub(1),
        None => all.last().copied().unwrap_or(0),
    };
    let existing: Vec<u32> = all.into_iter().filter(|uid| *uid <= horizon).collect();
    let taken: Vec<u32> = match start_at {
        StartAt::All => existing.clone(),
        StartAt::Now => Vec::new(),
        StartAt::Unseen => session.search("UNSEEN").await?,
        // SINCE compares INTERNALDATE's day, disregarding time and timezone (RFC 3501).
        StartAt::Since(day) => {
            session
                .search(&format!("SINCE {}", day.format("%-d-%b-%Y")))
                .await?
        }
    };
    let taken: Vec<u32> = taken
        .into_iter()
        .filter(|uid| existing.binary_search(uid).is_ok())
        .collect();
    let report = FirstContact {
        folder: folder.to_string(),
        start_at,
        existing: existing.len(),
        taken: taken.len(),
    };
    let (last_uid, backlog) = if taken.len() == existing.len() {
        (0, None)
    } else if taken.is_empty() {
        (i64::from(horizon), None)
    } else {
        let backlog = Backlog {
            until: i64::from(horizon),
            uids: taken.iter().map(|uid| i64::from(*uid)).collect(),
        };
        (0, Some(backlog))
    };
    Ok(Start {
        last_uid,
        backlog,
        report,
    })
}

/// The UID set to list for a pass: the backlog's UIDs above `last_uid`, then everything
/// past the backlog's end; and whether a listed UID is wanted (a `n:*` range also
/// returns the last message when n is past it).
pub fn pending_set(last_uid: i64, backlog: Option<&Backlog>) -> (String, impl Fn(u32) -> bool) {
    let from = u32::try_from(last_uid + 1).unwrap_or(u32::MAX);
    let (until, chosen): (u32, Vec<u32>) = match backlog {
        Some(b) if b.until > last_uid => (
            u32::try_from(b.until).unwrap_or(u32::MAX),
            b.uids
                .iter()
                .filter(|uid| **uid > last_uid)
                .filter_map(|uid| u32::try_from(*uid).ok())
                .collect(),
        ),
        _ => (from.saturating_sub(1), Vec::new()),
    };
    let after = until.saturating_add(1).max(from);
    let mut set = crate::source::imap::uid_set(&chosen);
    if set.len() > MAX_SET_LEN {
        // A long, scattered choice would make a command line servers refuse (RFC 7162
        // section 4 asks clients to stay under 8192 octets): list the whole range and
        // keep the chosen ones here.
        set.clear();
        set.push_str(&format!("{from}:*"));
    } else {
        if !set.is_empty() {
            set.push(',');
        }
        set.push_str(&format!("{after}:*"));
    }
    let wanted = move |uid: u32| uid >= after || chosen.binary_search(&uid).is_ok();
    (set, wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_backlog_everything_past_the_checkpoint_is_listed() {
        let (set, wanted) = pending_set(41, None);
        assert_eq!(set, "42:*");
        assert!(wanted(42) && !wanted(41));
    }

    #[test]
    fn a_backlog_lists_only_its_chosen_uids_below_its_end() {
        let backlog = Backlog {
            until: 100,
            uids: vec![3, 4, 5, 50, 90],
        };
        let (set, wanted) = pending_set(4, Some(&backlog));
        assert_eq!(set, "5,50,90,101:*");
        assert!(wanted(5) && wanted(90) && wanted(101) && wanted(5000));
        assert!(!wanted(4) && !wanted(6) && !wanted(100));
        // A scattered choice too long for one command line: the range, filtered here.
        let scattered = Backlog {
            until: 100_000,
            uids: (1..50_000).map(|uid| uid * 2).collect(),
        };
        let (set, wanted) = pending_set(0, Some(&scattered));
        assert_eq!(set, "1:*");
        assert!(wanted(2) && !wanted(3) && wanted(100_001));
        // Once the checkpoint passes the backlog's end, it no longer matters.
        let (set, _) = pending_set(100, Some(&backlog));
        assert_eq!(set, "101:*");
    }
}
