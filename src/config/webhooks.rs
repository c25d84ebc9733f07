//! `[[webhook]]` and `[events]`: where events are delivered, signed as the Standard
//! Webhooks specification says, and how long delivered events are kept.

use super::parsers::is_loopback;
use super::problems::{Problems, Table};
use super::raw::{RawEvents, RawWebhook};
use super::{EVENT_KINDS, EventsConfig, ParserConfig, WebhookConfig};
use base64::Engine;
use secrecy::ExposeSecret;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// Checks every `[[webhook]]` against the parsers and the event kinds.
pub(super) fn validate_webhooks(
    raw: &[Spanned<RawWebhook>],
    parsers: &[ParserConfig],
    config_dir: &Path,
    problems: &mut Problems,
) -> Vec<WebhookConfig> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, spanned) in raw.iter().enumerate() {
        let mut table = Table::new(problems, format!("webhook[{i}]"), spanned.span().start);
        let w = spanned.get_ref();
        let name = w.name.trim().to_string();
        if name.is_empty() || name.chars().any(char::is_control) {
            table.add(
                "name",
                "must be a non-empty name without control characters",
            );
        } else if !seen.insert(name.clone()) {
            table.add("name", format!("a webhook named {name:?} is already defined; names must be unique (they key the delivery rows)"));
        }
        let url = match url::Url::parse(w.url.trim()) {
            Ok(url) if url.scheme() == "https" => Some(url),
            Ok(url)
                if url.scheme() == "http"
                    && (w.allow_insecure || url.host_str().is_some_and(is_loopback)) =>
            {
                Some(url)
            }
            Ok(url) if url.scheme() == "http" => {
                table.add("url", format!("{url} sends events in clear text; use https, or set allow_insecure = true if you really mean it"));
                None
            }
            _ => {
                table.add("url", format!("{:?} is not an http(s) URL", w.url));
                None
            }
        };
        let secret = match w.secret.resolve(config_dir) {
            Ok(secret) => match signing_key(secret.expose_secret()) {
                Ok(_) => Some(secret),
                Err(e) => {
                    table.add("secret", e);
                    None
                }
            },
            Err(e) => {
                table.add("secret", e);
                None
            }
        };
        for kind in w.events.iter().flatten() {
            if !EVENT_KINDS.contains(&kind.as_str()) {
                table.add(
                    "events",
                    format!("{kind:?} is not an event kind; use some of {EVENT_KINDS:?}"),
                );
            }
        }
        for parser in w.parsers.iter().flatten() {
            if !parsers.iter().any(|p| &p.name == parser) {
                table.add("parsers", format!("no [[parser]] is named {parser:?}"));
            }
        }
        if w.timeout == Some(0) {
            table.add("timeout", "must be at least 1 (seconds)");
        }
        let (Some(url), Some(secret)) = (url, secret) else {
            continue;
        };
        out.push(WebhookConfig {
            name,
            url: url.to_string(),
            secret,
            events: w.events.clone(),
            parsers: w.parsers.clone(),
            timeout: Duration::from_secs(w.timeout.unwrap_or(10)),
            include_body: w.include_body,
        });
    }
    out
}

/// The signing key of a Standard Webhooks secret: `whsec_` and the base64 of 24 to 64
/// random bytes.
pub(super) fn signing_key(secret: &str) -> Result<Vec<u8>, String> {
    let fix = "write it as \"whsec_\" followed by the base64 of 24 to 64 random bytes (openssl rand -base64 32)";
    let Some(encoded) = secret.trim().strip_prefix("whsec_") else {
        return Err(format!("does not start with \"whsec_\"; {fix}"));
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| format!("is not base64 after \"whsec_\"; {fix}"))?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!("holds {} bytes; {fix}", key.len()));
    }
    Ok(key)
}

/// `[events]`.
pub(super) fn validate_events(raw: Option<RawEvents>, problems: &mut Problems) -> EventsConfig {
    let keep_days = raw.and_then(|e| e.keep_days).unwrap_or(30);
    if keep_days == 0 {
        problems.add("events.keep_days", None, "must be at least 1 (days)");
    }
    EventsConfig { keep_days }
}
