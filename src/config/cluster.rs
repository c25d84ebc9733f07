//! `[cluster]`: how this process shares the mailboxes with other replicas of the same
//! configuration (see `src/runtime/leases.rs`).

use super::ClusterConfig;
use super::problems::Problems;
use super::raw::RawCluster;
use std::time::Duration;
use toml::Spanned;

/// The lease TTL when `[cluster] lease_ttl` is not set (seconds).
const DEFAULT_LEASE_TTL: u64 = 15;
/// Shorter leases would be renewed more often than a busy database answers reliably.
const MIN_LEASE_TTL: u64 = 3;
/// Longer leases make a dead replica's mailboxes wait too long.
const MAX_LEASE_TTL: u64 = 600;

/// Checks `[cluster]`; without it, the defaults.
pub(super) fn validate_cluster(
    raw: Option<Spanned<RawCluster>>,
    problems: &mut Problems,
) -> ClusterConfig {
    let at = raw.as_ref().map(|r| r.span().start);
    let raw = raw.map(Spanned::into_inner);
    let ttl = raw
        .as_ref()
        .and_then(|c| c.lease_ttl)
        .unwrap_or(DEFAULT_LEASE_TTL);
    if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl) {
        problems.add(
            "cluster.lease_ttl",
            at,
            format!("{ttl} is out of range: set a number of seconds from {MIN_LEASE_TTL} to {MAX_LEASE_TTL} (default {DEFAULT_LEASE_TTL})"),
        );
    }
    let replica_name = match raw.and_then(|c| c.replica_name) {
        Some(name) => {
            let name = name.trim().to_string();
            if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
                problems.add(
                    "cluster.replica_name",
                    at,
                    "must be 1 to 200 printable characters, unique per running process (or leave it out: host name and process id)",
                );
            }
            name
        }
        None => default_replica_name(),
    };
    ClusterConfig {
        replica_name,
        lease_ttl: Duration::from_secs(ttl),
    }
}

/// The host name and the process id: unique among running processes. (The host name is
/// read from the kernel directly: Linux is the only target, and a crate for one file read
/// is not worth it.)
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mail2ticket".to_string());
    format!("{host}-{}", std::process::id())
}
