//! The command line: parses arguments, runs one command, maps the result to an exit code.
//!
//! Exit codes: 0 success; 1 the command ran but something failed (a message could not be
//! stored, the database is down); 2 bad usage or bad configuration.

use crate::config::Config;
use crate::ops::logging::{self, LogFormat};
use crate::store;
mod events;
mod ingest;
mod quarantine;
mod run;
mod status;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code: the command ran, and something in it failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage or bad configuration.
pub const EXIT_USAGE: u8 = 2;

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
    /// Read the events outbox (what downstream systems hear about).
    Events {
        #[command(subcommand)]
        action: EventsAction,
    },
    /// Webhook deliveries: their state, and redelivery.
    Webhooks {
        #[command(subcommand)]
        action: WebhooksAction,
    },
    /// Show a running daemon's mailboxes and credentials (from its /status.json); exit 0
    /// when healthy, 1 when not (or unreachable).
    Status {
        /// The daemon's [http] address.
        #[arg(long, default_value = "http://127.0.0.1:9187")]
        url: String,
        /// The [http] token, if one is set.
        #[arg(long, env = "MAIL2TICKET_HTTP_TOKEN", hide_env_values = true)]
        token: Option<String>,
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
enum EventsAction {
    /// Print events as JSON lines, oldest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only events after this id (the last id a consumer has seen).
        #[arg(long, default_value_t = 0)]
        since: i64,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum WebhooksAction {
    /// Deliveries per endpoint: pending, dead, delivered.
    Status {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Deliver again: every dead delivery (`--dead`), or the given events.
    Redeliver {
        #[command(flatten)]
        config: ConfigArg,
        /// Every delivery given up on.
        #[arg(long, conflicts_with = "events")]
        dead: bool,
        /// Only to this webhook.
        #[arg(long)]
        webhook: Option<String>,
        /// Event ids.
        events: Vec<i64>,
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

impl Command {
    /// The configuration file every command reads.
    fn config_path(&self) -> &Path {
        match self {
            Command::Status { .. } => unreachable!("status reads no configuration"),
            Command::CheckConfig(c) | Command::Migrate(c) => &c.config,
            Command::Run { config, .. }
            | Command::Doctor { config, .. }
            | Command::Login { config, .. }
            | Command::Ingest { config, .. } => &config.config,
            Command::Quarantine { action } => match action {
                QuarantineAction::List { config, .. } | QuarantineAction::Replay { config, .. } => {
                    &config.config
                }
            },
            Command::Events {
                action: EventsAction::List { config, .. },
            } => &config.config,
            Command::Webhooks { action } => match action {
                WebhooksAction::Status { config } | WebhooksAction::Redeliver { config, .. } => {
                    &config.config
                }
            },
        }
    }
}

async fn run(command: Command) -> ExitCode {
    if let Command::Status { url, token } = &command {
        return status::status_command(url, token.as_deref()).await;
    }
    let config = match load_config(command.config_path()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match command {
        Command::CheckConfig(_) => {
            let active = config
                .parsers
                .iter()
                .filter(|p| p.status == crate::config::ParserStatus::Active)
                .count();
            println!(
                "{}: OK ({} parser(s), {active} active; {} credential(s))",
                config.path.display(),
                config.parsers.len(),
                config.credentials.len()
            );
            ExitCode::SUCCESS
        }
        Command::Migrate(_) => match connect_and_migrate(&config).await {
            Ok(_) => {
                println!("database schema is up to date");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { once, .. } => run::run_command(&config, once).await,
        Command::Quarantine { action } => quarantine::quarantine_command(&config, action).await,
        Command::Events {
            action: EventsAction::List { since, limit, .. },
        } => events::list(&config, since, limit).await,
        Command::Webhooks { action } => events::webhooks(&config, action).await,
        Command::Login {
            credential,
            device_code,
            ..
        } => run::login_command(&config, &credential, device_code).await,
        Command::Doctor { parser, .. } => {
            match crate::ops::doctor::run(&config, parser.as_deref()).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_FAILED),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }
        Command::Status { .. } => unreachable!("handled above"),
        Command::Ingest { parser, files, .. } => {
            ingest::ingest_command(&config, &parser, files).await
        }
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_USAGE)
    })
}

pub(crate) async fn connect_and_migrate(config: &Config) -> Result<sqlx::PgPool, ExitCode> {
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
