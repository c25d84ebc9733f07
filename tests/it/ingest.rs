//! The ingest pipeline against a real Postgres: exactly-once, quarantine, parser settings.

use crate::support::{self, env::TestEnv};
use mail2ticket::pipeline::{self, Outcome};

fn corpus(name: &str) -> Vec<u8> {
    std::fs::read(support::corpus_dir().join(name)).unwrap()
}

#[tokio::test]
async fn the_same_message_twice_is_one_ticket() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let p = env.pipeline("support", "add_ccs = true");
    let raw = corpus("13-outlook-nested.eml");
    let first = pipeline::ingest_one(&db.pool, &p, &raw).await.unwrap();
    let Outcome::Created { ticket_id } = first else {
        panic!("{first:?}")
    };
    let second = pipeline::ingest_one(&db.pool, &p, &raw).await.unwrap();
    assert_eq!(second, Outcome::Duplicate { ticket_id });
    assert_eq!(env.count("select count(*) from tickets").await, 1);
    assert_eq!(env.count("select count(*) from ticket_messages").await, 1);
    assert_eq!(env.count("select count(*) from attachments").await, 2);
    assert_eq!(env.count("select count(*) from participants").await, 2);
}

#[tokio::test]
async fn concurrent_copies_of_one_message_make_one_ticket() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let p = env.pipeline("support", "");
    let raw = corpus("08-alternative-text-html.eml");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (pool, p, raw) = (db.pool.clone(), p.clone(), raw.clone());
            tokio::spawn(async move { pipeline::ingest_one(&pool, &p, &raw).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Outcome::Created { .. }) {
            created += 1;
        }
    }
    assert_eq!(created, 1);
    assert_eq!(env.count("select count(*) from tickets").await, 1);
    assert_eq!(env.count("select count(*) from ticket_messages").await, 1);
}

#[tokio::test]
async fn deduplication_is_per_parser() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let raw = corpus("01-plain-ascii.eml");
    for name in ["sales", "support"] {
        let p = env.pipeline(name, "");
        let outcome = pipeline::ingest_one(&db.pool, &p, &raw).await.unwrap();
        assert!(
            matches!(outcome, Outcome::Created { .. }),
            "{name}: {outcome:?}"
        );
    }
    assert_eq!(env.count("select count(*) from tickets").await, 2);
}

#[tokio::test]
async fn a_message_without_message_id_is_the_same_with_crlf_or_lf() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let p = env.pipeline("support", "");
    let lf = b"From: a@example.com\nSubject: no id\n\nbody line\n".to_vec();
    let crlf = b"From: a@example.com\r\nSubject: no id\r\n\r\nbody line\r\n".to_vec();
    assert!(matches!(
        pipeline::ingest_one(&db.pool, &p, &lf).await.unwrap(),
        Outcome::Created { .. }
    ));
    assert!(matches!(
        pipeline::ingest_one(&db.pool, &p, &crlf).await.unwrap(),
        Outcome::Duplicate { .. }
    ));
}

#[tokio::test]
async fn an_oversized_message_is_quarantined_with_its_exact_bytes_once() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let p = env.pipeline("support", "max_message_size = 1000");
    let raw = corpus("21-huge-headers.eml");
    let outcome = pipeline::ingest_one(&db.pool, &p, &raw).await.unwrap();
    let Outcome::Quarantined { id, reason } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(reason.contains("max_message_size"), "{reason}");
    let (stored, parser): (Vec<u8>, String) =
        sqlx::query_as("select raw, parser from quarantine where id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, raw);
    assert_eq!(parser, "support");
    let again = pipeline::ingest_one(&db.pool, &p, &raw).await.unwrap();
    assert_eq!(again, Outcome::DuplicateQuarantined { id });
    assert_eq!(env.count("select count(*) from quarantine").await, 1);
    assert_eq!(env.count("select count(*) from tickets").await, 0);
}

#[tokio::test]
async fn parser_switches_control_attachments_and_ccs() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let raw = corpus("13-outlook-nested.eml");
    let p = env.pipeline("plain", "add_attachments = false");
    pipeline::ingest_one(&db.pool, &p, &raw).await.unwrap();
    assert_eq!(env.count("select count(*) from attachments").await, 0);
    let roles: Vec<String> = sqlx::query_scalar("select role from participants")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(roles, vec!["requester"]);
}

