//! Runs one poller per active parser, restarts a failed one with capped exponential
//! backoff and jitter, and stops them all on cancellation. One mailbox's failure never
//! stops or slows another: each poller is its own task with its own backoff, inside a
//! `mailbox{parser=...}` tracing span (so its events need not repeat the name).
//!
//! This is where a parser's [`MailSource`](crate::source::MailSource) is chosen: a new
//! kind of source is registered in [`source_of`].

use crate::auth::TokenSources;
use crate::config::ParserConfig;
use crate::config::{Config, ParserAuth, ParserStatus};
use crate::runtime::mailbox::{OnceStats, PollError, Poller};
use crate::runtime::state::{Failure, MailboxState, Registry};
use crate::source::SourceError;
use crate::source::imap::ImapSource;
use backon::BackoffBuilder;
use futures::FutureExt;
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The loop of one parser, over the parser's mail source.
type MailboxPoller = Poller<ImapSource>;

/// Longest wait between two attempts of a failing poller.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The result of `run --once` for one parser.
#[derive(Debug)]
pub struct OnceReport {
    /// Parser name.
    pub parser: String,
    /// Counters (and the first-contact decision), or the error that stopped it.
    pub result: Result<OnceStats, String>,
}

/// The mail source of a parser.
fn source_of(parser: &Arc<ParserConfig>, tokens: &TokenSources) -> Result<ImapSource, String> {
    let tokens = match &parser.auth {
        ParserAuth::Credential(name) => Some(tokens.get(name).ok_or_else(|| {
            format!(
                "parser {:?} names an unknown credential {name:?}",
                parser.name
            )
        })?),
        ParserAuth::Password(_) => None,
    };
    Ok(ImapSource::new(parser.clone(), tokens))
}

fn pollers(
    config: &Config,
    pool: &PgPool,
    tokens: &TokenSources,
    states: &Registry,
) -> Vec<Result<MailboxPoller, (String, String)>> {
    config
        .parsers
        .iter()
        .filter(|p| p.status == ParserStatus::Active)
        .map(|p| {
            let parser = Arc::new(p.clone());
            states.register(&parser);
            let source = source_of(&parser, tokens).map_err(|e| (p.name.clone(), e))?;
            Ok(Poller::new(parser, pool.clone(), source, states.clone()))
        })
        .collect()
}

/// The span every event of one mailbox's task is logged in.
fn mailbox_span(parser: &str) -> tracing::Span {
    tracing::info_span!("mailbox", parser = %parser)
}

/// Processes everything new in every active parser once, all parsers at the same time.
pub async fn run_once(
    config: &Config,
    pool: &PgPool,
    tokens: &TokenSources,
    cancel: &CancellationToken,
) -> Vec<OnceReport> {
    let tasks: Vec<_> = pollers(config, pool, tokens, &Registry::default())
        .into_iter()
        .map(|poller| {
            let cancel = cancel.clone();
            let name = match &poller {
                Ok(p) => p.name().to_string(),
                Err((parser, _)) => parser.clone(),
            };
            let span = mailbox_span(&name);
            let task = tokio::spawn(
                async move {
                    match poller {
                        Err((parser, e)) => OnceReport {
                            parser,
                            result: Err(e),
                        },
                        Ok(poller) => {
                            let result = poller.run_once(&cancel).await.map_err(|e| e.to_string());
                            OnceReport {
                                parser: poller.name().to_string(),
                                result,
                            }
                        }
                    }
                }
                .instrument(span),
            );
            (name, task)
        })
        .collect();
    let mut reports = Vec::new();
    for (parser, task) in tasks {
        match task.await {
            Ok(report) => reports.push(report),
            Err(e) => reports.push(OnceReport {
                parser,
                result: Err(format!(
                    "the poller task panicked (a bug, please report it): {e}"
                )),
            }),
        }
    }
    reports
}

/// Runs every active parser until `cancel` fires; returns when all pollers have stopped.
pub async fn run(
    config: &Config,
    pool: &PgPool,
    tokens: &TokenSources,
    cancel: &CancellationToken,
) {
    run_observed(config, pool, tokens, &Registry::default(), &(), cancel).await
}

/// What the process around the supervisor hears from its loop (systemd's notify protocol):
/// called from the loop itself, so a hung loop falls silent.
pub trait Heartbeat: Sync {
    /// Every active mailbox's task was started.
    fn started(&self);
    /// The loop turned (every [`HEARTBEAT`]).
    fn beat(&self);
}

/// Nobody listens.
impl Heartbeat for () {
    fn started(&self) {}
    fn beat(&self) {}
}

