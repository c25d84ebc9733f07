//! The `mail2ticket` binary as ops run it: exit codes, messages, a corpus run twice.

use crate::support::env::binary;
use crate::support::{self, postgres};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("mail2ticket.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(path: &Path) -> Output {
    binary(&[])
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The count before `label` in the summary line ("summary: 3 created, ...").
fn summary_count(line: &str, label: &str) -> usize {
    line.trim_start_matches("summary:")
        .split(',')
        .find_map(|part| {
            let (n, l) = part.trim().split_once(' ')?;
            (l == label).then(|| n.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {label} in {line}"))
}

fn summary_line(out: &Output) -> String {
    text(&out.stdout)
        .lines()
        .find(|l| l.starts_with("summary:"))
        .unwrap_or_else(|| panic!("no summary in {}", text(&out.stdout)))
        .to_string()
}

#[test]
fn check_config_accepts_the_example_file() {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/mail2ticket.example.toml");
    // Beside it, the certificate and key its certificate credential names.
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("mail2ticket.toml");
    std::fs::copy(&source, &example).unwrap();
    support::entra::make_certificate(dir.path());
    let out = binary(&[])
        .args(["check-config", "--config"])
        .arg(&example)
        .env("CONTOSO_SECRET", "example-secret")
        .env("SUPPORT_IMAP_PASSWORD", "example-password")
        .env("HELPDESK_PASSWORD", "example-password")
        .env("MAIL2TICKET_KEY", "example-key-0123456789abcdef0123456789")
        .env("MAIL2TICKET_HTTP_TOKEN", "example-http-token")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn check_config_reports_file_key_and_fix_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config_text(
        "postgres://u:hunter2-db@localhost/db",
        "support",
        "credential = \"missing\"\ncolor = \"blue\"",
    );
    let path = write_config(dir.path(), &cfg);
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("color"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let cfg = support::config_text(
        "postgres://u:hunter2-db@localhost/db",
        "support",
        "credential = \"missing\"",
    );
    let path = write_config(dir.path(), &cfg);
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("parser[0].credential"), "{err}");
    assert!(err.contains("not both"), "{err}");
    assert!(
        !err.contains("hunter2") && !err.contains("not-used-by-ingest"),
        "{err}"
    );
}

#[tokio::test]
async fn ingesting_the_corpus_twice_adds_nothing_the_second_time() {
    let url = postgres::empty_db().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &support::config_text(&url, "support", "add_ccs = true"),
    );
    let messages = support::corpus_files().len();
    // A directory with only the .eml files (the corpus also holds expectations).
    let mail_dir = dir.path().join("mail");
    std::fs::create_dir(&mail_dir).unwrap();
    for p in support::corpus_files() {
        std::fs::copy(&p, mail_dir.join(p.file_name().unwrap())).unwrap();
    }

    let first = binary(&[])
        .args(["ingest", "--parser", "support", "--config"])
        .arg(&path)
        .arg(&mail_dir)
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}\n{}",
        text(&first.stdout),
        text(&first.stderr)
    );
    let line = summary_line(&first);
    let stored = ["created", "appended", "held", "quarantined"]
        .iter()
        .map(|l| summary_count(&line, l))
        .sum::<usize>();
    assert_eq!(stored, messages, "{line}");
    assert!(
        summary_count(&line, "quarantined") >= 2,
        "empty and garbage files are quarantined: {line}"
    );
    assert_eq!(summary_count(&line, "failed"), 0, "{line}");

    let second = binary(&[])
        .args(["ingest", "--parser", "support", "--config"])
        .arg(&path)
        .arg(&mail_dir)
        .output()
        .unwrap();
    assert!(second.status.success());
    assert_eq!(
        summary_line(&second),
        format!(
            "summary: 0 created, 0 appended, 0 held, {messages} duplicate, 0 quarantined, 0 failed"
        )
    );
}

#[tokio::test]
async fn ingest_reads_stdin() {
    let url = postgres::empty_db().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &support::config_text(&url, "support", ""));
    let mut child = binary(&[])
        .args(["ingest", "--parser", "support", "--config"])
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"From: pipe@example.com\r\nSubject: via MTA pipe\r\nMessage-ID: <pipe-1@x>\r\n\r\nhello\r\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        summary_line(&out),
        "summary: 1 created, 0 appended, 0 held, 0 duplicate, 0 quarantined, 0 failed"
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let subject: String = sqlx::query_scalar("select subject from tickets")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(subject, "via MTA pipe");
}

