//! SQL of `mailbox_leases` and `replicas`: which replica reads which mailbox. Only the
//! database's clock decides expiry; an epoch that only grows fences a replica that lost
//! its lease out of every later commit ([`check_fence`], inside the batch transaction).
//! Nothing here needs session state (no advisory locks), so every statement works through
//! a transaction-pooling connection pooler.

use super::StoreError;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::time::Duration;

/// A lease this replica holds: the proof every commit for its mailbox shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// This replica's name.
    pub owner: String,
    /// The lease's epoch when it was acquired.
    pub epoch: i64,
}

/// Why a commit was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "the lease of this mailbox was lost (owner {owner}, epoch {epoch}): another replica may read it now, so nothing was stored"
)]
pub struct LeaseLost {
    /// This replica.
    pub owner: String,
    /// The epoch it held.
    pub epoch: i64,
}

/// Checks, inside the caller's transaction, that `fence` still holds the lease of
/// `parser`, and keeps the row locked until the transaction ends, so that no other replica
/// can take the lease (bump the epoch) before this transaction is committed or rolled
/// back. `Ok(false)` means the lease is lost: the caller must roll back.
pub async fn check_fence(
    conn: &mut PgConnection,
    parser: &str,
    fence: &Fence,
) -> Result<bool, StoreError> {
    let held: Option<i32> = sqlx::query_scalar(
        "select 1 from mailbox_leases
          where parser = $1 and owner = $2 and epoch = $3 and expires_at > now()
          for share",
    )
    .bind(parser)
    .bind(&fence.owner)
    .bind(fence.epoch)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(held.is_some())
}

/// Takes the lease of `parser` for `owner` when it is free (never taken, released or
/// expired), bumping its epoch; returns the new epoch, or `None` when another replica
/// holds it.
pub async fn acquire(
    conn: &mut PgConnection,
    parser: &str,
    owner: &str,
    ttl: Duration,
) -> Result<Option<i64>, StoreError> {
    let epoch = sqlx::query_scalar(
        "insert into mailbox_leases (parser, owner, epoch, expires_at, acquired_at)
         values ($1, $2, 1, now() + $3 * interval '1 millisecond', now())
         on conflict (parser) do update
            set owner = excluded.owner, epoch = mailbox_leases.epoch + 1,
                expires_at = excluded.expires_at, acquired_at = now()
          where mailbox_leases.expires_at <= now()
         returning epoch",
    )
    .bind(parser)
    .bind(owner)
    .bind(ttl.as_millis() as f64)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(epoch)
}

/// Renews the given leases (parser and epoch) of `owner` in one statement; returns the
/// parsers renewed. A lease missing from the answer is lost (taken over, or expired
/// before this renewal): its mailbox must stop at once.
pub async fn renew(
    conn: &mut PgConnection,
    owner: &str,
    held: &[(String, i64)],
    ttl: Duration,
) -> Result<Vec<String>, StoreError> {
    let (parsers, epochs): (Vec<&str>, Vec<i64>) =
        held.iter().map(|(p, e)| (p.as_str(), *e)).unzip();
    let renewed = sqlx::query_scalar(
        "update mailbox_leases l
            set expires_at = now() + $4 * interval '1 millisecond'
           from unnest($2::text[], $3::bigint[]) as h(parser, epoch)
          where l.parser = h.parser and l.epoch = h.epoch and l.owner = $1
            and l.expires_at > now()
         returning l.parser",
    )
    .bind(owner)
    .bind(&parsers)
    .bind(&epochs)
    .bind(ttl.as_millis() as f64)
    .fetch_all(&mut *conn)
    .await?;
    Ok(renewed)
}

/// Gives the lease back (if still held with that epoch), so another replica may take it
/// at once. The row stays: its epoch must keep growing.
pub async fn release(
    conn: &mut PgConnection,
    parser: &str,
    fence: &Fence,
) -> Result<(), StoreError> {
    sqlx::query(
        "update mailbox_leases set expires_at = now()
          where parser = $1 and owner = $2 and epoch = $3 and expires_at > now()",
    )
    .bind(parser)
    .bind(&fence.owner)
    .bind(fence.epoch)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records that `name` is alive (and when it started, the first time); returns how many
/// replicas are alive, counting those whose heartbeat is younger than `ttl`.
pub async fn heartbeat(
    conn: &mut PgConnection,
    name: &str,
    ttl: Duration,
) -> Result<usize, StoreError> {
    let live: i64 = sqlx::query_scalar(
        "with beat as (
            insert into replicas (name, started_at, heartbeat_at) values ($1, now(), now())
            on conflict (name) do update set heartbeat_at = now()
         )
         select 1 + count(*) from replicas
          where name <> $1 and heartbeat_at > now() - $2 * interval '1 millisecond'",
    )
    .bind(name)
    .bind(ttl.as_millis() as f64)
    .fetch_one(&mut *conn)
    .await?;
    Ok(live as usize)
}

/// Removes `name` from the live replicas (at shutdown), and forgets replicas silent for a
/// day.
pub async fn leave(conn: &mut PgConnection, name: &str) -> Result<(), StoreError> {
    sqlx::query("delete from replicas where name = $1 or heartbeat_at < now() - interval '1 day'")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A lease as the status endpoints show it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct LeaseRow {
    /// The mailbox (parser).
    pub parser: String,
    /// The replica that holds (or last held) it.
    pub owner: String,
    /// How often it was taken.
    pub epoch: i64,
    /// When it runs out (in the past: free).
    pub expires_at: DateTime<Utc>,
    /// When the owner took it.
    pub acquired_at: DateTime<Utc>,
    /// True while it has not run out.
    pub held: bool,
}

/// A replica as the status endpoints show it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ReplicaRow {
    /// Its `[cluster] replica_name`.
    pub name: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last renewed.
    pub heartbeat_at: DateTime<Utc>,
}

/// Every lease, by parser.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<LeaseRow>, StoreError> {
    let rows = sqlx::query_as(
        "select parser, owner, epoch, expires_at, acquired_at, expires_at > now() as held
           from mailbox_leases order by parser",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// The replicas whose heartbeat is younger than `ttl`, by name.
pub async fn live_replicas(
    conn: &mut PgConnection,
    ttl: Duration,
) -> Result<Vec<ReplicaRow>, StoreError> {
    let rows = sqlx::query_as(
        "select name, started_at, heartbeat_at from replicas
          where heartbeat_at > now() - $1 * interval '1 millisecond' order by name",
    )
    .bind(ttl.as_millis() as f64)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// The replica holding the lease of `parser` now, if any.
pub async fn holder(conn: &mut PgConnection, parser: &str) -> Result<Option<String>, StoreError> {
    let owner = sqlx::query_scalar(
        "select owner from mailbox_leases where parser = $1 and expires_at > now()",
    )
    .bind(parser)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(owner)
}
