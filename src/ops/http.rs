//! The operations endpoints (axum), off unless `[http]` is configured:
//! - `/livez`: 200 while the supervisor's own loop turns, 503 when it is stuck;
//! - `/readyz`: 200 when the database answers a query within 2 s, 503 otherwise;
//! - `/healthz`: for monitoring systems: 200 when every active mailbox is `idle` or
//!   `fetching` and no credential fails, else 503 with the issues;
//! - `/status.json`: this replica's mailboxes and the credentials, with states, errors and
//!   fixes, and the cluster: live replicas and every mailbox's lease (owner, epoch);
//! - `/metrics`: Prometheus text ([`super::metrics`]);
//! - `/status`: the same for a person, as HTML ([`super::status_page`]).
//!
//! With `[http] token`, every endpoint but `/livez` and `/readyz` needs
//! `Authorization: Bearer <token>`, compared in constant time. The token is read from the
//! configuration in force, so a reload that rotates it applies at once.

use crate::auth::{CredentialStatus, TokenSources};
use crate::config::{Config, HttpConfig};
use crate::runtime::state::{MailboxStatus, Registry};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// The supervisor is stuck when its heartbeat is older than this.
const LIVENESS_LIMIT: Duration = Duration::from_secs(10);
/// `/readyz` waits this long for the database.
const READINESS_LIMIT: Duration = Duration::from_secs(2);

/// What the endpoints read.
#[derive(Clone)]
pub struct Ops {
    /// Every mailbox's state and the supervisor's heartbeat.
    pub states: Registry,
    /// Every credential's token cache.
    pub tokens: TokenSources,
    /// The database.
    pub pool: sqlx::PgPool,
    /// When this process started.
    pub started_at: DateTime<Utc>,
    /// The metrics recorder's handle.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The configuration in force (its `[http] token`), replaced by each reload.
    pub config: tokio::sync::watch::Receiver<Arc<Config>>,
    /// Webhook endpoints disabled by a `410 Gone`.
    pub disabled_webhooks: crate::webhooks::Disabled,
}

impl Ops {
    /// The replicas and the leases.
    async fn cluster(&self) -> super::cluster::ClusterView {
        let cluster = self.config.borrow().cluster.clone();
        super::cluster::ClusterView::load(&self.pool, &cluster).await
    }

    /// Every webhook endpoint with its deliveries.
    async fn webhooks(&self) -> Vec<crate::webhooks::EndpointStatus> {
        let config = self.config.borrow().clone();
        crate::webhooks::statuses(&self.pool, &config, &self.disabled_webhooks).await
    }
}

struct App {
    ops: Ops,
}

/// Binds the listener (so a port in use fails the start, not later).
pub async fn bind(http: &HttpConfig) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(http.listen)
        .await
        .map_err(|e| format!("cannot listen on {} ([http] listen): {e}", http.listen))
}

/// Serves the endpoints on `listener` until `cancel` fires.
pub async fn serve(listener: tokio::net::TcpListener, ops: Ops, cancel: CancellationToken) {
    let app = Arc::new(App { ops });
    let guarded = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status_page))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    let router = axum::Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(app);
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the HTTP listener stopped");
    }
}