#[tokio::test]
async fn a_suspicious_message_keeps_its_raw_bytes_with_the_ticket() {
    let env = TestEnv::database().await;
    let db = &env.db;
    // keep_raw = false: the raw bytes are kept for the warning alone.
    let p = env.pipeline("support", "keep_raw = false");
    let raw = corpus("38-boundary-trap-unrepairable.eml");
    let Outcome::Created { ticket_id } = pipeline::ingest_one(&db.pool, &p, &raw).await.unwrap()
    else {
        panic!("expected a ticket")
    };
    let kept: Vec<u8> = sqlx::query_scalar(
        "select r.raw from raw_messages r join ticket_messages m on m.id = r.ticket_message_id
         where m.ticket_id = $1",
    )
    .bind(ticket_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(kept, raw);
}

#[tokio::test]
async fn postgres_data_errors_are_classified_as_refused_data() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let err = sqlx::query("select 'x'::int")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(mail2ticket::store::StoreError::from(err).is_refused_data());
    use sqlx::Connection;
    let gone = sqlx::PgConnection::connect(&crate::support::postgres::unreachable_url())
        .await
        .unwrap_err();
    assert!(!mail2ticket::store::StoreError::from(gone).is_refused_data());
}

#[tokio::test]
async fn an_attachment_over_the_limit_is_a_stub_with_a_note() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let p = env.pipeline("support", "max_attachment_size = 20");
    let raw = corpus("10-rfc2231-filename.eml");
    let Outcome::Created { ticket_id } = pipeline::ingest_one(&db.pool, &p, &raw).await.unwrap()
    else {
        panic!("expected a ticket")
    };
    let rows: Vec<(String, i64, Option<Vec<u8>>)> = sqlx::query_as(
        "select a.filename, a.size, a.content from attachments a
         join ticket_messages m on m.id = a.ticket_message_id where m.ticket_id = $1 order by a.id",
    )
    .bind(ticket_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].1, rows[0].2.is_none()),
        (48, true),
        "the 48-byte PDF is a stub"
    );
    assert_eq!(
        (rows[1].1, rows[1].2.as_ref().map(Vec::len)),
        (8, Some(8)),
        "the 8-byte CSV is kept"
    );
    let warnings: Vec<String> =
        sqlx::query_scalar("select warnings from ticket_messages where ticket_id = $1")
            .bind(ticket_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("Rechnung März 2026.pdf") && w.contains("max_attachment_size")),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn keep_raw_keeps_every_message_unless_turned_off() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let raw = corpus("01-plain-ascii.eml");
    for (name, extra, kept) in [("keeps", "", true), ("drops", "keep_raw = false", false)] {
        let p = env.pipeline(name, extra);
        pipeline::ingest_one(&db.pool, &p, &raw).await.unwrap();
        let stored: Option<Vec<u8>> = sqlx::query_scalar(
            "select r.raw from ticket_messages m left join raw_messages r on r.ticket_message_id = m.id
             where m.parser = $1",
        )
        .bind(name)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(stored.is_some(), kept, "{name}");
        if kept {
            assert_eq!(stored.unwrap(), raw);
        }
    }
}

