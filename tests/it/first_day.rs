//! A real mailbox's first day: what existing mail becomes (`start_at`), loop protection
//! that judges a backlog by arrival time, one ungranted mailbox that costs the others no
//! token, plain IMAP usernames, a link that keeps dropping, a connection lost between a
//! batch's commit and its move, folders with international names, and a throttled token
//! endpoint.

use crate::daemon::message;
use crate::support::KillOnDrop;
use crate::support::env::{NOT_GRANTED, SHARED_A, SHARED_B, TestEnv, binary, wait_for};
use crate::support::proxy::CuttingProxy;
use chrono::{DateTime, TimeZone, Utc};
use mail2ticket::config::Config;
use mail2ticket::pipeline::{self, Outcome};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// A message from `from` with this subject (and a Message-ID made of both).
fn mail(from: &str, subject: &str, date: Option<DateTime<Utc>>) -> Vec<u8> {
    let date = date.map_or(String::new(), |d| format!("Date: {}\r\n", d.to_rfc2822()));
    let id = format!("{from}-{subject}").replace([' ', '@'], ".");
    format!(
        "From: {from}\r\nTo: support@example.test\r\nSubject: {subject}\r\nMessage-ID: <{id}@test>\r\n{date}\r\nHello.\r\n"
    )
    .into_bytes()
}

fn at(year: i32, month: u32, day: u32, hour: u32, minute: u32, second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, hour, minute, second)
        .unwrap()
}

/// Messages of a Maildir mailbox that are not `\Seen`.
fn unseen_on_server(s: &TestEnv, mailbox: &str) -> usize {
    let maildir = s.dovecot().maildir(mailbox, "");
    let new = std::fs::read_dir(maildir.join("new")).map_or(0, |d| d.count());
    let cur_unseen = std::fs::read_dir(maildir.join("cur")).map_or(0, |d| {
        d.filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            !name
                .rsplit_once(":2,")
                .is_some_and(|(_, f)| f.contains('S'))
        })
        .count()
    });
    new + cur_unseen
}

