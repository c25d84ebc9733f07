//! Throughput of a backlog: the sandbox (Dovecot + Entra endpoint + throwaway Postgres),
//! a mailbox filled from a directory of messages (e.g. `../shared/bench/gen_dataset.py`
//! output), then, interleaved, a raw IMAP fetch of the whole mailbox (connect, XOAUTH2,
//! UID FETCH BODY.PEEK[] in batches of 50, bytes discarded) and `mail2ticket run --once`
//! ingesting it into Postgres (a fresh database and mailbox state each time).
//!
//!     python3 ../shared/bench/gen_dataset.py /tmp/bench5k 5000 42
//!     cargo build --release --locked && cargo run --release --example bench_backlog -- /tmp/bench5k/cur

#[path = "../tests/it/support/mod.rs"]
#[allow(dead_code)]
mod support;

use mail2ticket::config::Config;
use mail2ticket::source::imap::{self, Login};
use std::process::Command;
use std::time::Instant;
use support::dovecot::Dovecot;
use support::entra::{App, Entra, TENANT};

const MAILBOX: &str = "bulk@contoso.test";

#[tokio::main]
async fn main() {
    let dir = std::env::args().nth(1).expect("usage: bench_backlog DIR");
    let entra = Entra::start(&[(
        "app",
        App {
            secret: "s".into(),
            mailboxes: vec![MAILBOX.into()],
            lifetime: 3599,
            ..App::default()
        },
    )]);
    let dovecot = Dovecot::start(&entra);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut bytes = 0u64;
    for f in &files {
        let raw = std::fs::read(f).unwrap();
        bytes += raw.len() as u64;
        dovecot.deliver(MAILBOX, &raw);
    }
    let mb = bytes as f64 / 1e6;
    println!("mailbox: {} messages, {mb:.1} MB", files.len());

    for round in 1..=2 {
        // Raw fetch.
        let db = support::postgres::test_db().await;
        let config = Config::from_toml(
            std::path::Path::new("bench.toml"),
            &config_text(&db.url, &entra, &dovecot),
        )
        .unwrap();
        let tokens = mail2ticket::auth::TokenSources::from_config(&config, None).unwrap();
        let token = tokens.get("app").unwrap().token().await.unwrap();
        let started = Instant::now();
        let mail2ticket::config::SourceConfig::Imap(server) = &config.parsers[0].source else {
            unreachable!("an IMAP parser")
        };
        let mut session = imap::connect(server)
            .await
            .unwrap()
            .login(Login::OAuth {
                user: MAILBOX,
                token: &token.secret,
            })
            .await
            .unwrap();
        session.select("INBOX").await.unwrap();
        let listed = session.pending_from(1).await.unwrap();
        let uids: Vec<u32> = listed.iter().map(|p| p.uid).collect();
        let mut fetched = 0usize;
        for chunk in uids.chunks(50) {
            fetched += session.fetch(chunk).await.unwrap().len();
        }
        session.logout().await;
        let raw_s = started.elapsed().as_secs_f64();
        println!(
            "round {round}: raw IMAP fetch: {fetched} messages in {raw_s:.2} s = {:.0} msg/s, {:.1} MB/s",
            fetched as f64 / raw_s,
            mb / raw_s
        );

        // The daemon, into Postgres.
        let cfg_dir = tempfile::tempdir().unwrap();
        let path = cfg_dir.path().join("m2t.toml");
        std::fs::write(&path, config_text(&db.url, &entra, &dovecot)).unwrap();
        let bin = support::env::binary_path().display().to_string();
        let started = Instant::now();
        let out = Command::new("/usr/bin/time")
            .args(["-f", "%M"])
            .arg(&bin)
            .args(["run", "--once", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let run_s = started.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "{bin} run --once failed (build it with cargo build --release --locked): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rss_kb = String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("?")
            .to_string();
        let stored: i64 = sqlx::query_scalar("select count(*) from ticket_messages")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let quarantined: i64 = sqlx::query_scalar("select count(*) from quarantine")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        println!(
            "round {round}: mail2ticket run --once: {} | {stored} ticket messages + {quarantined} quarantined in {run_s:.2} s = {:.0} msg/s, {:.1} MB/s, peak RSS {rss_kb} KB",
            String::from_utf8_lossy(&out.stdout).trim(),
            (stored + quarantined) as f64 / run_s,
            mb / run_s
        );
    }
}

fn config_text(db_url: &str, entra: &Entra, dovecot: &Dovecot) -> String {
    format!(
        "[database]\nurl = \"{db_url}\"\n[[credential]]\nname = \"app\"\ntype = \"client_credentials\"\ntenant_id = \"{TENANT}\"\nclient_id = \"app\"\nclient_secret = \"s\"\nauthority = \"{}\"\n[[parser]]\nname = \"bulk\"\nemail = \"{MAILBOX}\"\nshared_mailbox = true\ncredential = \"app\"\nadd_ccs = true\nafter = \"none\"\n[parser.imap]\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\n",
        entra.url,
        dovecot.imaps_port,
        dovecot.ca_file.display()
    )
}
