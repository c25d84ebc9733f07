//! Microsoft Graph mailboxes against the test Graph endpoint (`support::graph`), the test
//! Entra and Postgres: delta rounds over several pages, exactly once, messages not
//! downloaded twice, `start_at`, throttling, a lost sync state, cut downloads, oversized
//! messages, batches bounded by bytes without listed sizes, each `after`, a move that fails
//! after the commit, one credential serving IMAP and Graph, and doctor.

use crate::daemon::message;
use crate::support::env::{NOT_GRANTED, SHARED_A, SHARED_B, TestEnv, binary};
use crate::support::graph::GraphFake;
use chrono::{Duration as Days, Utc};
use mail2ticket::config::Config;
use std::path::Path;

/// A third mailbox the app may read.
const HELPDESK: &str = "helpdesk@example.test";

/// The environment and a Graph endpoint holding the test mailboxes.
async fn graph_env() -> (TestEnv, GraphFake) {
    let s = TestEnv::granting(&[SHARED_A, SHARED_B, HELPDESK], 3599).await;
    let graph = GraphFake::start(s.entra(), &[SHARED_A, SHARED_B, HELPDESK, NOT_GRANTED]).await;
    (s, graph)
}

/// A `[[parser]]` reading `email` through Graph (`keys` go before `[parser.graph]`).
fn graph_parser(name: &str, email: &str, graph: &GraphFake, keys: &str) -> String {
    format!(
        "\n[[parser]]\nname = \"{name}\"\nemail = \"{email}\"\ncredential = \"app\"\n{keys}\n[parser.graph]\nbase_url = \"{}\"\npoll_interval = 1\n",
        graph.url
    )
}

fn config(s: &TestEnv, parsers: &str) -> Config {
    Config::from_toml(Path::new("graph.toml"), &(s.config_toml(&[]) + parsers)).unwrap()
}

/// `(created, quarantined)` of one parser's `run --once`, or its error.
async fn run_once(s: &TestEnv, config: &Config, parser: &str) -> Result<(u64, u64), String> {
    let reports = s.run_once(config).await;
    let report = reports.iter().find(|r| r.parser == parser).unwrap();
    report
        .result
        .as_ref()
        .map(|once| (once.outcomes.created, once.outcomes.quarantined))
        .map_err(Clone::clone)
}

#[tokio::test]
async fn a_backlog_over_several_pages_is_stored_once_and_not_downloaded_again() {
    let (s, graph) = graph_env().await;
    let yesterday = Utc::now() - Days::days(1);
    for n in 0..25 {
        graph.deliver(SHARED_A, "inbox", &message(n, SHARED_A), false, yesterday);
    }
    // Read before the first contact: start_at = "unseen" leaves them alone.
    for n in 100..103 {
        graph.deliver(SHARED_A, "inbox", &message(n, SHARED_A), true, yesterday);
    }
    let config = config(&s, &graph_parser("support", SHARED_A, &graph, ""));
    assert_eq!(run_once(&s, &config, "support").await, Ok((25, 0)));
    assert!(graph.requests("delta") >= 3, "25 messages in pages of 10");
    assert_eq!(graph.requests("$value"), 25);
    assert_eq!(graph.requests("patch"), 25);
    let inbox = graph.messages(SHARED_A, "inbox");
    assert!(
        inbox.iter().all(|(_, read)| *read),
        "every message is read now"
    );

    // The next round returns the 25 again (they changed when marked read): they are
    // recognised by Message-ID, neither downloaded nor marked again.
    assert_eq!(run_once(&s, &config, "support").await, Ok((0, 0)));
    assert_eq!(graph.requests("$value"), 25);
    assert_eq!(graph.requests("patch"), 25);

    // Mail that arrives later is taken, read or not; the old read mail still is not.
    graph.deliver(
        SHARED_A,
        "inbox",
        &message(200, SHARED_A),
        false,
        Utc::now(),
    );
    graph.deliver(SHARED_A, "inbox", &message(201, SHARED_A), true, Utc::now());
    assert_eq!(run_once(&s, &config, "support").await, Ok((2, 0)));
    assert_eq!(s.tickets("support").await.len(), 27);
    // Those two come back changed (marked read) and are taken by arrival: recognised,
    // not downloaded again, not marked again.
    assert_eq!(run_once(&s, &config, "support").await, Ok((0, 0)));
    assert_eq!(graph.requests("$value"), 27);
    assert_eq!(graph.requests("patch"), 27);
    let old_read = s
        .count("select count(*) from ticket_messages where subject in ('Request 100', 'Request 101', 'Request 102')")
        .await;
    assert_eq!(old_read, 0);
}

