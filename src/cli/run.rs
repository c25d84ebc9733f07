//! `run` (the daemon, or `--once`) and `login`: signals, the shutdown deadline, exit codes.

use super::{EXIT_FAILED, EXIT_USAGE, connect_and_migrate};
use crate::config::Config;
use std::process::ExitCode;

pub(super) async fn login_command(config: &Config, name: &str, device_code: bool) -> ExitCode {
    let Some(credential) = config.credentials.iter().find(|c| c.name == name) else {
        let known: Vec<&str> = config.credentials.iter().map(|c| c.name.as_str()).collect();
        eprintln!(
            "{}: no [[credential]] is named {name:?} (defined: {known:?})",
            config.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    };
    if credential.kind != crate::config::CredentialKind::Delegated {
        eprintln!(
            "{}: credential {name:?} is of type {:?}; login is for type = \"delegated\" credentials",
            config.path.display(),
            credential.kind.as_str()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let pool = match connect_and_migrate(config).await {
        Ok(pool) => pool,
        Err(code) => return code,
    };
    let flow = if device_code {
        crate::auth::login::Flow::DeviceCode
    } else {
        crate::auth::login::Flow::AuthorizationCode
    };
    match crate::auth::login::login(config, credential, flow, &pool).await {
        Ok(signed_in) => {
            println!(
                "OK: credential {name:?} signed in as {}; its refresh token is saved, encrypted, in the database. A running daemon picks it up on its next attempt. Check every mailbox with: mail2ticket doctor --config {}",
                signed_in
                    .user
                    .as_deref()
                    .unwrap_or("(user not named in the token)"),
                config.path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: login failed: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// How long a shutdown may take before the remaining work is abandoned (it is retried on
/// the next start: nothing uncommitted was acknowledged on the server).
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) async fn run_command(config: &Config, once: bool) -> ExitCode {
    if !config
        .parsers
        .iter()
        .any(|p| p.status == crate::config::ParserStatus::Active)
    {
        eprintln!(
            "{}: no [[parser]] has status = \"active\": nothing to run",
            config.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    raise_open_files_limit(config);
    let pool = match connect_and_migrate(config).await {
        Ok(pool) => pool,
        Err(code) => return code,
    };
    let tokens = match crate::auth::TokenSources::from_config(config, Some(pool.clone())) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    // Before any poller commits: every event from now on gets its deliveries.
    if let Err(e) = sync_webhooks(&pool, config).await {
        eprintln!("error: cannot record the webhooks in the database: {e}");
        return ExitCode::from(EXIT_FAILED);
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    if once {
        return run_once(config, &pool, &tokens, &cancel).await;
    }
    run_daemon(config, pool, tokens, cancel).await
}

/// Raises the soft limit of open files to the hard one, as servers do (the soft limit is
/// often 1,024: a shell's `ulimit -n`, systemd's default): every mailbox holds a socket,
/// and the pool, the endpoints and the webhooks more. Warns when even the hard limit
/// leaves too few for the active mailboxes (raised later by a reload, it is checked
/// again only at the next start).
fn raise_open_files_limit(config: &Config) {
    let active = (config.parsers.iter())
        .filter(|p| p.status == crate::config::ParserStatus::Active)
        .count();
    // The pool, the webhook listener's own connection, the endpoints and some spare.
    let needed = active as u64 + u64::from(config.database.max_connections) + 64;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the limit of open files is below one per mailbox plus the database pool: raise it (systemd: LimitNOFILE=65536; a shell: ulimit -n), or some mailboxes will fail to connect"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the limit of open files"),
    }
}

/// The daemon: the operations endpoints, the webhook dispatcher, the supervisor, reload
/// on SIGHUP, and the shutdown deadline.
async fn run_daemon(
    config: &Config,
    pool: sqlx::PgPool,
    tokens: crate::auth::TokenSources,
    cancel: tokio_util::sync::CancellationToken,
) -> ExitCode {
    let states = crate::runtime::state::Registry::default();
    let (state_events, written) = tokio::sync::mpsc::unbounded_channel();
    states.publish_to(state_events);
    tokio::spawn(write_state_events(pool.clone(), written));
    let notifier = std::sync::Arc::new(crate::ops::systemd::Notifier::new(states.clone()));
    let current = tokio::sync::watch::Sender::new(std::sync::Arc::new(config.clone()));
    let disabled = crate::webhooks::Disabled::default();
    if let Err(code) = start_http(
        config, &current, &states, &tokens, &pool, &disabled, &cancel,
    )
    .await
    {
        return code;
    }
    let dispatcher =
        crate::webhooks::run(pool.clone(), current.subscribe(), disabled, cancel.clone());
    tokio::spawn(dispatcher);
    // Installed before READY=1: SIGHUP's default action would end the process.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let (reload_requests, mut reloads) = tokio::sync::mpsc::channel(1);
    match hangup {
        Ok(hangup) => drop(tokio::spawn(reload_on_sighup(hangup, reload_requests))),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler: reloading is off")
        }
    }
    let supervisor = {
        let (config_pool, cancel) = (pool.clone(), cancel.clone());
        let tokens = tokens.clone();
        let states = states.clone();
        let notifier = notifier.clone();
        tokio::spawn(async move {
            let supervisor = crate::runtime::supervisor::run_observed;
            let (pool, notifier) = (&config_pool, &*notifier);
            supervisor(
                &current,
                pool,
                &tokens,
                &states,
                notifier,
                &mut reloads,
                &cancel,
            )
            .await
        })
    };
    cancel.cancelled().await;
    notifier.stopping();
    tracing::info!("shutting down: finishing the messages in flight");
    match tokio::time::timeout(SHUTDOWN_DEADLINE, supervisor).await {
        Ok(_) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(_) => {
            tracing::warn!(
                "some pollers did not stop within {}s; exiting anyway",
                SHUTDOWN_DEADLINE.as_secs()
            );
            ExitCode::SUCCESS
        }
    }
}

/// Asks the supervisor to reload the configuration file on every SIGHUP (`systemctl
/// reload`). Signals that arrive while a reload is pending are merged into it.
async fn reload_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    requests: tokio::sync::mpsc::Sender<()>,
) {
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received");
        match requests.try_send(()) {
            Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => break,
        }
    }
}

async fn cancel_on_signal(cancel: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    // Cancel first: nothing (not even logging) may stand between a signal and shutdown.
    cancel.cancel();
    tracing::info!("{name} received");
}

/// `run --once`: every active parser once, one line each (and its first-contact decision).
async fn run_once(
    config: &Config,
    pool: &sqlx::PgPool,
    tokens: &crate::auth::TokenSources,
    cancel: &tokio_util::sync::CancellationToken,
) -> ExitCode {
    let reports = crate::runtime::supervisor::run_once(config, pool, tokens, cancel).await;
    let mut failed = false;
    for report in &reports {
        match &report.result {
            Ok(once) => {
                let s = &once.outcomes;
                println!(
                    "{}: {} created, {} appended, {} held, {} duplicate, {} quarantined",
                    report.parser, s.created, s.appended, s.held, s.duplicate, s.quarantined
                );
                if let Some(first) = &once.first_contact {
                    println!("{}: first contact: {first}", report.parser);
                }
            }
            Err(e) => {
                failed = true;
                println!("{}: failed: {e}", report.parser);
            }
        }
    }
    if failed {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Starts the operations endpoints when `[http]` is configured (metrics recorder, listener).
async fn start_http(
    config: &Config,
    current: &tokio::sync::watch::Sender<std::sync::Arc<Config>>,
    states: &crate::runtime::state::Registry,
    tokens: &crate::auth::TokenSources,
    pool: &sqlx::PgPool,
    disabled_webhooks: &crate::webhooks::Disabled,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), ExitCode> {
    let Some(http) = &config.http else {
        return Ok(());
    };
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_FAILED)
    };
    let listener = crate::ops::http::bind(http).await.map_err(fail)?;
    let metrics = crate::ops::metrics::install().map_err(fail)?;
    let ops = crate::ops::http::Ops {
        metrics,
        states: states.clone(),
        tokens: tokens.clone(),
        pool: pool.clone(),
        started_at: chrono::Utc::now(),
        config: current.subscribe(),
        disabled_webhooks: disabled_webhooks.clone(),
    };
    tracing::info!(listen = %http.listen, "operations endpoints listening");
    let cancel = cancel.clone();
    tokio::spawn(async move { crate::ops::http::serve(listener, ops, cancel).await });
    Ok(())
}

/// Mirrors `[[webhook]]` into the database (the event writers fan out to it).
async fn sync_webhooks(
    pool: &sqlx::PgPool,
    config: &Config,
) -> Result<(), crate::store::StoreError> {
    let mut conn = pool.acquire().await?;
    crate::store::webhooks::sync_subscriptions(&mut conn, &config.webhooks).await
}

/// Writes the mailboxes' changes of state to the events outbox (each in a transaction of
/// its own; a database outage loses them, and the log still has them).
async fn write_state_events(
    pool: sqlx::PgPool,
    mut events: tokio::sync::mpsc::UnboundedReceiver<crate::runtime::state::StateEvent>,
) {
    while let Some(event) = events.recv().await {
        let written = async {
            let mut conn = pool.acquire().await?;
            crate::store::events::state_event(&mut conn, event.kind, &event.parser, &event.payload)
                .await
        };
        if let Err(e) = written.await {
            tracing::warn!(kind = event.kind, parser = %event.parser, error = %e, "cannot write the event");
        }
    }
}
