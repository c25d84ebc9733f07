//! The configuration file as serde reads it: unknown keys are errors, with line and column.

use super::{CredentialKind, Encryption, ParserStatus};
use crate::config::secret::SecretSource;
use serde::Deserialize;
use std::path::PathBuf;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) database: Option<RawDatabase>,
    #[serde(default)]
    pub(super) credential: Vec<Spanned<RawCredential>>,
    #[serde(default)]
    pub(super) parser: Vec<Spanned<RawParser>>,
    pub(super) secrets: Option<RawSecrets>,
    pub(super) http: Option<RawHttp>,
    #[serde(default)]
    pub(super) webhook: Vec<Spanned<RawWebhook>>,
    pub(super) events: Option<RawEvents>,
    pub(super) cluster: Option<Spanned<RawCluster>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) replica_name: Option<String>,
    pub(super) lease_ttl: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) name: String,
    pub(super) url: String,
    pub(super) secret: SecretSource,
    pub(super) events: Option<Vec<String>>,
    pub(super) parsers: Option<Vec<String>>,
    pub(super) timeout: Option<u64>,
    #[serde(default)]
    pub(super) include_body: bool,
    #[serde(default)]
    pub(super) allow_insecure: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvents {
    pub(super) keep_days: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) listen: String,
    pub(super) token: Option<SecretSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecrets {
    pub(super) key: Option<SecretSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub(super) url: Option<SecretSource>,
    #[serde(default = "default_max_connections")]
    pub(super) max_connections: u32,
}

fn default_max_connections() -> u32 {
    5
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) kind: CredentialKind,
    pub(super) tenant_id: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<SecretSource>,
    pub(super) certificate: Option<SecretSource>,
    pub(super) private_key: Option<SecretSource>,
    pub(super) username: Option<String>,
    pub(super) password: Option<SecretSource>,
    pub(super) authority: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) graph_scope: Option<String>,
    pub(super) redirect_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawParser {
    pub(super) name: String,
    pub(super) email: String,
    pub(super) username: Option<String>,
    #[serde(default)]
    pub(super) shared_mailbox: bool,
    #[serde(default = "default_status")]
    pub(super) status: ParserStatus,
    #[serde(default = "yes")]
    pub(super) add_attachments: bool,
    #[serde(default)]
    pub(super) add_ccs: bool,
    pub(super) credential: Option<String>,
    pub(super) password: Option<SecretSource>,
    pub(super) max_message_size: Option<ByteSize>,
    pub(super) max_attachment_size: Option<ByteSize>,
    #[serde(default = "yes")]
    pub(super) keep_raw: bool,
    #[serde(default)]
    pub(super) attachments_in_raw: bool,
    pub(super) after: Option<String>,
    pub(super) stale_after: Option<u64>,
    pub(super) start_at: Option<String>,
    pub(super) poll_interval: Option<u64>,
    pub(super) ticket_tag: Option<String>,
    pub(super) max_tickets_per_sender: Option<u32>,
    pub(super) sender_window: Option<u64>,
    pub(super) imap: Option<RawImap>,
    pub(super) graph: Option<RawGraph>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGraph {
    #[serde(default = "default_graph_folder")]
    pub(super) folder: String,
    pub(super) base_url: Option<String>,
    pub(super) poll_interval: Option<u64>,
}

fn default_graph_folder() -> String {
    "inbox".to_string()
}

fn default_status() -> ParserStatus {
    ParserStatus::Active
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawImap {
    pub(super) host: String,
    #[serde(default = "default_port")]
    pub(super) port: u16,
    #[serde(default = "default_encryption")]
    pub(super) encryption: Encryption,
    #[serde(default = "default_folder")]
    pub(super) folder: String,
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) allow_insecure: bool,
}

fn default_port() -> u16 {
    993
}

fn default_encryption() -> Encryption {
    Encryption::Ssl
}

fn default_folder() -> String {
    "INBOX".to_string()
}

/// A size written as bytes (`36700160`) or with a unit (`"35 MB"`, `"512KiB"`).
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    pub(super) fn bytes(&self) -> Result<u64, String> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(text) => parse_byte_size(text),
        }
    }
}

/// Parses "35 MB", "35MiB", "900 kB", "1G" (binary multiples: a mail admin's MB is 2^20).
pub(super) fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size; write e.g. 36700160 or \"35 MB\""))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}`; use B, KB, MB or GB")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
}