#[tokio::test]
async fn throttling_and_a_lost_sync_state_lose_and_duplicate_nothing() {
    let (s, graph) = graph_env().await;
    for n in 0..30 {
        graph.deliver(SHARED_A, "inbox", &message(n, SHARED_A), false, Utc::now());
    }
    let config = config(
        &s,
        &graph_parser("support", SHARED_A, &graph, "start_at = \"all\""),
    );
    // Retry-After in seconds, then as an HTTP date: both waited out within the pass.
    graph.throttle_next(3, "1");
    assert_eq!(run_once(&s, &config, "support").await, Ok((30, 0)));
    assert_eq!(graph.requests("throttled"), 3);
    let soon = (Utc::now() + Days::seconds(1))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    graph.throttle_next(1, &soon);
    assert_eq!(run_once(&s, &config, "support").await, Ok((0, 0)));
    assert_eq!(graph.requests("throttled"), 4);

    // The sync state is lost: the round starts over; nothing is stored or fetched twice.
    graph.lose_sync_state();
    for n in 30..35 {
        graph.deliver(SHARED_A, "inbox", &message(n, SHARED_A), false, Utc::now());
    }
    assert_eq!(run_once(&s, &config, "support").await, Ok((5, 0)));
    assert_eq!(s.tickets("support").await.len(), 35);
    assert_eq!(graph.requests("$value"), 35);
}

#[tokio::test]
async fn cut_downloads_oversized_messages_and_every_after() {
    let (s, graph) = graph_env().await;
    for n in 0..3 {
        graph.deliver(SHARED_A, "inbox", &message(n, SHARED_A), false, Utc::now());
    }
    let big = format!(
        "From: a@example.com\r\nSubject: Huge\r\nMessage-ID: <huge@test>\r\n\r\n{}\r\n",
        "x".repeat(20_000)
    );
    let huge = graph.deliver(SHARED_A, "inbox", big.as_bytes(), false, Utc::now());
    for n in 0..2 {
        graph.deliver(SHARED_B, "inbox", &message(n, SHARED_B), false, Utc::now());
        graph.deliver(HELPDESK, "inbox", &message(n, HELPDESK), false, Utc::now());
    }
    graph.add_folder(SHARED_A, "inbox", "Done");
    let parsers = graph_parser(
        "support",
        SHARED_A,
        &graph,
        "after = \"move:Inbox/Done\"\nmax_message_size = \"10 KB\"",
    );
    let split = parsers.len();
    let parsers = parsers
        + &graph_parser("sales", SHARED_B, &graph, "after = \"delete\"")
        + &graph_parser("helpdesk", HELPDESK, &graph, "after = \"none\"");
    let (support, others) = (config(&s, &parsers[..split]), config(&s, &parsers[split..]));

    // The first download is cut off half way: that pass fails, nothing is lost.
    graph.cut_next_downloads(1);
    let first = run_once(&s, &support, "support").await;
    assert!(first.is_err(), "{first:?}");
    assert_eq!(run_once(&s, &support, "support").await, Ok((3, 1)));

    // Moved after commit; the oversized one stays, unread, with its header quarantined.
    let done: Vec<String> = graph
        .messages(SHARED_A, "Done")
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(done.len(), 3);
    assert_eq!(graph.messages(SHARED_A, "inbox"), vec![(huge, false)]);
    let header_only = s
        .count("select count(*) from quarantine where parser = 'support' and header_only and reason like '%at least%over max_message_size%' and convert_from(raw, 'UTF8') like '%Message-ID: <huge@test>%'")
        .await;
    assert_eq!(header_only, 1);
    // Deleted (to Deleted Items), and left alone.
    let reports = s.run_once(&others).await;
    assert!(reports.iter().all(|r| r.result.is_ok()), "{reports:?}");
    assert_eq!(s.tickets("sales").await.len(), 2);
    assert!(graph.messages(SHARED_B, "inbox").is_empty());
    assert_eq!(graph.messages(SHARED_B, "deleteditems").len(), 2);
    assert_eq!(s.tickets("helpdesk").await.len(), 2);
    assert!(
        graph
            .messages(HELPDESK, "inbox")
            .iter()
            .all(|(_, read)| !read)
    );
}