/// [`run`], reporting every mailbox's state to `states`, and the supervisor's own
/// heartbeat (its loop turns every [`HEARTBEAT`]) for `/livez`.
pub async fn run_observed(
    config: &Config,
    pool: &PgPool,
    tokens: &TokenSources,
    states: &Registry,
    heartbeat: &dyn Heartbeat,
    cancel: &CancellationToken,
) {
    let tracker = TaskTracker::new();
    for poller in pollers(config, pool, tokens, states) {
        let cancel = cancel.clone();
        match poller {
            Err((parser, e)) => {
                tracing::error!(parser = %parser, error = %e, "cannot start the poller")
            }
            Ok(poller) => {
                let span = mailbox_span(poller.name());
                let states = states.clone();
                let task = async move { supervise(poller, states, cancel).await };
                tracker.spawn(task.instrument(span));
            }
        }
    }
    tracker.close();
    states.beat();
    heartbeat.started();
    let all_stopped = tracker.wait();
    tokio::pin!(all_stopped);
    loop {
        tokio::select! {
            _ = &mut all_stopped => break,
            _ = tokio::time::sleep(HEARTBEAT) => {
                states.beat();
                heartbeat.beat();
            }
        }
    }
}

/// How often the supervisor's own loop turns (and proves it with a heartbeat).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// The step a pass failed at, for `mail2ticket_poll_errors_total` (a fixed set).
fn failed_step(error: &PollError) -> &'static str {
    use crate::source::imap::ImapError;
    match error {
        PollError::Source(SourceError::Auth(_)) => "token",
        PollError::Source(SourceError::Imap(e)) => match e {
            ImapError::Connect { .. } | ImapError::Tls { .. } => "connect",
            ImapError::AuthRejected { .. } => "login",
            ImapError::Select { .. } | ImapError::NotConnected { .. } => "select",
            ImapError::Command { step, .. } | ImapError::Timeout { step, .. }
                if ["STORE", "MOVE", "EXPUNGE", "COPY"]
                    .iter()
                    .any(|s| step.contains(s)) =>
            {
                "settle"
            }
            _ => "fetch",
        },
        PollError::Store(_) => "store",
        PollError::Panicked(_) => "fetch",
    }
}

/// What to do about a failure, when the error says.
fn fix_for(error: &PollError) -> Option<String> {
    use crate::auth::AuthError;
    use crate::source::imap::ImapError;
    let fix = match error {
        PollError::Source(SourceError::Auth(AuthError::NeedsLogin { command, .. })) => {
            format!("sign in again: {command}")
        }
        PollError::Source(SourceError::Auth(AuthError::Entra {
            aadsts: Some(code), ..
        })) => crate::auth::entra_hint(*code).trim().trim_start_matches("Fix: ").to_string(),
        PollError::Source(SourceError::Imap(ImapError::AuthRejected { .. })) => {
            "the mailbox refused the login: give the app (or user) FullAccess on it and check the address; mail2ticket doctor names the cause".to_string()
        }
        PollError::Source(SourceError::Imap(ImapError::NotConnected { .. })) => {
            "give FullAccess on the mailbox and enable IMAP for it (Set-CASMailbox -ImapEnabled $true)".to_string()
        }
        PollError::Store(_) => "check that Postgres runs and [database] url".to_string(),
        _ => return None,
    };
    (!fix.is_empty()).then_some(fix)
}

async fn supervise(poller: MailboxPoller, states: Registry, cancel: CancellationToken) {
    let progressed = AtomicBool::new(false);
    let new_backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_secs(1))
            .with_max_delay(MAX_BACKOFF)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = new_backoff();
    tracing::info!("poller started");
    while !cancel.is_cancelled() {
        // A panic in one pass (a bug, or a dependency's) is handled like an error: this
        // parser backs off and tries again instead of stopping for good.
        let result = std::panic::AssertUnwindSafe(
            poller.run(&cancel, &|| progressed.store(true, Ordering::Relaxed)),
        )
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(PollError::Panicked(crate::panic_message(&*panic))));
        if cancel.is_cancelled() {
            break;
        }
        if progressed.swap(false, Ordering::Relaxed) {
            // It made progress (a pass, or a committed batch): start the backoff over.
            backoff = new_backoff();
        }
        let delay = match &result {
            Ok(()) => continue,
            // The other side said when to come back (a throttled token endpoint).
            Err(e) => match e.retry_after() {
                Some(after) => after,
                None => backoff.next().unwrap_or(MAX_BACKOFF),
            },
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, retry_in_s = delay.as_secs_f32(), "poller failed");
            let needs_login = matches!(
                e,
                PollError::Source(SourceError::Auth(crate::auth::AuthError::NeedsLogin { .. }))
            );
            let failure = Failure {
                error: e.to_string(),
                fix: fix_for(e),
                retry_at: chrono::Utc::now() + delay,
                needs_login,
            };
            states.failed(poller.name(), failure);
            let labels = [
                ("parser", poller.name().to_string()),
                ("step", failed_step(e).to_string()),
            ];
            metrics::counter!("mail2ticket_poll_errors_total", &labels).increment(1);
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => break,
        }
    }
    states.set(poller.name(), MailboxState::Stopped);
    tracing::info!("poller stopped");
}
