//! The daemon's mailbox tasks: one per mailbox whose lease this replica holds, started,
//! stopped and restarted as the leases and the configuration say (the supervisor's loop
//! drives them).

use super::leases::Leases;
use super::state::{MailboxState, Registry};
use super::supervisor::{mailbox_span, poller_of, supervise};
use crate::auth::TokenSources;
use crate::config::{Config, ParserConfig, ParserStatus};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The mailbox tasks of the daemon, started and stopped as the configuration says.
pub(super) struct Tasks {
    pool: PgPool,
    tokens: TokenSources,
    states: Registry,
    /// The mailboxes this replica may read.
    leases: Arc<Leases>,
    /// The daemon's shutdown; each task runs under a child of it.
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The task of each running parser.
    running: HashMap<String, Running>,
    /// Tasks of removed parsers, finishing their batch in flight.
    stopping: Vec<(String, JoinHandle<()>)>,
}

/// One parser's task.
struct Running {
    /// Stops this task only.
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

impl Tasks {
    /// No task yet.
    pub(super) fn new(
        pool: &PgPool,
        tokens: &TokenSources,
        states: &Registry,
        leases: &Arc<Leases>,
        cancel: &CancellationToken,
    ) -> Tasks {
        Tasks {
            pool: pool.clone(),
            tokens: tokens.clone(),
            states: states.clone(),
            leases: leases.clone(),
            cancel: cancel.clone(),
            tracker: TaskTracker::new(),
            running: HashMap::new(),
            stopping: Vec::new(),
        }
    }

    /// Stops every task after its batch in flight, the leases renewed until then, then
    /// gives every lease back at once (a rolling restart hands the mailboxes over at once).
    pub(super) async fn shut_down(self) {
        self.tracker.close();
        tokio::select! {
            _ = self.tracker.wait() => {}
            _ = self.leases.keep_renewed() => {}
        }
        self.leases.release_all().await;
        metrics::gauge!("mail2ticket_leases_held").set(0.0);
    }

    /// Renews the leases and moves towards this replica's share: starts the mailboxes
    /// whose leases it took, stops its surplus after the batch in flight (released once
    /// ended, in [`Self::reap`]).
    pub(super) async fn turn(&mut self, config: &Config) {
        let active: Vec<String> = config
            .parsers
            .iter()
            .filter(|p| p.status == ParserStatus::Active)
            .map(|p| p.name.clone())
            .collect();
        let releasing: Vec<String> = self.stopping.iter().map(|(n, _)| n.clone()).collect();
        if let Ok(balance) = self.leases.balance(&active, &releasing).await {
            for (name, _) in &balance.acquired {
                if let Some(parser) = config.parser(name) {
                    self.start(parser);
                }
            }
            for name in &balance.surplus {
                tracing::info!(parser = %name, live_replicas = balance.live,
                    "more than this replica's share: handing the mailbox over after its batch in flight");
                self.stop(name);
            }
            metrics::gauge!("mail2ticket_replicas_live").set(balance.live as f64);
        }
        metrics::gauge!("mail2ticket_leases_held").set(self.leases.count() as f64);
    }

    /// Starts the task of `parser` if this replica holds its lease. If a task of the same
    /// name is still running or stopping (a restart), the new one waits until it ended: a
    /// mailbox never has two readers.
    fn start(&mut self, parser: &ParserConfig) {
        let name = parser.name.clone();
        let Some(lease) = self.leases.get(&name) else {
            return;
        };
        let previous = match self.running.remove(&name) {
            Some(running) => {
                running.cancel.cancel();
                Some(running.handle)
            }
            None => self
                .stopping
                .iter()
                .position(|(n, _)| *n == name)
                .map(|i| self.stopping.swap_remove(i).1),
        };
        let parser = Arc::new(parser.clone());
        let fence = lease.fence.clone();
        let poller = match poller_of(&parser, &self.pool, &self.tokens, &self.states, fence) {
            Ok(poller) => poller,
            Err(e) => {
                tracing::error!(parser = %name, error = %e, "cannot start the poller");
                return;
            }
        };
        if previous.is_none() {
            self.states.register(&parser);
        }
        let (states, cancel) = (self.states.clone(), self.cancel.child_token());
        let stop = cancel.clone();
        let task = async move {
            if let Some(previous) = previous {
                let _ = previous.await;
                states.register(&parser);
            }
            // A lost lease ends the task at once: its session and any uncommitted
            // transaction are dropped with it.
            tokio::select! {
                _ = supervise(poller, states.clone(), stop) => {}
                _ = lease.lost.cancelled() => states.set(&parser.name, MailboxState::Stopped),
            }
        };
        let handle = self.tracker.spawn(task.instrument(mailbox_span(&name)));
        self.running.insert(name, Running { cancel, handle });
    }