#[tokio::test]
async fn large_messages_of_unknown_size_are_stored_in_batches_bounded_by_bytes() {
    let (s, graph) = graph_env().await;
    // Graph lists no sizes: a batch ends once 24 MiB are downloaded (with the message that
    // passed the mark). Three messages of 13 MB: two batches, not one of 39 MB.
    let line = "x".repeat(76) + "\r\n";
    for n in 0..3 {
        let mut raw = message(n, SHARED_A);
        raw.extend_from_slice(line.repeat(170_000).as_bytes());
        graph.deliver(SHARED_A, "inbox", &raw, false, Utc::now());
    }
    let config = config(&s, &graph_parser("support", SHARED_A, &graph, ""));
    assert_eq!(run_once(&s, &config, "support").await, Ok((3, 0)));
    let transactions = "select count(distinct xmin::text) from ticket_messages";
    assert_eq!(s.count(transactions).await, 2);
    assert_eq!(graph.requests("$value"), 3, "each downloaded once");
}

#[tokio::test]
async fn messages_whose_move_failed_after_the_commit_are_moved_by_the_next_pass() {
    let (s, graph) = graph_env().await;
    for n in 0..3 {
        graph.deliver(SHARED_A, "inbox", &message(n, SHARED_A), false, Utc::now());
    }
    graph.add_folder(SHARED_A, "inbox", "Done");
    let parser = graph_parser("support", SHARED_A, &graph, "after = \"move:Inbox/Done\"");
    let config = config(&s, &parser);
    // The first move fails (500): the batch is committed, nothing is moved yet.
    graph.fail_next_moves(1, 500);
    let first = run_once(&s, &config, "support").await;
    assert!(first.is_err(), "{first:?}");
    assert_eq!(s.tickets("support").await.len(), 3);
    assert_eq!(graph.messages(SHARED_A, "inbox").len(), 3);

    assert_eq!(run_once(&s, &config, "support").await, Ok((0, 0)));
    assert!(graph.messages(SHARED_A, "inbox").is_empty());
    assert_eq!(graph.messages(SHARED_A, "Done").len(), 3);
    assert_eq!(s.tickets("support").await.len(), 3);
    let owed = "select count(*) from mailbox_state where unsettled is not null";
    assert_eq!(s.count(owed).await, 0);

    // A move Graph refuses when it is owed (403) is reported and not asked again: the pass
    // goes on, and the message stays where it is.
    graph.deliver(SHARED_A, "inbox", &message(3, SHARED_A), false, Utc::now());
    graph.fail_next_moves(1, 500);
    assert!(run_once(&s, &config, "support").await.is_err());
    assert_eq!(s.count(owed).await, 1);
    graph.fail_next_moves(1, 403);
    graph.deliver(SHARED_A, "inbox", &message(4, SHARED_A), false, Utc::now());
    assert_eq!(run_once(&s, &config, "support").await, Ok((1, 0)));
    assert_eq!(s.count(owed).await, 0);
    let inbox = graph.messages(SHARED_A, "inbox");
    assert_eq!(
        inbox.len(),
        1,
        "the refused one stays; the new one is moved"
    );
    assert_eq!(graph.messages(SHARED_A, "Done").len(), 4);
    assert_eq!(s.tickets("support").await.len(), 5);
}

