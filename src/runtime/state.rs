//! What each mailbox is doing, kept by the runtime as it happens (not parsed from logs), for
//! the operations endpoints: its state and since when, its last success and last error
//! with the likely fix, its backlog, and what became of its messages since start.

use crate::config::ParserConfig;
use crate::pipeline::Outcome;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A mailbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MailboxState {
    /// Its task was started, nothing tried yet.
    Starting,
    /// Opening a session (token, connect, login).
    Connecting,
    /// Reading and storing what is pending.
    Fetching,
    /// Waiting for news (IDLE or a poll).
    Idle,
    /// The last attempt failed; retrying at `retry_at`.
    Backoff,
    /// Its credential needs `mail2ticket login`.
    NeedsLogin,
    /// No successful pass or completed wait for longer than `stale_after`.
    Stale,
    /// Its task ended.
    Stopped,
}

impl MailboxState {
    /// Every state, for metrics and documentation.
    pub const ALL: [MailboxState; 8] = [
        MailboxState::Starting,
        MailboxState::Connecting,
        MailboxState::Fetching,
        MailboxState::Idle,
        MailboxState::Backoff,
        MailboxState::NeedsLogin,
        MailboxState::Stale,
        MailboxState::Stopped,
    ];

    /// The name used in JSON, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MailboxState::Starting => "starting",
            MailboxState::Connecting => "connecting",
            MailboxState::Fetching => "fetching",
            MailboxState::Idle => "idle",
            MailboxState::Backoff => "backoff",
            MailboxState::NeedsLogin => "needs_login",
            MailboxState::Stale => "stale",
            MailboxState::Stopped => "stopped",
        }
    }

    /// Working as it should (what `/healthz` and `mailbox_up` count as up).
    pub fn is_up(self) -> bool {
        matches!(self, MailboxState::Idle | MailboxState::Fetching)
    }
}

/// Messages of one mailbox since start, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MessageTotals {
    /// New tickets.
    pub created: u64,
    /// Appended to tickets.
    pub appended: u64,
    /// Held by the rules.
    pub held: u64,
    /// Already stored.
    pub duplicate: u64,
    /// Quarantined.
    pub quarantined: u64,
    /// Not stored because the database failed (they are fetched again).
    pub failed: u64,
}

/// One mailbox as the endpoints show it.
#[derive(Debug, Clone, Serialize)]
pub struct MailboxStatus {
    /// The parser's name.
    pub parser: String,
    /// The mailbox's address.
    pub email: String,
    /// Where its mail comes from (`imap`).
    pub source: &'static str,
    /// What it is doing.
    pub state: MailboxState,
    /// Since when.
    pub since: DateTime<Utc>,
    /// Its last successful pass or completed wait.
    pub last_ok_at: Option<DateTime<Utc>>,
    /// The last error, if the mailbox has failed since it last worked.
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_at: Option<DateTime<Utc>>,
    /// What to do about it.
    pub fix: Option<String>,
    /// When the next attempt is due (in `backoff`).
    pub retry_at: Option<DateTime<Utc>>,
    /// Messages waiting on the server past the checkpoint at the last pass.
    pub backlog: u64,
    /// What became of its messages since start.
    pub messages_total: MessageTotals,
    /// How long without success makes it `stale`.
    #[serde(skip)]
    pub stale_after: Duration,
}

/// The states of every mailbox, shared by the runtime (which writes) and the endpoints
/// (which read). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    mailboxes: Arc<RwLock<BTreeMap<String, MailboxStatus>>>,
    /// When the supervisor's loop last turned (unix milliseconds; 0 = never).
    heartbeat: Arc<std::sync::atomic::AtomicI64>,
}

