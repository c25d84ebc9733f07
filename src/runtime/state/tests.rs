//! Unit tests of the registry: states, staleness, and what the log is told.

use super::*;

fn parser(stale_after: u64) -> ParserConfig {
    let text = format!(
        "[database]\nurl = \"postgres://x/y\"\n[[parser]]\nname = \"p\"\nemail = \"p@x.test\"\npassword = \"pw\"\nstale_after = {stale_after}\n[parser.imap]\nhost = \"127.0.0.1\"\nencryption = \"none\"\n"
    );
    let config = crate::config::Config::from_toml(std::path::Path::new("t.toml"), &text).unwrap();
    config.parsers[0].clone()
}

#[test]
fn states_errors_and_staleness() {
    let registry = Registry::default();
    registry.register(&parser(1200));
    registry.set("p", MailboxState::Idle);
    registry.ok("p");
    assert_eq!(registry.snapshot()[0].state, MailboxState::Idle);
    registry.failed(
        "p",
        Failure {
            error: "refused".into(),
            step: "login",
            fix: Some("grant FullAccess".into()),
            retry_at: Utc::now(),
            needs_login: false,
            credential: None,
        },
    );
    let m = &registry.snapshot()[0];
    assert_eq!(m.state, MailboxState::Backoff);
    assert_eq!(m.last_error.as_deref(), Some("refused"));
    registry.set("p", MailboxState::Idle);
    registry.ok("p");
    assert_eq!(registry.snapshot()[0].last_error, None);

    let quiet = Registry::default();
    quiet.register(&parser(1));
    quiet.set("p", MailboxState::Idle);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(quiet.snapshot()[0].state, MailboxState::Stale);
}

/// The log lines written while `f` runs.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let into = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || into.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
}

fn failure(step: &'static str, needs_login: bool) -> Failure {
    Failure {
        error: format!("failed at {step}"),
        step,
        fix: Some("do this".into()),
        retry_at: Utc::now(),
        needs_login,
        credential: needs_login.then(|| "app".to_string()),
    }
}

#[test]
fn a_change_of_state_is_logged_once_and_reminded_every_ten_minutes() {
    let registry = Registry::default();
    registry.register(&parser(1200));
    let log = logged(|| {
        for _ in 0..3 {
            registry.failed("p", failure("login", false));
        }
    });
    assert_eq!(log.matches("mailbox failing").count(), 1, "{log}");
    assert!(log.contains("WARN") && log.contains("do this"), "{log}");

    // Failing another way, or needing a login, is news.
    let log = logged(|| {
        registry.failed("p", failure("connect", false));
        registry.failed("p", failure("token", true));
        registry.failed("p", failure("token", true));
    });
    assert_eq!(log.matches("mailbox failing").count(), 2, "{log}");

    // Ten minutes later, one reminder with the attempts since the last line.
    registry.update_entry("p", |e| {
        let problem = e.announced.as_mut().unwrap();
        problem.logged = Instant::now() - REMINDER_EVERY - Duration::from_secs(1);
    });
    let log = logged(|| {
        registry.failed("p", failure("token", true));
        registry.failed("p", failure("token", true));
    });
    assert_eq!(log.matches("mailbox still failing").count(), 1, "{log}");
    assert!(log.contains("attempts=2"), "{log}");

    let log = logged(|| {
        registry.ok("p");
        registry.ok("p");
    });
    assert_eq!(log.matches("mailbox recovered").count(), 1, "{log}");
    assert!(log.contains("INFO"), "{log}");
}
