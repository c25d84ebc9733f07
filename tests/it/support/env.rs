//! The one test environment every module uses: a fresh database, and when a test needs
//! mail, the test Entra endpoint and a Dovecot trusting it; a directory for config files,
//! the binary, `run --once` and the daemon in this process, and small queries.

use super::dovecot::Dovecot;
use super::entra::{App, Entra, TENANT};
use super::postgres::{TestDb, test_db};
use mail2ticket::auth::TokenSources;
use mail2ticket::config::Config;
use mail2ticket::pipeline::Pipeline;
use mail2ticket::runtime::supervisor::{self, OnceReport};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A shared mailbox the default app may read.
pub const SHARED_A: &str = "support@example.test";
/// Another shared mailbox the default app may read.
pub const SHARED_B: &str = "sales@example.test";
/// A mailbox the default app has no FullAccess to.
pub const NOT_GRANTED: &str = "finance@example.test";

/// A test's servers, database and scratch directory; everything stops when it drops.
pub struct TestEnv {
    /// This test's database.
    pub db: TestDb,
    /// The token endpoint and the IMAP server, for tests that read mail.
    mail: Option<(Entra, Dovecot)>,
    /// Config files and other scratch files.
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    /// A database only (pipeline and CLI tests).
    pub async fn database() -> TestEnv {
        TestEnv {
            db: test_db().await,
            mail: None,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The app "app-1" (secret "s3cret", hour-long tokens) with FullAccess to
    /// [`SHARED_A`] and [`SHARED_B`], a Dovecot trusting it, and a database.
    pub async fn mail() -> TestEnv {
        Self::granting(&[SHARED_A, SHARED_B], 3599).await
    }

    /// Like [`mail`](Self::mail), the app having FullAccess to exactly `mailboxes` and
    /// tokens living `lifetime` seconds.
    pub async fn granting(mailboxes: &[&str], lifetime: i64) -> TestEnv {
        let app = App {
            secret: "s3cret".into(),
            mailboxes: mailboxes.iter().map(|m| m.to_string()).collect(),
            lifetime,
            ..App::default()
        };
        Self::with_entra(Entra::start(&[("app-1", app)])).await
    }

    /// An environment around a token endpoint set up by the test.
    pub async fn with_entra(entra: Entra) -> TestEnv {
        let dovecot = Dovecot::start(&entra);
        Self::with_servers(entra, dovecot).await
    }

    /// An environment around servers set up by the test.
    pub async fn with_servers(entra: Entra, dovecot: Dovecot) -> TestEnv {
        TestEnv {
            db: test_db().await,
            mail: Some((entra, dovecot)),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The token endpoint.
    pub fn entra(&self) -> &Entra {
        &self.mail.as_ref().expect("a mail environment").0
    }

    /// The IMAP server.
    pub fn dovecot(&self) -> &Dovecot {
        &self.mail.as_ref().expect("a mail environment").1
    }

    /// A parser on the implicit-TLS port.
    pub fn ssl<'a>(&self, name: &'a str, email: &'a str) -> ParserSpec<'a> {
        ParserSpec::new(name, email, "ssl", self.dovecot().imaps_port)
    }

    /// A parser on the plain port upgraded with STARTTLS.
    pub fn starttls<'a>(&self, name: &'a str, email: &'a str) -> ParserSpec<'a> {
        ParserSpec::new(name, email, "starttls", self.dovecot().imap_port)
    }

    /// A parser on plain IMAP through a proxy on `port` (a proxy sees traffic only without
    /// TLS).
    pub fn plain_via<'a>(&self, name: &'a str, email: &'a str, port: u16) -> ParserSpec<'a> {
        ParserSpec::new(name, email, "none", port)
    }

    /// A configuration with `[database]`, the credential "app" (app-1) and `parsers`;
    /// leases of 3 s (a process killed by a test leaves its leases for that long).
    pub fn config_toml(&self, parsers: &[ParserSpec]) -> String {
        let mut text = format!(
            "[database]\nurl = \"{}\"\n[cluster]\nlease_ttl = 3\n[[credential]]\nname = \"app\"\ntype = \"client_credentials\"\ntenant_id = \"{TENANT}\"\nclient_id = \"app-1\"\nclient_secret = \"s3cret\"\nauthority = \"{}\"\n",
            self.db.url,
            self.entra().url
        );
        for p in parsers {
            text.push_str(&p.toml(&self.dovecot().ca_file));
        }
        text
    }

    /// [`config_toml`](Self::config_toml), loaded.
    pub fn config(&self, parsers: &[ParserSpec]) -> Config {
        Config::from_toml(Path::new("test.toml"), &self.config_toml(parsers)).unwrap()
    }

    /// Writes `text` to `file` in the scratch directory; returns its path.
    pub fn write_file(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes a configuration file; returns its path and the configuration it holds.
    pub fn write_config(&self, file: &str, text: &str) -> (PathBuf, Config) {
        let path = self.write_file(file, text);
        let config = Config::from_toml(&path, text).unwrap();
        (path, config)
    }

    /// The pipeline of a parser `name` with more parser keys (`ingest` style, no server).
    pub fn pipeline(&self, name: &str, extra_parser_keys: &str) -> Pipeline {
        let text = super::config_text(&self.db.url, name, extra_parser_keys);
        let config = Config::from_toml(Path::new("test.toml"), &text).unwrap();
        Pipeline::from(&config.parsers[0])
    }

    /// `run --once` in this process, with fresh token caches (as a new process has).
    pub async fn run_once(&self, config: &Config) -> Vec<OnceReport> {
        let tokens = TokenSources::from_config(config, Some(self.db.pool.clone())).unwrap();
        supervisor::run_once(config, &self.db.pool, &tokens, &CancellationToken::new()).await
    }

    /// The supervisor running in this process, as `mail2ticket run` runs it.
    pub fn daemon(&self, config: &Config) -> Daemon {
        Daemon::start(config, &self.db.pool)
    }

    /// A proxy in front of this test's database (to play an outage with
    /// [`set_down`](super::proxy::CuttingProxy::set_down)) and the database URL through it.
    pub async fn database_via_proxy(&self) -> (super::proxy::CuttingProxy, String) {
        let port: u16 = self
            .db
            .url
            .rsplit_once(':')
            .unwrap()
            .1
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let proxy = super::proxy::CuttingProxy::start(port, usize::MAX).await;
        let url = self
            .db
            .url
            .replace(&format!(":{port}/"), &format!(":{}/", proxy.port));
        (proxy, url)
    }

    /// The value of a `select count(*) ...`.
    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// The subjects of a parser's tickets, sorted.
    pub async fn tickets(&self, parser: &str) -> Vec<String> {
        sqlx::query_scalar("select subject from tickets where parser = $1 order by subject")
            .bind(parser)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }
}

/// One `[[parser]]` of a test configuration, through the credential "app".
pub struct ParserSpec<'a> {
    name: &'a str,
    email: &'a str,
    encryption: &'a str,
    port: u16,
    /// More `[[parser]]` keys.
    extra: &'a str,
}

impl<'a> ParserSpec<'a> {
    fn new(name: &'a str, email: &'a str, encryption: &'a str, port: u16) -> Self {
        ParserSpec {
            name,
            email,
            encryption,
            port,
            extra: "",
        }
    }

    /// With more `[[parser]]` keys (one per line).
    pub fn with(self, extra: &'a str) -> Self {
        ParserSpec { extra, ..self }
    }

    fn toml(&self, ca_file: &Path) -> String {
        let host = if self.encryption == "none" {
            "127.0.0.1"
        } else {
            "localhost"
        };
        format!(
            "\n[[parser]]\nname = \"{}\"\nemail = \"{}\"\nusername = \"helpdesk@example.test\"\nshared_mailbox = true\ncredential = \"app\"\n{}\n[parser.imap]\nhost = \"{host}\"\nport = {}\nencryption = \"{}\"\nca_file = \"{}\"\n",
            self.name,
            self.email,
            self.extra,
            self.port,
            self.encryption,
            ca_file.display()
        )
    }
}

/// The supervisor running in this process, as `mail2ticket run` runs it.
pub struct Daemon {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// Starts every active parser of `config`.
    pub fn start(config: &Config, pool: &sqlx::PgPool) -> Daemon {
        let tokens = TokenSources::from_config(config, Some(pool.clone())).unwrap();
        let cancel = CancellationToken::new();
        let (config, pool, stop) = (config.clone(), pool.clone(), cancel.clone());
        let task =
            tokio::spawn(async move { supervisor::run(&config, &pool, &tokens, &stop).await });
        Daemon { cancel, task }
    }

    /// Cancels and waits: every poller must stop within 10 s.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("pollers stop when cancelled")
            .unwrap();
    }
}

/// The path of the `mail2ticket` binary: the one cargo built for the tests, or for the
/// examples (which cargo gives no binary) the release build.
pub fn binary_path() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_mail2ticket") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/mail2ticket"),
    }
}

/// The `mail2ticket` binary with `args`, its output piped, and no configuration taken
/// from this process's environment.
pub fn binary(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(binary_path());
    c.args(args)
        .env_remove("MAIL2TICKET_DATABASE_URL")
        .env_remove("MAIL2TICKET_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits until `check` holds, failing the test after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
