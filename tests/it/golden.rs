//! The golden corpus: every `tests/corpus/*.eml` goes through the real pipeline into a
//! real Postgres, and the rows it produced are compared with `*.json` beside it.
//!
//! Regenerate after a deliberate change with `UPDATE_GOLDEN=1 cargo test golden`, then
//! read the diff of the JSON files before committing it.

use crate::support::{self, env::TestEnv};
use mail2ticket::pipeline::{self, Outcome};
use serde_json::{Value, json};
use sqlx::{PgPool, Row};

#[tokio::test]
async fn golden_corpus_matches_expected_rows() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let pipeline = env.pipeline("golden", "add_ccs = true");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();

    let files = support::corpus_files();
    assert!(files.len() >= 30, "the corpus has {} messages", files.len());

    let mut mismatches = Vec::new();
    for file in &files {
        let raw = std::fs::read(file).unwrap();
        let outcome = pipeline::ingest_one(&db.pool, &pipeline, &raw)
            .await
            .unwrap();
        let got = describe(&db.pool, &outcome).await;
        let expected_path = file.with_extension("json");
        if update {
            std::fs::write(
                &expected_path,
                serde_json::to_string_pretty(&got).unwrap() + "\n",
            )
            .unwrap();
            continue;
        }
        let expected: Value = match std::fs::read_to_string(&expected_path) {
            Ok(text) => serde_json::from_str(&text).unwrap(),
            Err(_) => {
                mismatches.push(format!("{}: no expected file", expected_path.display()));
                continue;
            }
        };
        if expected != got {
            mismatches.push(format!(
                "{}:\nexpected {}\n     got {}",
                file.display(),
                serde_json::to_string_pretty(&expected).unwrap(),
                serde_json::to_string_pretty(&got).unwrap()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}

/// Reads back what the pipeline stored for one message, as JSON.
async fn describe(pool: &PgPool, outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Created { ticket_id } => describe_ticket(pool, *ticket_id).await,
        Outcome::Appended { ticket_id } => {
            let mut ticket = describe_ticket(pool, *ticket_id).await;
            ticket["outcome"] = json!("appended");
            ticket
        }
        Outcome::Held { id, .. } => {
            let row = sqlx::query(
                "select kind, reason, sender, message_id from quarantine where id = $1",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
            json!({
                "outcome": "held",
                "kind": row.get::<String, _>("kind"),
                "reason": row.get::<String, _>("reason"),
                "sender": row.get::<Option<String>, _>("sender"),
                "message_id": row.get::<Option<String>, _>("message_id"),
            })
        }
        Outcome::Quarantined { id, .. } => {
            let row = sqlx::query("select reason, raw_size from quarantine where id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .unwrap();
            json!({
                "outcome": "quarantined",
                "reason": row.get::<String, _>("reason"),
                "raw_size": row.get::<i64, _>("raw_size"),
            })
        }
        other => panic!("a fresh database cannot hold a duplicate: {other:?}"),
    }
}

async fn describe_ticket(pool: &PgPool, ticket_id: i64) -> Value {
    let t = sqlx::query(
        "select subject, requester_email, requester_name, status from tickets where id = $1",
    )
    .bind(ticket_id)
    .fetch_one(pool)
    .await
    .unwrap();
    let m = sqlx::query(
        "select id, message_id, message_id_derived, in_reply_to, references_ids, subject,
                from_email, from_name, to_emails, cc_emails,
                to_char(sent_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') as sent_at,
                body_text, body_html, raw_size, warnings, automatic_reason,
                exists (select 1 from raw_messages r where r.ticket_message_id = ticket_messages.id) as raw_kept
         from ticket_messages where ticket_id = $1 order by id desc limit 1",
    )
    .bind(ticket_id)
    .fetch_one(pool)
    .await
    .unwrap();
    let message_row: i64 = m.get("id");
    let participants: Vec<Value> = sqlx::query(
        "select email, name, role from participants where ticket_id = $1 order by role desc, email",
    )
    .bind(ticket_id)
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|p| {
        json!([
            p.get::<String, _>("email"),
            p.get::<Option<String>, _>("name"),
            p.get::<String, _>("role")
        ])
    })
    .collect();
    let attachments: Vec<Value> = sqlx::query(
        "select filename, content_type, size, sha256, content_id, is_inline, length(content) as stored
         from attachments where ticket_message_id = $1 order by id",
    )
    .bind(message_row)
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|a| {
        json!({
            "filename": a.get::<String, _>("filename"),
            "content_type": a.get::<String, _>("content_type"),
            "size": a.get::<i64, _>("size"),
            "stored_bytes": a.get::<Option<i32>, _>("stored"),
            "sha256": a.get::<String, _>("sha256"),
            "content_id": a.get::<Option<String>, _>("content_id"),
            "is_inline": a.get::<bool, _>("is_inline"),
        })
    })
    .collect();
    let references: Vec<String> = m.get("references_ids");
    json!({
        "outcome": "created",
        "ticket": {
            "subject": t.get::<String, _>("subject"),
            "requester_email": t.get::<String, _>("requester_email"),
            "requester_name": t.get::<Option<String>, _>("requester_name"),
            "status": t.get::<String, _>("status"),
        },
        "message": {
            "message_id": m.get::<String, _>("message_id"),
            "message_id_derived": m.get::<bool, _>("message_id_derived"),
            "in_reply_to": m.get::<Option<String>, _>("in_reply_to"),
            "references_count": references.len(),
            "references_first": references.first(),
            "subject": m.get::<String, _>("subject"),
            "from_email": m.get::<String, _>("from_email"),
            "from_name": m.get::<Option<String>, _>("from_name"),
            "to": m.get::<Vec<String>, _>("to_emails"),
            "cc": m.get::<Vec<String>, _>("cc_emails"),
            "sent_at": m.get::<Option<String>, _>("sent_at"),
            "body_text": m.get::<String, _>("body_text"),
            "body_html": m.get::<Option<String>, _>("body_html"),
            "raw_size": m.get::<i64, _>("raw_size"),
            "warnings": m.get::<Vec<String>, _>("warnings"),
            "automatic_reason": m.get::<Option<String>, _>("automatic_reason"),
            "raw_kept": m.get::<bool, _>("raw_kept"),
        },
        "participants": participants,
        "attachments": attachments,
    })
}
