//! The events outbox against a real Postgres: one event per stored message, written in
//! its transaction, none for a duplicate, NOTIFY with the event's id, and `events list`.

use crate::support::env::{TestEnv, binary};
use mail2ticket::pipeline::{self, Outcome};
use serde_json::Value;
use sqlx::postgres::PgListener;
use std::time::Duration;

fn mail(id: &str, subject: &str, extra: &str) -> Vec<u8> {
    format!(
        "From: Ann Customer <ann@example.com>\r\nTo: support@example.test\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\n{extra}\r\nHello.\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn each_stored_message_writes_one_event_and_wakes_listeners() {
    let env = TestEnv::database().await;
    let pool = &env.db.pool;
    let mut listener = PgListener::connect_with(pool).await.unwrap();
    listener.listen("mail2ticket_events").await.unwrap();
    let p = env.pipeline("support", "");
    let first = mail("one@x", "Printer broken", "");
    let created = pipeline::ingest_one(pool, &p, &first).await.unwrap();
    let Outcome::Created { ticket_id } = created else {
        panic!("{created:?}")
    };
    let reply = mail("two@x", "Re: Printer broken", "In-Reply-To: <one@x>\r\n");
    assert!(matches!(
        pipeline::ingest_one(pool, &p, &reply).await.unwrap(),
        Outcome::Appended { .. }
    ));
    let auto = mail(
        "three@x",
        "Out of office",
        "Auto-Submitted: auto-replied\r\n",
    );
    assert!(matches!(
        pipeline::ingest_one(pool, &p, &auto).await.unwrap(),
        Outcome::Held { .. }
    ));
    let broken = b"no header at all".to_vec();
    assert!(matches!(
        pipeline::ingest_one(pool, &p, &broken).await.unwrap(),
        Outcome::Quarantined { .. }
    ));
    // Duplicates write nothing.
    assert!(matches!(
        pipeline::ingest_one(pool, &p, &first).await.unwrap(),
        Outcome::Duplicate { .. }
    ));
    assert!(matches!(
        pipeline::ingest_one(pool, &p, &broken).await.unwrap(),
        Outcome::DuplicateQuarantined { .. }
    ));

    let rows: Vec<(i64, String, Value)> =
        sqlx::query_as("select id, kind, payload from ticket_events order by id")
            .fetch_all(pool)
            .await
            .unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ticket.created",
            "ticket.message_added",
            "message.held",
            "message.quarantined"
        ]
    );
    let created = &rows[0].2;
    assert_eq!(created["ticket_id"], ticket_id);
    assert_eq!(created["parser"], "support");
    assert_eq!(created["subject"], "Printer broken");
    assert_eq!(created["requester_email"], "ann@example.com");
    assert_eq!(created["requester_name"], "Ann Customer");
    assert_eq!(created["message_id"], "one@x");
    assert!(created["ticket_message_id"].is_i64());
    assert_eq!(rows[1].2["ticket_id"], ticket_id);
    assert!(
        rows[2].2["reason"].as_str().unwrap().contains("auto"),
        "{}",
        rows[2].2
    );
    assert!(rows[3].2["quarantine_id"].is_i64() && rows[3].2["reason"].is_string());

    // One NOTIFY per event, carrying its id, in commit order.
    let mut heard = Vec::new();
    while heard.len() < rows.len() {
        let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("a notification per event")
            .unwrap();
        assert_eq!(n.channel(), "mail2ticket_events");
        heard.push(n.payload().parse::<i64>().unwrap());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(heard, ids);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_err()
    );

    // `events list --since` for consumers on a shell.
    let text = crate::support::config_text(&env.db.url, "support", "");
    let path = env.write_file("events.toml", &text);
    let since = ids[1].to_string();
    let out = tokio::task::spawn_blocking(move || {
        binary(&["events", "list", "--config"])
            .arg(&path)
            .args(["--since", &since])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let listed_kinds: Vec<&str> = listed.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(listed_kinds, ["message.held", "message.quarantined"]);
}

#[tokio::test]
async fn deliveries_fan_out_by_subscription_redeliver_and_old_events_go() {
    use mail2ticket::store::webhooks::{self, Attempt};
    let env = TestEnv::database().await;
    let pool = &env.db.pool;
    let hook = |name: &str, keys: &str| {
        format!(
            "[[webhook]]\nname = \"{name}\"\nurl = \"https://{name}.example.com/h\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n{keys}\n"
        )
    };
    let text = crate::support::config_text(&env.db.url, "support", "")
        + &hook("all", "")
        + &hook("created", "events = [\"ticket.created\"]")
        + &hook(
            "other",
            "parsers = [\"support\"]\nevents = [\"message.held\"]",
        );
    let config =
        mail2ticket::config::Config::from_toml(std::path::Path::new("t.toml"), &text).unwrap();
    let mut conn = pool.acquire().await.unwrap();
    webhooks::sync_subscriptions(&mut conn, &config.webhooks)
        .await
        .unwrap();
    let p = env.pipeline("support", "");
    pipeline::ingest_one(pool, &p, &mail("a@x", "First", ""))
        .await
        .unwrap();
    pipeline::ingest_one(
        pool,
        &p,
        &mail("b@x", "Re: First", "In-Reply-To: <a@x>\r\n"),
    )
    .await
    .unwrap();
    let per_hook: Vec<(String, i64)> = sqlx::query_as(
        "select webhook, count(*) from webhook_deliveries group by webhook order by webhook",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        per_hook,
        [("all".to_string(), 2), ("created".to_string(), 1)]
    );

    // A removed webhook gets nothing new.
    webhooks::sync_subscriptions(&mut conn, &config.webhooks[1..])
        .await
        .unwrap();
    pipeline::ingest_one(pool, &p, &mail("c@x", "Second", ""))
        .await
        .unwrap();
    assert_eq!(
        env.count("select count(*) from webhook_deliveries where webhook = 'all'")
            .await,
        2
    );

    // A dead delivery comes back with `webhooks redeliver --dead`.
    let claimed = webhooks::claim_due(&mut conn, "created", 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(
        webhooks::claim_due(&mut conn, "created", 10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "claimed rows are leased"
    );
    let dead = Attempt::Failed {
        status: Some(500),
        error: "HTTP 500".into(),
        retry_in: None,
    };
    webhooks::record(&mut conn, "created", claimed[0].event_id, &dead)
        .await
        .unwrap();
    webhooks::record(
        &mut conn,
        "created",
        claimed[1].event_id,
        &Attempt::Delivered { status: 204 },
    )
    .await
    .unwrap();
    let counts = webhooks::counts(&mut conn).await.unwrap();
    let created = counts.iter().find(|c| c.webhook == "created").unwrap();
    assert_eq!(
        (created.pending, created.dead, created.delivered),
        (0, 1, 1)
    );
    let path = env.write_file("hooks.toml", &text);
    let out = tokio::task::spawn_blocking(move || {
        binary(&["webhooks", "redeliver", "--dead", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("1 deliveries"),
        "{out:?}"
    );
    let due = webhooks::claim_due(&mut conn, "created", 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        due.iter()
            .map(|d| (d.event_id, d.attempts))
            .collect::<Vec<_>>(),
        [(claimed[0].event_id, 0)]
    );

    // Old events go once every delivery of theirs is done; pending or dead ones stay.
    sqlx::query("update ticket_events set created_at = now() - interval '40 days'")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("update webhook_deliveries set delivered_at = now() where webhook = 'all'")
        .execute(pool)
        .await
        .unwrap();
    let deleted = webhooks::delete_old_events(&mut conn, 30).await.unwrap();
    // Events 2 and 3 were delivered everywhere: they go; event 1 waits for "created".
    assert_eq!(deleted, 2);
    assert_eq!(env.count("select count(*) from ticket_events").await, 1);
}
