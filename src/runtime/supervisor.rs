//! Runs one poller per active parser whose lease this replica holds (see
//! [`super::leases`]), restarts a failed one with capped exponential backoff and jitter,
//! and stops them all on cancellation. One mailbox's failure never
//! stops or slows another: each poller is its own task with its own backoff, inside a
//! `mailbox{parser=...}` tracing span (so its events need not repeat the name).
//!
//! This is where a parser's [`MailSource`](crate::source::MailSource) is chosen: a new
//! kind of source is registered in [`source_of`].

use crate::auth::TokenSources;
use crate::config::ParserConfig;
use crate::config::SourceConfig;
use crate::config::{Config, ParserAuth, ParserStatus};
use crate::runtime::leases::{self, Fence, Leases};
use crate::runtime::mailbox::{OnceStats, PollError, Poller};
use crate::runtime::state::{Failure, MailboxState, Registry};
use crate::runtime::tasks::Tasks;
use crate::source::SourceError;
use crate::source::graph::{GraphClient, GraphSource};
use crate::source::imap::ImapSource;
use backon::BackoffBuilder;
use futures::FutureExt;
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The loop of one parser, over the parser's mail source.
pub(super) enum MailboxPoller {
    /// `[parser.imap]`.
    Imap(Poller<ImapSource>),
    /// `[parser.graph]`.
    Graph(Poller<GraphSource>),
}

impl MailboxPoller {
    fn name(&self) -> &str {
        match self {
            MailboxPoller::Imap(p) => p.name(),
            MailboxPoller::Graph(p) => p.name(),
        }
    }

    async fn run_once(&self, cancel: &CancellationToken) -> Result<OnceStats, PollError> {
        match self {
            MailboxPoller::Imap(p) => p.run_once(cancel).await,
            MailboxPoller::Graph(p) => p.run_once(cancel).await,
        }
    }

    async fn run(
        &self,
        cancel: &CancellationToken,
        on_progress: &(dyn Fn() + Sync),
    ) -> Result<(), PollError> {
        match self {
            MailboxPoller::Imap(p) => p.run(cancel, on_progress).await,
            MailboxPoller::Graph(p) => p.run(cancel, on_progress).await,
        }
    }
}

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

/// The loop of a parser over its mail source: this is where a kind of source is chosen.
pub(super) fn poller_of(
    parser: &Arc<ParserConfig>,
    pool: &PgPool,
    tokens: &TokenSources,
    states: &Registry,
    fence: Fence,
) -> Result<MailboxPoller, String> {
    let unknown = |name: &str| {
        format!(
            "parser {:?} names an unknown credential {name:?}",
            parser.name
        )
    };
    let (pool, states) = (pool.clone(), states.clone());
    match (&parser.source, &parser.auth) {
        (SourceConfig::Imap(imap), auth) => {
            let tokens = match auth {
                ParserAuth::Credential(name) => {
                    Some(tokens.get(name).ok_or_else(|| unknown(name))?)
                }
                ParserAuth::Password(_) => None,
            };
            let source = ImapSource::new(parser.clone(), imap.clone(), tokens);
            Ok(MailboxPoller::Imap(Poller::new(
                parser.clone(),
                pool,
                source,
                states,
                fence,
            )))
        }
        (SourceConfig::Graph(graph), ParserAuth::Credential(name)) => {
            let tokens = tokens.graph(name).ok_or_else(|| unknown(name))?;
            let client =
                GraphClient::new(&graph.base_url, name, tokens).map_err(|e| e.to_string())?;
            let source = GraphSource::new(parser.clone(), graph.clone(), client);
            Ok(MailboxPoller::Graph(Poller::new(
                parser.clone(),
                pool,
                source,
                states,
                fence,
            )))
        }
        (SourceConfig::Graph(_), ParserAuth::Password(_)) => Err(format!(
            "parser {:?}: a Graph mailbox needs a credential",
            parser.name
        )),
    }
}

/// The span every event of one mailbox's task is logged in.
pub(super) fn mailbox_span(parser: &str) -> tracing::Span {
    tracing::info_span!("mailbox", parser = %parser)
}

/// Processes everything new in every active parser once, all parsers at the same time,
/// each under its lease (taken for the run, waiting for a dead replica's to run out, and
/// released at the end).
pub async fn run_once(
    config: &Config,
    pool: &PgPool,
    tokens: &TokenSources,
    cancel: &CancellationToken,
) -> Vec<OnceReport> {
    let leases = Arc::new(Leases::new(pool.clone(), &config.cluster));
    let states = Registry::default();
    let tasks: Vec<_> = config
        .parsers
        .iter()
        .filter(|p| p.status == ParserStatus::Active)
        .map(|p| {
            let parser = Arc::new(p.clone());
            states.register(&parser);
            let (pool, tokens, states) = (pool.clone(), tokens.clone(), states.clone());
            let (leases, cancel) = (leases.clone(), cancel.clone());
            let span = mailbox_span(&p.name);
            let task = tokio::spawn(
                async move {
                    let result =
                        once_under_lease(&parser, &pool, &tokens, &states, &leases, &cancel).await;
                    OnceReport {
                        parser: parser.name.clone(),
                        result,
                    }
                }
                .instrument(span),
            );
            (p.name.clone(), task)
        })
        .collect();
    let reports = async {
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
    };
    tokio::select! {
        reports = reports => reports,
        _ = leases.keep_renewed() => unreachable!("keep_renewed never returns"),
    }
}

