//! The operations endpoints of the real daemon (the binary), against Dovecot, the token
//! endpoint and Postgres: status codes, JSON fields, the bearer token, an ungranted
//! mailbox named by `/healthz`, counts equal to the database's, and `/readyz` while the
//! database is down.

use crate::daemon::message;
use crate::support::KillOnDrop;
use crate::support::env::{NOT_GRANTED, SHARED_A, SHARED_B, TestEnv, binary, wait_for};
use crate::support::postgres::free_port;
use crate::support::proxy::CuttingProxy;
use serde_json::Value;
use std::time::Duration;

const TOKEN: &str = "ops-token-0123456789";

/// An HTTP client (with the crypto provider the program installs).
fn client() -> reqwest::Client {
    mail2ticket::auth::http_client().unwrap()
}

/// `GET url` with an optional bearer token: the status and the body.
async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = client().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The mailbox `parser` in a `/status.json` document.
fn mailbox<'a>(status: &'a Value, parser: &str) -> &'a Value {
    status["mailboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["parser"] == parser)
        .unwrap_or_else(|| panic!("no {parser} in {status}"))
}

#[tokio::test]
async fn the_endpoints_show_every_mailbox_and_enforce_the_token() {
    let s = TestEnv::mail().await;
    for n in 0..3 {
        s.dovecot().deliver(SHARED_A, &message(n, SHARED_A));
    }
    s.dovecot().deliver(SHARED_B, &message(1, SHARED_B));
    // The database through a proxy, to take it away later.
    let (db_proxy, db_url) = s.database_via_proxy().await;
    // The ungranted mailbox's server answers with markup in its error (attacker-controlled).
    let script = b"<script>document.title='pwned'</script>";
    let dovecot_port = s.dovecot().imap_port;
    let scripted =
        CuttingProxy::start_rewriting(dovecot_port, b"Authentication failed", script).await;
    let http_port = free_port();
    let parsers = [
        s.ssl("support", SHARED_A),
        s.ssl("sales", SHARED_B),
        s.plain_via("finance", NOT_GRANTED, scripted.port),
    ];
    let text = s.config_toml(&parsers).replace(&s.db.url, &db_url)
        + &format!("\n[http]\nlisten = \"127.0.0.1:{http_port}\"\ntoken = \"{TOKEN}\"\n");
    let (path, _) = s.write_config("ops.toml", &text);
    let _daemon = KillOnDrop(binary(&["run", "--config"]).arg(&path).spawn().unwrap());
    let base = format!("http://127.0.0.1:{http_port}");
    let status_url = format!("{base}/status.json");

    // Wait until the granted mailboxes are idle with their mail and finance has failed.
    wait_for(Duration::from_secs(60), || async {
        let Ok(response) = client().get(&status_url).bearer_auth(TOKEN).send().await else {
            return false;
        };
        let status: Value = response.json().await.unwrap();
        mailbox(&status, "support")["messages_total"]["created"] == 3
            && mailbox(&status, "sales")["state"] == "idle"
            && mailbox(&status, "finance")["state"] == "backoff"
    })
    .await;

    assert_eq!(get(&format!("{base}/livez"), None).await.0, 200);
    assert_eq!(get(&format!("{base}/readyz"), None).await.0, 200);
    assert_eq!(get(&format!("{base}/healthz"), None).await.0, 401);
    assert_eq!(get(&status_url, Some("wrong-token")).await.0, 401);

    let (code, body) = get(&format!("{base}/healthz"), Some(TOKEN)).await;
    assert_eq!(code, 503, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["healthy"], false);
    let issues = health["issues"].as_array().unwrap();
    assert_eq!(issues.len(), 1, "{body}");
    assert_eq!(issues[0]["parser"], "finance");
    assert_eq!(issues[0]["state"], "backoff");
    assert!(
        issues[0]["reason"].as_str().unwrap().contains("refused"),
        "{body}"
    );

    let (code, body) = get(&status_url, Some(TOKEN)).await;
    assert_eq!(code, 200);
    assert!(!body.contains("s3cret") && !body.contains(TOKEN), "{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    let support = mailbox(&status, "support");
    assert_eq!(support["email"], SHARED_A);
    assert_eq!(support["source"], "imap");
    assert_eq!(support["state"], "idle");
    assert_eq!(support["backlog"], 0);
    assert!(support["last_ok_at"].is_string() && support["last_error"].is_null());
    let stored = s
        .count("select count(*) from tickets where parser = 'support'")
        .await;
    assert_eq!(support["messages_total"]["created"], stored);
    let finance = mailbox(&status, "finance");
    assert!(
        finance["fix"].as_str().unwrap().contains("FullAccess"),
        "{finance}"
    );
    assert!(finance["retry_at"].is_string() && finance["last_error_at"].is_string());
    let credential = &status["credentials"][0];
    assert_eq!(
        (
            &credential["name"],
            &credential["type"],
            &credential["state"]
        ),
        (
            &Value::from("app"),
            &Value::from("client_credentials"),
            &Value::from("ok")
        )
    );
    assert!(credential["token_expires_at"].is_string(), "{credential}");

    // Prometheus: counters equal the database's rows, gauges the states.
    assert_eq!(get(&format!("{base}/metrics"), None).await.0, 401);
    let (code, metrics) = get(&format!("{base}/metrics"), Some(TOKEN)).await;
    assert_eq!(code, 200);
    let value = |name: &str, labels: &[&str]| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
            .or_else(|| {
                metrics
                    .lines()
                    .find(|l| labels.is_empty() && l.starts_with(&format!("{name} ")))
            })
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let created = r#"outcome="created""#;
    assert_eq!(
        value(
            "mail2ticket_messages_total",
            &[r#"parser="support""#, created]
        ),
        stored as f64
    );
    assert_eq!(
        value(
            "mail2ticket_messages_total",
            &[r#"parser="sales""#, created]
        ),
        1.0
    );
    assert_eq!(
        value("mail2ticket_mailbox_up", &[r#"parser="support""#]),
        1.0
    );
    assert_eq!(
        value("mail2ticket_mailbox_up", &[r#"parser="finance""#]),
        0.0
    );
    let backoff = [r#"parser="finance""#, r#"state="backoff""#];
    assert_eq!(value("mail2ticket_mailbox_state", &backoff), 1.0);
    assert!(
        value(
            "mail2ticket_poll_errors_total",
            &[r#"parser="finance""#, r#"step="login""#]
        ) >= 1.0
    );
    let token_ok = [r#"credential="app""#, r#"result="ok""#];
    assert_eq!(value("mail2ticket_token_requests_total", &token_ok), 1.0);
    let latency = value(
        "mail2ticket_ingest_latency_seconds_count",
        &[r#"parser="support""#],
    );
    assert_eq!(latency, stored as f64);
    assert_eq!(
        value(
            "mail2ticket_credential_needs_login",
            &[r#"credential="app""#]
        ),
        0.0
    );
    assert!(value("mail2ticket_build_info", &[]) == 1.0);
    assert!(value("process_resident_memory_bytes", &[]) > 1e6);

    // The same for a person on a shell: exit 1 while finance fails, and 401 named.
    let (out, refused) = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            let status = |token: &str| {
                binary(&["status", "--url", &base, "--token", token])
                    .output()
                    .unwrap()
            };
            (status(TOKEN), status("wrong"))
        })
        .await
        .unwrap()
    };
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("support") && l.contains("idle"))
            && table
                .lines()
                .any(|l| l.starts_with("finance") && l.contains("backoff"))
            && table.contains("not healthy"),
        "{table}"
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));

    // The page, rendered by a real browser: every mailbox with its state, the error as text.
    let (code, page) = get(&format!("{base}/status"), Some(TOKEN)).await;
    assert_eq!(code, 200);
    let file = s.write_file("status.html", &page);
    let profile = s.dir.path().join("chromium-profile");
    let dom = tokio::task::spawn_blocking(move || {
        std::process::Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("file://{}", file.display()))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    for (parser, state) in [
        ("support", "idle"),
        ("sales", "idle"),
        ("finance", "backoff"),
    ] {
        let row = format!("<tr class=\"{state}\"><td>{parser}</td>");
        assert!(dom.contains(&row), "{row} in {dom}");
    }
    assert!(dom.contains("<title>mail2ticket status</title>"), "{dom}");
    assert!(dom.contains("&lt;script&gt;document.title"), "{dom}");
    assert!(!dom.contains("<script"), "{dom}");

    // The database goes away: not ready, though alive.
    db_proxy.set_down(true);
    let (code, body) = get(&format!("{base}/readyz"), None).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(get(&format!("{base}/livez"), None).await.0, 200);
    db_proxy.set_down(false);
    wait_for(Duration::from_secs(20), || async {
        get(&format!("{base}/readyz"), None).await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn systemd_hears_ready_watchdog_status_and_stopping() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    let socket_path = s.dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let (path, _) = s.write_config("notify.toml", &s.config_toml(&[s.ssl("support", SHARED_A)]));
    let child = binary(&["run", "--config"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .spawn()
        .unwrap();
    let pid = child.id();
    let _daemon = KillOnDrop(child);
    let mut heard = Vec::new();
    let mut buf = vec![0u8; 4096];
    let receive = async {
        // READY, then at least two watchdog pings (every second) and an idle status.
        while !(heard.iter().any(|m: &String| m == "READY=1")
            && heard.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2
            && heard
                .iter()
                .any(|m| m.starts_with("STATUS=1 mailboxes: 1 idle")))
        {
            let n = socket.recv(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            heard.extend(text.lines().map(str::to_string));
        }
    };
    tokio::time::timeout(Duration::from_secs(30), receive)
        .await
        .unwrap_or_else(|_| panic!("heard only {heard:?}"));
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let stopping = async {
        loop {
            let n = socket.recv(&mut buf).await.unwrap();
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "STOPPING=1")
            {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("STOPPING=1 on SIGTERM");
}
