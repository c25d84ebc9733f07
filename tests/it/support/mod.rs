//! Test support: real servers started for the tests, and small helpers.

pub mod dovecot;
pub mod entra;
pub mod env;
pub mod graph;
pub mod postgres;
pub mod proxy;

use std::path::PathBuf;

/// The repository's `tests/corpus` directory.
pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// The corpus messages (`tests/corpus/*.eml`), sorted by name.
pub fn corpus_files() -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    files.sort();
    files
}

/// A configuration file text with one parser named `name` and the given extra parser keys.
pub fn config_text(database_url: &str, parser: &str, extra_parser_keys: &str) -> String {
    format!(
        r#"
[database]
url = "{database_url}"

[[parser]]
name = "{parser}"
email = "support@contoso.com"
password = "not-used-by-ingest"
{extra_parser_keys}
[parser.imap]
host = "127.0.0.1"
port = 143
encryption = "none"
"#
    )
}

/// One parser's lines of a `doctor` report (from "parser NAME" to the next parser).
pub fn doctor_section(report: &str, name: &str) -> String {
    let start = report
        .find(&format!("parser {name}\n"))
        .unwrap_or_else(|| panic!("no {name} in {report}"));
    let rest = &report[start + 1..];
    rest[..rest.find("\nparser ").map_or(rest.len(), |e| e + 1)].to_string()
}

/// A child process killed when the test ends, passed or failed.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
