//! What each mailbox is doing, kept by the runtime as it happens (not parsed from logs), for
//! the operations endpoints: its state and since when, its last success and last error
//! with the likely fix, its backlog, and what became of its messages since start.
//!
//! The registry also announces changes in the log (in the mailbox's span), so that the log reads like the status
//! page's history: a mailbox that starts failing (or changes how it fails, or needs a
//! login, or goes stale) is logged once at `warn` with the reason and the fix, its
//! recovery once at `info`, and while it keeps failing a reminder at most every
//! [`REMINDER_EVERY`], not one line per retry (each retry is logged at `debug`).

use crate::config::ParserConfig;
use crate::pipeline::Outcome;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// While a mailbox keeps failing the same way, its log reminder comes this often at most.
pub const REMINDER_EVERY: Duration = Duration::from_secs(600);

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
    /// Where its mail comes from (`imap` or `graph`).
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

/// A mailbox in the registry: what the endpoints show, and what the log was told.
#[derive(Debug, Clone)]
struct Entry {
    status: MailboxStatus,
    /// The problem last announced in the log, if it is not over.
    announced: Option<Announced>,
}

/// A problem announced in the log, remembered so that it is not announced again on every
/// retry.
#[derive(Debug, Clone)]
struct Announced {
    /// What kind of problem: the state, and for failures the step that failed.
    kind: String,
    /// When the problem began.
    since: DateTime<Utc>,
    /// When it was last written to the log.
    logged: Instant,
    /// Failed attempts since it was last written to the log (for the reminder).
    attempts: u32,
    /// The credential that needs a sign-in, when that is the problem.
    credential: Option<String>,
}

/// The states of every mailbox, shared by the runtime (which writes) and the endpoints
/// (which read). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    mailboxes: Arc<RwLock<BTreeMap<String, Entry>>>,
    /// Where changes of state go as events for the outbox, once the daemon listens.
    events: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<StateEvent>>>,
    /// Credentials whose `credential.needs_login` was published (until a mailbox of
    /// theirs recovers).
    needing_login: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// When the supervisor's loop last turned (unix milliseconds; 0 = never).
    heartbeat: Arc<std::sync::atomic::AtomicI64>,
}

/// A change of a mailbox's state (or a credential needing a sign-in) as an event for the
/// outbox: `mailbox.state_changed` or `credential.needs_login`.
#[derive(Debug, Clone)]
pub struct StateEvent {
    /// The event's kind.
    pub kind: &'static str,
    /// The mailbox it concerns (or that found the credential needing a sign-in).
    pub parser: String,
    /// What it says.
    pub payload: serde_json::Value,
}

impl Registry {
    /// Sends every announced change of state to `events` as well (the daemon writes them
    /// to the outbox).
    pub fn publish_to(&self, events: tokio::sync::mpsc::UnboundedSender<StateEvent>) {
        let _ = self.events.set(events);
    }

    fn publish(&self, kind: &'static str, parser: &str, payload: serde_json::Value) {
        if let Some(events) = self.events.get() {
            let event = StateEvent {
                kind,
                parser: parser.to_string(),
                payload,
            };
            let _ = events.send(event);
        }
    }

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