/// A backlog's batch writes its raw messages by `COPY` (in pieces, a large message on its
/// own), a small batch by a statement: either way every message's bytes come back exactly,
/// 8-bit bytes and all.
#[tokio::test]
async fn raw_messages_of_large_and_small_batches_come_back_byte_for_byte() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let p = env.pipeline("support", "");
    let message = |n: usize, body_bytes: usize| {
        let mut raw = format!(
            "From: Customer {n} <c{n}@example.com>\r\nTo: support@example.test\r\nSubject: Raw {n}\r\nMessage-ID: <raw-{n}@example.com>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        )
        .into_bytes();
        // Lines of every byte value but CR and LF, so that nothing is text-only by chance.
        let line: Vec<u8> = (0u8..=255).filter(|b| *b != b'\r' && *b != b'\n').collect();
        while raw.len() < body_bytes {
            raw.extend_from_slice(&line[n % 7..]);
            raw.extend_from_slice(b"\r\n");
        }
        raw
    };
    // 60 messages of 6 KB and one of 700 KB: more than one COPY piece, and one message
    // larger than a piece; then a batch of one small message.
    let mut large: Vec<(usize, Vec<u8>)> = (0..60).map(|n| (n, message(n, 6_000))).collect();
    large.insert(30, (60, message(60, 700_000)));
    let small = vec![(61, message(61, 2_000))];
    for batch in [&large, &small] {
        let raws: Vec<Vec<u8>> = batch.iter().map(|(_, raw)| raw.clone()).collect();
        let outcomes = pipeline::ingest_batch(&db.pool, &p, &raws).await.unwrap();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Created { .. })),
            "{outcomes:?}"
        );
    }
    for (n, raw) in large.iter().chain(&small) {
        let stored: Vec<u8> = sqlx::query_scalar(
            "select r.raw from raw_messages r join ticket_messages m on m.id = r.ticket_message_id
              where m.message_id = $1",
        )
        .bind(format!("raw-{n}@example.com"))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(
            stored == *raw,
            "message {n}: {} bytes stored, {} sent",
            stored.len(),
            raw.len()
        );
    }
}

#[tokio::test]
async fn a_batch_stores_around_the_one_message_the_database_refuses_and_threads_within_itself() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let p = env.pipeline("support", "");
    let mail = |id: &str, extra: &str, subject: &str| {
        let from = if extra.starts_with("From:") {
            ""
        } else {
            "From: Customer <c@example.com>\r\n"
        };
        format!(
            "{from}To: support@example.test\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\n{extra}Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
        )
        .into_bytes()
    };
    let huge = unindexable_local_part();
    let batch = vec![
        mail("first@example.com", "", "Printer broken"),
        mail(
            "refused@example.com",
            &format!("From: <{huge}@example.com>\r\n"),
            "Refused",
        ),
        mail(
            "reply@example.com",
            "In-Reply-To: <first@example.com>\r\n",
            "Re: Printer broken",
        ),
        mail("first@example.com", "", "Printer broken"),
    ];
    let outcomes = pipeline::ingest_batch(&db.pool, &p, &batch).await.unwrap();
    let Outcome::Created { ticket_id } = outcomes[0] else {
        panic!("{outcomes:?}")
    };
    assert!(
        matches!(&outcomes[1], Outcome::Quarantined { reason, .. } if reason.contains("refused")),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes[2..],
        [
            Outcome::Appended { ticket_id },
            Outcome::Duplicate { ticket_id }
        ],
        "the reply threads onto the message stored earlier in the batch"
    );
    assert_eq!(env.count("select count(*) from ticket_messages").await, 2);
    assert_eq!(env.count("select count(*) from quarantine").await, 1);
    let raw: Vec<u8> = sqlx::query_scalar("select raw from quarantine")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(raw, batch[1], "the refused message is kept whole");
    let events = env
        .count("select count(*) from ticket_events where kind in ('ticket.created', 'ticket.message_added', 'message.quarantined')")
        .await;
    assert_eq!(events, 3, "one event each, none from the abandoned attempt");
}

/// A sender address no index can hold (Postgres refuses the ticket row: SQLSTATE 54000);
/// random, so that compression cannot shrink it under the limit.
fn unindexable_local_part() -> String {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    (0..9000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(seed % 36) as usize])
        })
        .collect()
}

