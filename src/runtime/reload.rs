//! What a reloaded configuration (SIGHUP) changes for the running daemon: which parsers
//! start, stop or restart, and which changes only a restart of the process can apply.
//! Deciding is a pure function of the two configurations, kept apart from doing it (the
//! supervisor) so that the rules are plain to read and to test:
//! - a parser that is active now and was not (added, or switched to active) starts;
//! - a parser that was active and is not now (removed, or switched to inactive) stops
//!   after its batch in flight;
//! - an active parser whose settings changed, or whose credential changed (a rotated
//!   secret gets a fresh token cache), restarts;
//! - every other parser is not touched: its IMAP session stays open;
//! - `[database]` and `[http] listen` keep their running values until a restart (the
//!   pool and the listener were made from them); `[http] token` applies at once.

use crate::config::{Config, ParserAuth, ParserConfig, ParserStatus};
use std::collections::BTreeMap;

/// What a reload does.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Parsers to start (names, in file order).
    pub start: Vec<String>,
    /// Parsers to stop.
    pub stop: Vec<String>,
    /// Parsers to stop and start again with their new settings.
    pub restart: Vec<String>,
    /// How many running parsers stay as they are.
    pub unchanged: usize,
    /// Changed settings that only a restart of the process applies.
    pub needs_restart: Vec<&'static str>,
}

impl Plan {
    /// One line for the log: "started [a], stopped [], restarted [b], 3 unchanged".
    pub fn summary(&self) -> String {
        format!(
            "started {:?}, stopped {:?}, restarted {:?}, {} unchanged",
            self.start, self.stop, self.restart, self.unchanged
        )
    }
}

/// The active parsers of a configuration, by name.
fn active(config: &Config) -> BTreeMap<&str, &ParserConfig> {
    config
        .parsers
        .iter()
        .filter(|p| p.status == ParserStatus::Active)
        .map(|p| (p.name.as_str(), p))
        .collect()
}

/// What going from `old` to `new` does, given the credentials whose token caches were
/// replaced (see [`TokenSources::reload`](crate::auth::TokenSources::reload)).
pub fn plan(old: &Config, new: &Config, changed_credentials: &[String]) -> Plan {
    let (before, now) = (active(old), active(new));
    let mut plan = Plan::default();
    for p in new
        .parsers
        .iter()
        .filter(|p| now.contains_key(p.name.as_str()))
    {
        match before.get(p.name.as_str()) {
            None => plan.start.push(p.name.clone()),
            Some(was) => {
                let credential_changed = matches!(
                    &p.auth,
                    ParserAuth::Credential(c) if changed_credentials.contains(c)
                );
                if *was != p || credential_changed {
                    plan.restart.push(p.name.clone());
                } else {
                    plan.unchanged += 1;
                }
            }
        }
    }
    for p in old.parsers.iter() {
        if before.contains_key(p.name.as_str()) && !now.contains_key(p.name.as_str()) {
            plan.stop.push(p.name.clone());
        }
    }
    if old.database != new.database {
        plan.needs_restart.push("[database]");
    }
    let listen = |c: &Config| c.http.as_ref().map(|h| h.listen);
    if listen(old) != listen(new) {
        plan.needs_restart.push("[http] listen");
    }
    if old.cluster != new.cluster {
        plan.needs_restart.push("[cluster]");
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(parsers: &str, extra: &str) -> Config {
        let text = format!(
            "[database]\nurl = \"postgres://x/y\"\n{extra}\n[[credential]]\nname = \"app\"\ntype = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{parsers}"
        );
        Config::from_toml(Path::new("t.toml"), &text).unwrap()
    }

    fn parser(name: &str, keys: &str) -> String {
        format!(
            "[[parser]]\nname = \"{name}\"\nemail = \"{name}@x.test\"\ncredential = \"app\"\n{keys}\n[parser.imap]\nhost = \"127.0.0.1\"\nencryption = \"none\"\n"
        )
    }

    #[test]
    fn added_removed_changed_and_untouched_parsers() {
        let old = config(
            &(parser("same", "")
                + &parser("changed", "")
                + &parser("removed", "")
                + &parser("paused", "")
                + &parser("woken", "status = \"inactive\"")),
            "",
        );
        let new = config(
            &(parser("same", "")
                + &parser("changed", "max_message_size = 1000")
                + &parser("paused", "status = \"inactive\"")
                + &parser("woken", "")
                + &parser("added", "")),
            "",
        );
        let plan = plan(&old, &new, &[]);
        assert_eq!(plan.start, ["woken", "added"]);
        assert_eq!(plan.stop, ["removed", "paused"]);
        assert_eq!(plan.restart, ["changed"]);
        assert_eq!(plan.unchanged, 1);
        assert!(plan.needs_restart.is_empty());
    }

    #[test]
    fn a_changed_credential_restarts_its_parsers() {
        let c = config(
            &(parser("a", "")
                + &parser("b", "password = \"pw\"").replace("credential = \"app\"\n", "")),
            "",
        );
        let plan = plan(&c, &c, &["app".to_string()]);
        assert_eq!(plan.restart, ["a"]);
        assert_eq!(plan.unchanged, 1);
    }

    #[test]
    fn database_and_listen_changes_need_a_restart_and_a_token_does_not() {
        let old = config(
            &parser("a", ""),
            "[http]\nlisten = \"127.0.0.1:9187\"\ntoken = \"one\"",
        );
        let token = config(
            &parser("a", ""),
            "[http]\nlisten = \"127.0.0.1:9187\"\ntoken = \"two\"",
        );
        assert_eq!(
            plan(&old, &token, &[]),
            Plan {
                unchanged: 1,
                ..Plan::default()
            }
        );
        let moved = config(&parser("a", ""), "[http]\nlisten = \"127.0.0.1:9188\"");
        assert_eq!(plan(&old, &moved, &[]).needs_restart, ["[http] listen"]);
        let text = "[database]\nurl = \"postgres://x/other\"\n[[parser]]\nname = \"a\"\nemail = \"a@x.test\"\npassword = \"pw\"\n[parser.imap]\nhost = \"127.0.0.1\"\nencryption = \"none\"\n";
        let other = Config::from_toml(Path::new("t.toml"), text).unwrap();
        assert!(
            plan(&old, &other, &[])
                .needs_restart
                .contains(&"[database]")
        );
    }
}