/// One parser of `run --once`: its lease, one pass, the lease given back.
async fn once_under_lease(
    parser: &Arc<ParserConfig>,
    pool: &PgPool,
    tokens: &TokenSources,
    states: &Registry,
    leases: &Leases,
    cancel: &CancellationToken,
) -> Result<OnceStats, String> {
    let patience = leases.ttl() + leases.renew_every();
    let lease = leases.wait_for(&parser.name, patience, cancel).await?;
    let result = match poller_of(parser, pool, tokens, states, lease.fence.clone()) {
        Err(e) => Err(e),
        Ok(poller) => tokio::select! {
            result = poller.run_once(cancel) => result.map_err(|e| e.to_string()),
            _ = lease.lost.cancelled() => Err(
                "the mailbox's lease was lost during the run (the database could not be reached in time, or another replica took it over): stopped; nothing uncommitted was kept".to_string()
            ),
        },
    };
    leases.release(&parser.name).await;
    result
}

/// Runs every active parser until `cancel` fires; returns when all pollers have stopped.
pub async fn run(
    config: &Config,
    pool: &PgPool,
    tokens: &TokenSources,
    cancel: &CancellationToken,
) {
    let config = watch::Sender::new(Arc::new(config.clone()));
    let (_no_reloads, mut reloads) = mpsc::channel(1);
    let states = Registry::default();
    run_observed(&config, pool, tokens, &states, &(), &mut reloads, cancel).await
}

/// What the process around the supervisor hears from its loop (systemd's notify protocol):
/// called from the loop itself, so a hung loop falls silent.
pub trait Heartbeat: Sync {
    /// Every active mailbox's task was started (also: a reload is done).
    fn started(&self);
    /// The loop turned (every [`HEARTBEAT`]).
    fn beat(&self);
    /// A reload of the configuration begins.
    fn reloading(&self);
}

/// Nobody listens.
impl Heartbeat for () {
    fn started(&self) {}
    fn beat(&self) {}
    fn reloading(&self) {}
}

/// [`run`], reporting every mailbox's state to `states` and the supervisor's own heartbeat
/// (its loop turns every [`HEARTBEAT`]) for `/livez`, and reloading the configuration
/// file whenever `reloads` asks (SIGHUP). `config` holds the configuration in force: a
/// reload publishes the new one there (the operations endpoints read their token from it).
pub async fn run_observed(
    config: &watch::Sender<Arc<Config>>,
    pool: &PgPool,
    tokens: &TokenSources,
    states: &Registry,
    heartbeat: &dyn Heartbeat,
    reloads: &mut mpsc::Receiver<()>,
    cancel: &CancellationToken,
) {
    let leases = Arc::new(Leases::new(pool.clone(), &config.borrow().cluster));
    let mut tasks = Tasks::new(pool, tokens, states, &leases, cancel);
    // The first turn takes this replica's share of the leases and starts those mailboxes.
    let first = config.borrow().clone();
    tasks.turn(&first).await;
    let mut next_turn = tokio::time::Instant::now() + leases.renew_every();
    // An interval, not a sleep in the select: the other arms must not postpone it.
    let mut beats = tokio::time::interval(HEARTBEAT);
    beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    states.beat();
    heartbeat.started();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(()) = reloads.recv() => {
                heartbeat.reloading();
                if tasks.reload(config).await.is_ok() {
                    next_turn = tokio::time::Instant::now() + leases.renew_every();
                }
                heartbeat.started();
            }
            _ = tokio::time::sleep_until(next_turn) => {
                let current = config.borrow().clone();
                tasks.turn(&current).await;
                next_turn = tokio::time::Instant::now() + leases.renew_every();
            }
            _ = leases::until(leases.fence_at()) => leases.fence_if_due(),
            _ = beats.tick() => {
                states.beat();
                heartbeat.beat();
                states.announce_stale();
                tasks.reap().await;
            }
        }
    }
    tasks.shut_down().await;
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
        PollError::Source(SourceError::Graph(e)) => {
            use crate::source::graph::GraphError;
            match e {
                GraphError::Unreachable { step, .. }
                | GraphError::Api { step, .. }
                | GraphError::Throttled { step, .. }
                | GraphError::Unexpected { step, .. } => graph_step(step),
                GraphError::ForeignLink { .. } => "fetch",
            }
        }
        PollError::Store(_) => "store",
        PollError::Panicked(_) => "fetch",
    }
}

/// The metric step of a Graph request.
fn graph_step(step: &str) -> &'static str {
    if step.contains("folder") {
        "select"
    } else if step.contains("marking") || step.contains("moving") || step.contains("deleting") {
        "settle"
    } else if step == "setup" || step == "token" {
        "connect"
    } else {
        "fetch"
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

pub(super) async fn supervise(poller: MailboxPoller, states: Registry, cancel: CancellationToken) {
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
        if let Err(PollError::Store(crate::store::StoreError::LeaseLost(lost))) = &result {
            // Another replica may read the mailbox now: this task ends (its lease is
            // given back, and taken again at the next turn if nobody else has it).
            tracing::warn!(error = %lost, "stopping the mailbox");
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
            // Every retry at debug; the registry logs the change of state (and reminders).
            tracing::debug!(error = %e, retry_in_s = delay.as_secs_f32(), "poller failed");
            let credential = match e {
                PollError::Source(SourceError::Auth(crate::auth::AuthError::NeedsLogin {
                    credential,
                    ..
                })) => Some(credential.clone()),
                _ => None,
            };
            let needs_login = credential.is_some();
            let failure = Failure {
                error: e.to_string(),
                step: failed_step(e),
                fix: fix_for(e),
                retry_at: chrono::Utc::now() + delay,
                needs_login,
                credential,
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
