//! `[database]`: the Postgres URL (or `MAIL2TICKET_DATABASE_URL`) and the pool size.

use super::problems::Problems;
use super::raw::RawDatabase;
use super::{DATABASE_URL_ENV, DatabaseConfig};
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