    /// Adds a mailbox in `starting`; a mailbox restarted by a reload is reset but keeps
    /// its counts since start (they match the metrics' counters, which never go down).
    pub fn register(&self, parser: &ParserConfig) {
        let mut status = MailboxStatus {
            parser: parser.name.clone(),
            email: parser.email.clone(),
            source: parser.source.kind(),
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
        let mut mailboxes = self.write();
        if let Some(before) = mailboxes.get(&parser.name) {
            status.messages_total = before.status.messages_total;
        }
        let entry = Entry {
            status,
            announced: None,
        };
        mailboxes.insert(parser.name.clone(), entry);
    }

    /// Forgets a mailbox whose parser was removed by a reload (once its task ended).
    pub fn remove(&self, parser: &str) {
        self.write().remove(parser);
    }

    /// Every mailbox, by name; a working one without success for `stale_after` is `stale`.
    pub fn snapshot(&self) -> Vec<MailboxStatus> {
        let now = Utc::now();
        let mailboxes = self.mailboxes.read().expect("not poisoned");
        mailboxes
            .values()
            .map(|entry| entry.status.clone())
            .map(|mut m| {
                if let Some(since) = m.stale_since(now) {
                    m.state = MailboxState::Stale;
                    m.since = since;
                }
                m
            })
            .collect()
    }

    /// Announces the mailboxes that went stale (called from the supervisor's loop).
    pub fn announce_stale(&self) {
        let now = Utc::now();
        let mut stale = Vec::new();
        for entry in self.write().values_mut() {
            if let Some(since) = entry.status.stale_since(now) {
                let stale_after = entry.status.stale_after;
                let quiet = (now - since).to_std().unwrap_or_default() + stale_after;
                let reason = format!(
                    "no successful pass or completed wait for {}s (stale_after = {})",
                    quiet.as_secs(),
                    stale_after.as_secs()
                );
                let fix = "the server or the network stopped answering without an error: check them; mail2ticket keeps retrying";
                // Logged in the mailbox's span, as its own task logs.
                let span = tracing::info_span!("mailbox", parser = %entry.status.parser);
                if span.in_scope(|| entry.announce("stale", &reason, Some(fix), since, false)) {
                    stale.push((
                        entry.status.parser.clone(),
                        entry.status.email.clone(),
                        reason,
                        since,
                    ));
                }
            }
        }
        for (parser, email, reason, since) in stale {
            let payload = serde_json::json!({
                "parser": parser, "email": email, "state": "stale", "problem": "stale",
                "reason": reason, "since": since,
            });
            self.publish("mailbox.state_changed", &parser, payload);
        }
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
        let recovered = self.update_entry(parser, |entry| {
            let m = &mut entry.status;
            m.last_ok_at = Some(Utc::now());
            m.last_error = None;
            m.fix = None;
            let problem = entry.announced.take()?;
            let after = (Utc::now() - problem.since).to_std().unwrap_or_default();
            tracing::info!(
                was = %problem.kind,
                after_s = after.as_secs(),
                "mailbox recovered"
            );
            Some((problem, m.email.clone()))
        });
        if let Some(Some((problem, email))) = recovered {
            if let Some(credential) = &problem.credential {
                self.needing_login
                    .lock()
                    .expect("not poisoned")
                    .remove(credential);
            }
            let payload = serde_json::json!({
                "parser": parser, "email": email, "state": "recovered",
                "was": problem.kind, "since": problem.since,
            });
            self.publish("mailbox.state_changed", parser, payload);
        }
    }

    /// Records a failure and the next attempt.
    pub fn failed(&self, parser: &str, failure: Failure) {
        let state = if failure.needs_login {
            MailboxState::NeedsLogin
        } else {
            MailboxState::Backoff
        };
        self.set(parser, state);
        let credential = failure.credential.clone();
        let announced = self.update_entry(parser, |entry| {
            let kind = match state {
                MailboxState::NeedsLogin => state.as_str().to_string(),
                _ => format!("{} at {}", state.as_str(), failure.step),
            };
            let new = entry.announce(
                &kind,
                &failure.error,
                failure.fix.as_deref(),
                Utc::now(),
                true,
            );
            if let Some(problem) = entry.announced.as_mut() {
                problem.credential = credential.clone();
            }
            let m = &mut entry.status;
            m.last_error = Some(failure.error.clone());
            m.last_error_at = Some(Utc::now());
            m.fix = failure.fix.clone();
            m.retry_at = Some(failure.retry_at);
            new.then(|| {
                serde_json::json!({
                    "parser": parser, "email": m.email, "state": state.as_str(),
                    "problem": kind, "reason": failure.error, "fix": failure.fix,
                    "since": m.since,
                })
            })
        });
        if let Some(Some(payload)) = announced {
            self.publish("mailbox.state_changed", parser, payload);
            if let Some(credential) = credential
                && self
                    .needing_login
                    .lock()
                    .expect("not poisoned")
                    .insert(credential.clone())
            {
                let payload = serde_json::json!({
                    "credential": credential, "found_by": parser, "reason": failure.error,
                    "fix": failure.fix,
                });
                self.publish("credential.needs_login", parser, payload);
            }
        }
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
        self.update_entry(parser, |entry| change(&mut entry.status));
    }

    fn update_entry<R>(&self, parser: &str, change: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        self.write().get_mut(parser).map(change)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.mailboxes.write().expect("not poisoned")
    }
}

impl MailboxStatus {
    /// When a working mailbox became stale (no success for `stale_after`), if it is.
    fn stale_since(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let reference = self.last_ok_at.unwrap_or(self.since);
        let quiet = (now - reference).to_std().unwrap_or_default();
        let working = matches!(
            self.state,
            MailboxState::Idle | MailboxState::Fetching | MailboxState::Connecting
        );
        (working && quiet > self.stale_after).then(|| reference + self.stale_after)
    }
}

impl Entry {
    /// Logs a problem of `kind` when it is new, or as a reminder when the last line about
    /// it is [`REMINDER_EVERY`] old; otherwise only counts the attempt (when it is one).
    fn announce(
        &mut self,
        kind: &str,
        reason: &str,
        fix: Option<&str>,
        since: DateTime<Utc>,
        attempt: bool,
    ) -> bool {
        let fix = fix.unwrap_or("-");
        match &mut self.announced {
            Some(known) if known.kind == kind => {
                known.attempts += u32::from(attempt);
                if known.logged.elapsed() >= REMINDER_EVERY {
                    tracing::warn!(
                        state = %kind,
                        since = %known.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        attempts = known.attempts,
                        fix,
                        "mailbox still failing: {reason}"
                    );
                    known.logged = Instant::now();
                    known.attempts = 0;
                }
                false
            }
            known => {
                tracing::warn!(state = %kind, fix, "mailbox failing: {reason}");
                let since = known.as_ref().map_or(since, |k| k.since);
                *known = Some(Announced {
                    kind: kind.to_string(),
                    since,
                    logged: Instant::now(),
                    attempts: 0,
                    credential: None,
                });
                true
            }
        }
    }
}

/// A failed attempt, as the supervisor reports it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The error's text (secrets never reach errors).
    pub error: String,
    /// The step that failed (`token`, `connect`, `login`, `select`, `fetch`, `store`,
    /// `settle`): a change of step is a new problem in the log.
    pub step: &'static str,
    /// What to do about it.
    pub fix: Option<String>,
    /// When the next attempt is due.
    pub retry_at: DateTime<Utc>,
    /// The credential needs `mail2ticket login`.
    pub needs_login: bool,
    /// That credential's name.
    pub credential: Option<String>,
}

#[cfg(test)]
mod tests;
