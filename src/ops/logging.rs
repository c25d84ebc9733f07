//! Log setup: human-readable or JSON lines on stderr, filtered by `RUST_LOG`.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// The two log formats: `text` for terminals and journald, `json` for containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs the global subscriber. Logs go to stderr so stdout stays for command output.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald, files and log collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        // A closed stderr (a log pipe that went away) must not take the daemon down: with
        // internal error logging on, tracing-subscriber reports a failed write with
        // eprintln!, which panics on that same closed stderr, in whichever task logged.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
