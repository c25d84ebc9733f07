//! `[database]`: the Postgres URL (or `MAIL2TICKET_DATABASE_URL`) and the pool size;
//! `[http]`: the operations listener.

use super::problems::Problems;
use super::raw::{RawDatabase, RawHttp};
use super::{DATABASE_URL_ENV, DatabaseConfig, HttpConfig};
use secrecy::SecretString;
use std::path::Path;

/// Checks `[database]` and resolves its URL.
pub(super) fn validate_database(
    raw: Option<RawDatabase>,
    config_dir: &Path,
    problems: &mut Problems,
) -> Option<DatabaseConfig> {
    let max_connections = raw.as_ref().map_or(5, |d| d.max_connections);
    if max_connections == 0 {
        problems.add("database.max_connections", None, "must be at least 1");
    }
    let url = match std::env::var(DATABASE_URL_ENV) {
        Ok(url) if !url.is_empty() => SecretString::from(url),
        _ => match raw.and_then(|d| d.url) {
            Some(source) => match source.resolve(config_dir) {
                Ok(url) => url,
                Err(e) => {
                    problems.add("database.url", None, e);
                    return None;
                }
            },
            None => {
                problems.add(
                    "database.url",
                    None,
                    format!("missing: set [database] url = \"postgres://...\" or the environment variable {DATABASE_URL_ENV}"),
                );
                return None;
            }
        },
    };
    Some(DatabaseConfig {
        url,
        max_connections,
    })
}

/// Checks `[http]`: a parseable address, and a token unless it listens on loopback only
/// (the status names mailboxes and errors; a network should not read it unasked).
pub(super) fn validate_http(
    raw: Option<RawHttp>,
    config_dir: &Path,
    problems: &mut Problems,
) -> Option<HttpConfig> {
    let raw = raw?;
    let Ok(listen) = raw.listen.trim().parse::<std::net::SocketAddr>() else {
        let message = format!(
            "{:?} is not an address and port such as \"127.0.0.1:9187\"",
            raw.listen
        );
        problems.add("http.listen", None, message);
        return None;
    };
    let token = match raw.token.map(|t| t.resolve(config_dir)) {
        None => None,
        Some(Ok(token)) => Some(token),
        Some(Err(e)) => {
            problems.add("http.token", None, e);
            return None;
        }
    };
    if token.is_none() && !listen.ip().is_loopback() {
        problems.add(
            "http.token",
            None,
            format!("missing: {listen} is reachable from the network; set token = {{ env = \"MAIL2TICKET_HTTP_TOKEN\" }} or listen on 127.0.0.1"),
        );
    }
    Some(HttpConfig { listen, token })
}
