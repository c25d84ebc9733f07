//! Webhooks end to end: the real daemon, Dovecot, Postgres, and a receiver that checks
//! every signature with its own implementation of the Standard Webhooks specification
//! (`support/webhook_receiver.py`): signed deliveries per subscription, a retry with the
//! same `webhook-id`, `410` disabling an endpoint, a hanging endpoint, and deliveries that
//! survive kill -9 of the daemon.

use crate::daemon::message;
use crate::support::KillOnDrop;
use crate::support::env::{SHARED_A, SHARED_B, TestEnv, binary, wait_for};
use crate::support::postgres::free_port;
use serde_json::Value;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

/// A Standard Webhooks secret (24 bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The receiver process and its log of requests.
struct Receiver {
    port: u16,
    log: PathBuf,
    _process: KillOnDrop,
}

impl Receiver {
    /// Starts a receiver on `port` (0: any free port).
    fn start(dir: &std::path::Path, port: u16, name: &str) -> Receiver {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/webhook_receiver.py");
        let log = dir.join(format!("{name}.jsonl"));
        let mut child = std::process::Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(SECRET)
            .arg(&log)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the receiver");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Receiver {
            port: line.trim().parse().expect("the receiver prints its port"),
            log,
            _process: KillOnDrop(child),
        }
    }

    /// Every request so far at `path`.
    fn records(&self, path: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["path"] == path)
            .collect()
    }
}

fn webhook(name: &str, url: &str, keys: &str) -> String {
    format!("\n[[webhook]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n{keys}\n")
}

#[tokio::test]
async fn deliveries_are_signed_retried_disabled_on_410_and_survive_kill_9() {
    let s = TestEnv::mail().await;
    for n in 0..3 {
        s.dovecot().deliver(SHARED_A, &message(n, SHARED_A));
    }
    s.dovecot().deliver(SHARED_B, &message(9, SHARED_B));
    let receiver = Receiver::start(s.dir.path(), 0, "main");
    let base = format!("http://127.0.0.1:{}", receiver.port);
    let late_port = free_port();
    let http_port = free_port();
    let text = s.config_toml(&[s.ssl("support", SHARED_A), s.ssl("sales", SHARED_B)])
        + &format!("\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n")
        + &webhook(
            "desk",
            &format!("{base}/ok"),
            "parsers = [\"support\"]\ninclude_body = true",
        )
        + &webhook(
            "flaky",
            &format!("{base}/flaky"),
            "events = [\"ticket.created\"]",
        )
        + &webhook("gone", &format!("{base}/gone"), "")
        + &webhook("slow", &format!("{base}/hang"), "timeout = 1")
        + &webhook("late", &format!("http://127.0.0.1:{late_port}/ok"), "");
    let (path, _) = s.write_config("webhooks.toml", &text);
    let first = KillOnDrop(binary(&["run", "--config"]).arg(&path).spawn().unwrap());

    // Signed deliveries of support's tickets only, with the message text.
    wait_for(Duration::from_secs(30), || async {
        receiver.records("/ok").len() >= 3
    })
    .await;
    let desk = receiver.records("/ok");
    assert_eq!(desk.len(), 3, "{desk:?}");
    for r in &desk {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["body"]["type"], "ticket.created");
        assert_eq!(r["body"]["data"]["parser"], "support");
        assert!(
            r["body"]["data"]["body_text"]
                .as_str()
                .unwrap()
                .contains("Please help"),
            "{r}"
        );
        assert!(r["id"].as_str().unwrap().starts_with("msg_"));
    }
    // Every ticket exists although one endpoint hangs and another refuses connections.
    assert_eq!(s.count("select count(*) from tickets").await, 4);

    // 410 disables the endpoint: one attempt, then nothing; the status says so.
    wait_for(Duration::from_secs(10), || async {
        !receiver.records("/gone").is_empty()
    })
    .await;
    let status_url = format!("http://127.0.0.1:{http_port}/status.json");
    let status: Value = mail2ticket::auth::http_client()
        .unwrap()
        .get(&status_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let gone = status["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "gone")
        .unwrap();
    assert_eq!(gone["state"], "disabled", "{status}");
    assert_eq!(gone["host"], "127.0.0.1");
    assert_eq!(receiver.records("/gone").len(), 1);
    let metrics = mail2ticket::auth::http_client()
        .unwrap()
        .get(format!("http://127.0.0.1:{http_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"mail2ticket_webhook_deliveries_total{webhook="desk",result="delivered"} 3"#,
        r#"mail2ticket_webhook_deliveries_total{webhook="gone",result="gone"} 1"#,
        r#"mail2ticket_webhook_pending{webhook="desk"} 0"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    // kill -9 while "late" cannot be reached and "flaky" waits for its retry; the late
    // receiver comes up; a new process delivers every event to both, with the same ids.
    drop(first);
    let late = Receiver::start(s.dir.path(), late_port, "late");
    let _second = KillOnDrop(binary(&["run", "--config"]).arg(&path).spawn().unwrap());
    let all: Vec<i64> = sqlx::query_scalar("select id from ticket_events order by id")
        .fetch_all(&s.db.pool)
        .await
        .unwrap();
    wait_for(Duration::from_secs(40), || async {
        let mut ids: Vec<String> = late
            .records("/ok")
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids.dedup();
        ids.len() == all.len()
    })
    .await;
    assert!(late.records("/ok").iter().all(|r| r["verified"] == true));

    // A failed attempt was retried with the same webhook-id (here by the new process).
    let created: Vec<i64> = sqlx::query_scalar(
        "select id from ticket_events where kind = 'ticket.created' order by id",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    wait_for(Duration::from_secs(30), || async {
        receiver
            .records("/flaky")
            .iter()
            .filter(|r| r["status"] == 200)
            .count()
            >= created.len()
    })
    .await;
    let flaky = receiver.records("/flaky");
    for id in &created {
        let attempts: Vec<&Value> = flaky
            .iter()
            .filter(|r| r["id"] == format!("msg_{id}"))
            .collect();
        let statuses: Vec<i64> = attempts
            .iter()
            .map(|r| r["status"].as_i64().unwrap())
            .collect();
        assert_eq!(statuses, [503, 200], "event {id}: {flaky:?}");
        assert!(attempts.iter().all(|r| r["verified"] == true));
    }
    assert_eq!(
        flaky.len(),
        2 * created.len(),
        "only ticket.created events: {flaky:?}"
    );

    let out = tokio::task::spawn_blocking(move || {
        binary(&["webhooks", "status", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let desk_row = table.lines().find(|l| l.starts_with("desk")).unwrap();
    assert!(
        desk_row.split_whitespace().collect::<Vec<_>>()[1..4] == ["0", "0", "3"],
        "{table}"
    );
}