impl Registry {
    /// The supervisor's loop turned.
    pub fn beat(&self) {
        let now = Utc::now().timestamp_millis();
        self.heartbeat
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the supervisor's loop last turned.
    pub fn last_beat(&self) -> Option<DateTime<Utc>> {
        let millis = self.heartbeat.load(std::sync::atomic::Ordering::Relaxed);
        (millis > 0)
            .then(|| DateTime::from_timestamp_millis(millis))
            .flatten()
    }

    /// Adds (or resets) a mailbox in `starting`.
    pub fn register(&self, parser: &ParserConfig) {
        let status = MailboxStatus {
            parser: parser.name.clone(),
            email: parser.email.clone(),
            source: "imap",
            state: MailboxState::Starting,
            since: Utc::now(),
            last_ok_at: None,
            last_error: None,
            last_error_at: None,
            fix: None,
            retry_at: None,
            backlog: 0,
            messages_total: MessageTotals::default(),
            stale_after: parser.stale_after,
        };
        self.write().insert(parser.name.clone(), status);
    }

    /// Every mailbox, by name; a working one without success for `stale_after` is `stale`.
    pub fn snapshot(&self) -> Vec<MailboxStatus> {
        let now = Utc::now();
        let mailboxes = self.mailboxes.read().expect("not poisoned");
        mailboxes
            .values()
            .cloned()
            .map(|mut m| {
                let reference = m.last_ok_at.unwrap_or(m.since);
                let quiet = (now - reference).to_std().unwrap_or_default();
                let working = matches!(
                    m.state,
                    MailboxState::Idle | MailboxState::Fetching | MailboxState::Connecting
                );
                if working && quiet > m.stale_after {
                    m.state = MailboxState::Stale;
                    m.since = reference + m.stale_after;
                }
                m
            })
            .collect()
    }

    /// Records a state (its `since` moves only when the state changes).
    pub fn set(&self, parser: &str, state: MailboxState) {
        self.update(parser, |m| {
            if m.state != state {
                m.state = state;
                m.since = Utc::now();
            }
            if state != MailboxState::Backoff {
                m.retry_at = None;
            }
        });
    }

    /// Records a successful pass or completed wait: the error, if any, is over.
    pub fn ok(&self, parser: &str) {
        self.update(parser, |m| {
            m.last_ok_at = Some(Utc::now());
            m.last_error = None;
            m.fix = None;
        });
    }

    /// Records a failure and the next attempt.
    pub fn failed(&self, parser: &str, failure: Failure) {
        let state = if failure.needs_login {
            MailboxState::NeedsLogin
        } else {
            MailboxState::Backoff
        };
        self.set(parser, state);
        self.update(parser, |m| {
            m.last_error = Some(failure.error);
            m.last_error_at = Some(Utc::now());
            m.fix = failure.fix;
            m.retry_at = Some(failure.retry_at);
        });
    }

    /// Records how many messages wait on the server past the checkpoint.
    pub fn backlog(&self, parser: &str, messages: u64) {
        self.update(parser, |m| m.backlog = messages);
    }

    /// Counts committed outcomes (and takes them off the backlog).
    pub fn committed(&self, parser: &str, outcomes: &[Outcome]) {
        self.update(parser, |m| {
            for outcome in outcomes {
                let totals = &mut m.messages_total;
                let (count, name) = match outcome {
                    Outcome::Created { .. } => (&mut totals.created, "created"),
                    Outcome::Appended { .. } => (&mut totals.appended, "appended"),
                    Outcome::Held { .. } => (&mut totals.held, "held"),
                    Outcome::Duplicate { .. } | Outcome::DuplicateQuarantined { .. } => {
                        (&mut totals.duplicate, "duplicate")
                    }
                    Outcome::Quarantined { .. } => (&mut totals.quarantined, "quarantined"),
                };
                *count += 1;
                let labels = [
                    ("parser", parser.to_string()),
                    ("outcome", name.to_string()),
                ];
                metrics::counter!("mail2ticket_messages_total", &labels).increment(1);
            }
            m.backlog = m.backlog.saturating_sub(outcomes.len() as u64);
        });
    }

    /// Counts messages whose batch the database refused to commit.
    pub fn not_stored(&self, parser: &str, messages: u64) {
        self.update(parser, |m| m.messages_total.failed += messages);
        let labels = [
            ("parser", parser.to_string()),
            ("outcome", "failed".to_string()),
        ];
        metrics::counter!("mail2ticket_messages_total", &labels).increment(messages);
    }

    fn update(&self, parser: &str, change: impl FnOnce(&mut MailboxStatus)) {
        if let Some(m) = self.write().get_mut(parser) {
            change(m);
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, MailboxStatus>> {
        self.mailboxes.write().expect("not poisoned")
    }
}

/// A failed attempt, as the supervisor reports it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The error's text (secrets never reach errors).
    pub error: String,
    /// What to do about it.
    pub fix: Option<String>,
    /// When the next attempt is due.
    pub retry_at: DateTime<Utc>,
    /// The credential needs `mail2ticket login`.
    pub needs_login: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser(stale_after: u64) -> ParserConfig {
        let text = format!(
            "[database]\nurl = \"postgres://x/y\"\n[[parser]]\nname = \"p\"\nemail = \"p@x.test\"\npassword = \"pw\"\nstale_after = {stale_after}\n[parser.imap]\nhost = \"127.0.0.1\"\nencryption = \"none\"\n"
        );
        let config =
            crate::config::Config::from_toml(std::path::Path::new("t.toml"), &text).unwrap();
        config.parsers[0].clone()
    }

    #[test]
    fn states_errors_and_staleness() {
        let registry = Registry::default();
        registry.register(&parser(1200));
        registry.set("p", MailboxState::Idle);
        registry.ok("p");
        assert_eq!(registry.snapshot()[0].state, MailboxState::Idle);
        registry.failed(
            "p",
            Failure {
                error: "refused".into(),
                fix: Some("grant FullAccess".into()),
                retry_at: Utc::now(),
                needs_login: false,
            },
        );
        let m = &registry.snapshot()[0];
        assert_eq!(m.state, MailboxState::Backoff);
        assert_eq!(m.last_error.as_deref(), Some("refused"));
        registry.set("p", MailboxState::Idle);
        registry.ok("p");
        assert_eq!(registry.snapshot()[0].last_error, None);

        let quiet = Registry::default();
        quiet.register(&parser(1));
        quiet.set("p", MailboxState::Idle);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(quiet.snapshot()[0].state, MailboxState::Stale);
    }
}