#[test]
fn ingest_fails_with_exit_1_when_the_database_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &support::config_text(&postgres::unreachable_url(), "support", ""),
    );
    let file = support::corpus_dir().join("01-plain-ascii.eml");
    let out = binary(&[])
        .args(["ingest", "--parser", "support", "--config"])
        .arg(&path)
        .arg(file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot connect to the database"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ingest_names_an_unknown_parser_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &support::config_text("postgres://localhost/x", "support", ""),
    );
    let out = binary(&[])
        .args(["ingest", "--parser", "nope", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("\"nope\""),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn quarantine_replay_after_a_config_fix_stores_each_message_once() {
    let url = postgres::empty_db().await;
    let dir = tempfile::tempdir().unwrap();
    let big = support::corpus_dir().join("21-huge-headers.eml");
    let vacation = dir.path().join("vacation.eml");
    std::fs::write(&vacation, "From: dan@example.com\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\nMessage-ID: <ooo-1@example.com>\r\n\r\nAway.\r\n").unwrap();

    // Too small a limit: the big message is quarantined, the vacation reply held.
    let strict = write_config(
        dir.path(),
        &support::config_text(&url, "support", "max_message_size = 1000"),
    );
    let out = binary(&[])
        .args(["ingest", "--parser", "support", "--config"])
        .arg(&strict)
        .arg(&big)
        .arg(&vacation)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = summary_line(&out);
    assert_eq!(
        (
            summary_count(&line, "quarantined"),
            summary_count(&line, "held")
        ),
        (1, 1),
        "{line}"
    );

    let list = binary(&[])
        .args(["quarantine", "list", "--config"])
        .arg(&strict)
        .output()
        .unwrap();
    let listing = text(&list.stdout);
    assert!(
        listing.contains("max_message_size") && listing.contains("automatic"),
        "{listing}"
    );
    assert!(listing.contains("2 row(s)"), "{listing}");

    // The limit is fixed: replaying everything tickets the big one; the auto-reply stays held.
    let fixed = write_config(dir.path(), &support::config_text(&url, "support", ""));
    let replay = || {
        binary(&[])
            .args(["quarantine", "replay", "--all", "--config"])
            .arg(&fixed)
            .output()
            .unwrap()
    };
    let first = replay();
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        text(&first.stdout).contains("replay: 1 stored, 1 still held, 0 skipped"),
        "{}",
        text(&first.stdout)
    );
    let second = replay();
    assert!(
        text(&second.stdout).contains("replay: 0 stored, 1 still held, 0 skipped"),
        "{}",
        text(&second.stdout)
    );

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tickets: i64 = sqlx::query_scalar("select count(*) from tickets")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tickets, 1);
    let replayed: Vec<String> =
        sqlx::query_scalar("select replay_outcome from quarantine where replayed_at is not null")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(replayed, vec!["created ticket 1".to_string()]);
    // Naming a replayed row again changes nothing.
    let id: i64 = sqlx::query_scalar("select id from quarantine where replayed_at is not null")
        .fetch_one(&pool)
        .await
        .unwrap();
    let again = binary(&[])
        .args(["quarantine", "replay", "--config"])
        .arg(&fixed)
        .arg(id.to_string())
        .output()
        .unwrap();
    assert!(
        text(&again.stdout).contains("already replayed"),
        "{}",
        text(&again.stdout)
    );
}
