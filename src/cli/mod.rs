//! The command line: parses arguments, runs one command, maps the result to an exit code.
//!
//! Exit codes: 0 success; 1 the command ran but something failed (a message could not be
//! stored, the database is down); 2 bad usage or bad configuration.

use crate::config::Config;
use crate::ops::logging::{self, LogFormat};
use crate::pipeline::{self, Outcome, Pipeline};
use crate::store;
use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code: the command ran, and something in it failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage or bad configuration.
pub const EXIT_USAGE: u8 = 2;
/// `ingest` commits this many messages per transaction at most (one fsync per batch)...
const BATCH_MESSAGES: usize = 100;
/// ...or about this many bytes, whichever comes first.
const BATCH_BYTES: usize = 32 << 20;

#[derive(Parser)]
#[command(
    name = "mail2ticket",
    version,
    about = "Email to helpdesk tickets in Postgres, exactly once"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "MAIL2TICKET_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The configuration file.
    #[arg(long, short = 'c', env = "MAIL2TICKET_CONFIG")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration file and report every problem found.
    CheckConfig(ConfigArg),
    /// Apply pending database migrations.
    Migrate(ConfigArg),
    /// Run the daemon: one IMAP poller per active parser, until SIGTERM or SIGINT.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Process everything new in every active parser, then exit (0: all succeeded,
        /// 1: some parser failed).
        #[arg(long)]
        once: bool,
    },
    /// Walk each parser's chain (DNS, TCP/TLS, token, claims, login, folder) and explain
    /// what fails; exit 0 only when every checked parser passes.
    Doctor {
        #[command(flatten)]
        config: ConfigArg,
        /// Check only this parser.
        #[arg(long, short = 'p')]
        parser: Option<String>,
    },
    /// Sign a user in once for a `type = "delegated"` credential (authorization code with
    /// PKCE on a loopback redirect; paste the redirected address on a headless server).
    /// The refresh token is kept in the database, encrypted with [secrets] key.
    Login {
        #[command(flatten)]
        config: ConfigArg,
        /// The delegated credential to sign in.
        #[arg(long)]
        credential: String,
        /// Use the device-code flow instead (often blocked by Conditional Access).
        #[arg(long)]
        device_code: bool,
    },
    /// List or replay quarantined and held messages.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Turn raw RFC 5322 messages (files, directories, or stdin) into tickets.
    Ingest {
        #[command(flatten)]
        config: ConfigArg,
        /// The parser (mailbox) the messages belong to.
        #[arg(long, short = 'p')]
        parser: String,
        /// Message files, or directories read recursively (hidden files skipped);
        /// none or `-` reads one message from stdin.
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum QuarantineAction {
    /// List the rows not replayed yet.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this parser's rows.
        #[arg(long, short = 'p')]
        parser: Option<String>,
        /// Include rows already replayed.
        #[arg(long)]
        all: bool,
    },
    /// Push rows through the current pipeline again (after an upgrade or a config fix).
    /// Each row is stored at most once.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Row ids to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Replay every row not replayed yet.
        #[arg(long)]
        all: bool,
        /// With --all: only this parser's rows.
        #[arg(long, short = 'p', requires = "all")]
        parser: Option<String>,
    },
}

