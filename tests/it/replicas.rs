//! Several `mail2ticket run` processes on one database: leases spread the mailboxes, a
//! dead replica's mailboxes move, a paused one commits nothing after losing its leases, a
//! database outage is survived, and a rolling restart loses and duplicates nothing.

use crate::daemon::message;
use crate::support::KillOnDrop;
use crate::support::env::{TestEnv, binary, wait_for};
use crate::support::proxy::CuttingProxy;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One replica process, its log in a file.
struct Replica {
    name: String,
    process: KillOnDrop,
    log: PathBuf,
}

impl Replica {
    /// Starts `mail2ticket run` named `name` on the configuration `text`.
    fn start(s: &TestEnv, name: &str, text: &str) -> Replica {
        let text = text.replacen(
            "[cluster]\n",
            &format!("[cluster]\nreplica_name = \"{name}\"\n"),
            1,
        );
        let (path, _) = s.write_config(&format!("{name}.toml"), &text);
        let log = s.dir.path().join(format!("{name}.log"));
        let process = binary(&["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Replica {
            name: name.to_string(),
            process: KillOnDrop(process),
            log,
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.process.0.id().to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// SIGTERM, and the exit status within 20 s.
    async fn terminate(mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.process.0.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status:?}", self.name);
                return;
            }
            assert!(Instant::now() < deadline, "{} ignored SIGTERM", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// The held leases per owner.
async fn spread(db: &PgPool) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select owner, count(*) from mailbox_leases where expires_at > now() group by owner",
    )
    .fetch_all(db)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// The mailboxes (parsers) whose lease `owner` holds.
async fn held_by(db: &PgPool, owner: &str) -> Vec<String> {
    sqlx::query_scalar(
        "select parser from mailbox_leases where owner = $1 and expires_at > now() order by parser",
    )
    .bind(owner)
    .fetch_all(db)
    .await
    .unwrap()
}

/// Waits until the held leases are spread as `expected` (owner, count).
async fn wait_for_spread(db: &PgPool, expected: &[(&str, i64)], limit: Duration) {
    let expected: BTreeMap<String, i64> =
        expected.iter().map(|(o, n)| (o.to_string(), *n)).collect();
    let deadline = Instant::now() + limit;
    loop {
        let now = spread(db).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leases spread {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of a `select count(*) ...`.
async fn count(db: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

/// Every message stored exactly once, nothing quarantined.
async fn assert_exactly_once(db: &PgPool, delivered: i64) {
    assert_eq!(count(db, "select count(*) from tickets").await, delivered);
    assert_eq!(
        count(db, "select count(distinct message_id) from ticket_messages").await,
        delivered
    );
    assert_eq!(
        count(db, "select count(*) from ticket_messages").await,
        delivered
    );
    assert_eq!(count(db, "select count(*) from quarantine").await, 0);
}

async fn wait_for_tickets(db: &PgPool, n: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let stored = count(db, "select count(*) from tickets").await;
        if stored >= n {
            return;
        }
        if Instant::now() >= deadline {
            let rows: Vec<(String, String)> =
                sqlx::query_as("select parser, kind || ': ' || reason from quarantine")
                    .fetch_all(db)
                    .await
                    .unwrap();
            let messages = count(db, "select count(*) from ticket_messages").await;
            let per: Vec<(String, i64)> = sqlx::query_as(
                "select t.parser, count(*) from ticket_messages m join tickets t on t.id = m.ticket_id group by 1 order by 1",
            )
            .fetch_all(db)
            .await
            .unwrap();
            panic!(
                "{stored} tickets ({messages} messages) of {n} within {limit:?}; by parser {per:?}; leases {:?}; quarantine {rows:?}",
                spread(db).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mailboxes(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("desk{i}@example.test")).collect()
}

#[tokio::test]
async fn three_replicas_share_nine_mailboxes_survive_a_kill_and_a_rolling_restart() {
    let boxes = mailboxes(9);
    let refs: Vec<&str> = boxes.iter().map(String::as_str).collect();
    let s = TestEnv::granting(&refs, 3599).await;
    let db = &s.db.pool;
    const BACKLOG: usize = 20;
    let mut delivered = 0i64;
    let mut next = 0usize;
    let mut deliver = |to: &[String], s: &TestEnv| {
        for mailbox in to {
            s.dovecot().deliver(mailbox, &message(next, mailbox));
            delivered += 1;
        }
        next += 1;
        delivered
    };
    let mut total = 0;
    for _ in 0..BACKLOG {
        total = deliver(&boxes, &s);
    }
    // One proxy per mailbox: it sees every IMAP session of that mailbox.
    let mut proxies = Vec::new();
    for _ in &boxes {
        proxies.push(CuttingProxy::start_passing(s.dovecot().imap_port).await);
    }
    let names: Vec<String> = (0..9).map(|i| format!("desk{i}")).collect();
    let parsers: Vec<_> = names
        .iter()
        .zip(&boxes)
        .zip(&proxies)
        .map(|((name, mailbox), proxy)| s.plain_via(name, mailbox, proxy.port))
        .collect();
    let text = s.config_toml(&parsers);

    let r1 = Replica::start(&s, "r1", &text);
    let r2 = Replica::start(&s, "r2", &text);
    let r3 = Replica::start(&s, "r3", &text);
    wait_for_tickets(db, total, Duration::from_secs(120)).await;
    wait_for_spread(
        db,
        &[("r1", 3), ("r2", 3), ("r3", 3)],
        Duration::from_secs(30),
    )
    .await;

    // kill -9: the dead replica's mailboxes are taken over, their new mail ticketed.
    let orphans = held_by(db, "r1").await;
    let orphan_boxes: Vec<String> = orphans
        .iter()
        .map(|p| boxes[names.iter().position(|n| n == p).unwrap()].clone())
        .collect();
    drop(r1); // SIGKILL
    let killed = Instant::now();
    let total = deliver(&orphan_boxes, &s);
    wait_for_tickets(db, total, Duration::from_secs(60)).await;
    eprintln!(
        "kill -9: new mail of the dead replica's mailboxes ticketed after {:?}",
        killed.elapsed()
    );
    let survivors = spread(db).await;
    assert_eq!(survivors.values().sum::<i64>(), 9, "{survivors:?}");
    assert!(!survivors.contains_key("r1"), "{survivors:?}");

    // A new replica gets its share within two TTLs (plus a turn).
    let joined = Instant::now();
    let r4 = Replica::start(&s, "r4", &text);
    wait_for_spread(
        db,
        &[("r2", 3), ("r3", 3), ("r4", 3)],
        Duration::from_secs(20),
    )
    .await;

    eprintln!("a new replica has its share after {:?}", joined.elapsed());
    // A rolling restart with SIGTERM, mail arriving all along.
    let mut replicas = vec![r2, r3, r4];
    for fresh in ["r5", "r6", "r7"] {
        let old = replicas.remove(0);
        let log = old.log.clone();
        old.terminate().await;
        let log = std::fs::read_to_string(log).unwrap();
        assert!(log.contains("lease released"), "{log}");
        deliver(&boxes, &s);
        replicas.push(Replica::start(&s, fresh, &text));
    }
    let total = deliver(&boxes, &s);
    wait_for_tickets(db, total, Duration::from_secs(60)).await;
    wait_for_spread(
        db,
        &[("r5", 3), ("r6", 3), ("r7", 3)],
        Duration::from_secs(20),
    )
    .await;
    assert_exactly_once(db, total).await;
    for (proxy, name) in proxies.iter().zip(&names) {
        assert_eq!(
            proxy.most_open_at_once(),
            1,
            "{name}: two IMAP sessions at once"
        );
    }
    for replica in &replicas {
        assert!(!replica.log().contains("panicked"), "{}", replica.log());
    }
}

#[tokio::test]
async fn a_paused_replica_commits_nothing_after_losing_its_leases_and_a_database_outage_is_survived()
 {
    let boxes = mailboxes(4);
    let refs: Vec<&str> = boxes.iter().map(String::as_str).collect();
    let s = TestEnv::granting(&refs, 3599).await;
    let db = &s.db.pool;
    let names: Vec<String> = (0..4).map(|i| format!("desk{i}")).collect();
    let parsers: Vec<_> = names
        .iter()
        .zip(&boxes)
        .map(|(name, mailbox)| s.ssl(name, mailbox))
        .collect();
    let (db_proxy, url) = s.database_via_proxy().await;
    let text = s.config_toml(&parsers).replace(&s.db.url, &url);
    let mut delivered = 0i64;
    let mut round = 0usize;
    let mut deliver = |s: &TestEnv| {
        for mailbox in &boxes {
            s.dovecot().deliver(mailbox, &message(round, mailbox));
            delivered += 1;
        }
        round += 1;
        delivered
    };
    let total = deliver(&s);
    let a = Replica::start(&s, "ra", &text);
    let b = Replica::start(&s, "rb", &text);
    wait_for_tickets(db, total, Duration::from_secs(60)).await;
    wait_for_spread(db, &[("ra", 2), ("rb", 2)], Duration::from_secs(30)).await;

    // SIGSTOP past the TTL: the other replica takes everything over and tickets new mail.
    a.signal("-STOP");
    wait_for_spread(db, &[("rb", 4)], Duration::from_secs(30)).await;
    let total = deliver(&s);
    wait_for_tickets(db, total, Duration::from_secs(30)).await;
    let before_resume = a.log().len();
    a.signal("-CONT");
    // Resumed, it notices the loss, then gets its share again under new epochs.
    wait_for_spread(db, &[("ra", 2), ("rb", 2)], Duration::from_secs(30)).await;
    let total = deliver(&s);
    wait_for_tickets(db, total, Duration::from_secs(30)).await;
    let resumed = a.log()[before_resume..].to_string();
    let first_acquired = resumed.find("lease acquired").unwrap_or(resumed.len());
    assert!(
        !resumed[..first_acquired].contains("committed"),
        "the paused replica committed with a lost lease:\n{resumed}"
    );
    assert_exactly_once(db, total).await;
    let moved = count(db, "select count(*) from mailbox_leases where epoch >= 2").await;
    assert!(moved >= 2, "the paused replica's leases changed hands");

    // The database away for longer than the TTL: every replica stops its mailboxes, then
    // both recover and share them again.
    db_proxy.set_down(true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    db_proxy.set_down(false);
    for replica in [&a, &b] {
        wait_for(Duration::from_secs(20), || async {
            replica
                .log()
                .contains("could not be renewed within the TTL")
        })
        .await;
    }
    wait_for_spread(db, &[("ra", 2), ("rb", 2)], Duration::from_secs(30)).await;
    let total = deliver(&s);
    wait_for_tickets(db, total, Duration::from_secs(30)).await;
    assert_exactly_once(db, total).await;
}

#[tokio::test]
async fn a_stale_owner_fails_the_fence_and_a_takeover_waits_for_a_commit_in_flight() {
    use mail2ticket::store::leases;
    let s = TestEnv::database().await;
    let ttl = Duration::from_secs(30);
    let mut conn = s.db.pool.acquire().await.unwrap();
    // A's lease is short: it runs out while A's commit is in flight.
    let short = Duration::from_secs(1);
    let a = leases::acquire(&mut conn, "desk", "a", short)
        .await
        .unwrap();
    assert_eq!(a, Some(1));
    assert_eq!(
        leases::acquire(&mut conn, "desk", "b", ttl).await.unwrap(),
        None,
        "held: nobody else may take it"
    );
    let fence_a = leases::Fence {
        owner: "a".into(),
        epoch: 1,
    };

    // A commit in flight keeps the lease row locked: a takeover waits for it.
    let mut tx = s.db.pool.begin().await.unwrap();
    assert!(
        leases::check_fence(&mut tx, "desk", &fence_a)
            .await
            .unwrap()
    );
    tokio::time::sleep(short + Duration::from_millis(200)).await;
    let pool = s.db.pool.clone();
    let takeover = tokio::spawn(async move {
        let mut conn = pool.acquire().await.unwrap();
        leases::acquire(&mut conn, "desk", "b", Duration::from_secs(30)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !takeover.is_finished(),
        "the takeover waited for the commit"
    );
    tx.commit().await.unwrap();
    let b = takeover.await.unwrap().unwrap();
    assert_eq!(b, Some(2), "taken over with a new epoch");

    // The old owner's fence, renewal and release now fail; the new owner's hold.
    let mut tx = s.db.pool.begin().await.unwrap();
    assert!(
        !leases::check_fence(&mut tx, "desk", &fence_a)
            .await
            .unwrap()
    );
    tx.rollback().await.unwrap();
    let renewed = leases::renew(&mut conn, "a", &[("desk".into(), 1)], ttl)
        .await
        .unwrap();
    assert!(renewed.is_empty(), "a lost lease is not renewed");
    leases::release(&mut conn, "desk", &fence_a).await.unwrap();
    let fence_b = leases::Fence {
        owner: "b".into(),
        epoch: 2,
    };
    let mut tx = s.db.pool.begin().await.unwrap();
    assert!(
        leases::check_fence(&mut tx, "desk", &fence_b)
            .await
            .unwrap()
    );
    tx.rollback().await.unwrap();
    let renewed = leases::renew(&mut conn, "b", &[("desk".into(), 2)], ttl)
        .await
        .unwrap();
    assert_eq!(renewed, ["desk"]);
}

#[tokio::test]
async fn every_replica_recovers_from_a_postgres_restart() {
    let boxes = mailboxes(6);
    let refs: Vec<&str> = boxes.iter().map(String::as_str).collect();
    let s = TestEnv::granting(&refs, 3599).await;
    let server = crate::support::postgres::OwnServer::start().await;
    let db = &PgPool::connect(&server.url).await.unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("desk{i}")).collect();
    let parsers: Vec<_> = names
        .iter()
        .zip(&boxes)
        .map(|(name, mailbox)| s.ssl(name, mailbox))
        .collect();
    let text = s.config_toml(&parsers).replace(&s.db.url, &server.url);
    let mut delivered = 0i64;
    let mut round = 0usize;
    let mut deliver = |s: &TestEnv| {
        for mailbox in &boxes {
            s.dovecot().deliver(mailbox, &message(round, mailbox));
            delivered += 1;
        }
        round += 1;
        delivered
    };
    let total = deliver(&s);
    let replicas = [
        Replica::start(&s, "rx", &text),
        Replica::start(&s, "ry", &text),
        Replica::start(&s, "rz", &text),
    ];
    wait_for_tickets(db, total, Duration::from_secs(60)).await;
    let even = [("rx", 2), ("ry", 2), ("rz", 2)];
    wait_for_spread(db, &even, Duration::from_secs(30)).await;

    // Down for longer than the TTL: every replica stops its mailboxes by its own clock.
    server.stop();
    let total = deliver(&s);
    for replica in &replicas {
        wait_for(Duration::from_secs(20), || async {
            replica
                .log()
                .contains("could not be renewed within the TTL")
        })
        .await;
    }
    server.start_again();
    let db = &PgPool::connect(&server.url).await.unwrap();
    wait_for_tickets(db, total, Duration::from_secs(60)).await;
    wait_for_spread(db, &even, Duration::from_secs(30)).await;
    let total = deliver(&s);
    wait_for_tickets(db, total, Duration::from_secs(30)).await;
    assert_exactly_once(db, total).await;
    for replica in &replicas {
        assert!(!replica.log().contains("panicked"), "{}", replica.log());
    }
}