#[tokio::test]
async fn one_credential_serves_an_imap_and_a_graph_mailbox_and_doctor_explains_graph() {
    let (s, graph) = graph_env().await;
    s.dovecot().deliver(SHARED_A, &message(1, SHARED_A));
    graph.deliver(SHARED_B, "inbox", &message(2, SHARED_B), false, Utc::now());
    let text = s.config_toml(&[s.ssl("imap-support", SHARED_A)])
        + &graph_parser("graph-sales", SHARED_B, &graph, "");
    let config = Config::from_toml(Path::new("both.toml"), &text).unwrap();
    let reports = s.run_once(&config).await;
    for report in &reports {
        let once = report.result.as_ref().unwrap();
        assert_eq!(once.outcomes.created, 1, "{}", report.parser);
    }
    // One token per resource: Exchange (IMAP) and Graph.
    assert_eq!(s.entra().requests_of("client_credentials"), 2);

    graph.disable_rest(HELPDESK);
    let doctor_text = text
        + &graph_parser("graph-finance", NOT_GRANTED, &graph, "")
        + &graph_parser("graph-nobody", "nobody@example.test", &graph, "")
        + &graph_parser("graph-onprem", HELPDESK, &graph, "");
    let (path, _) = s.write_config("doctor.toml", &doctor_text);
    let out = tokio::task::spawn_blocking(move || {
        binary(&["doctor", "--config"]).arg(&path).output().unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let sales = crate::support::doctor_section(&report, "graph-sales");
    assert!(
        sales.contains("Mail.ReadWrite") && sales.contains("1 messages"),
        "{sales}"
    );
    let finance = crate::support::doctor_section(&report, "graph-finance");
    assert!(
        finance.contains("ErrorAccessDenied") && finance.contains("New-ManagementRoleAssignment"),
        "{finance}"
    );
    let nobody = crate::support::doctor_section(&report, "graph-nobody");
    assert!(
        nobody.contains("ErrorInvalidUser") && nobody.contains("check the parser's email"),
        "{nobody}"
    );
    let onprem = crate::support::doctor_section(&report, "graph-onprem");
    assert!(
        onprem.contains("MailboxNotEnabledForRESTAPI") && onprem.contains("[parser.imap]"),
        "{onprem}"
    );
}

#[tokio::test]
async fn one_credential_keeps_four_requests_in_flight_and_start_at_holds() {
    let (s, graph) = graph_env().await;
    let three_days_ago = Utc::now() - Days::days(3);
    let yesterday = Utc::now() - Days::days(1);
    for mailbox in [SHARED_A, SHARED_B, HELPDESK] {
        for n in 0..3 {
            graph.deliver(mailbox, "archive", &message(n, mailbox), true, yesterday);
        }
    }
    // start_at = "now": nothing that is there already; a date: what arrived since.
    for n in 10..13 {
        graph.deliver(SHARED_A, "inbox", &message(n, SHARED_A), false, yesterday);
    }
    graph.deliver(
        SHARED_B,
        "inbox",
        &message(20, SHARED_B),
        false,
        three_days_ago,
    );
    graph.deliver(SHARED_B, "inbox", &message(21, SHARED_B), false, yesterday);
    graph.deliver(HELPDESK, "inbox", &message(30, HELPDESK), true, yesterday);
    let day = (Utc::now() - Days::days(2)).format("%Y-%m-%d").to_string();
    let all = "start_at = \"all\"";
    let parsers = [
        graph_parser("a-archive", SHARED_A, &graph, all),
        graph_parser("b-archive", SHARED_B, &graph, all),
        graph_parser("h-archive", HELPDESK, &graph, all),
        graph_parser("a-inbox", SHARED_A, &graph, "start_at = \"now\""),
        graph_parser(
            "b-inbox",
            SHARED_B,
            &graph,
            &format!("start_at = \"{day}\""),
        ),
        graph_parser("h-inbox", HELPDESK, &graph, "start_at = \"unseen\""),
    ]
    .map(|p| {
        p.replace(
            "[parser.graph]\n",
            if p.contains("archive\"") {
                "[parser.graph]\nfolder = \"archive\"\n"
            } else {
                "[parser.graph]\n"
            },
        )
    })
    .concat();
    let config = config(&s, &parsers);
    graph.slow_down(100);
    let reports = s.run_once(&config).await;
    let created = |parser: &str| {
        let report = reports.iter().find(|r| r.parser == parser).unwrap();
        report.result.as_ref().unwrap().outcomes.created
    };
    for parser in ["a-archive", "b-archive", "h-archive"] {
        assert_eq!(created(parser), 3, "{parser}");
    }
    assert_eq!(
        (created("a-inbox"), created("b-inbox"), created("h-inbox")),
        (0, 1, 0)
    );
    let most = graph.most_in_flight();
    assert!((2..=4).contains(&most), "{most} requests at once");
    // Skipped messages are untouched.
    assert!(
        graph
            .messages(SHARED_A, "inbox")
            .iter()
            .all(|(_, read)| !read)
    );
}

#[tokio::test]
async fn a_graph_mailbox_killed_mid_round_resumes_with_every_message_once() {
    let (s, graph) = graph_env().await;
    for n in 0..150 {
        graph.deliver(SHARED_A, "inbox", &message(n, SHARED_A), false, Utc::now());
    }
    let text = s.config_toml(&[]) + &graph_parser("support", SHARED_A, &graph, "");
    let (path, _) = s.write_config("graph-daemon.toml", &text);
    graph.slow_down(20);
    let daemon =
        crate::support::KillOnDrop(binary(&["run", "--config"]).arg(&path).spawn().unwrap());
    crate::support::env::wait_for(std::time::Duration::from_secs(60), || async {
        s.count("select count(*) from tickets").await >= 30
    })
    .await;
    drop(daemon); // kill -9
    let stored = s.count("select count(*) from tickets").await;
    assert!(stored < 150, "killed before the end ({stored})");
    // A storm of 429s greets the new process: more than one request waits out.
    graph.throttle_next(8, "1");
    let _daemon =
        crate::support::KillOnDrop(binary(&["run", "--config"]).arg(&path).spawn().unwrap());
    crate::support::env::wait_for(std::time::Duration::from_secs(90), || async {
        let n = s.count("select count(*) from tickets").await;
        eprintln!(
            "TICKETS {n} unread {}",
            graph
                .messages(SHARED_A, "inbox")
                .iter()
                .filter(|m| !m.1)
                .count()
        );
        n == 150
    })
    .await;
    assert_eq!(s.count("select count(*) from ticket_messages").await, 150);
    assert_eq!(s.count("select count(*) from quarantine").await, 0);
    assert_eq!(graph.requests("throttled"), 8);
    // Marked read after commit; only the batch committed when the first process was
    // killed (before it could mark it) may stay unread: never a second ticket.
    crate::support::env::wait_for(std::time::Duration::from_secs(30), || async {
        let unread = graph
            .messages(SHARED_A, "inbox")
            .iter()
            .filter(|(_, read)| !read)
            .count();
        unread <= 50
    })
    .await;
}

#[tokio::test]
async fn a_message_graph_never_sends_is_given_up_on_and_a_refused_token_is_replaced() {
    let (s, graph) = graph_env().await;
    graph.deliver(SHARED_A, "inbox", &message(1, SHARED_A), false, Utc::now());
    let stuck = graph.deliver(SHARED_A, "inbox", &message(2, SHARED_A), false, Utc::now());
    graph.deliver(SHARED_A, "inbox", &message(3, SHARED_A), false, Utc::now());
    graph.cut_always(&stuck);
    // The first token is expired already: Graph answers 401 and one new token is asked.
    s.entra().issue_expired_tokens(1);
    let config = config(&s, &graph_parser("support", SHARED_A, &graph, ""));
    let mut passes = 0;
    let quarantined = loop {
        passes += 1;
        assert!(passes <= 6, "not given up after {passes} passes");
        if let Ok((_, quarantined)) = run_once(&s, &config, "support").await
            && quarantined == 1
        {
            break passes;
        }
    };
    assert!(quarantined >= 3, "given up only after repeated failures");
    assert_eq!(s.tickets("support").await.len(), 2);
    let reason = s
        .count("select count(*) from quarantine where header_only and reason like '%failed 4 times%' and convert_from(raw, 'UTF8') like '%req-2-%'")
        .await;
    assert_eq!(reason, 1);
    // The message stays in the mailbox, unread; the others are read.
    let inbox = graph.messages(SHARED_A, "inbox");
    assert_eq!(
        inbox.iter().filter(|(_, read)| !read).collect::<Vec<_>>(),
        vec![&(stuck, false)]
    );
    // One token per pass (each is a new process), plus the one that replaced the expired.
    let passes = quarantined;
    assert_eq!(s.entra().requests_of("client_credentials"), passes + 1);
}

#[tokio::test]
async fn a_user_credential_reads_a_shared_mailbox_through_graph() {
    use crate::support::entra::{App, Entra, TENANT, User};
    let agent = User {
        password: "agent-pw".into(),
        mailboxes: vec!["agent@example.test".into(), SHARED_A.into()],
        mfa: false,
    };
    let public = App {
        public_client: true,
        ..App::default()
    };
    let entra = Entra::start_with(&[("app-public", public)], &[("agent@example.test", agent)]);
    let s = TestEnv::with_entra(entra).await;
    let graph = GraphFake::start(s.entra(), &[SHARED_A, SHARED_B]).await;
    graph.deliver(SHARED_A, "inbox", &message(1, SHARED_A), false, Utc::now());
    graph.deliver(SHARED_B, "inbox", &message(2, SHARED_B), false, Utc::now());
    let credential = format!(
        "[database]\nurl = \"{}\"\n[[credential]]\nname = \"agent\"\ntype = \"password\"\ntenant_id = \"{TENANT}\"\nclient_id = \"app-public\"\nauthority = \"{}\"\nusername = \"agent@example.test\"\npassword = \"agent-pw\"\n",
        s.db.url,
        s.entra().url
    );
    let as_agent = |p: String| p.replace("credential = \"app\"", "credential = \"agent\"");
    let text = credential
        + &as_agent(graph_parser("shared", SHARED_A, &graph, ""))
        + &as_agent(graph_parser("not-mine", SHARED_B, &graph, ""));
    let config = Config::from_toml(Path::new("user.toml"), &text).unwrap();
    assert_eq!(run_once(&s, &config, "shared").await, Ok((1, 0)));
    let refused = run_once(&s, &config, "not-mine").await.unwrap_err();
    assert!(
        refused.contains("ErrorAccessDenied") && refused.contains("FullAccess"),
        "{refused}"
    );
    assert!(
        graph
            .messages(SHARED_A, "inbox")
            .iter()
            .all(|(_, read)| *read)
    );
}
