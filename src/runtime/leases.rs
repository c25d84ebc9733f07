//! Which mailboxes this replica reads, when several replicas run against one database.
//!
//! Every mailbox is read under a lease in `mailbox_leases` (see `src/store/leases.rs`):
//! - a replica takes free or expired leases, up to its share, ceil(active mailboxes / live
//!   replicas), and gives back its surplus (after the batch in flight);
//! - it renews what it holds every third of the TTL, in one statement; a lease the renewal
//!   does not find is lost, and its mailbox stops at once (the task is dropped, with its
//!   session and any uncommitted transaction);
//! - when it cannot renew (the database is unreachable, the process was paused) its own
//!   monotonic clock stops every mailbox a fifth of the TTL before the leases could run
//!   out in the database, so nobody else can take one while it still reads (self-fencing);
//! - and should it still try to commit (paused in the middle of a batch), the batch's
//!   transaction checks the lease and its epoch ([`Fence`]) and refuses.

use crate::config::ClusterConfig;
use crate::store::StoreError;
pub use crate::store::leases::Fence;
use crate::store::leases::{self as store};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A lease held by this replica, as a mailbox's task gets it.
#[derive(Debug, Clone)]
pub struct Lease {
    /// What its commits show.
    pub fence: Fence,
    /// Fires when the lease is lost (taken over, not renewed in time): the task must end
    /// at once.
    pub lost: CancellationToken,
}

/// What a turn of [`Leases::balance`] changed.
#[derive(Debug, Default)]
pub struct Balance {
    /// Leases taken: start these mailboxes.
    pub acquired: Vec<(String, Lease)>,
    /// More than this replica's share: stop these after their batch in flight, then
    /// [`Leases::release`] them.
    pub surplus: Vec<String>,
    /// Replicas alive (this one included).
    pub live: usize,
}

/// This replica's leases.
#[derive(Debug)]
pub struct Leases {
    pool: PgPool,
    /// This replica's name.
    me: String,
    ttl: Duration,
    held: Mutex<BTreeMap<String, Lease>>,
    /// When the leases held could start running out (the start of the last successful
    /// renewal plus the TTL), less a margin: this replica stops them all by then.
    fence_at: Mutex<Option<Instant>>,
    /// True while the last renewal failed (its change is logged once).
    failing: std::sync::atomic::AtomicBool,
}

impl Leases {
    /// No leases yet.
    pub fn new(pool: PgPool, cluster: &ClusterConfig) -> Self {
        Leases {
            pool,
            me: cluster.replica_name.clone(),
            ttl: cluster.lease_ttl,
            held: Mutex::default(),
            fence_at: Mutex::default(),
            failing: Default::default(),
        }
    }

    /// This replica's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// How often leases are renewed: a third of the TTL.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How many leases this replica holds.
    pub fn count(&self) -> usize {
        self.held.lock().expect("leases lock").len()
    }

    /// The lease of `parser`, if this replica holds it.
    pub fn get(&self, parser: &str) -> Option<Lease> {
        self.held.lock().expect("leases lock").get(parser).cloned()
    }

    /// When this replica must stop every mailbox unless a renewal succeeds first (`None`
    /// while it holds nothing).
    pub fn fence_at(&self) -> Option<Instant> {
        *self.fence_at.lock().expect("leases lock")
    }

    /// Takes the lease of `parser` if it is free; `Ok(None)` while another replica holds it.
    pub async fn try_acquire(&self, parser: &str) -> Result<Option<Lease>, StoreError> {
        let started = Instant::now();
        let mut conn = self.pool.acquire().await?;
        let Some(epoch) = store::acquire(&mut conn, parser, &self.me, self.ttl).await? else {
            return Ok(None);
        };
        let lease = Lease {
            fence: Fence {
                owner: self.me.clone(),
                epoch,
            },
            lost: CancellationToken::new(),
        };
        let mut held = self.held.lock().expect("leases lock");
        held.insert(parser.to_string(), lease.clone());
        let mut fence_at = self.fence_at.lock().expect("leases lock");
        let this = started + self.fence_margin();
        // The earliest of the leases held decides.
        *fence_at = Some(fence_at.map_or(this, |at| at.min(this)));
        tracing::info!(parser, epoch, "lease acquired");
        Ok(Some(lease))
    }

