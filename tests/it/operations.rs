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

/// The mailbox `parser` in a `/status.json` document, or null while it is not there yet
/// (a mailbox appears once its lease is taken): for conditions waited for.
fn mailbox_or_null<'a>(status: &'a Value, parser: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    status["mailboxes"]
        .as_array()
        .and_then(|all| all.iter().find(|m| m["parser"] == parser))
        .unwrap_or(&NULL)
}

/// The value of metric `name` on the line carrying every one of `labels`, if any.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .or_else(|| {
            text.lines()
                .find(|l| labels.is_empty() && l.starts_with(&format!("{name} ")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
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
        mailbox_or_null(&status, "support")["messages_total"]["created"] == 3
            && mailbox_or_null(&status, "sales")["state"] == "idle"
            && mailbox_or_null(&status, "finance")["state"] == "backoff"
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
        metric(&metrics, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{metrics}"))
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
            && table.contains("not healthy")
            && table.contains("holds 3 lease(s); live replicas: "),
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

    // The outbox heard of finance's failure once, however many retries it took.
    let failing = s
        .count("select count(*) from ticket_events where kind = 'mailbox.state_changed' and parser = 'finance' and payload->>'state' = 'backoff'")
        .await;
    assert_eq!(failing, 1);

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

/// Sends `signal` to process `pid`.
fn kill(signal: &str, pid: u32) {
    let sent = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Everything heard on a notify socket, collected in the background.
fn listen_for_notifications(
    socket: tokio::net::UnixDatagram,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = heard.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf).await {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            into.lock()
                .unwrap()
                .extend(text.lines().map(str::to_string));
        }
    });
    heard
}

#[tokio::test]
async fn a_sighup_applies_a_new_file_and_a_broken_one_changes_nothing() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    for n in 0..2 {
        s.dovecot().deliver(SHARED_B, &message(n, SHARED_B));
    }
    // Each mailbox through its own proxy, which counts the sessions opened.
    let imap = s.dovecot().imap_port;
    let support_link = CuttingProxy::start_passing(imap).await;
    let sales_link = CuttingProxy::start_passing(imap).await;
    let http_port = free_port();
    let http = |token: &str| {
        format!("\n[http]\nlisten = \"127.0.0.1:{http_port}\"\ntoken = \"{token}\"\n")
    };
    let support = || s.plain_via("support", SHARED_A, support_link.port);
    let sales = || s.plain_via("sales", SHARED_B, sales_link.port);
    let first = s.config_toml(&[support(), s.ssl("finance", NOT_GRANTED)]) + &http(TOKEN);
    let path = s.write_file("reload.toml", &first);
    let socket_path = s.dir.path().join("notify.sock");
    let heard = listen_for_notifications(tokio::net::UnixDatagram::bind(&socket_path).unwrap());
    let log_path = s.dir.path().join("stderr.log");
    let child = binary(&["run", "--config"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _daemon = KillOnDrop(child);
    let base = format!("http://127.0.0.1:{http_port}");
    let status = |token: &'static str| {
        let url = format!("{base}/status.json");
        async move {
            let response = client().get(&url).bearer_auth(token).send().await.ok()?;
            if response.status() != 200 {
                return None;
            }
            response.json::<Value>().await.ok()
        }
    };
    let state = |status: &Value, parser: &str| -> Option<String> {
        status["mailboxes"]
            .as_array()?
            .iter()
            .find(|m| m["parser"] == parser)
            .map(|m| m["state"].as_str().unwrap().to_string())
    };
    wait_for(Duration::from_secs(60), || async {
        status(TOKEN).await.is_some_and(|st| {
            mailbox_or_null(&st, "support")["messages_total"]["created"] == 1
                && state(&st, "support").as_deref() == Some("idle")
                && state(&st, "finance").as_deref() == Some("backoff")
        })
    })
    .await;
    assert_eq!(support_link.connections(), 1);

    // 1. Add sales, remove finance, rotate the HTTP token; support is not touched.
    const ROTATED: &str = "rotated-token-9876543210";
    s.write_file(
        "reload.toml",
        &(s.config_toml(&[support(), sales()]) + &http(ROTATED)),
    );
    kill("-HUP", pid);
    wait_for(Duration::from_secs(60), || async {
        status(ROTATED).await.is_some_and(|st| {
            mailbox_or_null(&st, "sales")["messages_total"]["created"] == 2
                && state(&st, "sales").as_deref() == Some("idle")
                && state(&st, "finance").is_none()
        })
    })
    .await;
    assert!(status(TOKEN).await.is_none(), "the old token still works");
    let st = status(ROTATED).await.unwrap();
    assert_eq!(state(&st, "support").as_deref(), Some("idle"));
    assert_eq!(mailbox(&st, "support")["messages_total"]["created"], 1);
    assert_eq!(
        support_link.connections(),
        1,
        "support's session was closed"
    );
    let notifications = heard.lock().unwrap().clone();
    let reloading = notifications.iter().position(|m| m == "RELOADING=1");
    let ready_again = notifications.iter().rposition(|m| m == "READY=1");
    assert!(
        matches!((reloading, ready_again), (Some(r), Some(a)) if r < a)
            && notifications
                .iter()
                .any(|m| m.starts_with("MONOTONIC_USEC=")),
        "{notifications:?}"
    );
    // The removed parser's gauges leave /metrics; the reload is counted.
    let metrics_url = format!("{base}/metrics");
    wait_for(Duration::from_secs(20), || async {
        let (_, text) = get(&metrics_url, Some(ROTATED)).await;
        metric(&text, "mail2ticket_mailbox_up", &[r#"parser="finance""#]).is_none()
            && metric(&text, "mail2ticket_mailbox_up", &[r#"parser="sales""#]) == Some(1.0)
            && text.lines().any(|l| l == "mail2ticket_leases_held 2")
    })
    .await;
    // This replica holds both leases, and says so.
    let st = status(ROTATED).await.unwrap();
    let replica = st["cluster"]["replica"].as_str().unwrap().to_string();
    assert_eq!(mailbox(&st, "sales")["owner"], replica.as_str(), "{st}");
    assert!(
        mailbox(&st, "sales")["epoch"].as_i64().unwrap() >= 1,
        "{st}"
    );
    assert_eq!(
        st["cluster"]["replicas"][0]["name"],
        replica.as_str(),
        "{st}"
    );
    let (_, text) = get(&metrics_url, Some(ROTATED)).await;
    let reloads = |result: &str| {
        let label = format!("result=\"{result}\"");
        metric(&text, "mail2ticket_config_reloads_total", &[&label])
    };
    assert_eq!(reloads("ok"), Some(1.0), "{text}");

    // 2. A changed parser restarts (a new session); the unchanged one keeps its own.
    let changed = s.config_toml(&[support(), sales().with("stale_after = 900")]) + &http(ROTATED);
    s.write_file("reload.toml", &changed);
    kill("-HUP", pid);
    wait_for(Duration::from_secs(30), || async {
        sales_link.connections() == 2
            && status(ROTATED)
                .await
                .is_some_and(|st| state(&st, "sales").as_deref() == Some("idle"))
    })
    .await;
    assert_eq!(support_link.connections(), 1);

    // 3. A broken file: every problem logged with its line, nothing changes.
    let broken = changed.replace("stale_after = 900", "stale_after = 900\nafter = \"shred\"")
        + "[[parser]]\nname = \"late\"\nemail = \"late@example.test\"\ncredential = \"nope\"\n[parser.imap]\nhost = \"127.0.0.1\"\n";
    s.write_file("reload.toml", &broken);
    kill("-HUP", pid);
    wait_for(Duration::from_secs(20), || async {
        let (_, text) = get(&metrics_url, Some(ROTATED)).await;
        metric(
            &text,
            "mail2ticket_config_reloads_total",
            &[r#"result="error""#],
        ) == Some(1.0)
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let problem_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reload.toml:") && (l.contains("shred") || l.contains("nope")))
        .collect();
    assert_eq!(problem_lines.len(), 2, "{log}");
    let st = status(ROTATED).await.unwrap();
    assert_eq!(st["mailboxes"].as_array().unwrap().len(), 2, "{st}");
    assert_eq!(state(&st, "support").as_deref(), Some("idle"));
    assert_eq!(state(&st, "sales").as_deref(), Some("idle"));
    assert_eq!(
        (support_link.connections(), sales_link.connections()),
        (1, 2)
    );
    assert!(!log.contains("s3cret") && !log.contains(ROTATED), "{log}");
}
