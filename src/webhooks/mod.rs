//! Delivers the events outbox to the configured webhooks, at least once, however long an
//! endpoint is down:
//! - each event is POSTed as `{"type", "timestamp", "data"}` with the Standard Webhooks
//!   headers `webhook-id` (`msg_<event id>`: the same for every retry to an endpoint),
//!   `webhook-timestamp` and `webhook-signature` ([`signature`]);
//! - a 2xx is delivered; `410 Gone` disables the endpoint until the next reload (loudly);
//!   anything else (a timeout, a refused connection) is retried after [`RETRY_DELAYS`],
//!   then the delivery is dead (`mail2ticket webhooks redeliver` revives it);
//! - each endpoint has its own task, so a slow or dead endpoint delays neither ingest nor
//!   the others; every task wakes on `NOTIFY mail2ticket_events`, when its next delivery
//!   comes due, and at least every [`IDLE_WAKE`];
//! - deliveries are claimed in the database (`FOR UPDATE SKIP LOCKED` and a lease), so any
//!   number of processes can dispatch side by side.

pub mod signature;

use crate::config::{Config, WebhookConfig};
use crate::store::webhooks::{self as store, Attempt, Claimed};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// The waits between attempts: after the first failure 5 s, then 5 min, 30 min, 2 h, 5 h,
/// 10 h, 10 h; a delivery failing once more is dead.
pub const RETRY_DELAYS: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];
/// A task with nothing due looks again at least this often.
const IDLE_WAKE: Duration = Duration::from_secs(30);
/// Deliveries claimed at once per endpoint.
const CLAIM: i64 = 20;
/// How often delivered events past `[events] keep_days` are deleted.
const CLEANUP_EVERY: Duration = Duration::from_secs(3600);

/// Endpoints that answered `410 Gone`, disabled until the next reload; shown by the
/// operations endpoints.
#[derive(Debug, Clone, Default)]
pub struct Disabled(Arc<Mutex<HashSet<String>>>);

impl Disabled {
    /// Is this endpoint disabled?
    pub fn contains(&self, webhook: &str) -> bool {
        self.0.lock().expect("not poisoned").contains(webhook)
    }

    fn insert(&self, webhook: &str) {
        self.0
            .lock()
            .expect("not poisoned")
            .insert(webhook.to_string());
    }

    fn clear(&self) {
        self.0.lock().expect("not poisoned").clear();
    }
}

/// Runs the dispatcher until `cancel`: mirrors the configuration's webhooks into the
/// database (again after each reload, which also re-enables endpoints that answered 410),
/// and runs one task per endpoint.
pub async fn run(
    pool: PgPool,
    mut config: watch::Receiver<Arc<Config>>,
    disabled: Disabled,
    cancel: CancellationToken,
) {
    let wake = Arc::new(Notify::new());
    tokio::spawn(clean_up(pool.clone(), config.clone(), cancel.clone()));
    loop {
        let current = config.borrow_and_update().clone();
        disabled.clear();
        if let Err(e) = sync(&pool, &current.webhooks).await {
            tracing::error!(error = %e, "cannot record the webhooks in the database; retrying");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                _ = cancel.cancelled() => return,
            }
        }
        let round = cancel.child_token();
        let mut tasks: Vec<_> = current
            .webhooks
            .iter()
            .map(|webhook| {
                let endpoint = Endpoint {
                    pool: pool.clone(),
                    webhook: webhook.clone(),
                    http: client(webhook),
                    disabled: disabled.clone(),
                };
                let (wake, stop) = (wake.clone(), round.clone());
                let span = tracing::info_span!("webhook", webhook = %webhook.name);
                tokio::spawn(tracing::Instrument::instrument(
                    endpoint.run(wake, stop),
                    span,
                ))
            })
            .collect();
        if !current.webhooks.is_empty() {
            tasks.push(tokio::spawn(listen(
                pool.clone(),
                wake.clone(),
                round.clone(),
            )));
        }
        tokio::select! {
            changed = config.changed() => {
                round.cancel();
                for task in tasks {
                    let _ = task.await;
                }
                if changed.is_err() {
                    return;
                }
            }
            _ = cancel.cancelled() => {
                for task in tasks {
                    let _ = task.await;
                }
                return;
            }
        }
    }
}