#[tokio::test]
async fn attachments_kept_only_in_the_raw_message_read_back_the_same_through_the_view() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let corpus: Vec<Vec<u8>> = support::corpus_files()
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    let copy = env.pipeline("copy", "");
    pipeline::ingest_batch(&db.pool, &copy, &corpus)
        .await
        .unwrap();
    let in_raw = env.pipeline("in_raw", "attachments_in_raw = true");
    pipeline::ingest_batch(&db.pool, &in_raw, &corpus)
        .await
        .unwrap();
    // The same again, stored message by message (a message Postgres refuses is in the
    // batch).
    let alone = env.pipeline("in_raw_alone", "attachments_in_raw = true");
    let mut batch = corpus.clone();
    let refused = format!(
        "From: <{}@example.com>\r\nSubject: refused\r\nMessage-ID: <refused@example.com>\r\n\r\nx\r\n",
        unindexable_local_part()
    );
    batch.push(refused.into_bytes());
    let outcomes = pipeline::ingest_batch(&db.pool, &alone, &batch)
        .await
        .unwrap();
    assert!(
        matches!(outcomes.last(), Some(Outcome::Quarantined { .. })),
        "{outcomes:?}"
    );

    type Row = (String, String, Option<Vec<u8>>, bool);
    let files = |parser: &'static str| {
        sqlx::query_as::<_, Row>(
            "select m.message_id, f.filename, f.content, f.in_raw
               from attachment_files f join ticket_messages m on m.id = f.ticket_message_id
              where m.parser = $1 order by m.message_id, f.id",
        )
        .bind(parser)
        .fetch_all(&db.pool)
    };
    let expected = files("copy").await.unwrap();
    assert!(
        expected.len() >= 10,
        "the corpus has attachments: {}",
        expected.len()
    );
    assert!(
        expected
            .iter()
            .all(|(_, _, content, in_raw)| content.is_some() && !in_raw)
    );
    for parser in ["in_raw", "in_raw_alone"] {
        let got = files(parser).await.unwrap();
        let in_raw = got.iter().filter(|row| row.3).count();
        assert!(
            in_raw >= 5,
            "{parser}: {in_raw} attachments kept in the raw message"
        );
        let strip = |rows: &[Row]| -> Vec<(String, String, Option<Vec<u8>>)> {
            rows.iter()
                .map(|(id, name, content, _)| (id.clone(), name.clone(), content.clone()))
                .collect()
        };
        assert!(
            strip(&got) == strip(&expected),
            "{parser}: the view gives other bytes"
        );
    }
    let stored_twice = env
        .count(
            "select count(*) from attachments where raw_offset is not null and content is not null",
        )
        .await;
    assert_eq!(stored_twice, 0);
}

#[tokio::test]
async fn a_message_another_writer_stores_during_the_batch_is_a_duplicate_and_the_rest_is_stored() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let p = env.pipeline("support", "");
    let mail = |id: &str| {
        format!(
            "From: Customer <c@example.com>\r\nTo: support@example.test\r\nSubject: {id}\r\nMessage-ID: <{id}>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
        )
        .into_bytes()
    };
    let contested = mail("contested@example.com");
    // Another writer has stored the message and not committed yet: the batch does not
    // see it when it looks, and its multi-row insert waits on the unique key.
    let mut other = db.pool.begin().await.unwrap();
    let item = pipeline::Incoming::whole(&contested, pipeline::Arrival::FromDateHeader);
    let theirs = pipeline::store_batch(&mut other, &p, &[item])
        .await
        .unwrap();
    let Outcome::Created { ticket_id } = theirs[0] else {
        panic!("{theirs:?}")
    };
    let batch = vec![
        mail("before@example.com"),
        contested,
        mail("after@example.com"),
    ];
    let ours = {
        let (pool, p) = (db.pool.clone(), p.clone());
        tokio::spawn(async move { pipeline::ingest_batch(&pool, &p, &batch).await })
    };
    let waiting = "select count(*) from pg_stat_activity
                   where datname = current_database() and wait_event_type = 'Lock'";
    while env.count(waiting).await == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    other.commit().await.unwrap();
    let outcomes = ours.await.unwrap().unwrap();
    assert!(
        matches!(outcomes[0], Outcome::Created { .. }),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes[1],
        Outcome::Duplicate { ticket_id },
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[2], Outcome::Created { .. }),
        "{outcomes:?}"
    );
    assert_eq!(env.count("select count(*) from ticket_messages").await, 3);
    assert_eq!(env.count("select count(*) from tickets").await, 3);
    let events = env
        .count("select count(*) from ticket_events where kind = 'ticket.created'")
        .await;
    assert_eq!(
        events, 3,
        "one event per ticket, none from the abandoned attempt"
    );
}
