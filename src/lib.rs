//! mail2ticket: email to helpdesk tickets in Postgres, exactly once.
//!
//! Code map (one folder, one layer; see ARCHITECTURE in the README):
//! - [`cli`]: the command line behind `main.rs`: commands, output, exit codes.
//! - [`config`]: the TOML file: schema, validation per section, secrets that never print.
//! - [`auth`]: Entra ID tokens, one cache per credential and scope; certificate
//!   assertions, sealed refresh tokens, interactive `login`.
//! - [`source`]: where mail comes from: the [`source::MailSource`] seam and IMAP.
//! - [`pipeline`]: raw bytes to stored rows: MIME, ticket mapping, HTML, TNEF (pure), the
//!   rules, and [`pipeline::store_batch`], the one way every caller stores messages.
//! - [`store`]: the only SQL, by table family; migrations are embedded.
//! - [`runtime`]: the supervisor and the per-mailbox loop (the exactly-once rules).
//! - [`ops`]: `doctor` and logging.
//! - [`tls`]: the rustls provider and trust roots.
//!
//! Invariants: `pipeline::{mime, ticket, html, tnef, boundary, attachments}` do no IO;
//! only `store` speaks SQL and only `source::imap` speaks IMAP; a source never touches the
//! database and the loop never looks inside a cursor; a message is either stored (once per
//! parser and Message-ID) or quarantined with its raw bytes, never dropped; secrets never
//! reach logs, errors or Debug output.

#![warn(missing_docs)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod ops;
pub mod pipeline;
pub mod runtime;
pub mod source;
pub mod store;
pub mod tls;
pub mod webhooks;

/// The causes of an error (its source chain, not the error's own text), joined by ": ".
/// HTTP errors print their URL, which may carry a token (a Graph delta token, a webhook
/// receiver's key); their causes do not.
pub fn error_causes(e: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    causes.join(": ")
}

/// The text of a caught panic (`panic!` with a message carries a `&str` or a `String`):
/// panics are caught where one message or one pass must not take more down with it.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}