async fn sync(pool: &PgPool, webhooks: &[WebhookConfig]) -> Result<(), crate::store::StoreError> {
    let mut conn = pool.acquire().await?;
    store::sync_subscriptions(&mut conn, webhooks).await
}

/// An HTTP client for one endpoint, with its timeout per attempt.
fn client(webhook: &WebhookConfig) -> reqwest::Client {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(webhook.timeout)
        .user_agent(concat!("mail2ticket/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

/// Wakes every endpoint task on each `NOTIFY mail2ticket_events` (reconnecting when the
/// connection drops; the tasks' timers cover the gap). Runs only while webhooks are
/// configured, on a connection of its own: a listener holds its connection for good, and
/// one taken from `pool` would leave the mailboxes one fewer (none with
/// `max_connections = 1`).
async fn listen(pool: PgPool, wake: Arc<Notify>, cancel: CancellationToken) {
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with((*pool.connect_options()).clone());
    while !cancel.is_cancelled() {
        let listened = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&own).await?;
            listener.listen(crate::store::events::CHANNEL).await?;
            loop {
                listener.recv().await?;
                wake.notify_waiters();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            result = listened => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "the event listener lost its connection; reconnecting");
                }
            }
            _ = cancel.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Deletes delivered events past `[events] keep_days`, hourly.
async fn clean_up(pool: PgPool, config: watch::Receiver<Arc<Config>>, cancel: CancellationToken) {
    loop {
        let keep_days = config.borrow().events.keep_days;
        let deleted = async {
            let mut conn = pool.acquire().await?;
            store::delete_old_events(&mut conn, keep_days).await
        };
        match deleted.await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                events = n,
                keep_days,
                "deleted delivered events past keep_days"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot delete old events"),
        }
        tokio::select! {
            _ = tokio::time::sleep(CLEANUP_EVERY) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// One endpoint's deliveries.
struct Endpoint {
    pool: PgPool,
    webhook: WebhookConfig,
    http: reqwest::Client,
    disabled: Disabled,
}

impl Endpoint {
    async fn run(self, wake: Arc<Notify>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            // Registered before looking, so a NOTIFY between the look and the wait counts.
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let pause = if self.disabled.contains(&self.webhook.name) {
                IDLE_WAKE
            } else {
                match self.deliver_due().await {
                    Ok(true) => continue,
                    Ok(false) => self.until_next_due().await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the deliveries; retrying");
                        Duration::from_secs(5)
                    }
                }
            };
            tokio::select! {
                _ = &mut woken => {}
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Claims and tries the due deliveries; true when there were some.
    async fn deliver_due(&self) -> Result<bool, crate::store::StoreError> {
        let lease = self.webhook.timeout + Duration::from_secs(30);
        let claimed = {
            let mut conn = self.pool.acquire().await?;
            store::claim_due(&mut conn, &self.webhook.name, CLAIM, lease).await?
        };
        if claimed.is_empty() {
            return Ok(false);
        }
        for delivery in &claimed {
            if self.disabled.contains(&self.webhook.name) {
                break; // the claims expire on their own and wait for the next reload
            }
            let attempt = self.attempt(delivery).await;
            let result = match &attempt {
                Attempt::Delivered { .. } => "delivered",
                Attempt::Failed {
                    retry_in: Some(_), ..
                } => "failed",
                Attempt::Failed { retry_in: None, .. } => "dead",
                Attempt::Gone => "gone",
            };
            let labels = [
                ("webhook", self.webhook.name.clone()),
                ("result", result.to_string()),
            ];
            metrics::counter!("mail2ticket_webhook_deliveries_total", &labels).increment(1);
            match &attempt {
                Attempt::Failed {
                    error, retry_in, ..
                } => {
                    tracing::warn!(
                        event = delivery.event_id,
                        attempts = delivery.attempts + 1,
                        retry_in_s = retry_in.map(|d| d.as_secs()),
                        "webhook delivery failed: {error}"
                    );
                }
                Attempt::Gone => {
                    tracing::error!(
                        "the endpoint answered 410 Gone: webhook disabled until the next reload (systemctl reload mail2ticket); its deliveries wait"
                    );
                    self.disabled.insert(&self.webhook.name);
                }
                Attempt::Delivered { .. } => {}
            }
            let mut conn = self.pool.acquire().await?;
            store::record(&mut conn, &self.webhook.name, delivery.event_id, &attempt).await?;
        }
        Ok(true)
    }

    /// How long until the next delivery comes due (at most [`IDLE_WAKE`]).
    async fn until_next_due(&self) -> Duration {
        let next = async {
            let mut conn = self.pool.acquire().await?;
            store::next_due(&mut conn, &self.webhook.name).await
        };
        match next.await {
            Ok(Some(at)) => (at - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(IDLE_WAKE),
            _ => IDLE_WAKE,
        }
    }

    /// One POST of one event.
    async fn attempt(&self, delivery: &Claimed) -> Attempt {
        let body = body_of(delivery, self.webhook.include_body);
        let id = format!("msg_{}", delivery.event_id);
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signature::sign(&self.webhook.signing_key(), &id, timestamp, &body);
        let sent = self
            .http
            .post(&self.webhook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let retry_in = RETRY_DELAYS.get(delivery.attempts as usize).copied();
        match sent {
            Ok(response) if response.status().is_success() => Attempt::Delivered {
                status: response.status().as_u16(),
            },
            Ok(response) if response.status() == reqwest::StatusCode::GONE => Attempt::Gone,
            Ok(response) => Attempt::Failed {
                status: Some(response.status().as_u16()),
                error: format!("HTTP {}", response.status()),
                retry_in,
            },
            Err(e) => Attempt::Failed {
                status: None,
                error: if e.is_timeout() {
                    format!("no answer within {} s", self.webhook.timeout.as_secs())
                } else {
                    format!("cannot reach the endpoint: {}", crate::error_causes(&e))
                },
                retry_in,
            },
        }
    }
}

/// `{"type", "timestamp", "data"}`; ticket events carry `body_text` when asked.
fn body_of(delivery: &Claimed, include_body: bool) -> Vec<u8> {
    let mut data = delivery.payload.clone();
    if include_body && let (Some(text), Some(object)) = (&delivery.body_text, data.as_object_mut())
    {
        object.insert("body_text".into(), text.clone().into());
    }
    let body = serde_json::json!({
        "type": delivery.kind,
        "timestamp": delivery.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": data,
    });
    serde_json::to_vec(&body).expect("JSON values serialize")
}

/// One endpoint as the operations endpoints show it (its host only: a URL may carry a
/// token of the receiver).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStatus {
    /// The webhook's name.
    pub name: String,
    /// The host it delivers to.
    pub host: String,
    /// `ok`, or `disabled` (it answered 410 Gone; until the next reload).
    pub state: &'static str,
    /// Deliveries waiting (or being tried).
    pub pending: i64,
    /// Deliveries given up on.
    pub dead: i64,
    /// Deliveries done.
    pub delivered: i64,
}

/// Every configured endpoint with its deliveries by state (zeros while the database is
/// down: the status must show then too).
pub async fn statuses(pool: &PgPool, config: &Config, disabled: &Disabled) -> Vec<EndpointStatus> {
    let counts = async {
        let mut conn = pool.acquire().await?;
        store::counts(&mut conn).await
    };
    let counts: HashMap<String, store::Counts> = counts
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|c| (c.webhook.clone(), c))
        .collect();
    config
        .webhooks
        .iter()
        .map(|w| {
            let c = counts.get(&w.name).cloned().unwrap_or_default();
            EndpointStatus {
                name: w.name.clone(),
                host: url::Url::parse(&w.url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_default(),
                state: if disabled.contains(&w.name) {
                    "disabled"
                } else {
                    "ok"
                },
                pending: c.pending,
                dead: c.dead,
                delivered: c.delivered,
            }
        })
        .collect()
}
