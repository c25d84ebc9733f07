//! The daemon against a real Dovecot enforcing XOAUTH2, the test Entra endpoint and a real
//! Postgres: shared mailboxes, one credential, token renewal, IDLE, shutdown.

use crate::support::dovecot::Dovecot;
use crate::support::entra::{App, Entra};
use crate::support::env::{Daemon, NOT_GRANTED, SHARED_A, SHARED_B, TestEnv, binary, wait_for};
use crate::support::proxy::CuttingProxy;
use mail2ticket::auth::TokenSources;
use mail2ticket::config::Config;
use mail2ticket::runtime::supervisor;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub(crate) fn message(n: usize, to: &str) -> Vec<u8> {
    format!(
        "From: Customer {n} <customer{n}@example.com>\r\nTo: {to}\r\nSubject: Request {n}\r\nMessage-ID: <req-{n}-{to}>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nPlease help with request {n}.\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn one_credential_reads_two_shared_mailboxes_with_one_token_request() {
    let s = TestEnv::mail().await;
    for n in 0..3 {
        s.dovecot().deliver(SHARED_A, &message(n, SHARED_A));
    }
    for n in 0..2 {
        s.dovecot().deliver(SHARED_B, &message(n, SHARED_B));
    }
    let config = s.config(&[s.ssl("support", SHARED_A), s.starttls("sales", SHARED_B)]);
    let tokens = TokenSources::from_config(&config, None).unwrap();
    let cancel = CancellationToken::new();
    let reports = supervisor::run_once(&config, &s.db.pool, &tokens, &cancel).await;
    for r in &reports {
        assert!(
            r.result.is_ok(),
            "{}: {:?}\n{}",
            r.parser,
            r.result,
            s.dovecot().log()
        );
    }
    assert_eq!(
        s.tickets("support").await,
        vec!["Request 0", "Request 1", "Request 2"]
    );
    assert_eq!(s.tickets("sales").await, vec!["Request 0", "Request 1"]);
    assert_eq!(s.entra().requests(), 1, "both pollers share one token");

    // A second pass finds nothing new (checkpoint), and the messages are \Seen.
    let reports = supervisor::run_once(&config, &s.db.pool, &tokens, &cancel).await;
    for r in &reports {
        let stats = &r.result.as_ref().unwrap().outcomes;
        assert_eq!((stats.created, stats.duplicate), (0, 0), "{}", r.parser);
    }
    let cur = s
        .dovecot()
        .root
        .join("mail")
        .join(SHARED_A)
        .join("Maildir/cur");
    let seen = std::fs::read_dir(cur)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(":2,S")
        })
        .count();
    assert_eq!(
        seen, 3,
        "every stored message is marked \\Seen after commit"
    );
    assert_eq!(s.entra().requests(), 1, "the cached token is reused");
}

/// `n` mailboxes `box0@example.test` ... (parser names `box0` ...), each with one message.
fn many_mailboxes(s: &TestEnv, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let (name, email) = (format!("box{i}"), format!("box{i}@example.test"));
            s.dovecot().deliver(&email, &message(1, &email));
            (name, email)
        })
        .collect()
}

/// Many mailboxes meeting their folders for the first time at once, through a pool of two
/// connections: no task may hold a connection while it waits for another (or for the
/// network), or every task holds one and none gets its second until the pool times out.
#[tokio::test]
async fn sixteen_first_contacts_share_a_pool_of_two_connections() {
    let s = TestEnv::granting(&["*@example.test"], 3599).await;
    let boxes = many_mailboxes(&s, 16);
    let specs: Vec<_> = boxes.iter().map(|(n, e)| s.ssl(n, e)).collect();
    let config = s.config(&specs);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&s.db.url)
        .await
        .unwrap();
    let tokens = TokenSources::from_config(&config, None).unwrap();
    let reports = supervisor::run_once(&config, &pool, &tokens, &CancellationToken::new()).await;
    for r in &reports {
        assert!(r.result.is_ok(), "{}: {:?}", r.parser, r.result);
    }
    for (name, _) in &boxes {
        assert_eq!(s.tickets(name).await, vec!["Request 1"], "{name}");
    }
}

