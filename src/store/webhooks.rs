//! SQL of webhook deliveries (`migrations/0009_webhooks.sql`): the subscriptions mirrored
//! from the configuration, claiming due deliveries (`FOR UPDATE SKIP LOCKED`, so any
//! number of dispatchers can run), recording each attempt, redelivery and cleanup.

use super::StoreError;
use crate::config::WebhookConfig;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::time::Duration;

/// Mirrors the configured webhooks: each is an active subscription with its filters; any
/// other subscription stops receiving new events (its rows stay for `webhooks status`).
pub async fn sync_subscriptions(
    conn: &mut PgConnection,
    webhooks: &[WebhookConfig],
) -> Result<(), StoreError> {
    for w in webhooks {
        sqlx::query(
            "insert into webhook_subscriptions (name, kinds, parsers, active, updated_at)
             values ($1, $2, $3, true, now())
             on conflict (name) do update
             set kinds = excluded.kinds, parsers = excluded.parsers, active = true, updated_at = now()",
        )
        .bind(&w.name)
        .bind(&w.events)
        .bind(&w.parsers)
        .execute(&mut *conn)
        .await?;
    }
    let names: Vec<&str> = webhooks.iter().map(|w| w.name.as_str()).collect();
    sqlx::query(
        "update webhook_subscriptions set active = false, updated_at = now()
          where active and not (name = any($1))",
    )
    .bind(&names)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A delivery claimed for one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    /// The event.
    pub event_id: i64,
    /// Attempts made before this one.
    pub attempts: i32,
    /// The event's kind.
    pub kind: String,
    /// What it says.
    pub payload: serde_json::Value,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// The ticket message's text, for ticket events.
    pub body_text: Option<String>,
}

/// Claims up to `limit` due deliveries of `webhook`, oldest first, for `lease`: until then
/// no other dispatcher takes them (and if this one dies, they come due again).
pub async fn claim_due(
    conn: &mut PgConnection,
    webhook: &str,
    limit: i64,
    lease: Duration,
) -> Result<Vec<Claimed>, StoreError> {
    Ok(sqlx::query_as(
        "with due as (
           select event_id from webhook_deliveries
            where webhook = $1 and delivered_at is null and dead_at is null
              and next_attempt_at <= now()
            order by next_attempt_at, event_id
            limit $2
            for update skip locked),
         claimed as (
           update webhook_deliveries d set next_attempt_at = now() + make_interval(secs => $3)
             from due where d.webhook = $1 and d.event_id = due.event_id
           returning d.event_id, d.attempts)
         select c.event_id, c.attempts, e.kind, e.payload, e.created_at,
                (select m.body_text from ticket_messages m where m.id = e.ticket_message_id) as body_text
           from claimed c join ticket_events e on e.id = c.event_id
          order by c.event_id",
    )
    .bind(webhook)
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(&mut *conn)
    .await?)
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx answer.
    Delivered {
        /// The HTTP status.
        status: u16,
    },
    /// Anything else: retried after `retry_in`, or dead when `None`.
    Failed {
        /// The HTTP status, if there was an answer.
        status: Option<u16>,
        /// What went wrong.
        error: String,
        /// When to try again; `None`: given up.
        retry_in: Option<Duration>,
    },
    /// `410 Gone`: the endpoint is disabled; the delivery waits, due, for the next reload.
    Gone,
}

/// Records the end of an attempt.
pub async fn record(
    conn: &mut PgConnection,
    webhook: &str,
    event_id: i64,
    attempt: &Attempt,
) -> Result<(), StoreError> {
    let sql = match attempt {
        Attempt::Delivered { .. } => {
            "update webhook_deliveries set attempts = attempts + 1, last_status = $3,
                    last_error = null, delivered_at = now()
              where webhook = $1 and event_id = $2"
        }
        Attempt::Failed { .. } => {
            "update webhook_deliveries set attempts = attempts + 1, last_status = $3,
                    last_error = $4,
                    next_attempt_at = now() + make_interval(secs => coalesce($5, 0)),
                    dead_at = case when $5 is null then now() end
              where webhook = $1 and event_id = $2"
        }
        Attempt::Gone => {
            "update webhook_deliveries set last_status = 410,
                    last_error = 'the endpoint answered 410 Gone: disabled until the next reload',
                    next_attempt_at = now()
              where webhook = $1 and event_id = $2"
        }
    };
    let query = sqlx::query(sql).bind(webhook).bind(event_id);
    let query = match attempt {
        Attempt::Delivered { status } => query.bind(i32::from(*status)),
        Attempt::Failed {
            status,
            error,
            retry_in,
        } => query
            .bind(status.map(i32::from))
            .bind(error.as_str())
            .bind(retry_in.map(|d| d.as_secs_f64())),
        Attempt::Gone => query,
    };
    query.execute(&mut *conn).await?;
    Ok(())
}

/// When the next delivery of `webhook` comes due, if any is waiting.
pub async fn next_due(
    conn: &mut PgConnection,
    webhook: &str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(sqlx::query_scalar(
        "select min(next_attempt_at) from webhook_deliveries
          where webhook = $1 and delivered_at is null and dead_at is null",
    )
    .bind(webhook)
    .fetch_one(&mut *conn)
    .await?)
}

/// Deliveries of one webhook by state.
#[derive(Debug, Clone, Default, sqlx::FromRow, serde::Serialize)]
pub struct Counts {
    /// The webhook.
    pub webhook: String,
    /// Waiting for an attempt (or in one).
    pub pending: i64,
    /// Given up on.
    pub dead: i64,
    /// Delivered.
    pub delivered: i64,
}

/// Every webhook's deliveries by state.
pub async fn counts(conn: &mut PgConnection) -> Result<Vec<Counts>, StoreError> {
    Ok(sqlx::query_as(
        "select webhook,
                count(*) filter (where delivered_at is null and dead_at is null) as pending,
                count(*) filter (where dead_at is not null) as dead,
                count(*) filter (where delivered_at is not null) as delivered
           from webhook_deliveries group by webhook order by webhook",
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Makes deliveries due again: the dead ones (of `webhook`, or of all), or those of the
/// given events (delivered or not). Returns how many.
pub async fn redeliver(
    conn: &mut PgConnection,
    webhook: Option<&str>,
    event_ids: Option<&[i64]>,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "update webhook_deliveries
            set attempts = 0, next_attempt_at = now(), dead_at = null, delivered_at = null
          where ($1::text is null or webhook = $1)
            and (case when $2::bigint[] is null then dead_at is not null else event_id = any($2) end)",
    )
    .bind(webhook)
    .bind(event_ids)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes events older than `keep_days` whose every delivery is done (delivered); events
/// with a pending or dead delivery stay (they can still be delivered or redelivered).
pub async fn delete_old_events(conn: &mut PgConnection, keep_days: u32) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "delete from ticket_events e
          where e.created_at < now() - make_interval(days => $1)
            and not exists (select 1 from webhook_deliveries d
                             where d.event_id = e.id and d.delivered_at is null)",
    )
    .bind(keep_days as i32)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}