/// 401 unless the request carries the configured bearer token.
async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let token = app
        .ops
        .config
        .borrow()
        .http
        .as_ref()
        .and_then(|h| h.token.clone());
    if let Some(expected) = &token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let matches: bool = given
            .as_bytes()
            .ct_eq(expected.expose_secret().as_bytes())
            .into();
        if !matches {
            let challenge = [(header::WWW_AUTHENTICATE, "Bearer")];
            return (
                StatusCode::UNAUTHORIZED,
                challenge,
                "bearer token required\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn livez(State(app): State<Arc<App>>) -> Response {
    let beat = app.ops.states.last_beat();
    let fresh =
        beat.is_some_and(|at| (Utc::now() - at).to_std().unwrap_or_default() < LIVENESS_LIMIT);
    if fresh {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let text = "the supervisor's loop has not turned for 10 s\n";
        (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let query = sqlx::query("select 1").execute(&app.ops.pool);
    match tokio::time::timeout(READINESS_LIMIT, query).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(e)) => {
            let text = format!(
                "the database failed: {}\n",
                crate::store::StoreError::from(e)
            );
            (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
        }
        Err(_) => {
            let text = "the database did not answer within 2 s\n";
            (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
        }
    }
}

/// One thing that keeps `/healthz` from being healthy.
#[derive(Serialize)]
struct Issue {
    #[serde(skip_serializing_if = "Option::is_none")]
    parser: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credential: Option<String>,
    state: String,
    reason: Option<String>,
    since: Option<DateTime<Utc>>,
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let mut issues: Vec<Issue> = app
        .ops
        .states
        .snapshot()
        .into_iter()
        .filter(|m| !m.state.is_up())
        .map(|m| Issue {
            parser: Some(m.parser),
            credential: None,
            state: m.state.as_str().to_string(),
            reason: m.last_error,
            since: Some(m.since),
        })
        .collect();
    for c in app.ops.tokens.statuses().await {
        if c.state != "ok" {
            issues.push(Issue {
                parser: None,
                credential: Some(c.name),
                state: c.state.to_string(),
                reason: c.reason,
                since: None,
            });
        }
    }
    let healthy = issues.is_empty();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"healthy": healthy, "issues": issues}))).into_response()
}

/// A mailbox in `/status.json`: its state, the rows waiting in quarantine, and its
/// lease.
#[derive(Serialize)]
struct MailboxView {
    #[serde(flatten)]
    status: MailboxStatus,
    quarantine_pending: i64,
    /// The replica holding its lease.
    owner: Option<String>,
    /// The lease's epoch (how often it was taken).
    epoch: Option<i64>,
}

/// Rows waiting in quarantine per parser; empty while the database is down (the status
/// must show then too).
async fn quarantine_pending(app: &App) -> std::collections::HashMap<String, i64> {
    let pending = async {
        let mut conn = app.ops.pool.acquire().await?;
        crate::store::quarantine::pending_counts(&mut conn).await
    };
    pending.await.unwrap_or_default()
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let pending = quarantine_pending(&app).await;
    let ops = &app.ops;
    let webhooks = ops.webhooks().await;
    let text =
        super::metrics::render(&ops.metrics, &ops.states, &ops.tokens, &pending, &webhooks).await;
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (content_type, text).into_response()
}

async fn status_page(State(app): State<Arc<App>>) -> Response {
    let pending = quarantine_pending(&app).await;
    let mailboxes = app.ops.states.snapshot();
    let credentials = app.ops.tokens.statuses().await;
    let webhooks = app.ops.webhooks().await;
    let cluster = app.ops.cluster().await;
    let page = super::status_page::render(
        &mailboxes,
        &credentials,
        &webhooks,
        &cluster,
        &pending,
        app.ops.started_at,
    );
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'",
        ),
    ];
    (headers, page).into_response()
}

async fn status_json(State(app): State<Arc<App>>) -> Response {
    let pending = quarantine_pending(&app).await;
    let cluster = app.ops.cluster().await;
    let mailboxes: Vec<MailboxView> = app
        .ops
        .states
        .snapshot()
        .into_iter()
        .map(|status| {
            let lease = cluster.lease(&status.parser).filter(|l| l.held);
            MailboxView {
                quarantine_pending: pending.get(&status.parser).copied().unwrap_or(0),
                owner: lease.map(|l| l.owner.clone()),
                epoch: lease.map(|l| l.epoch),
                status,
            }
        })
        .collect();
    let credentials: Vec<CredentialStatus> = app.ops.tokens.statuses().await;
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": app.ops.started_at,
        "mailboxes": mailboxes,
        "credentials": credentials,
        "webhooks": app.ops.webhooks().await,
        "cluster": cluster,
    }))
    .into_response()
}