#[tokio::test]
async fn start_at_chooses_what_existing_mail_becomes_and_later_mail_is_always_taken() {
    let policies = [
        ("all", "all@example.test", "all", 4),
        ("unseen", "unseen@example.test", "unseen", 2),
        ("now", "now@example.test", "now", 0),
        ("since", "since@example.test", "2026-11-01", 2),
    ];
    let mailboxes: Vec<&str> = policies.iter().map(|p| p.1).collect();
    let s = TestEnv::granting(&mailboxes, 3599).await;
    let old = SystemTime::from(at(2026, 10, 1, 12, 0, 0));
    let new = SystemTime::from(at(2026, 11, 15, 12, 0, 0));
    for (_, mailbox, _, _) in &policies {
        for (subject, seen, received) in [
            ("old seen", true, old),
            ("old unseen", false, old),
            ("new seen", true, new),
            ("new unseen", false, new),
        ] {
            s.dovecot().deliver_as(
                mailbox,
                &mail("c@example.com", subject, None),
                seen,
                received,
            );
        }
    }
    let keys: Vec<String> = policies
        .iter()
        .map(|(_, _, value, _)| format!("start_at = \"{value}\""))
        .collect();
    let parsers: Vec<_> = policies
        .iter()
        .zip(&keys)
        .map(|((name, mailbox, _, _), key)| s.ssl(name, mailbox).with(key))
        .collect();
    let (path, _) = s.write_config("start-at.toml", &s.config_toml(&parsers));

    // doctor says what each policy would take, without taking anything.
    let doctor = binary(&["doctor", "--config"]).arg(&path).output().unwrap();
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        report.contains(
            "start_at = 2026-11-01 takes 2 of the 4 messages already in INBOX and leaves 2"
        ),
        "{report}"
    );
    assert_eq!(s.count("select count(*) from tickets").await, 0);

    // run --once: each policy takes its share and says so.
    let run = binary(&["run", "--once", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for (name, _, value, taken) in &policies {
        let line = format!(
            "{name}: first contact: start_at = {value} takes {taken} of the 4 messages already in INBOX and leaves {}",
            4 - taken
        );
        assert!(out.contains(&line), "{line}\n{out}");
        assert_eq!(s.tickets(name).await.len(), *taken, "{name}");
    }
    assert_eq!(s.tickets("unseen").await, vec!["new unseen", "old unseen"]);
    assert_eq!(s.tickets("since").await, vec!["new seen", "new unseen"]);
    // Skipped messages are not touched: their \Seen state is as it was.
    assert_eq!(unseen_on_server(&s, "now@example.test"), 2);
    assert_eq!(unseen_on_server(&s, "since@example.test"), 1);
    assert_eq!(unseen_on_server(&s, "unseen@example.test"), 0);

    // Later mail is taken whatever the policy, even if someone read it first.
    for (_, mailbox, _, _) in &policies {
        let raw = mail("c@example.com", "later", None);
        s.dovecot()
            .deliver_as(mailbox, &raw, true, SystemTime::now());
    }
    let config = Config::from_toml(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
    for report in s.run_once(&config).await {
        let once = report.result.as_ref().unwrap();
        assert_eq!(once.outcomes.created, 1, "{}", report.parser);
        assert!(once.first_contact.is_none(), "{}", report.parser);
    }
}

#[tokio::test]
async fn loop_protection_over_imap_counts_by_internaldate() {
    let s = TestEnv::mail().await;
    let day = at(2026, 11, 20, 0, 0, 0);
    // A day of ordinary backlog: four customers writing five times each, an hour apart.
    for sender in 0..4 {
        for n in 0..5 {
            let arrived = day + chrono::TimeDelta::hours(i64::from(sender + 5 * n));
            let raw = mail(
                &format!("customer{sender}@example.com"),
                &format!("q{n}"),
                None,
            );
            s.dovecot()
                .deliver_as(SHARED_A, &raw, false, SystemTime::from(arrived));
        }
    }
    // A true loop: five messages within a minute.
    for n in 0..5 {
        let arrived = day + chrono::TimeDelta::seconds(30_000 + 10 * n);
        let raw = mail("robot@example.com", &format!("alert {n}"), None);
        s.dovecot()
            .deliver_as(SHARED_A, &raw, false, SystemTime::from(arrived));
    }
    let config = s.config(&[s
        .ssl("support", SHARED_A)
        .with("max_tickets_per_sender = 3\nsender_window = 600")]);
    let reports = s.run_once(&config).await;
    let once = &reports[0].result.as_ref().unwrap().outcomes;
    assert_eq!((once.created, once.held), (23, 2), "{once:?}");
    let held: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "select sender, arrived_at from quarantine where kind = 'loop' order by arrived_at",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        held,
        vec![
            (
                "robot@example.com".to_string(),
                day + chrono::TimeDelta::seconds(30_030)
            ),
            (
                "robot@example.com".to_string(),
                day + chrono::TimeDelta::seconds(30_040)
            ),
        ]
    );
    let arrived: DateTime<Utc> = sqlx::query_scalar(
        "select m.arrived_at from ticket_messages m join tickets t on t.id = m.ticket_id
         where t.requester_email = 'customer0@example.com' and m.subject = 'q0'",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(arrived, day);
}

#[tokio::test]
async fn loop_protection_over_ingest_counts_by_a_plausible_date_header() {
    let s = TestEnv::database().await;
    let db = &s.db;
    let pipeline = s.pipeline(
        "support",
        "max_tickets_per_sender = 10\nsender_window = 600",
    );
    let day = at(2026, 11, 20, 0, 0, 0);
    // 2,000 ordinary messages from a hundred senders over a day, ingested in one go.
    let backlog: Vec<Vec<u8>> = (0..2000)
        .map(|n| {
            let sent = day + chrono::TimeDelta::seconds(i64::from(n) * 43);
            mail(
                &format!("c{}@example.com", n % 100),
                &format!("m{n}"),
                Some(sent),
            )
        })
        .collect();
    let mut created = 0;
    for batch in backlog.chunks(100) {
        for outcome in pipeline::ingest_batch(&db.pool, &pipeline, batch)
            .await
            .unwrap()
        {
            assert!(matches!(outcome, Outcome::Created { .. }), "{outcome:?}");
            created += 1;
        }
    }
    assert_eq!(created, 2000);

    // A true loop (twelve messages dated within two minutes) is still held.
    let burst: Vec<Vec<u8>> = (0..12)
        .map(|n| {
            let sent = day + chrono::TimeDelta::seconds(50_000 + 10 * n);
            mail("robot@example.com", &format!("alert {n}"), Some(sent))
        })
        .collect();
    let outcomes = pipeline::ingest_batch(&db.pool, &pipeline, &burst)
        .await
        .unwrap();
    let held = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Held { .. }))
        .count();
    assert_eq!(held, 2, "{outcomes:?}");

    // A Date header in the future is not plausible: the ingest time counts instead.
    let future = mail(
        "later@example.com",
        "from the future",
        Some(at(2099, 1, 1, 0, 0, 0)),
    );
    pipeline::ingest_one(&db.pool, &pipeline, &future)
        .await
        .unwrap();
    let arrived: DateTime<Utc> = sqlx::query_scalar(
        "select arrived_at from tickets where requester_email = 'later@example.com'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        (Utc::now() - arrived).num_seconds().abs() < 600,
        "{arrived}"
    );
}

