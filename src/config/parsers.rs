//! `[[parser]]`: one mailbox each, with its source (an IMAP server or Microsoft Graph), its
//! login and its rules.

use super::problems::{Problems, Table};
use super::raw::{RawGraph, RawImap, RawParser};
use super::*;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// Checks every `[[parser]]` against the credentials.
pub(super) fn validate_parsers(
    raw: &[Spanned<RawParser>],
    credentials: &[CredentialConfig],
    config_dir: &Path,
    problems: &mut Problems,
) -> Vec<ParserConfig> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, spanned) in raw.iter().enumerate() {
        let mut table = Table::new(problems, format!("parser[{i}]"), spanned.span().start);
        let p = spanned.get_ref();
        let name = p.name.trim().to_string();
        if name.is_empty() || name.chars().any(char::is_control) {
            table.add(
                "name",
                "must be a non-empty name without control characters",
            );
        } else if !seen.insert(name.clone()) {
            table.add("name", format!("a parser named {name:?} is already defined; names must be unique (they key the database rows)"));
        }
        let username = check_identity(p, &mut table);
        let auth = parser_auth(p, credentials, config_dir, &mut table);
        let source = check_source(p, &auth, config_dir, &mut table);
        let rules = check_rules(p, &mut table);
        let (Some(auth), Some(source)) = (auth, source) else {
            continue;
        };
        out.push(ParserConfig {
            name,
            email: p.email.trim().to_string(),
            username,
            shared_mailbox: p.shared_mailbox,
            status: p.status,
            add_attachments: p.add_attachments,
            add_ccs: p.add_ccs,
            auth,
            max_message_size: rules.max_message_size,
            max_attachment_size: rules.max_attachment_size,
            keep_raw: p.keep_raw,
            attachments_in_raw: p.attachments_in_raw,
            after: rules.after,
            stale_after: Duration::from_secs(p.stale_after.unwrap_or(1200)),
            start_at: rules.start_at,
            poll_interval: Duration::from_secs(p.poll_interval.unwrap_or(60)),
            ticket_tag: rules.ticket_tag,
            max_tickets_per_sender: p.max_tickets_per_sender.unwrap_or(20),
            sender_window: Duration::from_secs(p.sender_window.unwrap_or(600)),
            source,
        });
    }
    out
}

/// Checks `email` and `username`; returns the username (default: `email`).
fn check_identity(p: &RawParser, table: &mut Table) -> String {
    if !looks_like_address(&p.email) {
        table.add("email", format!("{:?} is not an email address", p.email));
    }
    let username = p.username.clone().unwrap_or_else(|| p.email.clone());
    // Only an XOAUTH2 `user=` names a Microsoft 365 mailbox and must be an address;
    // IMAP LOGIN on other servers takes names like `jdoe` or `DOMAIN\jdoe`.
    let username_is_xoauth2_user = p.credential.is_some() && !p.shared_mailbox;
    if username.trim().is_empty() || username.chars().any(char::is_control) {
        table.add(
            "username",
            "must not be empty or contain control characters",
        );
    } else if username_is_xoauth2_user && !looks_like_address(&username) {
        table.add("username", format!("{username:?} is not an email address; with a credential and shared_mailbox = false it is the XOAUTH2 user= (the mailbox's address). Plain usernames work with password = ... (IMAP LOGIN)"));
    }
    username.trim().to_string()
}

/// How the parser logs in: a known credential, or a password.
fn parser_auth(
    p: &RawParser,
    credentials: &[CredentialConfig],
    config_dir: &Path,
    table: &mut Table,
) -> Option<ParserAuth> {
    match (&p.credential, &p.password) {
        (Some(_), Some(_)) => {
            table.add(
                "credential",
                "set either credential (OAuth) or password (plain LOGIN), not both",
            );
            None
        }
        (None, None) => {
            table.add("credential", "missing: name a [[credential]] (credential = \"...\") or set password = { env = \"VAR\" }");
            None
        }
        (Some(name), None) => {
            if !credentials.iter().any(|c| &c.name == name) {
                let known: Vec<&str> = credentials.iter().map(|c| c.name.as_str()).collect();
                table.add("credential", format!("no [[credential]] is named {name:?} (defined: {known:?}); fix the name or add that credential"));
            }
            Some(ParserAuth::Credential(name.clone()))
        }
        (None, Some(source)) => match source.resolve(config_dir) {
            Ok(secret) => Some(ParserAuth::Password(secret)),
            Err(e) => {
                table.add("password", e);
                None
            }
        },
    }
}

/// The checked values of a parser's limits and rules.
struct Rules {
    max_message_size: u64,
    max_attachment_size: u64,
    after: AfterIngest,
    start_at: StartAt,
    ticket_tag: String,
}