/// Runs the program and returns its exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::CheckConfig(args) => match load_config(&args.config) {
            Ok(config) => {
                println!(
                    "{}: OK ({} parser(s), {} active; {} credential(s))",
                    config.path.display(),
                    config.parsers.len(),
                    config
                        .parsers
                        .iter()
                        .filter(|p| p.status == crate::config::ParserStatus::Active)
                        .count(),
                    config.credentials.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Migrate(args) => {
            let config = match load_config(&args.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match connect_and_migrate(&config).await {
                Ok(_) => {
                    println!("database schema is up to date");
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::Run { config, once } => {
            let config = match load_config(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_command(&config, once).await
        }
        Command::Quarantine { action } => quarantine_command(action).await,
        Command::Login {
            config,
            credential,
            device_code,
        } => {
            let config = match load_config(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            login_command(&config, &credential, device_code).await
        }
        Command::Doctor { config, parser } => {
            let config = match load_config(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match crate::ops::doctor::run(&config, parser.as_deref()).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_FAILED),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }
        Command::Ingest {
            config,
            parser,
            files,
        } => {
            let config = match load_config(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            ingest_command(&config, &parser, files).await
        }
    }
}

async fn login_command(config: &Config, name: &str, device_code: bool) -> ExitCode {
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

async fn run_command(config: &Config, once: bool) -> ExitCode {
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
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    if once {
        let reports = crate::runtime::supervisor::run_once(config, &pool, &tokens, &cancel).await;
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
        return if failed {
            ExitCode::from(EXIT_FAILED)
        } else {
            ExitCode::SUCCESS
        };
    }
    let supervisor = {
        let (config_pool, cancel) = (pool.clone(), cancel.clone());
        let tokens = tokens.clone();
        let config = config.clone();
        tokio::spawn(async move {
            crate::runtime::supervisor::run(&config, &config_pool, &tokens, &cancel).await
        })
    };
    cancel.cancelled().await;
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

async fn quarantine_command(action: QuarantineAction) -> ExitCode {
    let path = match &action {
        QuarantineAction::List { config, .. } | QuarantineAction::Replay { config, .. } => {
            config.config.clone()
        }
    };
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let pool = match connect_and_migrate(&config).await {
        Ok(pool) => pool,
        Err(code) => return code,
    };
    match action {
        QuarantineAction::List { parser, all, .. } => {
            let rows = async {
                let mut conn = pool.acquire().await?;
                store::quarantine::list_quarantine(&mut conn, parser.as_deref(), all).await
            };
            match rows.await {
                Ok(rows) => {
                    for r in &rows {
                        println!(
                            "#{:<6} {} {:<12} {:<9} {:>9} B  {}{}{}",
                            r.id,
                            r.created_at.format("%Y-%m-%d %H:%M:%S"),
                            r.parser,
                            r.kind,
                            r.raw_size,
                            r.reason,
                            if r.header_only { " [header only]" } else { "" },
                            r.replay_outcome
                                .as_deref()
                                .map(|o| format!(" [replayed: {o}]"))
                                .unwrap_or_default(),
                        );
                    }
                    println!("{} row(s)", rows.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        QuarantineAction::Replay {
            ids, all, parser, ..
        } => {
            let pipelines: std::collections::HashMap<String, Pipeline> = config
                .parsers
                .iter()
                .map(|p| (p.name.clone(), Pipeline::from(p)))
                .collect();
            let ids = if all {
                let pending = async {
                    let mut conn = pool.acquire().await?;
                    store::quarantine::pending_quarantine_ids(&mut conn, parser.as_deref()).await
                };
                match pending.await {
                    Ok(ids) => ids,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_FAILED);
                    }
                }
            } else {
                ids
            };
            let (mut stored, mut held, mut skipped) = (0, 0, 0);
            for id in ids {
                match pipeline::replay(&pool, &pipelines, id).await {
                    Ok(pipeline::Replay::Stored(outcome)) => {
                        stored += 1;
                        println!("{}", describe(&outcome, &format!("quarantine #{id}")));
                    }
                    Ok(pipeline::Replay::StillHeld) => {
                        held += 1;
                        println!("still held   quarantine #{id}");
                    }
                    Ok(pipeline::Replay::Skipped(why)) => {
                        skipped += 1;
                        println!("skipped      quarantine #{id}: {why}");
                    }
                    Err(e) => {
                        eprintln!("error: quarantine #{id}: {e}");
                        return ExitCode::from(EXIT_FAILED);
                    }
                }
            }
            println!("replay: {stored} stored, {held} still held, {skipped} skipped");
            ExitCode::SUCCESS
        }
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_USAGE)
    })
}

async fn connect_and_migrate(config: &Config) -> Result<sqlx::PgPool, ExitCode> {
    let pool = store::connect(&config.database).await.map_err(|e| {
        eprintln!("error: cannot connect to the database: {e}");
        ExitCode::from(EXIT_FAILED)
    })?;
    store::migrate(&pool).await.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_FAILED)
    })?;
    Ok(pool)
}

/// One message to ingest: where it came from, for the report.
enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    fn label(&self) -> String {
        match self {
            Input::Stdin => "<stdin>".to_string(),
            Input::File(p) => p.display().to_string(),
        }
    }

    fn read(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Input::Stdin => {
                let mut raw = Vec::new();
                std::io::stdin().lock().read_to_end(&mut raw)?;
                Ok(raw)
            }
            Input::File(p) => std::fs::read(p),
        }
    }
}

/// Expands directories (recursively, sorted, hidden entries skipped) into files.
fn collect_inputs(args: Vec<PathBuf>) -> Result<Vec<Input>, String> {
    if args.is_empty() {
        return Ok(vec![Input::Stdin]);
    }
    let mut inputs = Vec::new();
    for arg in args {
        if arg.as_os_str() == "-" {
            inputs.push(Input::Stdin);
        } else if arg.is_dir() {
            walk(&arg, &mut inputs)
                .map_err(|e| format!("cannot read directory {}: {e}", arg.display()))?;
        } else {
            inputs.push(Input::File(arg));
        }
    }
    Ok(inputs)
}

fn walk(dir: &Path, out: &mut Vec<Input>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(Input::File(path));
        }
    }
    Ok(())
}

async fn ingest_command(config: &Config, parser_name: &str, files: Vec<PathBuf>) -> ExitCode {
    let Some(parser) = config.parser(parser_name) else {
        let known: Vec<&str> = config.parsers.iter().map(|p| p.name.as_str()).collect();
        eprintln!(
            "{}: no [[parser]] is named {parser_name:?} (defined: {known:?})",
            config.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    };
    let inputs = match collect_inputs(files) {
        Ok(inputs) => inputs,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let pool = match connect_and_migrate(config).await {
        Ok(pool) => pool,
        Err(code) => return code,
    };
    let pipeline = Pipeline::from(parser);
    let mut tally = Tally::default();
    let mut pending = inputs.as_slice();
    while !pending.is_empty() {
        // Read up to BATCH_MESSAGES messages / BATCH_BYTES, store them in one transaction.
        let mut batch: Vec<(String, Vec<u8>)> = Vec::new();
        let mut bytes = 0;
        while let Some((input, rest)) = pending.split_first() {
            if batch.len() >= BATCH_MESSAGES || (bytes >= BATCH_BYTES && !batch.is_empty()) {
                break;
            }
            pending = rest;
            match input.read() {
                Ok(raw) => {
                    bytes += raw.len();
                    batch.push((input.label(), raw));
                }
                Err(e) => {
                    println!("failed       {}: cannot read: {e}", input.label());
                    tally.failed += 1;
                }
            }
        }
        let raws: Vec<Vec<u8>> = batch
            .iter_mut()
            .map(|(_, raw)| std::mem::take(raw))
            .collect();
        match pipeline::ingest_batch(&pool, &pipeline, &raws).await {
            Ok(outcomes) => {
                for ((label, _), outcome) in batch.iter().zip(&outcomes) {
                    println!("{}", describe(outcome, label));
                    tally.count(outcome);
                }
            }
            Err(e) => {
                for (label, _) in &batch {
                    println!("failed       {label}: {e}");
                }
                tally.failed += batch.len();
                tally.not_attempted = pending.len();
                tracing::error!(parser = parser_name, error = %e, "stopping: messages could not be stored");
                break;
            }
        }
    }
    println!("{}", tally.summary());
    if tally.failed == 0 && tally.not_attempted == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

fn describe(outcome: &Outcome, label: &str) -> String {
    match outcome {
        Outcome::Created { ticket_id } => format!("created      ticket {ticket_id:<8} {label}"),
        Outcome::Appended { ticket_id } => format!("appended     ticket {ticket_id:<8} {label}"),
        Outcome::Held { id, reason } => {
            format!("held         quarantine #{id:<2} {label}: {reason}")
        }
        Outcome::Duplicate { ticket_id } => format!("duplicate    ticket {ticket_id:<8} {label}"),
        Outcome::Quarantined { id, reason } => {
            format!("quarantined  #{id:<13} {label}: {reason}")
        }
        Outcome::DuplicateQuarantined { id } => {
            format!("duplicate    quarantine #{id:<2} {label}")
        }
    }
}

#[derive(Default)]
struct Tally {
    outcomes: pipeline::OutcomeCounts,
    failed: usize,
    not_attempted: usize,
}

impl Tally {
    fn count(&mut self, outcome: &Outcome) {
        self.outcomes.count(outcome);
    }

    fn summary(&self) -> String {
        let o = &self.outcomes;
        let mut s = format!(
            "summary: {} created, {} appended, {} held, {} duplicate, {} quarantined, {} failed",
            o.created, o.appended, o.held, o.duplicate, o.quarantined, self.failed
        );
        if self.not_attempted > 0 {
            s.push_str(&format!(", {} not attempted", self.not_attempted));
        }
        s
    }
}