#[tokio::test]
async fn one_ungranted_mailbox_costs_the_others_no_token() {
    let s = TestEnv::mail().await;
    for mailbox in [SHARED_A, SHARED_B, NOT_GRANTED] {
        s.dovecot().deliver(mailbox, &message(1, mailbox));
    }
    // The ungranted mailbox goes through a proxy that records its logins.
    let proxy = CuttingProxy::start(s.dovecot().imap_port, usize::MAX).await;
    let parsers = [
        s.ssl("support", SHARED_A),
        s.ssl("sales", SHARED_B),
        s.plain_via("finance", NOT_GRANTED, proxy.port),
    ];
    let config = s.config(&parsers);
    let reports = s.run_once(&config).await;
    for report in &reports {
        let refused = report.parser == "finance";
        assert_eq!(report.result.is_err(), refused, "{report:?}");
    }
    assert_eq!(s.entra().requests(), 1, "run --once: one token request");

    // A daemon (a new token cache) through three retries of the ungranted mailbox.
    let daemon = s.daemon(&config);
    wait_for(Duration::from_secs(60), || async {
        proxy.client_traffic().matches("AUTHENTICATE").count() >= 5
    })
    .await;
    daemon.stop().await;
    assert_eq!(s.entra().requests(), 2, "the daemon: one token request");
}

#[tokio::test]
async fn a_password_parser_logs_in_with_a_username_that_is_not_an_address() {
    let s = TestEnv::mail().await;
    s.dovecot()
        .deliver("jdoe", &message(1, "jdoe@example.test"));
    let text = format!(
        "[database]\nurl = \"{}\"\n[[parser]]\nname = \"plain\"\nemail = \"jdoe@example.test\"\nusername = \"jdoe\"\npassword = \"secret\"\n[parser.imap]\nhost = \"127.0.0.1\"\nport = {}\nencryption = \"none\"\n",
        s.db.url,
        s.dovecot().imap_port
    );
    let config = Config::from_toml(Path::new("jdoe.toml"), &text).unwrap();
    let reports = s.run_once(&config).await;
    let once = reports[0].result.as_ref().unwrap();
    assert_eq!(once.outcomes.created, 1, "{:?}", reports[0].result);
}

