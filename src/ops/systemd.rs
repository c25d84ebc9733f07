//! systemd's notify protocol for `Type=notify` (the `sd-notify` crate): `READY=1` once every
//! mailbox's task started, `WATCHDOG=1` from the supervisor's own loop at half of
//! `WATCHDOG_USEC` (so a hung supervisor stops the pings and systemd restarts it),
//! `STATUS=` a one-line summary when it changes, `STOPPING=1` on shutdown, and
//! `RELOADING=1` (with `MONOTONIC_USEC`, as `Type=notify-reload` requires) then `READY=1`
//! around a reload. Without `NOTIFY_SOCKET` nothing is sent.

use crate::runtime::state::{MailboxState, Registry};
use crate::runtime::supervisor::Heartbeat;
use sd_notify::NotifyState;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tells systemd how the daemon is doing.
pub struct Notifier {
    states: Registry,
    /// Half of `WATCHDOG_USEC`, when systemd watches.
    ping_every: Option<Duration>,
    last_ping: Mutex<Option<Instant>>,
    last_status: Mutex<String>,
}

impl Notifier {
    /// A notifier reading the mailboxes' states from `states`.
    pub fn new(states: Registry) -> Self {
        Notifier {
            states,
            ping_every: sd_notify::watchdog_enabled().map(|usec| usec / 2),
            last_ping: Mutex::new(None),
            last_status: Mutex::new(String::new()),
        }
    }

    /// The daemon is shutting down.
    pub fn stopping(&self) {
        send(&[NotifyState::Stopping]);
    }

    fn update_status(&self) {
        let line = summary(&self.states);
        let mut last = self.last_status.lock().expect("not poisoned");
        if *last != line {
            send(&[NotifyState::Status(&line)]);
            *last = line;
        }
    }
}

impl Heartbeat for Notifier {
    fn started(&self) {
        send(&[NotifyState::Ready]);
        self.update_status();
    }

    fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
    }

    fn beat(&self) {
        if let Some(every) = self.ping_every {
            let mut last = self.last_ping.lock().expect("not poisoned");
            if last.is_none_or(|at| at.elapsed() >= every) {
                send(&[NotifyState::Watchdog]);
                *last = Some(Instant::now());
            }
        }
        self.update_status();
    }
}

/// "3 mailboxes: 2 idle, 1 backoff (finance: the IMAP server refused ...)".
pub fn summary(states: &Registry) -> String {
    let mailboxes = states.snapshot();
    let mut parts = Vec::new();
    for state in MailboxState::ALL {
        let n = mailboxes.iter().filter(|m| m.state == state).count();
        if n > 0 {
            parts.push(format!("{n} {}", state.as_str()));
        }
    }
    let mut line = format!("{} mailboxes: {}", mailboxes.len(), parts.join(", "));
    if let Some(m) = mailboxes
        .iter()
        .find(|m| !m.state.is_up() && m.last_error.is_some())
    {
        let error: String = m
            .last_error
            .as_deref()
            .unwrap_or_default()
            .chars()
            .take(80)
            .collect();
        line.push_str(&format!(" ({}: {error})", m.parser));
    }
    line
}

/// Sends to systemd; a failure is logged, never fatal (the daemon works without it).
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
