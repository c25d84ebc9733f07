//! `events list`, `webhooks status` and `webhooks redeliver`.

use super::{EXIT_FAILED, EXIT_USAGE, WebhooksAction, connect_and_migrate};
use crate::config::Config;
use crate::store::webhooks as store;
use std::process::ExitCode;

/// `events list`: one JSON object per line (id, kind, parser, payload, created_at).
pub(super) async fn list(config: &Config, since: i64, limit: i64) -> ExitCode {
    let pool = match connect_and_migrate(config).await {
        Ok(pool) => pool,
        Err(code) => return code,
    };
    let events = async {
        let mut conn = pool.acquire().await?;
        crate::store::events::list(&mut conn, since, limit).await
    };
    match events.await {
        Ok(events) => {
            for event in &events {
                println!(
                    "{}",
                    serde_json::to_string(event).expect("events serialize")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `webhooks status|redeliver`.
pub(super) async fn webhooks(config: &Config, action: WebhooksAction) -> ExitCode {
    let pool = match connect_and_migrate(config).await {
        Ok(pool) => pool,
        Err(code) => return code,
    };
    let done = async {
        let mut conn = pool.acquire().await?;
        match action {
            WebhooksAction::Status { .. } => {
                let counts = store::counts(&mut conn).await?;
                println!(
                    "{:<20} {:>9} {:>9} {:>9}  configured",
                    "webhook", "pending", "dead", "delivered"
                );
                let mut names: Vec<&str> =
                    config.webhooks.iter().map(|w| w.name.as_str()).collect();
                names.extend(counts.iter().map(|c| c.webhook.as_str()));
                names.sort();
                names.dedup();
                for name in names {
                    let c = counts
                        .iter()
                        .find(|c| c.webhook == name)
                        .cloned()
                        .unwrap_or_default();
                    let configured = if config.webhooks.iter().any(|w| w.name == name) {
                        "yes"
                    } else {
                        "no (removed)"
                    };
                    println!(
                        "{name:<20} {:>9} {:>9} {:>9}  {configured}",
                        c.pending, c.dead, c.delivered
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            WebhooksAction::Redeliver {
                dead,
                webhook,
                events,
                ..
            } => {
                if !dead && events.is_empty() {
                    eprintln!("error: name event ids, or --dead for every delivery given up on");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
                let ids = (!dead).then_some(events.as_slice());
                let n = store::redeliver(&mut conn, webhook.as_deref(), ids).await?;
                println!("{n} deliveries are due again; a running daemon sends them now");
                Ok(ExitCode::SUCCESS)
            }
        }
    };
    match done.await {
        Ok(code) => code,
        Err::<_, crate::store::StoreError>(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
