//! mail2ticket: email to helpdesk tickets in Postgres, exactly once.
//!
//! Code map (one module, one job):
//! - [`config`]: the TOML file: schema, validation, errors that name file, key and fix.
//! - [`secret`]: secret values (inline, env, file) that never print.
//! - [`mime`]: raw bytes to [`mime::ParsedMessage`]; pure, no IO.
//! - [`ticket`]: parsed message to [`ticket::NewTicket`] rows; pure, no IO.
//! - [`html`]: sanitizing a stranger's HTML; pure.
//! - [`tnef`]: the files inside Outlook's winmail.dat; pure.
//! - [`store`]: the only module that speaks SQL; migrations are embedded.
//! - [`ingest`]: the pipeline every mail source uses: decide (pure), then store in one
//!   transaction, or quarantine.
//! - [`auth`], [`assertion`], [`sealed`], [`login`]: Entra ID tokens for every credential
//!   type, certificate assertions, sealed refresh tokens, interactive sign-in.
//! - [`imap`], [`poller`], [`supervisor`], [`doctor`]: the daemon and its diagnosis.
//! - [`cli`]: the command-line interface behind `main.rs`.
//! - [`logging`]: log format and filter.
//!
//! Invariants: `mime` and `ticket` do no IO; only `store` speaks SQL; a message is either
//! stored (once per parser and Message-ID) or quarantined with its raw bytes, never
//! dropped; secrets never reach logs, errors or Debug output.

pub mod auth;
pub mod cli;
pub mod config;
pub mod ops;
pub mod pipeline;
pub mod runtime;
pub mod source;
pub mod store;
pub mod tls;

/// The text of a caught panic (`panic!` with a message carries a `&str` or a `String`):
/// panics are caught where one message or one pass must not take more down with it.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}
