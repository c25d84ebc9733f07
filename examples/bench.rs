//! Throughput and scale benchmarks on the test harness's real servers: Dovecot over TLS with
//! XOAUTH2, the local Entra token endpoint, and a throwaway Postgres (fsync off). Figures,
//! not tests: `scripts/bench.sh` builds the release binary and runs this.
//!
//! `bench backlog DIR [ROUNDS]`: a mailbox filled with the messages of DIR (e.g.
//! `../shared/bench/gen_dataset.py` output), then per round, one after the other: mbsync
//! (fetch only, when installed), a raw IMAP fetch (our client, batches of 50, bytes
//! discarded), `mail2ticket run --once` into a fresh database, and `mail2ticket ingest` of
//! the files into a fresh database. Prints each round and the medians, and mail2ticket's
//! throughput as a multiple of mbsync's.
//!
//! `bench mailboxes N [APPENDS]`: `mail2ticket run` with N mailboxes of one credential:
//! the time until every mailbox is idle (logged in, listed, waiting in IDLE), the resident
//! memory, then APPENDS messages delivered one by one to random mailboxes and the time from
//! delivery to committed row (percentiles).
//!
//! For profiling: `BENCH_ONLY=text` runs only the backlog steps whose name contains it, and
//! `BENCH_PERF_CTL=fifo` writes `enable`/`disable` to a `perf record --control fifo:...`
//! control pipe around each timed mail2ticket and mbsync run, so a machine-wide profile holds only it.

#[path = "../tests/it/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::dovecot::Dovecot;
use support::entra::{App, Entra, TENANT};

/// The mailbox the backlog is read from.
const MAILBOX: &str = "bulk@contoso.test";
/// The same mail for mbsync, which logs in with a password (a `users.passwd` account).
const PLAIN_USER: &str = "plainuser@example.test";

