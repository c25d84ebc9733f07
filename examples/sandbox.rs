//! The local sandbox, end to end: a throwaway Postgres, a real Dovecot that enforces
//! XOAUTH2 with Entra-shaped tokens, and the Entra-compatible token endpoint of the test
//! suite; two shared mailboxes filled with the sample mail; then the real `mail2ticket`
//! binary runs as a daemon, tickets the backlog, and tickets one more message delivered
//! while it waits in IDLE.
//!
//!     cargo build --release --locked && cargo run --release --example sandbox
//!
//! Needs root (Dovecot drops privileges to its users) and the packages `.ci/run` installs.

#[path = "../tests/it/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::entra::{App, Entra, TENANT};

#[tokio::main]
async fn main() {
    let shared = ["support@contoso.test", "sales@contoso.test"];
    let entra = Entra::start(&[(
        "helpdesk-app",
        App {
            secret: "sandbox-secret".into(),
            mailboxes: shared.iter().map(|s| s.to_string()).collect(),
            lifetime: 3599,
            ..App::default()
        },
    )]);
    let env = support::env::TestEnv::with_entra(entra).await;
    let (entra, dovecot, db) = (env.entra(), env.dovecot(), &env.db);
    for (i, file) in support::corpus_files().iter().enumerate() {
        dovecot.deliver(shared[i % 2], &std::fs::read(file).unwrap());
    }
    let mut text = format!(
        "[database]\nurl = \"{}\"\n\n[[credential]]\nname = \"helpdesk-app\"\ntype = \"client_credentials\"\ntenant_id = \"{TENANT}\"\nclient_id = \"helpdesk-app\"\nclient_secret = {{ env = \"SANDBOX_SECRET\" }}\nauthority = \"{}\"\n",
        db.url, entra.url
    );
    for mailbox in shared {
        let name = mailbox.split('@').next().unwrap();
        text.push_str(&format!(
            "\n[[parser]]\nname = \"{name}\"\nemail = \"{mailbox}\"\nusername = \"helpdesk@contoso.test\"\nshared_mailbox = true\nadd_ccs = true\ncredential = \"helpdesk-app\"\n[parser.imap]\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\n",
            dovecot.imaps_port,
            dovecot.ca_file.display()
        ));
    }
    let config = env.write_file("mail2ticket.toml", &text);
    println!("== configuration ({})\n{text}", config.display());

    let bin = support::env::binary_path();
    let mut daemon = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("SANDBOX_SECRET", "sandbox-secret")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} (build it with cargo build --release): {e}",
                bin.display()
            )
        });

    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "select (select count(*) from ticket_messages) + (select count(*) from quarantine)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let total = support::corpus_files().len() as i64;
    wait(Duration::from_secs(60), || async { count().await >= total }).await;
    println!("\n== backlog done; delivering one more message while the daemon idles");
    dovecot.deliver(
        shared[0],
        b"From: Late Customer <late@example.com>\r\nTo: support@contoso.test\r\nSubject: Arrived during IDLE\r\nMessage-ID: <late-1@example.com>\r\n\r\nHello?\r\n",
    );
    let started = Instant::now();
    wait(Duration::from_secs(30), || async { count().await > total }).await;
    println!(
        "== ticketed {:.1} s after delivery",
        started.elapsed().as_secs_f32()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let status = daemon.wait().unwrap();
    println!("== daemon stopped on SIGTERM: {status}");

    let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
        "select id, parser, left(subject, 45), requester_email from tickets order by id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    println!("\n== tickets");
    for (id, parser, subject, requester) in rows {
        println!("{id:>4}  {parser:<8} {subject:<46} {requester}");
    }
    let quarantined: Vec<(i64, String, String)> =
        sqlx::query_as("select id, parser, reason from quarantine order by id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    println!("\n== quarantine");
    for (id, parser, reason) in quarantined {
        println!("{id:>4}  {parser:<8} {reason}");
    }
    println!(
        "\ntoken requests sent to the Entra endpoint: {}",
        entra.requests()
    );
}

async fn wait<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not done within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