/// The parser's limits, `after`, `start_at`, polling, threading and loop rules.
fn check_rules(p: &RawParser, table: &mut Table) -> Rules {
    let max_message_size = table.parsed(
        "max_message_size",
        p.max_message_size.as_ref().map(|s| s.bytes()),
        DEFAULT_MAX_MESSAGE_SIZE,
    );
    if max_message_size == 0 {
        table.add("max_message_size", "must be larger than 0");
    }
    let max_attachment_size = table.parsed(
        "max_attachment_size",
        p.max_attachment_size.as_ref().map(|s| s.bytes()),
        DEFAULT_MAX_ATTACHMENT_SIZE,
    );
    let after = table.parsed(
        "after",
        p.after.as_deref().map(AfterIngest::parse),
        AfterIngest::MarkSeen,
    );
    let start_at = table.parsed(
        "start_at",
        p.start_at.as_deref().map(StartAt::parse),
        StartAt::Unseen,
    );
    let durations = [
        ("poll_interval", p.poll_interval),
        ("sender_window", p.sender_window),
        ("stale_after", p.stale_after),
    ];
    for (field, value) in durations {
        if value == Some(0) {
            table.add(field, "must be at least 1 (seconds)");
        }
    }
    let ticket_tag = p
        .ticket_tag
        .clone()
        .unwrap_or_else(|| DEFAULT_TICKET_TAG.to_string());
    if ticket_tag.matches("{id}").count() != 1 {
        table.add(
            "ticket_tag",
            format!("{ticket_tag:?} must contain {{id}} exactly once, e.g. \"[#{{id}}]\""),
        );
    }
    Rules {
        max_message_size,
        max_attachment_size,
        after,
        start_at,
        ticket_tag,
    }
}

/// Exactly one of `[parser.imap]` and `[parser.graph]`; Graph needs a credential.
fn check_source(
    p: &RawParser,
    auth: &Option<ParserAuth>,
    config_dir: &Path,
    table: &mut Table,
) -> Option<SourceConfig> {
    match (&p.imap, &p.graph) {
        (Some(imap), None) => Some(SourceConfig::Imap(check_imap(imap, config_dir, table))),
        (None, Some(graph)) => {
            if matches!(auth, Some(ParserAuth::Password(_))) {
                table.add("password", "a [parser.graph] mailbox signs in with a credential (credential = \"...\"), not an IMAP password");
            }
            Some(SourceConfig::Graph(check_graph(graph, table)))
        }
        (Some(_), Some(_)) => {
            table.add(
                "graph",
                "a parser reads one mailbox: keep either [parser.imap] or [parser.graph]",
            );
            None
        }
        (None, None) => {
            table.add(
                "imap",
                "missing: add [parser.imap] (host = ...) or [parser.graph] (Microsoft Graph)",
            );
            None
        }
    }
}

/// `[parser.graph]`: the folder and the endpoint (https, or http to loopback for tests).
fn check_graph(graph: &RawGraph, table: &mut Table) -> GraphConfig {
    if graph.folder.trim().is_empty() || graph.folder.split('/').any(|part| part.trim().is_empty())
    {
        table.add("graph.folder", "must be a well-known folder name such as \"inbox\" or a path such as \"Inbox/Support\"");
    }
    let base_url = graph
        .base_url
        .clone()
        .unwrap_or_else(|| DEFAULT_GRAPH_BASE_URL.to_string())
        .trim_end_matches('/')
        .to_string();
    match url::Url::parse(&base_url) {
        Ok(url) if url.scheme() == "https" => {}
        Ok(url) if url.scheme() == "http" && url.host_str().is_some_and(is_loopback) => {}
        _ => table.add("graph.base_url", format!("{base_url:?} must be an https URL such as {DEFAULT_GRAPH_BASE_URL} (plain http only to loopback)")),
    }
    if graph.poll_interval == Some(0) {
        table.add("graph.poll_interval", "must be at least 1 (seconds)");
    }
    GraphConfig {
        folder: graph.folder.trim().to_string(),
        base_url,
        poll_interval: Duration::from_secs(graph.poll_interval.unwrap_or(30)),
    }
}

/// `[parser.imap]`: the server, refusing clear text to a non-loopback host by default.
fn check_imap(imap: &RawImap, config_dir: &Path, table: &mut Table) -> ImapConfig {
    if imap.host.trim().is_empty() {
        table.add("imap.host", "must not be empty");
    }
    if imap.port == 0 {
        table.add(
            "imap.port",
            "must be 1-65535 (993 for ssl, 143 for starttls)",
        );
    }
    if imap.folder.trim().is_empty() {
        table.add("imap.folder", "must not be empty (INBOX is the default)");
    }
    if imap.encryption == Encryption::None && !imap.allow_insecure && !is_loopback(&imap.host) {
        table.add("imap.encryption", format!("\"none\" sends the login in clear text to {}; use \"ssl\" or \"starttls\", or set allow_insecure = true if you really mean it", imap.host));
    }
    let ca_file = imap.ca_file.as_ref().map(|f| config_dir.join(f));
    if let Some(f) = &ca_file
        && !f.is_file()
    {
        table.add(
            "imap.ca_file",
            format!("{} is not a readable file", f.display()),
        );
    }
    ImapConfig {
        host: imap.host.trim().to_string(),
        port: imap.port,
        encryption: imap.encryption,
        folder: imap.folder.clone(),
        ca_file,
        allow_insecure: imap.allow_insecure,
    }
}

/// Loosely an email address: something@something, without white space.
pub(super) fn looks_like_address(s: &str) -> bool {
    let s = s.trim();
    matches!(s.split_once('@'), Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !s.contains(char::is_whitespace))
}

/// True for `localhost` and loopback IP literals: the only places plaintext IMAP is allowed
/// without `allow_insecure`.
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