    /// Takes the lease of `parser`, waiting up to `patience` while another replica holds
    /// it (a dead one's lease runs out within the TTL); the error says who holds it.
    pub async fn wait_for(
        &self,
        parser: &str,
        patience: Duration,
        cancel: &CancellationToken,
    ) -> Result<Lease, String> {
        let give_up = Instant::now() + patience;
        loop {
            if let Some(lease) = self.try_acquire(parser).await.map_err(|e| e.to_string())? {
                return Ok(lease);
            }
            if Instant::now() >= give_up || cancel.is_cancelled() {
                let mut conn = self.pool.acquire().await.map_err(|e| e.to_string())?;
                let holder = store::holder(&mut conn, parser)
                    .await
                    .map_err(|e| e.to_string())?;
                return Err(format!(
                    "replica {:?} holds this mailbox's lease (waited {} s): a daemon reads it; stop it first, or let it do the work",
                    holder.unwrap_or_default(),
                    patience.as_secs()
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    /// The TTL less a fifth: what the local clock allows a lease after its renewal began.
    fn fence_margin(&self) -> Duration {
        self.ttl - self.ttl / 5
    }

    /// Renews every lease held (and this replica's heartbeat); a lease not renewed is lost:
    /// its `lost` fires. Returns how many replicas are alive. Gives up by the time the
    /// leases must be fenced.
    pub async fn renew(&self) -> Result<usize, StoreError> {
        let started = Instant::now();
        let deadline = self.fence_at().map_or(started + self.renew_every(), |at| {
            at.min(started + self.renew_every())
        });
        let held: Vec<(String, i64)> = {
            let held = self.held.lock().expect("leases lock");
            held.iter()
                .map(|(parser, lease)| (parser.clone(), lease.fence.epoch))
                .collect()
        };
        let renewal = async {
            let mut conn = self.pool.acquire().await?;
            let live = store::heartbeat(&mut conn, &self.me, self.ttl).await?;
            let renewed = if held.is_empty() {
                Vec::new()
            } else {
                store::renew(&mut conn, &self.me, &held, self.ttl).await?
            };
            Ok::<_, StoreError>((live, renewed))
        };
        let result = match tokio::time::timeout_at(deadline, renewal).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Sql(sqlx::Error::PoolTimedOut)),
        };
        let (live, renewed) = match result {
            Ok(ok) => ok,
            Err(e) => {
                if !self
                    .failing
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(error = %e, "cannot renew the mailbox leases: every mailbox stops if this lasts past the TTL");
                }
                return Err(e);
            }
        };
        if self
            .failing
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!("mailbox leases renewed again");
        }
        let mut map = self.held.lock().expect("leases lock");
        for (parser, epoch) in &held {
            if !renewed.contains(parser) && map.get(parser).is_some_and(|l| l.fence.epoch == *epoch)
            {
                tracing::warn!(parser = %parser, epoch, "lease lost (taken over or expired): the mailbox stops at once");
                if let Some(lease) = map.remove(parser) {
                    lease.lost.cancel();
                }
            }
        }
        *self.fence_at.lock().expect("leases lock") =
            (!map.is_empty()).then(|| started + self.fence_margin());
        Ok(live)
    }

    /// Renews the leases held every [`Self::renew_every`] and stops them all when renewal
    /// keeps failing until the fencing deadline; never returns (run it beside the work).
    pub async fn keep_renewed(&self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.renew_every()) => {
                    let _ = self.renew().await;
                }
                _ = until(self.fence_at()) => {}
            }
            self.fence_if_due();
        }
    }

    /// Stops every mailbox if the fencing deadline has passed without a renewal.
    pub fn fence_if_due(&self) {
        if self.fence_at().is_some_and(|at| Instant::now() >= at) {
            self.self_fence();
        }
    }

    /// Stops every mailbox (fires every `lost`): the leases could not be renewed in time.
    fn self_fence(&self) {
        let mut held = self.held.lock().expect("leases lock");
        if !held.is_empty() {
            tracing::error!(
                leases = held.len(),
                "the mailbox leases could not be renewed within the TTL: every mailbox of this replica stops until they can"
            );
        }
        for (_, lease) in std::mem::take(&mut *held) {
            lease.lost.cancel();
        }
        *self.fence_at.lock().expect("leases lock") = None;
    }

    /// Renews, then moves this replica towards its share of `active` (the active
    /// parsers): takes free leases while it has fewer, names its surplus while it has more
    /// (leaving out those in `releasing`, already on their way out).
    pub async fn balance(
        &self,
        active: &[String],
        releasing: &[String],
    ) -> Result<Balance, StoreError> {
        let live = self.renew().await?.max(1);
        let share = active.len().div_ceil(live);
        let mut balance = Balance {
            live,
            ..Balance::default()
        };
        let (held, holding): (usize, Vec<String>) = {
            let held = self.held.lock().expect("leases lock");
            let keeping = held.keys().filter(|p| !releasing.contains(p)).count();
            (keeping, held.keys().cloned().collect())
        };
        if held > share {
            // Give back the most recently named ones (any choice balances; this one is
            // stable, so two turns never pick different mailboxes).
            balance.surplus = holding
                .iter()
                .rev()
                .filter(|p| !releasing.contains(p))
                .take(held - share)
                .cloned()
                .collect();
            return Ok(balance);
        }
        // Start at a place of our own in the list, so that replicas starting together do
        // not all race for the same mailboxes first.
        let offset = self.me.bytes().map(usize::from).sum::<usize>() % active.len().max(1);
        let candidates = active[offset..].iter().chain(&active[..offset]);
        let mut wanted = share - held;
        for parser in candidates {
            if wanted == 0 {
                break;
            }
            if holding.contains(parser) {
                continue;
            }
            if let Some(lease) = self.try_acquire(parser).await? {
                balance.acquired.push((parser.clone(), lease));
                wanted -= 1;
            }
        }
        Ok(balance)
    }

    /// Gives the lease of `parser` back (its task has ended), so that another replica may
    /// take it at once. A failure only delays that until the lease runs out.
    pub async fn release(&self, parser: &str) {
        let lease = self.held.lock().expect("leases lock").remove(parser);
        let Some(lease) = lease else { return };
        let released = async {
            let mut conn = self.pool.acquire().await?;
            store::release(&mut conn, parser, &lease.fence).await
        };
        match tokio::time::timeout(self.renew_every(), released).await {
            Ok(Ok(())) => tracing::info!(parser, epoch = lease.fence.epoch, "lease released"),
            Ok(Err(e)) => {
                tracing::warn!(parser, error = %e, "cannot release the lease: it runs out on its own")
            }
            Err(_) => tracing::warn!(
                parser,
                "cannot release the lease in time: it runs out on its own"
            ),
        }
    }

    /// Releases every lease and leaves the live replicas (at shutdown, once every task
    /// has ended).
    pub async fn release_all(&self) {
        let parsers: Vec<String> = self
            .held
            .lock()
            .expect("leases lock")
            .keys()
            .cloned()
            .collect();
        for parser in parsers {
            self.release(&parser).await;
        }
        let left = async {
            let mut conn = self.pool.acquire().await?;
            store::leave(&mut conn, &self.me).await
        };
        if let Ok(Err(e)) = tokio::time::timeout(self.renew_every(), left).await {
            tracing::warn!(error = %e, "cannot remove this replica from the live replicas");
        }
    }
}

/// Sleeps until `at`, or forever when there is no such moment.
pub async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
