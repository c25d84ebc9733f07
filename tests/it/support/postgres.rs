//! A throwaway Postgres for the tests: one cluster per test process, one database per test.
//!
//! The cluster is started from the system's binaries (initdb + postgres, dropping to the
//! `postgres` user when running as root, since Postgres refuses root) on a random port in
//! a temporary directory. A small shell wrapper owns the server: it waits for its stdin to
//! close, which happens when this test process exits for any reason (even kill -9), then
//! stops the server and removes the directory. Set MAIL2TICKET_TEST_DATABASE_URL to use an
//! existing server instead (each test still gets a fresh database there).

use sqlx::{Connection, Executor, PgConnection, PgPool};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The server all tests of this process share.
struct Cluster {
    /// URL of the `postgres` maintenance database.
    admin_url: String,
    /// The wrapper; kept so its stdin stays open while the process lives.
    _guard: Option<Mutex<Child>>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// A fresh, migrated database for one test.
pub struct TestDb {
    /// Connection URL of this test's database.
    pub url: String,
    /// A pool on it.
    pub pool: PgPool,
}

/// Creates a new database on the shared cluster and applies the migrations.
pub async fn test_db() -> TestDb {
    let url = empty_db().await;
    let pool = PgPool::connect(&url)
        .await
        .expect("connect to the test database");
    mail2ticket::store::migrate(&pool)
        .await
        .expect("migrations apply");
    TestDb { url, pool }
}

/// Creates a new empty database (no migrations) and returns its URL.
pub async fn empty_db() -> String {
    let cluster = CLUSTER.get_or_init(start_cluster);
    let name = format!(
        "m2t_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    let mut admin = PgConnection::connect(&cluster.admin_url)
        .await
        .expect("connect to the test cluster");
    admin
        // The name is ours (pid and counter), not input: safe to format into SQL.
        .execute(sqlx::AssertSqlSafe(format!("create database {name}")))
        .await
        .expect("create the test database");
    replace_db_name(&cluster.admin_url, &name)
}

/// A URL on which nothing listens: for "database is down" tests.
pub fn unreachable_url() -> String {
    let port = free_port();
    format!("postgres://postgres@127.0.0.1:{port}/nothing")
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    format!("{base}/{name}{query}")
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start_cluster() -> Cluster {
    if let Ok(url) = std::env::var("MAIL2TICKET_TEST_DATABASE_URL") {
        return Cluster {
            admin_url: url,
            _guard: None,
        };
    }
    let bin = postgres_bindir();
    let (dir, as_root) = new_data_dir();
    let port = free_port();
    let script = r#"
"$PGBIN/postgres" -D "$PGDIR/data" -p "$PGPORT" -k "$PGDIR" -c listen_addresses=127.0.0.1 \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
  </dev/null >"$PGDIR/postgres.log" 2>&1 &
pid=$!
read -r _ || true
kill -INT "$pid" 2>/dev/null
wait "$pid"
rm -rf "$PGDIR"
"#;
    let child = privileged(as_root, std::path::Path::new("/bin/sh"))
        .args(["-c", script])
        .env("PGBIN", &bin)
        .env("PGDIR", &dir)
        .env("PGPORT", port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start postgres");
    let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    wait_ready(port, &dir);
    Cluster {
        admin_url,
        _guard: Some(Mutex::new(child)),
    }
}

/// A temporary directory with an initialized cluster in `data` (owned by `postgres` when
/// running as root); returns it and whether we are root.
fn new_data_dir() -> (PathBuf, bool) {
    let bin = postgres_bindir();
    let dir = tempfile::Builder::new()
        .prefix("m2t-pg-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let as_root = is_root();
    if as_root {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir));
    }
    let data = dir.join("data");
    let initdb = bin.join("initdb");
    run(privileged(as_root, &initdb).arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
        "--no-sync",
    ]));
    (dir, as_root)
}

/// A Postgres server of one test's own, which the test stops and starts again (a database
/// restart under running replicas). Stopped and removed when dropped, and by a watcher
/// when this test process exits in any way.
pub struct OwnServer {
    /// The database's URL (migrated).
    pub url: String,
    dir: PathBuf,
    port: u16,
    as_root: bool,
    watcher: Child,
}

impl OwnServer {
    /// Initializes, starts and migrates a server on a free port.
    pub async fn start() -> OwnServer {
        let (dir, as_root) = new_data_dir();
        let port = free_port();
        let script = r#"
read -r _ || true
"$PGBIN/pg_ctl" -D "$PGDIR/data" -m immediate -w stop >/dev/null 2>&1
rm -rf "$PGDIR"
"#;
        let watcher = privileged(as_root, std::path::Path::new("/bin/sh"))
            .args(["-c", script])
            .env("PGBIN", postgres_bindir())
            .env("PGDIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the watcher");
        let server = OwnServer {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            port,
            as_root,
            watcher,
        };
        server.start_again();
        let pool = PgPool::connect(&server.url).await.expect("connect");
        mail2ticket::store::migrate(&pool).await.expect("migrate");
        pool.close().await;
        server
    }

    fn pg_ctl(&self, args: &[&str]) {
        let pg_ctl = postgres_bindir().join("pg_ctl");
        run(privileged(self.as_root, &pg_ctl)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args));
    }

    /// Starts the server (again).
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("postgres.log");
        self.pg_ctl(&["-l", log.to_str().unwrap(), "-o", &options, "-w", "start"]);
        wait_ready(self.port, &self.dir);
    }

    /// Stops the server as an administrator's restart does (fast shutdown: every session
    /// is ended).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "stop"]);
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        drop(self.watcher.stdin.take());
        let _ = self.watcher.wait();
    }
}

fn wait_ready(port: u16, dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new(postgres_bindir().join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            panic!("the test Postgres did not start in 30 s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn postgres_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres server binaries under /usr/lib/postgresql (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates
        .pop()
        .expect("Postgres server binaries (initdb) are installed")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command that runs as `postgres` when we are root (Postgres refuses to run as root).
fn privileged(as_root: bool, program: &std::path::Path) -> Command {
    if as_root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        c.arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a setup command");
    if !out.status.success() {
        let _ = std::io::stderr().write_all(&out.stderr);
        panic!("setup command failed: {cmd:?}");
    }
}