#[tokio::main]
async fn main() {
    mail2ticket::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: usize| {
        args.get(i)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    match args.first().map(String::as_str) {
        Some("backlog") => {
            let dir = args.get(1).expect("usage: bench backlog DIR [ROUNDS]");
            backlog(Path::new(dir), number(2, 3)).await
        }
        Some("mailboxes") => mailboxes(number(1, 1000), number(2, 300)).await,
        _ => panic!("usage: bench backlog DIR [ROUNDS] | bench mailboxes N [APPENDS]"),
    }
}

/// One contender's figures for one round.
struct Run {
    seconds: f64,
    messages: usize,
    note: String,
}

async fn backlog(dir: &Path, rounds: usize) {
    let entra = Entra::start(&[("app", app(vec![MAILBOX.to_string()]))]);
    let dovecot = Dovecot::start(&entra);
    let files = message_files(dir);
    let mut bytes = 0u64;
    for f in &files {
        let raw = std::fs::read(f).unwrap();
        bytes += raw.len() as u64;
        dovecot.deliver(MAILBOX, &raw);
        dovecot.deliver(PLAIN_USER, &raw);
    }
    let mb = bytes as f64 / 1e6;
    println!("mailbox: {} messages, {mb:.1} MB", files.len());
    let mut results: Vec<(&str, Vec<Run>)> = Vec::new();
    let mut record = |name: &'static str, run: Run| {
        println!(
            "  {name:<22} {:>6.2} s  {:>6.0} msg/s  {:>6.1} MB/s  {}",
            run.seconds,
            run.messages as f64 / run.seconds,
            mb / run.seconds,
            run.note
        );
        match results.iter_mut().find(|(n, _)| *n == name) {
            Some((_, runs)) => runs.push(run),
            None => results.push((name, vec![run])),
        }
    };
    let have_mbsync = Command::new("mbsync").arg("--version").output().is_ok();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| name.contains(only.as_str());
    let in_raw = "attachments_in_raw = true\n";
    // BENCH_BINARIES=a,b: each mail2ticket step once per binary, alternating (A/B runs).
    let binaries: Vec<Option<String>> = match std::env::var("BENCH_BINARIES") {
        Ok(list) => list.split(',').map(|b| Some(b.to_string())).collect(),
        Err(_) => vec![None],
    };
    for round in 1..=rounds {
        println!("round {round}:");
        if have_mbsync && wanted("mbsync (fetch only)") {
            record("mbsync (fetch only)", mbsync(&dovecot));
        }
        if wanted("raw IMAP fetch") {
            record("raw IMAP fetch", raw_fetch(&entra, &dovecot).await);
        }
        for bin in &binaries {
            *BINARY.lock().unwrap() = bin.as_ref().map(PathBuf::from);
            let tag = |name: &str| -> &'static str {
                match bin {
                    Some(b) => format!("{name} [{b}]").leak(),
                    None => name.to_string().leak(),
                }
            };
            if wanted("mail2ticket run --once") {
                let run = run_once(&entra, &dovecot, "").await;
                record(tag("mail2ticket run --once"), run);
            }
            if wanted("mail2ticket ingest") {
                record(tag("mail2ticket ingest"), ingest(&entra, dir, "").await);
            }
            // The same with attachments stored once, inside the raw message.
            if wanted("run --once, in raw") {
                let run = run_once(&entra, &dovecot, in_raw).await;
                record(tag("run --once, in raw"), run);
            }
            if wanted("ingest, in raw") {
                record(tag("ingest, in raw"), ingest(&entra, dir, in_raw).await);
            }
        }
    }
    println!("medians of {rounds} rounds:");
    let median_rate = |runs: &[Run]| {
        let mut rates: Vec<f64> = runs.iter().map(|r| r.messages as f64 / r.seconds).collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    for (name, runs) in &results {
        println!("  {name:<22} {:>6.0} msg/s", median_rate(runs));
    }
    let rate_of = |name: &str| {
        results
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| median_rate(r))
    };
    let once = |name: &str| {
        name.starts_with("mail2ticket run --once") || name.starts_with("run --once, in raw")
    };
    for (name, _) in results.iter().filter(|(name, _)| once(name)) {
        if let (Some(m2t), Some(mbsync)) = (rate_of(name), rate_of("mbsync (fetch only)")) {
            println!("  {name} / mbsync = {:.2}", m2t / mbsync);
        }
    }
}

/// A token endpoint's application granted `mailboxes`.
fn app(mailboxes: Vec<String>) -> App {
    App {
        secret: "s".into(),
        mailboxes,
        lifetime: 3599,
        ..App::default()
    }
}

