//! `mail2ticket status`: a running daemon's mailboxes and credentials as a terminal table
//! and who holds the leases,
//! read from its `/healthz` and `/status.json`; exit 0 when healthy, 1 when not.

use super::EXIT_FAILED;
use serde_json::Value;
use std::process::ExitCode;

/// Prints the status of the daemon at `url`.
pub(super) async fn status_command(url: &str, token: Option<&str>) -> ExitCode {
    let base = url.trim_end_matches('/');
    let (health, status) = match (
        fetch(base, "/healthz", token).await,
        fetch(base, "/status.json", token).await,
    ) {
        (Ok(health), Ok(status)) => (health, status),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    println!(
        "{:<16} {:<12} {:<20} {:<20} {:>7} {:>7}  ERROR / FIX",
        "MAILBOX", "STATE", "SINCE", "LAST OK", "BACKLOG", "CREATED"
    );
    for m in status["mailboxes"].as_array().into_iter().flatten() {
        let problem = [&m["last_error"], &m["fix"]]
            .iter()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "{:<16} {:<12} {:<20} {:<20} {:>7} {:>7}  {problem}",
            text(&m["parser"]),
            text(&m["state"]),
            time(&m["since"]),
            time(&m["last_ok_at"]),
            m["backlog"],
            m["messages_total"]["created"],
        );
    }
    println!();
    println!(
        "{:<16} {:<20} {:<12} {:<20}  REASON",
        "CREDENTIAL", "TYPE", "STATE", "TOKEN EXPIRES"
    );
    for c in status["credentials"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<20} {:<12} {:<20}  {}",
            text(&c["name"]),
            text(&c["type"]),
            text(&c["state"]),
            time(&c["token_expires_at"]),
            text(&c["reason"]),
        );
    }
    let cluster = &status["cluster"];
    let live: Vec<String> = cluster["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| text(&r["name"]))
        .collect();
    let held = |owner: &str| {
        cluster["leases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["held"] == true && l["owner"] == owner)
            .count()
    };
    println!(
        "\nreplica {} holds {} lease(s); live replicas: {}",
        text(&cluster["replica"]),
        held(cluster["replica"].as_str().unwrap_or_default()),
        live.iter()
            .map(|name| format!("{name} ({})", held(name)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if health["healthy"] == true {
        println!("\nhealthy");
        ExitCode::SUCCESS
    } else {
        println!("\nnot healthy");
        ExitCode::from(EXIT_FAILED)
    }
}

/// GETs `path` and reads its JSON (a 503 of `/healthz` still carries JSON).
async fn fetch(base: &str, path: &str, token: Option<&str>) -> Result<Value, String> {
    let client = crate::auth::http_client()?;
    let mut request = client.get(format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {base}{path}: {}", e.without_url()))?;
    let code = response.status();
    if code == reqwest::StatusCode::UNAUTHORIZED {
        return Err(format!(
            "{base}{path}: 401: give the [http] token with --token or MAIL2TICKET_HTTP_TOKEN"
        ));
    }
    response.json().await.map_err(|e| {
        format!(
            "{base}{path} answered HTTP {code} without JSON: {}",
            e.without_url()
        )
    })
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("-").to_string()
}

/// "2026-12-03 06:00:00" from an RFC 3339 time.
fn time(v: &Value) -> String {
    v.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or("-".to_string(), |t| {
            t.format("%Y-%m-%d %H:%M:%S").to_string()
        })
}