#[tokio::test]
async fn a_link_that_keeps_dropping_retries_at_once_while_batches_commit() {
    let s = TestEnv::mail().await;
    let body = "x".repeat(4000);
    for n in 0..500 {
        let raw = format!(
            "From: c{n}@example.com\r\nSubject: backlog {n}\r\nMessage-ID: <b{n}@test>\r\n\r\n{body}\r\n"
        );
        s.dovecot().deliver(SHARED_A, raw.as_bytes());
    }
    // Every connection drops after ~600 KB: one batch of 100 (~400 KB) commits per session.
    let proxy = CuttingProxy::start_cutting_every(s.dovecot().imap_port, 600_000).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dropping.toml");
    std::fs::write(
        &path,
        s.config_toml(&[s.plain_via("support", SHARED_A, proxy.port)]),
    )
    .unwrap();
    // The log goes to a file (a pipe nobody reads could fill up and stall the daemon).
    let log_path = dir.path().join("stderr.log");
    let child = binary(&["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info,mail2ticket::runtime::supervisor=debug")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let daemon = KillOnDrop(child);
    wait_for(Duration::from_secs(120), || async {
        s.count("select count(*) from tickets").await == 500
    })
    .await;
    drop(daemon);
    let log = std::fs::read_to_string(&log_path).unwrap();
    let delays: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("poller failed"))
        .filter_map(|l| l.split("retry_in_s=").nth(1))
        .map(|v| v.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(
        delays.len() >= 3,
        "the link dropped {} times:\n{log}",
        delays.len()
    );
    // Each session committed a batch: the backoff starts over (1 s, with jitter up to 2 s).
    assert!(delays.iter().all(|d| *d <= 2.0), "{delays:?}");
}

#[tokio::test]
async fn a_batch_committed_but_not_yet_settled_is_settled_by_the_next_pass_and_stored_once() {
    let s = TestEnv::mail().await;
    for n in 0..3 {
        s.dovecot().deliver(SHARED_A, &message(n, SHARED_A));
        s.dovecot().deliver(SHARED_B, &message(n, SHARED_B));
    }
    // Each connection dies as the batch's settle is sent: after the commit, before the
    // server moved anything (support) or marked anything read (sales, the default after).
    let port = s.dovecot().imap_port;
    let moving = CuttingProxy::start_cutting_on_client(port, b"UID MOVE").await;
    let marking = CuttingProxy::start_cutting_on_client(port, b"UID STORE").await;
    let config = s.config(&[
        s.plain_via("support", SHARED_A, moving.port)
            .with("after = \"move:Processed\""),
        s.plain_via("sales", SHARED_B, marking.port),
    ]);
    let first = s.run_once(&config).await;
    assert!(first.iter().all(|r| r.result.is_err()), "{first:?}");
    assert_eq!((moving.cuts(), marking.cuts()), (1, 1));
    assert_eq!(
        s.count("select count(*) from tickets").await,
        6,
        "committed"
    );
    assert_eq!(s.dovecot().messages_in(SHARED_A, ""), 3, "not moved yet");
    assert_eq!(unseen_on_server(&s, SHARED_B), 3, "not marked read yet");

    let second = s.run_once(&config).await;
    for report in &second {
        let outcomes = &report.result.as_ref().unwrap().outcomes;
        assert_eq!(outcomes.created, 0, "nothing stored twice: {outcomes:?}");
    }
    assert_eq!(s.dovecot().messages_in(SHARED_A, ""), 0, "moved");
    assert_eq!(s.dovecot().messages_in(SHARED_A, "Processed"), 3);
    assert_eq!(unseen_on_server(&s, SHARED_B), 0, "marked read");
    assert_eq!(s.count("select count(*) from tickets").await, 6);
    let owed = "select count(*) from mailbox_state where unsettled is not null";
    assert_eq!(s.count(owed).await, 0, "nothing owed any more");
    // A later pass has nothing to settle again.
    let third = s.run_once(&config).await;
    assert!(third.iter().all(|r| r.result.is_ok()), "{third:?}");
    assert_eq!(s.dovecot().messages_in(SHARED_A, "Processed"), 3);
}

#[tokio::test]
async fn a_cut_search_or_listing_fails_the_pass_instead_of_finding_nothing() {
    // async-imap's own SEARCH and FETCH end with an empty answer there; only a later
    // command would notice the lost connection, if any. Read as "none unread", a first
    // contact (start_at = "unseen", the default) would skip the unread mail for good;
    // read as "nothing new", a listing leaves new mail waiting for the next news.
    let cases: [(&[u8], &str); 2] = [
        (b"UID SEARCH UNSEEN", "lost during UID SEARCH"),
        (
            b"RFC822.SIZE INTERNALDATE",
            "lost during UID FETCH (RFC822.SIZE INTERNALDATE)",
        ),
    ];
    for (command, step) in cases {
        let s = TestEnv::mail().await;
        let read = message(1, SHARED_A);
        s.dovecot()
            .deliver_as(SHARED_A, &read, true, SystemTime::now());
        for n in 2..4 {
            s.dovecot().deliver(SHARED_A, &message(n, SHARED_A));
        }
        let port = s.dovecot().imap_port;
        let proxy = CuttingProxy::start_cutting_on_client(port, command).await;
        let config = s.config(&[s.plain_via("support", SHARED_A, proxy.port)]);
        let first = s.run_once(&config).await;
        let error = first[0].result.as_ref().unwrap_err();
        assert!(error.contains(step), "{error}");
        assert_eq!(proxy.cuts(), 1);

        let second = s.run_once(&config).await;
        let once = second[0].result.as_ref().unwrap();
        assert_eq!(once.outcomes.created, 2, "the two unread messages: {step}");
    }
}

#[tokio::test]
async fn folders_with_international_names_are_read_and_moved_to() {
    let s = TestEnv::mail().await;
    // IMAP4rev1 names folders in modified UTF-7 (RFC 3501 5.1.3), and so does Dovecot's
    // Maildir on disk: "Überprüfung" is "&ANw-berpr&APw-fung".
    for n in 0..2 {
        let raw = message(n, SHARED_A);
        s.dovecot().deliver_into(
            SHARED_A,
            "&ANw-berpr&APw-fung",
            &raw,
            false,
            SystemTime::now(),
        );
    }
    s.dovecot().deliver(SHARED_A, &message(9, SHARED_A));
    // Written as Outlook shows them: an umlaut, "&", and a character outside the BMP.
    let text = s.config_toml(&[s
        .ssl("support", SHARED_A)
        .with("after = \"move:Erledigt & geprüft 📨\"")])
        + "folder = \"Überprüfung\"\n";
    let config = Config::from_toml(Path::new("intl.toml"), &text).unwrap();
    let reports = s.run_once(&config).await;
    let once = reports[0].result.as_ref().unwrap();
    assert_eq!(once.outcomes.created, 2, "only the folder's messages");
    assert_eq!(s.dovecot().messages_in(SHARED_A, "&ANw-berpr&APw-fung"), 0);
    assert_eq!(s.dovecot().messages_in(SHARED_A, ""), 1, "INBOX untouched");
    // U+1F4E8 is the surrogate pair D83D DCE8 in UTF-16.
    let moved = "Erledigt &- gepr&APw-ft &2D3c6A-";
    assert_eq!(s.dovecot().messages_in(SHARED_A, moved), 2, "{moved}");
}

#[tokio::test]
async fn a_throttled_token_endpoint_is_asked_again_when_it_says() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    s.entra().throttle_next(1, "1");
    let config = s.config(&[s.ssl("support", SHARED_A)]);
    let daemon = s.daemon(&config);
    wait_for(Duration::from_secs(30), || async {
        s.count("select count(*) from tickets").await == 1
    })
    .await;
    daemon.stop().await;
    let asked = s.entra().request_times("client_credentials");
    assert_eq!(
        asked.len(),
        2,
        "one throttled request, then one that worked"
    );
    let waited = asked[1] - asked[0];
    // Retry-After: 1 is obeyed: not sooner, and not after the 20 s failure hold.
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}