    /// Stops the task of `name` after its batch in flight; it leaves the registry once
    /// it ended.
    fn stop(&mut self, name: &str) {
        if let Some(running) = self.running.remove(name) {
            running.cancel.cancel();
            self.stopping.push((name.to_string(), running.handle));
        }
    }

    /// Forgets the tasks that have ended (stopped, or ended by a lost lease) and gives
    /// their leases back.
    pub(super) async fn reap(&mut self) {
        let mut ended: Vec<String> = Vec::new();
        self.stopping.retain(|(name, handle)| {
            let finished = handle.is_finished();
            if finished {
                ended.push(name.clone());
            }
            !finished
        });
        self.running.retain(|name, running| {
            let finished = running.handle.is_finished();
            if finished {
                ended.push(name.clone());
            }
            !finished
        });
        for name in ended {
            self.states.remove(&name);
            self.leases.release(&name).await;
        }
    }

    /// Reloads the configuration file (see [`Self::apply_file`]), counts the reload, and
    /// lets added mailboxes take their leases now rather than at the next turn.
    pub(super) async fn reload(&mut self, current: &watch::Sender<Arc<Config>>) -> Result<(), ()> {
        let result = self.apply_file(current);
        if result.is_ok() {
            let config = current.borrow().clone();
            self.turn(&config).await;
        }
        let labels = [("result", if result.is_ok() { "ok" } else { "error" })];
        metrics::counter!("mail2ticket_config_reloads_total", &labels).increment(1);
        result
    }

    /// Reads the configuration file again and applies it (see [`super::reload`]). An
    /// invalid file changes nothing: every problem is logged, the running configuration
    /// stays.
    fn apply_file(&mut self, current: &watch::Sender<Arc<Config>>) -> Result<(), ()> {
        let old = current.borrow().clone();
        tracing::info!(file = %old.path.display(), "reloading the configuration");
        let mut new = match Config::load(&old.path) {
            Ok(new) => new,
            Err(e) => {
                for line in e.to_string().lines() {
                    tracing::error!("{line}");
                }
                tracing::error!("configuration not reloaded: the running configuration stays");
                return Err(());
            }
        };
        let changed = match self.tokens.reload(&old, &new) {
            Ok(changed) => changed,
            Err(e) => {
                tracing::error!(error = %e, "configuration not reloaded: the running configuration stays");
                return Err(());
            }
        };
        let plan = super::reload::plan(&old, &new, &changed);
        for name in &plan.stop {
            self.stop(name);
        }
        for name in plan.restart.iter().chain(&plan.start) {
            if let Some(parser) = new.parser(name) {
                self.start(&parser.clone());
            }
        }
        for setting in &plan.needs_restart {
            tracing::warn!(
                file = %old.path.display(),
                "{setting} changed: the running value stays until mail2ticket restarts"
            );
        }
        // What only a restart applies stays as it runs, so the next reload compares with it.
        new.database = old.database.clone();
        new.cluster = old.cluster.clone();
        match (&old.http, &mut new.http) {
            (Some(running), Some(http)) => http.listen = running.listen,
            (running, http) => http.clone_from(running),
        }
        tracing::info!("configuration reloaded: {}", plan.summary());
        current.send_replace(Arc::new(new));
        Ok(())
    }
}