/// Started with a soft limit of 40 open files (a shell's or systemd's low default), `run`
/// raises it to the hard limit, so sixty mailboxes each get their socket.
#[tokio::test]
async fn sixty_mailboxes_run_under_a_soft_limit_of_forty_open_files() {
    let s = TestEnv::granting(&["*@example.test"], 3599).await;
    let boxes = many_mailboxes(&s, 60);
    let specs: Vec<_> = boxes.iter().map(|(n, e)| s.ssl(n, e)).collect();
    let path = s.write_file("many.toml", &s.config_toml(&specs));
    let out = std::process::Command::new("sh")
        .args(["-c", "ulimit -Sn 40 && exec \"$0\" \"$@\""])
        .arg(crate::support::env::binary_path())
        .args(["run", "--once", "--config"])
        .arg(&path)
        .env_remove("MAIL2TICKET_DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for (name, _) in &boxes {
        assert_eq!(s.tickets(name).await, vec!["Request 1"], "{name}");
    }
}

#[tokio::test]
async fn a_mailbox_the_app_was_not_granted_fails_clearly_while_the_others_are_ingested() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    s.dovecot().deliver(NOT_GRANTED, &message(1, NOT_GRANTED));
    let config = s.config(&[s.ssl("support", SHARED_A), s.ssl("finance", NOT_GRANTED)]);
    let reports = s.run_once(&config).await;
    let finance = reports.iter().find(|r| r.parser == "finance").unwrap();
    let error = finance.result.as_ref().unwrap_err();
    assert!(
        error.contains("refused the XOAUTH2 login as finance@example.test"),
        "{error}"
    );
    let support = reports.iter().find(|r| r.parser == "support").unwrap();
    assert_eq!(support.result.as_ref().unwrap().outcomes.created, 1);
    assert!(s.tickets("finance").await.is_empty());
}

#[tokio::test]
async fn a_rejected_token_is_renewed_and_the_login_retried() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    s.entra().issue_expired_tokens(1);
    let config = s.config(&[s.ssl("support", SHARED_A)]);
    let reports = s.run_once(&config).await;
    assert_eq!(
        reports[0].result.as_ref().unwrap().outcomes.created,
        1,
        "{:?}",
        reports[0].result
    );
    assert_eq!(
        s.entra().requests(),
        2,
        "the expired token was replaced once"
    );
}

