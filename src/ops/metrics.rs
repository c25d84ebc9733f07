//! Prometheus metrics (the `metrics` facade with `metrics-exporter-prometheus`, rendered by
//! `GET /metrics`). Counters and histograms are recorded where things happen (the runtime,
//! the token caches); the gauges that describe a mailbox's or credential's state are set
//! from the runtime's registry just before each render, so they never drift from what
//! `/status.json` says. Names follow Prometheus conventions: the `mail2ticket_` prefix, base
//! units, `_total` counters, labels only of configured names and fixed sets.

use crate::auth::TokenSources;
use crate::runtime::state::{MailboxState, Registry};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;

/// Arrival to commit, from 0.1 s to an hour.
const LATENCY_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0];
/// One batch transaction.
const COMMIT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A gauge not set again for this long leaves the output: every live mailbox's and
/// credential's gauges are set before each render, so only those of parsers and
/// credentials removed by a reload go.
const GAUGE_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide recorder (once, when `[http]` is configured).
pub fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .set_buckets_for_metric(
            Matcher::Full("mail2ticket_ingest_latency_seconds".into()),
            LATENCY_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("mail2ticket_batch_commit_seconds".into()),
                COMMIT_BUCKETS,
            )
        })
        .and_then(|b| b.install_recorder())
        .map_err(|e| format!("cannot set up the metrics recorder: {e}"))
}

/// The metrics text: the gauges of every mailbox and credential set from their current
/// state, then everything rendered.
pub async fn render(
    handle: &PrometheusHandle,
    states: &Registry,
    tokens: &TokenSources,
    quarantine_pending: &HashMap<String, i64>,
    webhooks: &[crate::webhooks::EndpointStatus],
) -> String {
    metrics::gauge!("mail2ticket_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for m in states.snapshot() {
        let parser = m.parser.clone();
        let up = if m.state.is_up() { 1.0 } else { 0.0 };
        metrics::gauge!("mail2ticket_mailbox_up", "parser" => parser.clone()).set(up);
        for state in MailboxState::ALL {
            let value = if m.state == state { 1.0 } else { 0.0 };
            let labels = [
                ("parser", parser.clone()),
                ("state", state.as_str().to_string()),
            ];
            metrics::gauge!("mail2ticket_mailbox_state", &labels).set(value);
        }
        if let Some(at) = m.last_ok_at {
            let seconds = at.timestamp_millis() as f64 / 1000.0;
            metrics::gauge!("mail2ticket_mailbox_last_success_timestamp_seconds", "parser" => parser.clone()).set(seconds);
        }
        metrics::gauge!("mail2ticket_mailbox_backlog_messages", "parser" => parser.clone())
            .set(m.backlog as f64);
        let pending = quarantine_pending.get(&parser).copied().unwrap_or(0);
        metrics::gauge!("mail2ticket_quarantine_pending", "parser" => parser).set(pending as f64);
    }
    for c in tokens.statuses().await {
        let needs_login = if c.state == "needs_login" { 1.0 } else { 0.0 };
        metrics::gauge!("mail2ticket_credential_needs_login", "credential" => c.name)
            .set(needs_login);
    }
    for w in webhooks {
        metrics::gauge!("mail2ticket_webhook_pending", "webhook" => w.name.clone())
            .set(w.pending as f64);
    }
    let mut text = handle.render();
    text.push_str(&process_metrics());
    text
}

/// `process_resident_memory_bytes` and `process_cpu_seconds_total` from `/proc/self`.
/// Written by hand: two numbers from two files do not justify another dependency; the
/// kernel reports CPU time in USER_HZ ticks, which is 100 on every Linux architecture.
fn process_metrics() -> String {
    let mut text = String::new();
    let rss_kb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
    if let Some(kb) = rss_kb {
        text.push_str("# TYPE process_resident_memory_bytes gauge\n");
        text.push_str(&format!("process_resident_memory_bytes {}\n", kb * 1024));
    }
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start after ')'.
            let rest = &s[s.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        });
    if let Some(ticks) = ticks {
        text.push_str("# TYPE process_cpu_seconds_total counter\n");
        text.push_str(&format!(
            "process_cpu_seconds_total {}\n",
            ticks as f64 / 100.0
        ));
    }
    text
}