fn message_files(dir: &Path) -> Vec<PathBuf> {
    let dir = if dir.join("cur").is_dir() {
        dir.join("cur")
    } else {
        dir.to_path_buf()
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// mbsync pulling the mailbox into an empty Maildir (on tmpfs when there is one).
fn mbsync(dovecot: &Dovecot) -> Run {
    let base = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let dir = tempfile::Builder::new()
        .prefix("m2t-mbsync-")
        .tempdir_in(base)
        .unwrap();
    let local = dir.path().join("mail");
    std::fs::create_dir(&local).unwrap();
    let config = dir.path().join("mbsyncrc");
    std::fs::write(
        &config,
        format!(
            "IMAPAccount bench\nHost localhost\nPort {}\nUser {PLAIN_USER}\nPass secret\nSSLType IMAPS\nCertificateFile {}\nAuthMechs PLAIN\n\nIMAPStore remote\nAccount bench\n\nMaildirStore local\nPath {}/\nInbox {}/INBOX\n\nChannel bench\nFar :remote:\nNear :local:\nPatterns INBOX\nSync Pull\nCreate Near\nSyncState *\n",
            dovecot.imaps_port,
            dovecot.ca_file.display(),
            local.display(),
            local.display()
        ),
    )
    .unwrap();
    perf_control("enable");
    let started = Instant::now();
    let out = Command::new("mbsync")
        .args(["-q", "-c"])
        .arg(&config)
        .arg("bench")
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    perf_control("disable");
    assert!(
        out.status.success(),
        "mbsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count =
        |sub: &str| std::fs::read_dir(local.join("INBOX").join(sub)).map_or(0, |d| d.count());
    Run {
        seconds,
        messages: count("cur") + count("new"),
        note: String::new(),
    }
}

/// Our IMAP client alone: connect, XOAUTH2, list, UID FETCH in batches of 50.
async fn raw_fetch(entra: &Entra, dovecot: &Dovecot) -> Run {
    use mail2ticket::source::imap::{self, Login};
    // The configuration only names the database; a raw fetch never connects to it.
    let config = mail2ticket::config::Config::from_toml(
        Path::new("bench.toml"),
        &backlog_config("postgres://unused@127.0.0.1/unused", entra, dovecot, ""),
    )
    .unwrap();
    let tokens = mail2ticket::auth::TokenSources::from_config(&config, None).unwrap();
    let token = tokens.get("app").unwrap().token().await.unwrap();
    let mail2ticket::config::SourceConfig::Imap(server) = &config.parsers[0].source else {
        unreachable!("an IMAP parser")
    };
    let started = Instant::now();
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
    let mut messages = 0;
    for chunk in uids.chunks(50) {
        messages += session.fetch(chunk).await.unwrap().len();
    }
    session.logout().await;
    Run {
        seconds: started.elapsed().as_secs_f64(),
        messages,
        note: String::new(),
    }
}

/// `mail2ticket run --once` into a fresh database; `extra`: more parser settings.
async fn run_once(entra: &Entra, dovecot: &Dovecot, extra: &str) -> Run {
    let db = support::postgres::test_db().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m2t.toml");
    std::fs::write(&path, backlog_config(&db.url, entra, dovecot, extra)).unwrap();
    let (seconds, rss) = timed(
        Command::new(binary())
            .args(["run", "--once", "--config"])
            .arg(&path),
    );
    stored_run(&db.pool, seconds, format!("peak RSS {rss}")).await
}

/// `mail2ticket ingest` of the files into a fresh database; `extra`: more parser settings.
async fn ingest(entra: &Entra, dir: &Path, extra: &str) -> Run {
    let db = support::postgres::test_db().await;
    let cfg = tempfile::tempdir().unwrap();
    let path = cfg.path().join("m2t.toml");
    let config = format!(
        "[database]\nurl = \"{}\"\n{}[[parser]]\nname = \"bulk\"\nemail = \"{MAILBOX}\"\ncredential = \"app\"\nadd_ccs = true\n{extra}[parser.imap]\nhost = \"localhost\"\n",
        db.url,
        credential(entra)
    );
    std::fs::write(&path, config).unwrap();
    let (seconds, rss) = timed(
        Command::new(binary())
            .args(["ingest", "--parser", "bulk", "--config"])
            .arg(&path)
            .arg(dir),
    );
    stored_run(&db.pool, seconds, format!("peak RSS {rss}")).await
}

/// Runs `command` (output discarded, `RUST_LOG=warn`) under `/usr/bin/time`: seconds and
/// peak RSS.
fn timed(command: &mut Command) -> (f64, String) {
    let mut timed = Command::new("/usr/bin/time");
    timed.args(["-f", "%M"]).arg(command.get_program());
    timed.args(command.get_args()).env("RUST_LOG", "warn");
    perf_control("enable");
    let started = Instant::now();
    let out = timed
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    perf_control("disable");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?} failed: {stderr}", command);
    let kb: f64 = stderr
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0.0);
    (seconds, format!("{:.0} MB", kb / 1024.0))
}

/// Tells a `perf record --control fifo:PATH` (PATH in `BENCH_PERF_CTL`) to `command`.
fn perf_control(command: &str) {
    if let Ok(path) = std::env::var("BENCH_PERF_CTL") {
        std::fs::write(path, format!("{command}\n")).expect("perf's control pipe");
    }
}

/// What a run stored: ticket messages and quarantine rows.
async fn stored_run(pool: &sqlx::PgPool, seconds: f64, note: String) -> Run {
    let stored: i64 = sqlx::query_scalar(
        "select (select count(*) from ticket_messages) + (select count(*) from quarantine)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    Run {
        seconds,
        messages: stored as usize,
        note,
    }
}

/// The binary the next step runs, when not the release build (`BENCH_BINARIES`).
static BINARY: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// The release binary (`cargo build --release` first), or the one `BENCH_BINARIES` names.
fn binary() -> PathBuf {
    if let Some(path) = BINARY.lock().unwrap().clone() {
        return path;
    }
    let path = support::env::binary_path();
    assert!(
        path.exists(),
        "{} is missing: cargo build --release --locked",
        path.display()
    );
    path
}

fn credential(entra: &Entra) -> String {
    format!(
        "[[credential]]\nname = \"app\"\ntype = \"client_credentials\"\ntenant_id = \"{TENANT}\"\nclient_id = \"app\"\nclient_secret = \"s\"\nauthority = \"{}\"\n",
        entra.url
    )
}

/// One IMAP parser per mailbox, the defaults otherwise (threading, raw archive) except
/// `after = "none"`, so that every round finds the same mailbox.
fn parser(name: &str, email: &str, dovecot: &Dovecot, extra: &str) -> String {
    format!(
        "[[parser]]\nname = \"{name}\"\nemail = \"{email}\"\nshared_mailbox = true\ncredential = \"app\"\nadd_ccs = true\nafter = \"none\"\n{extra}[parser.imap]\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\n",
        dovecot.imaps_port,
        dovecot.ca_file.display()
    )
}

fn backlog_config(db_url: &str, entra: &Entra, dovecot: &Dovecot, extra: &str) -> String {
    format!(
        "[database]\nurl = \"{db_url}\"\n{}{}",
        credential(entra),
        parser("bulk", MAILBOX, dovecot, extra)
    )
}

async fn mailboxes(n: usize, appends: usize) {
    let emails: Vec<String> = (0..n).map(|i| format!("mb{i:04}@contoso.test")).collect();
    let entra = Entra::start(&[("app", app(vec!["*@contoso.test".into()]))]);
    // One imap process per session, and clients of anvil and stats to match (every imap
    // process connects to both; at stats' default client_limit of 1,000, the last logins
    // of a thousand wait seconds for a connection slot).
    let limits = format!(
        "service imap {{\n  process_limit = {}\n}}\nservice anvil {{\n  client_limit = {}\n}}\nservice stats {{\n  client_limit = {}\n}}\n",
        n + 100,
        2 * n + 200,
        2 * n + 200
    );
    let _inotify = InotifyInstances::at_least(n as u64 + 256);
    let dovecot = Dovecot::start_with(&entra, &limits);
    for email in &emails {
        // Read already: creates the Maildir, and `start_at = "unseen"` leaves it.
        let warm_up = b"Subject: warm-up\r\nMessage-ID: <w@x>\r\n\r\nhello\r\n";
        dovecot.deliver_as(email, warm_up, true, std::time::SystemTime::now());
    }
    let db = support::postgres::test_db().await;
    let port = support::postgres::free_port();
    let mut config = format!(
        "[database]\nurl = \"{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n{}",
        db.url,
        credential(&entra)
    );
    for (i, email) in emails.iter().enumerate() {
        config.push_str(&parser(&format!("mb{i:04}"), email, &dovecot, ""));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m2t.toml");
    std::fs::write(&path, config).unwrap();
    let started = Instant::now();
    let child = Daemon(
        Command::new(binary())
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = format!("http://127.0.0.1:{port}/status.json");
    let http = reqwest::Client::new();
    let mut quarter = 1;
    loop {
        let idle = idle_mailboxes(&http, &status).await;
        if idle * 4 >= quarter * n && quarter < 4 {
            println!(
                "  {idle} idle after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            quarter += 1;
        }
        if idle == n {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let log = dovecot.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "only {idle} of {n} mailboxes idle after 2 minutes; Dovecot's log ends: {tail:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let up = started.elapsed().as_secs_f64();
    let rss = rss_mib(child.id());
    println!("{n} mailboxes: every one idle {up:.1} s after start; RSS {rss:.0} MiB");

    // Appends spread across the mailboxes, ~20 a second; each one's delivery-to-row time,
    // read by a task polling the table every 10 ms (the figures carry up to 10 ms of that).
    let delivered = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let watcher = tokio::spawn(watch_rows(db.pool.clone(), delivered.clone(), appends));
    let mut pick = 0usize;
    for i in 0..appends {
        pick = (pick + 7919) % n;
        let id = format!("append-{i}@bench");
        let raw = format!(
            "From: customer{i}@example.test\r\nTo: {}\r\nSubject: append {i}\r\nMessage-ID: <{id}>\r\n\r\nbody {i}\r\n",
            emails[pick]
        );
        delivered.lock().unwrap().insert(id, Instant::now());
        dovecot.deliver(&emails[pick], raw.as_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies = watcher.await.unwrap();
    let missing = delivered.lock().unwrap().len();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{appends} appends across the mailboxes, delivery to committed row: p50 {:.3} s, p90 {:.3} s, p99 {:.3} s, max {:.3} s; {} never arrived; RSS {:.0} MiB",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0),
        missing,
        rss_mib(child.id())
    );
    drop(child);
}

/// Dovecot's IDLE learns of new mail through inotify, one instance per IMAP process, and
/// Linux allows 128 per user by default: past that, Dovecot falls back to checking every
/// `mailbox_idle_check_interval` (30 s), and the delivery-to-row figures would measure
/// that. Raised for the run (as root) and put back afterwards.
struct InotifyInstances(Option<String>);

const INOTIFY_INSTANCES: &str = "/proc/sys/fs/inotify/max_user_instances";

impl InotifyInstances {
    fn at_least(wanted: u64) -> Self {
        let old = std::fs::read_to_string(INOTIFY_INSTANCES).unwrap_or_default();
        let old = old.trim().to_string();
        if old.parse::<u64>().is_ok_and(|n| n >= wanted) {
            return InotifyInstances(None);
        }
        match std::fs::write(INOTIFY_INSTANCES, wanted.to_string()) {
            Ok(()) => {
                println!("fs.inotify.max_user_instances: {old} -> {wanted} for this run");
                InotifyInstances(Some(old))
            }
            Err(e) => {
                println!(
                    "cannot raise fs.inotify.max_user_instances ({old}): {e}; mail in mailboxes past that is seen only by Dovecot's 30 s check"
                );
                InotifyInstances(None)
            }
        }
    }
}

impl Drop for InotifyInstances {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(INOTIFY_INSTANCES, old);
        }
    }
}

/// The daemon under measurement: stopped (SIGTERM, then waited for) however the bench ends.
struct Daemon(std::process::Child);

impl Daemon {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// How many mailboxes `/status.json` shows idle.
async fn idle_mailboxes(http: &reqwest::Client, url: &str) -> usize {
    let Ok(response) = http.get(url).send().await else {
        return 0;
    };
    let Ok(body) = response.json::<serde_json::Value>().await else {
        return 0;
    };
    body["mailboxes"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["state"] == "idle").count())
}

/// Collects delivery-to-row times until `expected` rows arrived or 60 s pass without one.
async fn watch_rows(
    pool: sqlx::PgPool,
    delivered: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    expected: usize,
) -> Vec<f64> {
    let mut latencies = Vec::new();
    let (mut last_id, mut last_row) = (0i64, Instant::now());
    while latencies.len() < expected && last_row.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let rows: Vec<(i64, String)> =
            sqlx::query_as("select id, message_id from ticket_messages where id > $1 order by id")
                .bind(last_id)
                .fetch_all(&pool)
                .await
                .unwrap();
        let mut delivered = delivered.lock().unwrap();
        for (id, message_id) in rows {
            last_id = last_id.max(id);
            if let Some(at) = delivered.remove(&message_id) {
                latencies.push(at.elapsed().as_secs_f64());
                last_row = Instant::now();
            }
        }
    }
    latencies
}

/// Resident memory of a process, MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