#[tokio::test]
async fn mail_delivered_while_idling_becomes_a_ticket() {
    let s = TestEnv::mail().await;
    let config = s.config(&[s.ssl("support", SHARED_A)]);
    let daemon = s.daemon(&config);
    wait_until_watching(&s).await;
    s.dovecot().deliver(SHARED_A, &message(7, SHARED_A));
    wait_for(Duration::from_secs(15), || async {
        s.tickets("support").await == vec!["Request 7"]
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn the_session_is_renewed_before_the_token_expires() {
    // 5-second tokens: the poller must leave IDLE and log in again with a new token
    // before each one expires, and keep ticketing mail.
    let s = TestEnv::granting(&[SHARED_A, SHARED_B], 5).await;
    let config = s.config(&[s.ssl("support", SHARED_A)]);
    let daemon = s.daemon(&config);
    wait_for(Duration::from_secs(30), || async {
        s.entra().requests() >= 3
    })
    .await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    wait_for(Duration::from_secs(15), || async {
        s.tickets("support").await.len() == 1
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_password_parser_logs_in_with_login_on_plain_loopback() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(
        "plainuser@example.test",
        &message(1, "plainuser@example.test"),
    );
    let text = |password: &str| {
        format!(
            "[database]\nurl = \"{}\"\n[[parser]]\nname = \"plain\"\nemail = \"plainuser@example.test\"\npassword = \"{password}\"\n[parser.imap]\nhost = \"127.0.0.1\"\nport = {}\nencryption = \"none\"\n",
            s.db.url,
            s.dovecot().imap_port
        )
    };
    let good = Config::from_toml(Path::new("p.toml"), &text("secret")).unwrap();
    let reports = s.run_once(&good).await;
    assert_eq!(
        reports[0].result.as_ref().unwrap().outcomes.created,
        1,
        "{:?}",
        reports[0].result
    );

    let bad = Config::from_toml(Path::new("p.toml"), &text("wrong-password")).unwrap();
    let reports = s.run_once(&bad).await;
    let error = reports[0].result.as_ref().unwrap_err();
    assert!(
        error.contains("refused the LOGIN login as plainuser@example.test"),
        "{error}"
    );
    assert!(!error.contains("wrong-password"), "{error}");
}

#[tokio::test]
async fn without_idle_the_poller_polls_every_poll_interval() {
    let entra = Entra::start(&[(
        "app-1",
        App {
            secret: "s3cret".into(),
            mailboxes: vec![SHARED_A.into()],
            lifetime: 3599,
            ..App::default()
        },
    )]);
    // A server that does not offer IDLE.
    let dovecot = Dovecot::start_with(
        &entra,
        "imap_capability = IMAP4rev1 LITERAL+ SASL-IR UIDPLUS MOVE",
    );
    let s = TestEnv::with_servers(entra, dovecot).await;
    // Plain IMAP through a proxy that never cuts, to see the commands sent.
    let proxy = CuttingProxy::start(s.dovecot().imap_port, usize::MAX).await;
    let parser = s
        .plain_via("support", SHARED_A, proxy.port)
        .with("poll_interval = 1");
    let config = s.config(&[parser]);
    let daemon = s.daemon(&config);
    wait_until_watching(&s).await;
    s.dovecot().deliver(SHARED_A, &message(3, SHARED_A));
    wait_for(Duration::from_secs(15), || async {
        s.tickets("support").await == vec!["Request 3"]
    })
    .await;
    daemon.stop().await;
    let traffic = proxy.client_traffic();
    assert!(traffic.contains(" NOOP\r\n"), "polled with NOOP");
    assert!(
        !traffic.contains(" IDLE\r\n"),
        "never sent IDLE to a server without it"
    );
}

#[tokio::test]
async fn a_wrong_client_secret_is_reported_with_its_aadsts_code_and_never_the_secret() {
    let s = TestEnv::mail().await;
    let text = s.config_toml(&[s.ssl("support", SHARED_A)]).replace(
        "client_secret = \"s3cret\"",
        "client_secret = \"not-the-secret-42\"",
    );
    let config = Config::from_toml(Path::new("bad.toml"), &text).unwrap();
    let reports = s.run_once(&config).await;
    let error = reports[0].result.as_ref().unwrap_err();
    assert!(error.contains("AADSTS7000215"), "{error}");
    assert!(
        error.contains("client_secret is wrong or expired"),
        "{error}"
    );
    assert!(!error.contains("not-the-secret-42"), "{error}");
}

#[tokio::test]
async fn an_oversized_message_is_quarantined_by_its_header_and_left_on_the_server() {
    let s = TestEnv::mail().await;
    let mut big = message(1, SHARED_A);
    big.extend_from_slice("y".repeat(200_000).as_bytes());
    s.dovecot().deliver(SHARED_A, &big);
    s.dovecot().deliver(SHARED_A, &message(2, SHARED_A));
    let config = s.config(&[s
        .ssl("support", SHARED_A)
        .with("max_message_size = \"100 KB\"")]);
    let reports = s.run_once(&config).await;
    let stats = &reports[0].result.as_ref().unwrap().outcomes;
    assert_eq!((stats.created, stats.quarantined), (1, 1));
    let (reason, raw): (String, Vec<u8>) = sqlx::query_as("select reason, raw from quarantine")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert!(reason.contains("over max_message_size"), "{reason}");
    assert!(
        raw.len() < 1000,
        "only the header was downloaded ({} bytes)",
        raw.len()
    );
    assert!(String::from_utf8_lossy(&raw).contains("Subject: Request 1"));
    assert_eq!(s.tickets("support").await, vec!["Request 2"]);
    // The big message is still in the mailbox and not marked \Seen.
    let cur = s
        .dovecot()
        .root
        .join("mail")
        .join(SHARED_A)
        .join("Maildir/cur");
    let unseen: Vec<_> = std::fs::read_dir(cur)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.contains(":2,S"))
        .collect();
    assert_eq!(unseen.len(), 1, "{unseen:?}");
}

#[tokio::test]
async fn a_uidvalidity_change_rescans_without_duplicating() {
    let s = TestEnv::mail().await;
    for n in 0..3 {
        s.dovecot().deliver(SHARED_A, &message(n, SHARED_A));
    }
    let config = s.config(&[s.ssl("support", SHARED_A)]);
    let tokens = TokenSources::from_config(&config, None).unwrap();
    let cancel = CancellationToken::new();
    let first = supervisor::run_once(&config, &s.db.pool, &tokens, &cancel).await;
    assert_eq!(first[0].result.as_ref().unwrap().outcomes.created, 3);
    let before = s.count("select uidvalidity from mailbox_state").await;
    // Dovecot gives the folder a new UIDVALIDITY when its UID list is lost.
    std::thread::sleep(Duration::from_millis(1100)); // UIDVALIDITY is a timestamp
    let maildir = s.dovecot().root.join("mail").join(SHARED_A).join("Maildir");
    for entry in std::fs::read_dir(&maildir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("dovecot")
        {
            std::fs::remove_file(path).unwrap(); // uidlist and indexes
        }
    }
    let second = supervisor::run_once(&config, &s.db.pool, &tokens, &cancel).await;
    let stats = &second[0].result.as_ref().unwrap().outcomes;
    assert_eq!(
        (stats.created, stats.duplicate),
        (0, 3),
        "rescanned, recognised by Message-ID"
    );
    assert_ne!(
        s.count("select uidvalidity from mailbox_state").await,
        before
    );
    assert_eq!(s.count("select count(*) from tickets").await, 3);
}

#[tokio::test]
async fn oauthbearer_is_used_when_the_server_offers_only_that() {
    let entra = Entra::start(&[(
        "app-1",
        App {
            secret: "s3cret".into(),
            mailboxes: vec![SHARED_A.into()],
            lifetime: 3599,
            ..App::default()
        },
    )]);
    let dovecot = Dovecot::start_with(&entra, "auth_mechanisms = oauthbearer plain login");
    let s = TestEnv::with_servers(entra, dovecot).await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    let proxy = CuttingProxy::start(s.dovecot().imap_port, usize::MAX).await;
    let config = s.config(&[s.plain_via("support", SHARED_A, proxy.port)]);
    let reports = s.run_once(&config).await;
    assert_eq!(
        reports[0].result.as_ref().unwrap().outcomes.created,
        1,
        "{:?}",
        reports[0].result
    );
    assert!(proxy.client_traffic().contains("AUTHENTICATE OAUTHBEARER"));
}

#[tokio::test]
async fn the_daemon_survives_a_database_outage() {
    let s = TestEnv::mail().await;
    let (proxy, db_via_proxy) = s.database_via_proxy().await;
    let text = s
        .config_toml(&[s.ssl("support", SHARED_A)])
        .replace(&s.db.url, &db_via_proxy);
    let config = Config::from_toml(Path::new("outage.toml"), &text).unwrap();
    let pool = mail2ticket::store::connect(&config.database).await.unwrap();
    let daemon = Daemon::start(&config, &pool);
    wait_until_watching(&s).await;
    proxy.set_down(true);
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        s.tickets("support").await.is_empty(),
        "nothing can be stored while the database is down"
    );
    proxy.set_down(false);
    wait_for(Duration::from_secs(40), || async {
        s.tickets("support").await == vec!["Request 1"]
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn inactive_parsers_are_skipped() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    // The inactive parser's mailbox is not granted: running it would fail.
    let config = s.config(&[
        s.ssl("support", SHARED_A),
        s.ssl("finance", NOT_GRANTED).with("status = \"inactive\""),
    ]);
    let reports = s.run_once(&config).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].parser, "support");
    assert!(reports[0].result.is_ok());
}

#[tokio::test]
async fn after_ingest_moves_or_deletes_only_committed_messages() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    s.dovecot().deliver(SHARED_B, &message(2, SHARED_B));
    let config = s.config(&[
        s.ssl("support", SHARED_A)
            .with("after = \"move:Processed\""),
        s.ssl("sales", SHARED_B).with("after = \"delete\""),
    ]);
    let reports = s.run_once(&config).await;
    for r in &reports {
        assert_eq!(
            r.result.as_ref().unwrap().outcomes.created,
            1,
            "{}: {:?}",
            r.parser,
            r.result
        );
    }
    let files = |mailbox: &str, folder: &str| s.dovecot().messages_in(mailbox, folder);
    assert_eq!(files(SHARED_A, ""), 0, "moved out of INBOX");
    assert_eq!(files(SHARED_A, "Processed"), 1, "into Processed");
    assert_eq!(files(SHARED_B, ""), 0, "deleted");
    assert_eq!(
        s.tickets("support").await.len() + s.tickets("sales").await.len(),
        2
    );
}

#[tokio::test]
async fn the_server_dropping_the_connection_mid_fetch_is_survived() {
    let s = TestEnv::mail().await;
    let padding = "x".repeat(8000);
    for n in 0..40 {
        let mut raw = message(n, SHARED_A);
        raw.extend_from_slice(padding.as_bytes());
        s.dovecot().deliver(SHARED_A, &raw);
    }
    // The first connection dies ~60 KB into the server's answers: inside the first FETCH.
    let proxy = CuttingProxy::start(s.dovecot().imap_port, 60_000).await;
    let config = s.config(&[s.plain_via("support", SHARED_A, proxy.port)]);
    let daemon = s.daemon(&config);
    wait_for(Duration::from_secs(30), || async {
        s.count("select count(*) from ticket_messages").await == 40
    })
    .await;
    daemon.stop().await;
    assert_eq!(proxy.cuts(), 1, "the connection was cut once");
    assert_eq!(s.count("select count(*) from tickets").await, 40);
}

#[tokio::test]
async fn a_message_the_server_never_returns_is_quarantined_by_its_header_and_the_rest_flow() {
    let s = TestEnv::mail().await;
    for n in 0..6 {
        let mut raw = message(n, SHARED_A);
        if n == 2 {
            // The proxy cuts every connection that carries this body.
            raw.extend_from_slice(b"NEVER-DELIVERED-7f3a\r\n");
        }
        s.dovecot().deliver(SHARED_A, &raw);
    }
    let proxy =
        CuttingProxy::start_cutting_on(s.dovecot().imap_port, b"NEVER-DELIVERED-7f3a").await;
    let config = s.config(&[s.plain_via("support", SHARED_A, proxy.port)]);
    let daemon = s.daemon(&config);
    // Twice as a batch, twice alone, then quarantined: backoff 1 + 2 + 4 + 8 s with jitter.
    wait_for(Duration::from_secs(90), || async {
        s.count("select count(*) from quarantine").await == 1
            && s.count("select count(*) from tickets").await == 5
    })
    .await;
    daemon.stop().await;
    assert_eq!(
        proxy.cuts(),
        4,
        "fetched twice in its batch and twice alone"
    );
    let (reason, header_only, raw): (String, bool, Vec<u8>) =
        sqlx::query_as("select reason, header_only, raw from quarantine")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert!(header_only);
    assert!(
        reason.contains("failed 4 times") && reason.contains("stays in the mailbox"),
        "{reason}"
    );
    let header = String::from_utf8_lossy(&raw);
    assert!(
        header.contains("Subject: Request 2") && !header.contains("NEVER-DELIVERED"),
        "{header}"
    );
    let subjects = s.tickets("support").await;
    assert_eq!(subjects.len(), 5);
    assert!(!subjects.contains(&"Request 2".to_string()), "{subjects:?}");
    let (last_uid, trouble): (i64, Option<i64>) = sqlx::query_as(
        "select last_uid, fetch_trouble_uid from mailbox_state where parser = 'support'",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (last_uid, trouble),
        (6, None),
        "checkpoint past everything, counter cleared"
    );
}

#[tokio::test]
async fn restarting_after_kill_9_mid_backlog_tickets_every_message_exactly_once() {
    let s = TestEnv::mail().await;
    const BACKLOG: i64 = 1500;
    for n in 0..BACKLOG as usize {
        s.dovecot().deliver(SHARED_A, &message(n, SHARED_A));
    }
    let (path, _) = s.write_config(
        "mail2ticket.toml",
        &s.config_toml(&[s.ssl("support", SHARED_A)]),
    );

    let mut daemon = binary(&["run", "--config"]).arg(&path).spawn().unwrap();
    wait_for(Duration::from_secs(60), || async {
        s.count("select count(*) from tickets").await > 0
    })
    .await;
    daemon.kill().unwrap(); // SIGKILL: no shutdown code runs
    daemon.wait().unwrap();
    let at_kill = s.count("select count(*) from tickets").await;
    assert!(
        at_kill < BACKLOG,
        "the kill must land mid-backlog (had {at_kill})"
    );

    let out = binary(&["run", "--once", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.count("select count(*) from tickets").await, BACKLOG);
    assert_eq!(
        s.count("select count(distinct message_id) from ticket_messages")
            .await,
        BACKLOG
    );
    let checkpoint = s.count("select last_uid from mailbox_state").await;
    assert_eq!(
        checkpoint, BACKLOG,
        "the checkpoint covers the whole backlog"
    );
}

/// `max_connections = 1` is a valid setting: nothing in the daemon may keep the only
/// connection for itself (the webhook dispatcher's NOTIFY listener once took one from the
/// pool for good, even with no webhook configured, and every mailbox waited forever).
#[tokio::test]
async fn a_pool_of_one_connection_serves_the_daemon() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    let text = s.config_toml(&[s.ssl("support", SHARED_A)]).replacen(
        "[database]\n",
        "[database]\nmax_connections = 1\n",
        1,
    );
    let (path, _) = s.write_config("mail2ticket.toml", &text);
    let _daemon =
        crate::support::KillOnDrop(binary(&["run", "--config"]).arg(&path).spawn().unwrap());
    wait_for(Duration::from_secs(30), || async {
        s.count("select count(*) from tickets").await == 1
    })
    .await;
    s.dovecot().deliver(SHARED_A, &message(2, SHARED_A));
    wait_for(Duration::from_secs(30), || async {
        s.count("select count(*) from tickets").await == 2
    })
    .await;
}

#[tokio::test]
async fn sigterm_stops_the_daemon_cleanly() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    let (path, _) = s.write_config(
        "mail2ticket.toml",
        &s.config_toml(&[s.ssl("support", SHARED_A)]),
    );
    let mut daemon = binary(&["run", "--config"]).arg(&path).spawn().unwrap();
    wait_for(Duration::from_secs(30), || async {
        s.count("select count(*) from tickets").await == 1
    })
    .await;
    let pid = daemon.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not stop within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn run_once_exits_1_when_a_parser_fails_and_still_ingests_the_others() {
    let s = TestEnv::mail().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mail2ticket.toml");
    std::fs::write(
        &path,
        s.config_toml(&[s.ssl("support", SHARED_A), s.ssl("finance", NOT_GRANTED)]),
    )
    .unwrap();
    let out = binary(&["run", "--once", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("support: 1 created"), "{stdout}");
    assert!(stdout.contains("finance: failed"), "{stdout}");
    assert!(!stdout.contains("s3cret") && !String::from_utf8_lossy(&out.stderr).contains("s3cret"));
}

#[tokio::test]
async fn doctor_names_the_failing_step_and_its_fix() {
    let s = TestEnv::mail().await;
    // Exchange's answer when the login worked but the mailbox cannot be opened.
    let exchange = CuttingProxy::start_rewriting(
        s.dovecot().imap_port,
        b"OK [READ-WRITE] Select completed",
        b"NO User is authenticated but not connected.",
    )
    .await;
    let mut text = s.config_toml(&[
        s.ssl("good", SHARED_A),
        s.ssl("ungranted", NOT_GRANTED),
        s.plain_via("notconnected", SHARED_A, exchange.port),
    ]);
    // A parser whose server certificate is not trusted (no ca_file).
    text.push_str(&format!(
        "\n[[parser]]\nname = \"untrusted\"\nemail = \"{SHARED_A}\"\nshared_mailbox = true\ncredential = \"app\"\n[parser.imap]\nhost = \"localhost\"\nport = {}\n",
        s.dovecot().imaps_port
    ));
    // A parser whose credential has a wrong secret.
    text.push_str(&format!(
        "\n[[credential]]\nname = \"bad-secret\"\ntype = \"client_credentials\"\ntenant_id = \"{}\"\nclient_id = \"app-1\"\nclient_secret = \"wrong-secret-value\"\nauthority = \"{}\"\n\n[[parser]]\nname = \"badsecret\"\nemail = \"{SHARED_A}\"\nshared_mailbox = true\ncredential = \"bad-secret\"\n[parser.imap]\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\n",
        crate::support::entra::TENANT,
        s.entra().url,
        s.dovecot().imaps_port,
        s.dovecot().ca_file.display()
    ));
    let (path, _) = s.write_config("m2t.toml", &text);

    // Off the test's runtime thread: the proxy runs on it.
    let mut doctor = binary(&["doctor", "--config"]);
    doctor.arg(&path);
    let out = tokio::task::spawn_blocking(move || doctor.output().unwrap())
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{report}");
    let section = |name: &str| crate::support::doctor_section(&report, name);
    let good = section("good");
    assert!(
        !good.contains("FAIL") && good.contains("OK   SELECT") && good.contains("IMAP.AccessAsApp"),
        "{good}"
    );
    let ungranted = section("ungranted");
    assert!(
        ungranted.contains("FAIL AUTHENTICATE") && ungranted.contains("New-ServicePrincipal"),
        "{ungranted}"
    );
    let not_connected = section("notconnected");
    assert!(
        not_connected.contains("OK   AUTHENTICATE")
            && not_connected.contains("FAIL SELECT")
            && not_connected.contains("FullAccess")
            && not_connected.contains("ImapEnabled"),
        "{not_connected}"
    );
    let untrusted = section("untrusted");
    assert!(
        untrusted.contains("FAIL TLS") && untrusted.contains("ca_file"),
        "{untrusted}"
    );
    let bad = section("badsecret");
    assert!(
        bad.contains("FAIL token")
            && bad.contains("AADSTS7000215")
            && bad.contains("client_secret is wrong"),
        "{bad}"
    );
    assert!(
        !report.contains("wrong-secret-value") && !report.contains("s3cret"),
        "{report}"
    );

    let only_good = binary(&["doctor", "--parser", "good", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        only_good.status.success(),
        "{}",
        String::from_utf8_lossy(&only_good.stdout)
    );
}

async fn wait_until_watching(s: &TestEnv) {
    wait_for(Duration::from_secs(15), || async {
        s.count("select count(*) from mailbox_state").await > 0
    })
    .await;
}
