//! The TOML configuration: schema, loading, validation.
//!
//! Loading is two steps: serde reads the file into `Raw*` structs (unknown keys are errors,
//! with line and column from the TOML parser), then [`Config::load`] checks what serde
//! cannot (references between tables, required keys per credential type, unsafe settings)
//! and resolves secrets. Every error names the file, the key and what to do about it, and
//! all of them are reported at once so that one `check-config` run shows everything.

pub mod secret;

use crate::config::secret::SecretSource;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Environment variable that overrides `[database] url` (containers pass the URL this way).
pub const DATABASE_URL_ENV: &str = "MAIL2TICKET_DATABASE_URL";
/// Default `authority` for Entra ID token requests.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// Default scope for app-only IMAP access to Exchange Online.
pub const DEFAULT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// Default scope of the resource-owner password grant.
pub const DEFAULT_PASSWORD_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
/// Default scope of a delegated sign-in: IMAP as the user, plus a refresh token.
pub const DEFAULT_DELEGATED_SCOPE: &str =
    "https://outlook.office.com/IMAP.AccessAsUser.All offline_access";
/// Shortest `[secrets] key` accepted, in bytes.
pub const MIN_SECRETS_KEY_LEN: usize = 32;
/// Default largest attachment whose content is stored: 25 MiB.
pub const DEFAULT_MAX_ATTACHMENT_SIZE: u64 = 25 * 1024 * 1024;
/// Default subject tag: "[#42]" threads onto ticket 42.
pub const DEFAULT_TICKET_TAG: &str = "[#{id}]";
/// Default largest message turned into a ticket: 35 MiB, Exchange Online's default limit.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 35 * 1024 * 1024;

/// The validated configuration the program runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from (for messages).
    pub path: PathBuf,
    /// Where tickets are stored.
    pub database: DatabaseConfig,
    /// OAuth identities, each usable by many parsers.
    pub credentials: Vec<CredentialConfig>,
    /// The mailboxes read into tickets.
    pub parsers: Vec<ParserConfig>,
    /// `[secrets] key`: encrypts the refresh tokens of delegated credentials in the
    /// database. Required when a delegated credential exists.
    pub secrets_key: Option<SecretString>,
}

/// `[database]`: the Postgres that holds tickets.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Connection URL; may hold a password, hence secret.
    pub url: SecretString,
    /// Pool size.
    pub max_connections: u32,
}

/// Which OAuth flow a credential uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// Entra ID app-only access (client credentials grant).
    ClientCredentials,
    /// A user's username and password (resource-owner password grant).
    Password,
    /// A user signed in once with `mail2ticket login`; refreshed with its refresh token.
    Delegated,
}

impl CredentialKind {
    /// The name written in `type = "..."`.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ClientCredentials => "client_credentials",
            CredentialKind::Password => "password",
            CredentialKind::Delegated => "delegated",
        }
    }
}

/// How the application proves its own identity to the token endpoint.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// No proof: a public client (password and delegated flows only).
    Public,
    /// A client secret.
    Secret(SecretString),
    /// A certificate: a client assertion signed with its private key.
    Certificate(ClientCertificate),
}

/// A certificate registered on the App Registration, and its private key.
#[derive(Clone)]
pub struct ClientCertificate {
    /// base64url SHA-256 of the certificate (DER): the assertion's `x5t#S256` header.
    pub thumbprint_s256: String,
    /// The RSA private key (PEM), checked to be usable when the configuration loads.
    pub private_key_pem: SecretString,
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("thumbprint_s256", &self.thumbprint_s256)
            .field("private_key_pem", &"[REDACTED]")
            .finish()
    }
}

/// `[[credential]]`: an OAuth identity. Many parsers may share one (one token cache).
#[derive(Debug, Clone)]
pub struct CredentialConfig {
    /// Name parsers refer to.
    pub name: String,
    /// The OAuth flow.
    pub kind: CredentialKind,
    /// Entra "Directory ID".
    pub tenant_id: String,
    /// Entra "Application ID".
    pub client_id: String,
    /// How the application authenticates itself.
    pub client_auth: ClientAuth,
    /// The user of a `password` credential.
    pub user: Option<PasswordUser>,
    /// Token endpoint base, e.g. `https://login.microsoftonline.com`.
    pub authority: String,
    /// Requested scope.
    pub scope: String,
    /// Loopback port `mail2ticket login` listens on for the redirect (0: any free port).
    pub redirect_port: u16,
}

impl CredentialConfig {
    /// `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.authority, self.tenant_id)
    }

    /// `{authority}/{tenant}/oauth2/v2.0/{endpoint}` (authorize, devicecode).
    pub fn endpoint_url(&self, endpoint: &str) -> String {
        format!(
            "{}/{}/oauth2/v2.0/{endpoint}",
            self.authority, self.tenant_id
        )
    }
}

/// The username and password of a `type = "password"` credential.
#[derive(Debug, Clone)]
pub struct PasswordUser {
    /// The user principal name that signs in.
    pub username: String,
    /// Its password.
    pub password: SecretString,
}

/// Whether a parser runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParserStatus {
    /// Polled by `run`.
    Active,
    /// Kept in the file but not polled (ingest still accepts it explicitly).
    Inactive,
}

/// How a parser authenticates to its IMAP server.
#[derive(Debug, Clone)]
pub enum ParserAuth {
    /// XOAUTH2 with a token from the named `[[credential]]`.
    Credential(String),
    /// Plain LOGIN with a password (non-Microsoft servers).
    Password(SecretString),
}

/// `[[parser]]`: one mailbox read into tickets (an "Email Parser").
#[derive(Debug, Clone)]
pub struct ParserConfig {
    /// Unique name, the key of this parser's rows in the database.
    pub name: String,
    /// The mailbox read (for Microsoft 365: the shared mailbox address).
    pub email: String,
    /// The identity that logs in (defaults to `email`).
    pub username: String,
    /// XOAUTH2 `user=` is `email` when true, `username` when false.
    pub shared_mailbox: bool,
    /// Active or inactive.
    pub status: ParserStatus,
    /// Store attachments with the ticket.
    pub add_attachments: bool,
    /// Add Cc (and other To) addresses as ticket participants.
    pub add_ccs: bool,
    /// How to log in.
    pub auth: ParserAuth,
    /// Messages larger than this (bytes) are quarantined instead of ticketed.
    pub max_message_size: u64,
    /// Attachments larger than this (bytes) are stored as a stub (name, type, size).
    pub max_attachment_size: u64,
    /// Keep every message's raw bytes beside its ticket message.
    pub keep_raw: bool,
    /// What to do on the server with a message once its rows are committed.
    pub after: AfterIngest,
    /// Which of the messages already in the folder at first contact become tickets.
    pub start_at: StartAt,
    /// How often to look for new mail when the server has no IDLE.
    pub poll_interval: std::time::Duration,
    /// Subject tag that threads a message onto a ticket; `{id}` stands for the ticket id.
    pub ticket_tag: String,
    /// More new tickets than this from one sender within `sender_window` are not opened.
    pub max_tickets_per_sender: u32,
    /// The window of the loop protection.
    pub sender_window: std::time::Duration,
    /// The IMAP server.
    pub imap: ImapConfig,
}

/// `after`: what happens on the IMAP server to a message whose rows are committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterIngest {
    /// Set `\Seen` (`"mark_seen"`, the default).
    MarkSeen,
    /// Leave it alone (`"none"`).
    Nothing,
    /// Move it to a folder (`"move:<folder>"`).
    Move(String),
    /// Delete it (`"delete"`).
    Delete,
}

impl AfterIngest {
    fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "mark_seen" => Ok(AfterIngest::MarkSeen),
            "none" => Ok(AfterIngest::Nothing),
            "delete" => Ok(AfterIngest::Delete),
            other => match other.strip_prefix("move:") {
                Some(folder) if !folder.trim().is_empty() => {
                    Ok(AfterIngest::Move(folder.trim().to_string()))
                }
                _ => Err(format!(
                    "{other:?} is not one of \"mark_seen\", \"none\", \"move:<folder>\", \"delete\""
                )),
            },
        }
    }
}

/// `start_at`: which messages already in the folder when mail2ticket first meets it (no
/// checkpoint yet) are taken; everything that arrives later is always taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The messages without `\Seen` (`"unseen"`, the default).
    Unseen,
    /// Every message in the folder (`"all"`).
    All,
    /// None of them: only mail that arrives from now on (`"now"`).
    Now,
    /// Those that arrived (INTERNALDATE) on or after this day (`"2026-11-01"`).
    Since(chrono::NaiveDate),
}

impl StartAt {
    fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "unseen" => Ok(StartAt::Unseen),
            "all" => Ok(StartAt::All),
            "now" => Ok(StartAt::Now),
            other => chrono::NaiveDate::parse_from_str(other, "%Y-%m-%d")
                .map(StartAt::Since)
                .map_err(|_| {
                    format!("{other:?} is not one of \"unseen\", \"all\", \"now\" or a date like \"2026-11-01\"")
                }),
        }
    }
}

impl std::fmt::Display for StartAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartAt::Unseen => f.write_str("unseen"),
            StartAt::All => f.write_str("all"),
            StartAt::Now => f.write_str("now"),
            StartAt::Since(day) => write!(f, "{}", day.format("%Y-%m-%d")),
        }
    }
}

impl ParserConfig {
    /// The `user=` of XOAUTH2 (and the LOGIN user): the mailbox to open.
    pub fn login_user(&self) -> &str {
        if self.shared_mailbox {
            &self.email
        } else {
            &self.username
        }
    }
}

/// Transport security of the IMAP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encryption {
    /// Implicit TLS (port 993).
    Ssl,
    /// Plain connection upgraded with STARTTLS.
    Starttls,
    /// No encryption: refused to non-loopback hosts unless `allow_insecure = true`.
    None,
}

/// `[parser.imap]`: where the mailbox lives.
#[derive(Debug, Clone)]
pub struct ImapConfig {
    /// Server host name.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Transport security.
    pub encryption: Encryption,
    /// Folder searched for new mail.
    pub folder: String,
    /// Extra trust root (PEM) besides the system's web roots.
    pub ca_file: Option<PathBuf>,
    /// Allow `encryption = "none"` to a non-loopback host.
    pub allow_insecure: bool,
}

// ---------------------------------------------------------------------------------------
// The file as serde reads it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: Option<RawDatabase>,
    #[serde(default)]
    credential: Vec<Spanned<RawCredential>>,
    #[serde(default)]
    parser: Vec<Spanned<RawParser>>,
    secrets: Option<RawSecrets>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecrets {
    key: Option<SecretSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<SecretSource>,
    #[serde(default = "default_max_connections")]
    max_connections: u32,
}

fn default_max_connections() -> u32 {
    5
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    name: String,
    #[serde(rename = "type")]
    kind: CredentialKind,
    tenant_id: Option<String>,
    client_id: Option<String>,
    client_secret: Option<SecretSource>,
    certificate: Option<SecretSource>,
    private_key: Option<SecretSource>,
    username: Option<String>,
    password: Option<SecretSource>,
    authority: Option<String>,
    scope: Option<String>,
    redirect_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParser {
    name: String,
    email: String,
    username: Option<String>,
    #[serde(default)]
    shared_mailbox: bool,
    #[serde(default = "default_status")]
    status: ParserStatus,
    #[serde(default = "yes")]
    add_attachments: bool,
    #[serde(default)]
    add_ccs: bool,
    credential: Option<String>,
    password: Option<SecretSource>,
    max_message_size: Option<ByteSize>,
    max_attachment_size: Option<ByteSize>,
    #[serde(default = "yes")]
    keep_raw: bool,
    after: Option<String>,
    start_at: Option<String>,
    poll_interval: Option<u64>,
    ticket_tag: Option<String>,
    max_tickets_per_sender: Option<u32>,
    sender_window: Option<u64>,
    imap: RawImap,
}

fn default_status() -> ParserStatus {
    ParserStatus::Active
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImap {
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_encryption")]
    encryption: Encryption,
    #[serde(default = "default_folder")]
    folder: String,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    allow_insecure: bool,
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
enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(text) => parse_byte_size(text),
        }
    }
}

/// Parses "35 MB", "35MiB", "900 kB", "1G" (binary multiples: a mail admin's MB is 2^20).
fn parse_byte_size(text: &str) -> Result<u64, String> {
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

// ---------------------------------------------------------------------------------------
// Errors.

/// One problem in the configuration file, located as precisely as we can.
#[derive(Debug, Clone)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `parser[1].imap.port` (empty for a syntax error).
    pub key: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// The problems, in file order where known.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.path.display())?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
                if let Some(column) = p.column {
                    write!(f, ":{column}")?;
                }
            }
            if p.key.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": key `{}`: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

/// Collects problems with the line of the table they belong to.
struct Problems<'a> {
    text: &'a str,
    list: Vec<ConfigProblem>,
}

impl Problems<'_> {
    fn add(
        &mut self,
        key: impl Into<String>,
        span_start: Option<usize>,
        message: impl Into<String>,
    ) {
        let line = span_start.map(|offset| line_of(self.text, offset));
        self.list.push(ConfigProblem {
            key: key.into(),
            line,
            column: None,
            message: message.into(),
        });
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn column_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |p| p + 1);
    text[line_start..offset].chars().count() + 1
}

// ---------------------------------------------------------------------------------------
// Loading.

impl Config {
    /// Reads, validates and resolves a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |message: String| ConfigError {
            path: path.to_path_buf(),
            problems: vec![ConfigProblem {
                key: String::new(),
                line: None,
                column: None,
                message,
            }],
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(format!("cannot read the configuration file: {e}")))?;
        Self::from_toml(path, &text)
    }

    /// Validates configuration text; `path` is used for messages and relative paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let start = e.span().map(|s| s.start);
            ConfigError {
                path: path.to_path_buf(),
                problems: vec![ConfigProblem {
                    key: String::new(),
                    line: start.map(|s| line_of(text, s)),
                    column: start.map(|s| column_of(text, s)),
                    message: e.message().trim_end().to_string(),
                }],
            }
        })?;
        let config_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut problems = Problems {
            text,
            list: Vec::new(),
        };
        let database = validate_database(raw.database, &config_dir, &mut problems);
        let credentials = validate_credentials(&raw.credential, &config_dir, &mut problems);
        let parsers = validate_parsers(&raw.parser, &credentials, &config_dir, &mut problems);
        let secrets_key = validate_secrets(raw.secrets, &credentials, &config_dir, &mut problems);
        if !problems.list.is_empty() {
            return Err(ConfigError {
                path: path.to_path_buf(),
                problems: problems.list,
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            database: database.expect("no problems means a database"),
            credentials,
            parsers,
            secrets_key,
        })
    }

    /// The parser of that name.
    pub fn parser(&self, name: &str) -> Option<&ParserConfig> {
        self.parsers.iter().find(|p| p.name == name)
    }
}

fn validate_database(
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

fn validate_credentials(
    raw: &[Spanned<RawCredential>],
    config_dir: &Path,
    problems: &mut Problems,
) -> Vec<CredentialConfig> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, spanned) in raw.iter().enumerate() {
        let at = Some(spanned.span().start);
        let c = spanned.get_ref();
        let key = |field: &str| format!("credential[{i}].{field}");
        if c.name.trim().is_empty() {
            problems.add(key("name"), at, "must not be empty");
        } else if !seen.insert(c.name.clone()) {
            problems.add(
                key("name"),
                at,
                format!(
                    "a credential named {:?} is already defined; names must be unique",
                    c.name
                ),
            );
        }
        let kind = c.kind.as_str();
        let mut required = |field: &str, value: &Option<String>| -> String {
            match value.as_deref().map(str::trim) {
                Some(v) if !v.is_empty() => v.to_string(),
                _ => {
                    problems.add(
                        key(field),
                        at,
                        format!("missing: a {kind:?} credential needs {field}"),
                    );
                    String::new()
                }
            }
        };
        let tenant_id = required("tenant_id", &c.tenant_id);
        let client_id = required("client_id", &c.client_id);
        let client_auth = validate_client_auth(c, config_dir, &key, at, problems);
        let user = match c.kind {
            CredentialKind::Password => {
                let username = match c.username.as_deref().map(str::trim) {
                    Some(u) if looks_like_address(u) => u.to_string(),
                    _ => {
                        problems.add(
                            key("username"),
                            at,
                            "missing: a \"password\" credential needs username = \"user@tenant.com\" (the user principal name that signs in)",
                        );
                        String::new()
                    }
                };
                let password = match &c.password {
                    Some(source) => {
                        resolve_secret(source, config_dir, &key("password"), at, problems)
                    }
                    None => {
                        problems.add(
                            key("password"),
                            at,
                            "missing: set password = { env = \"VAR\" } (or { file = \"...\" })",
                        );
                        SecretString::from(String::new())
                    }
                };
                Some(PasswordUser { username, password })
            }
            _ => {
                for (field, set) in [
                    ("username", c.username.is_some()),
                    ("password", c.password.is_some()),
                ] {
                    if set {
                        problems.add(key(field), at, format!("only a \"password\" credential has {field}; remove it (a {kind:?} credential does not sign in with a password)"));
                    }
                }
                None
            }
        };
        if c.redirect_port.is_some() && c.kind != CredentialKind::Delegated {
            problems.add(
                key("redirect_port"),
                at,
                "only a \"delegated\" credential has redirect_port; remove it",
            );
        }
        let authority = c
            .authority
            .clone()
            .unwrap_or_else(|| DEFAULT_AUTHORITY.to_string())
            .trim_end_matches('/')
            .to_string();
        if !(authority.starts_with("https://") || authority.starts_with("http://")) {
            problems.add(
                key("authority"),
                at,
                format!("must be an http(s) URL such as {DEFAULT_AUTHORITY}"),
            );
        }
        let default_scope = match c.kind {
            CredentialKind::ClientCredentials => DEFAULT_APP_SCOPE,
            CredentialKind::Password => DEFAULT_PASSWORD_SCOPE,
            CredentialKind::Delegated => DEFAULT_DELEGATED_SCOPE,
        };
        let scope = c.scope.clone().unwrap_or_else(|| default_scope.to_string());
        if c.kind == CredentialKind::Delegated
            && !scope.split_whitespace().any(|s| s == "offline_access")
        {
            problems.add(
                key("scope"),
                at,
                format!("a delegated credential needs offline_access in its scope (or it gets no refresh token); use {DEFAULT_DELEGATED_SCOPE:?}"),
            );
        }
        out.push(CredentialConfig {
            name: c.name.clone(),
            kind: c.kind,
            tenant_id,
            client_id,
            client_auth,
            user,
            authority,
            scope,
            redirect_port: c.redirect_port.unwrap_or(0),
        });
    }
    out
}

fn resolve_secret(
    source: &SecretSource,
    config_dir: &Path,
    key: &str,
    at: Option<usize>,
    problems: &mut Problems,
) -> SecretString {
    source.resolve(config_dir).unwrap_or_else(|e| {
        problems.add(key, at, e);
        SecretString::from(String::new())
    })
}

/// A client secret, a certificate, or neither (public client), by credential type.
fn validate_client_auth(
    c: &RawCredential,
    config_dir: &Path,
    key: &dyn Fn(&str) -> String,
    at: Option<usize>,
    problems: &mut Problems,
) -> ClientAuth {
    match (&c.client_secret, &c.certificate, &c.private_key) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            problems.add(
                key("client_secret"),
                at,
                "set either client_secret or certificate + private_key, not both",
            );
            ClientAuth::Public
        }
        (Some(secret), None, None) => ClientAuth::Secret(resolve_secret(
            secret,
            config_dir,
            &key("client_secret"),
            at,
            problems,
        )),
        (None, Some(certificate), Some(private_key)) => {
            let certificate =
                resolve_secret(certificate, config_dir, &key("certificate"), at, problems);
            let private_key =
                resolve_secret(private_key, config_dir, &key("private_key"), at, problems);
            if certificate.expose_secret().is_empty() || private_key.expose_secret().is_empty() {
                return ClientAuth::Public;
            }
            match crate::auth::assertion::load_certificate(certificate.expose_secret(), private_key)
            {
                Ok(cert) => ClientAuth::Certificate(cert),
                Err(crate::auth::assertion::CertificateError::Certificate(e)) => {
                    problems.add(key("certificate"), at, e);
                    ClientAuth::Public
                }
                Err(crate::auth::assertion::CertificateError::PrivateKey(e)) => {
                    problems.add(key("private_key"), at, e);
                    ClientAuth::Public
                }
            }
        }
        (None, Some(_), None) => {
            problems.add(key("private_key"), at, "missing: a certificate needs its private key: private_key = { file = \"app.key\" } (PEM, RSA)");
            ClientAuth::Public
        }
        (None, None, Some(_)) => {
            problems.add(key("certificate"), at, "missing: a private_key needs its certificate: certificate = { file = \"app.pem\" } (the one uploaded to the App Registration)");
            ClientAuth::Public
        }
        (None, None, None) => {
            if c.kind == CredentialKind::ClientCredentials {
                problems.add(
                    key("client_secret"),
                    at,
                    "missing: set client_secret = { env = \"VAR\" } (or { file = \"...\" }), or certificate = { file = \"app.pem\" } and private_key = { file = \"app.key\" }",
                );
            }
            ClientAuth::Public
        }
    }
}

fn validate_secrets(
    raw: Option<RawSecrets>,
    credentials: &[CredentialConfig],
    config_dir: &Path,
    problems: &mut Problems,
) -> Option<SecretString> {
    let needed_by = credentials
        .iter()
        .find(|c| c.kind == CredentialKind::Delegated)
        .map(|c| c.name.clone());
    let key = match raw.and_then(|s| s.key) {
        Some(source) => source
            .resolve(config_dir)
            .map_err(|e| problems.add("secrets.key", None, e))
            .ok()?,
        None => {
            if let Some(name) = needed_by {
                problems.add(
                    "secrets.key",
                    None,
                    format!("missing: the delegated credential {name:?} keeps its refresh token in the database, encrypted with this key; add [secrets] key = {{ env = \"MAIL2TICKET_KEY\" }} and set it to {MIN_SECRETS_KEY_LEN}+ random bytes (e.g. openssl rand -base64 32)"),
                );
            }
            return None;
        }
    };
    if key.expose_secret().len() < MIN_SECRETS_KEY_LEN {
        problems.add(
            "secrets.key",
            None,
            format!("too short: use at least {MIN_SECRETS_KEY_LEN} random bytes (e.g. openssl rand -base64 32)"),
        );
        return None;
    }
    Some(key)
}

fn validate_parsers(
    raw: &[Spanned<RawParser>],
    credentials: &[CredentialConfig],
    config_dir: &Path,
    problems: &mut Problems,
) -> Vec<ParserConfig> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, spanned) in raw.iter().enumerate() {
        let at = Some(spanned.span().start);
        let p = spanned.get_ref();
        let key = |field: &str| format!("parser[{i}].{field}");
        let name = p.name.trim().to_string();
        if name.is_empty() || name.chars().any(char::is_control) {
            problems.add(
                key("name"),
                at,
                "must be a non-empty name without control characters",
            );
        } else if !seen.insert(name.clone()) {
            problems.add(
                key("name"),
                at,
                format!("a parser named {name:?} is already defined; names must be unique (they key the database rows)"),
            );
        }
        if !looks_like_address(&p.email) {
            problems.add(
                key("email"),
                at,
                format!("{:?} is not an email address", p.email),
            );
        }
        let username = p.username.clone().unwrap_or_else(|| p.email.clone());
        // Only an XOAUTH2 `user=` names a Microsoft 365 mailbox and must be an address;
        // IMAP LOGIN on other servers takes names like `jdoe` or `DOMAIN\jdoe`.
        let username_is_xoauth2_user = p.credential.is_some() && !p.shared_mailbox;
        if username.trim().is_empty() || username.chars().any(char::is_control) {
            problems.add(
                key("username"),
                at,
                "must not be empty or contain control characters",
            );
        } else if username_is_xoauth2_user && !looks_like_address(&username) {
            problems.add(
                key("username"),
                at,
                format!("{username:?} is not an email address; with a credential and shared_mailbox = false it is the XOAUTH2 user= (the mailbox's address). Plain usernames work with password = ... (IMAP LOGIN)"),
            );
        }
        let auth = match (&p.credential, &p.password) {
            (Some(_), Some(_)) => {
                problems.add(
                    key("credential"),
                    at,
                    "set either credential (OAuth) or password (plain LOGIN), not both",
                );
                None
            }
            (None, None) => {
                problems.add(
                    key("credential"),
                    at,
                    "missing: name a [[credential]] (credential = \"...\") or set password = { env = \"VAR\" }",
                );
                None
            }
            (Some(name), None) => {
                if !credentials.iter().any(|c| &c.name == name) {
                    let known: Vec<&str> = credentials.iter().map(|c| c.name.as_str()).collect();
                    problems.add(
                        key("credential"),
                        at,
                        format!("no [[credential]] is named {name:?} (defined: {known:?}); fix the name or add that credential"),
                    );
                }
                Some(ParserAuth::Credential(name.clone()))
            }
            (None, Some(source)) => match source.resolve(config_dir) {
                Ok(secret) => Some(ParserAuth::Password(secret)),
                Err(e) => {
                    problems.add(key("password"), at, e);
                    None
                }
            },
        };
        let max_message_size = match &p.max_message_size {
            None => DEFAULT_MAX_MESSAGE_SIZE,
            Some(size) => size.bytes().unwrap_or_else(|e| {
                problems.add(key("max_message_size"), at, e);
                DEFAULT_MAX_MESSAGE_SIZE
            }),
        };
        if max_message_size == 0 {
            problems.add(key("max_message_size"), at, "must be larger than 0");
        }
        let max_attachment_size = match &p.max_attachment_size {
            None => DEFAULT_MAX_ATTACHMENT_SIZE,
            Some(size) => size.bytes().unwrap_or_else(|e| {
                problems.add(key("max_attachment_size"), at, e);
                DEFAULT_MAX_ATTACHMENT_SIZE
            }),
        };
        let after = match &p.after {
            None => AfterIngest::MarkSeen,
            Some(text) => AfterIngest::parse(text).unwrap_or_else(|e| {
                problems.add(key("after"), at, e);
                AfterIngest::MarkSeen
            }),
        };
        let start_at = match &p.start_at {
            None => StartAt::Unseen,
            Some(text) => StartAt::parse(text).unwrap_or_else(|e| {
                problems.add(key("start_at"), at, e);
                StartAt::Unseen
            }),
        };
        let poll_interval = std::time::Duration::from_secs(p.poll_interval.unwrap_or(60));
        if p.poll_interval == Some(0) {
            problems.add(key("poll_interval"), at, "must be at least 1 (seconds)");
        }
        let ticket_tag = p
            .ticket_tag
            .clone()
            .unwrap_or_else(|| DEFAULT_TICKET_TAG.to_string());
        if ticket_tag.matches("{id}").count() != 1 {
            problems.add(
                key("ticket_tag"),
                at,
                format!("{ticket_tag:?} must contain {{id}} exactly once, e.g. \"[#{{id}}]\""),
            );
        }
        let max_tickets_per_sender = p.max_tickets_per_sender.unwrap_or(20);
        let sender_window = std::time::Duration::from_secs(p.sender_window.unwrap_or(600));
        if p.sender_window == Some(0) {
            problems.add(key("sender_window"), at, "must be at least 1 (seconds)");
        }
        let imap = &p.imap;
        if imap.host.trim().is_empty() {
            problems.add(key("imap.host"), at, "must not be empty");
        }
        if imap.port == 0 {
            problems.add(
                key("imap.port"),
                at,
                "must be 1-65535 (993 for ssl, 143 for starttls)",
            );
        }
        if imap.folder.trim().is_empty() {
            problems.add(
                key("imap.folder"),
                at,
                "must not be empty (INBOX is the default)",
            );
        }
        if imap.encryption == Encryption::None && !imap.allow_insecure && !is_loopback(&imap.host) {
            problems.add(
                key("imap.encryption"),
                at,
                format!("\"none\" sends the login in clear text to {}; use \"ssl\" or \"starttls\", or set allow_insecure = true if you really mean it", imap.host),
            );
        }
        let ca_file = imap.ca_file.as_ref().map(|f| config_dir.join(f));
        if let Some(f) = &ca_file
            && !f.is_file()
        {
            problems.add(
                key("imap.ca_file"),
                at,
                format!("{} is not a readable file", f.display()),
            );
        }
        let Some(auth) = auth else { continue };
        out.push(ParserConfig {
            name,
            email: p.email.trim().to_string(),
            username: username.trim().to_string(),
            shared_mailbox: p.shared_mailbox,
            status: p.status,
            add_attachments: p.add_attachments,
            add_ccs: p.add_ccs,
            auth,
            max_message_size,
            max_attachment_size,
            keep_raw: p.keep_raw,
            after,
            start_at,
            poll_interval,
            ticket_tag,
            max_tickets_per_sender,
            sender_window,
            imap: ImapConfig {
                host: imap.host.trim().to_string(),
                port: imap.port,
                encryption: imap.encryption,
                folder: imap.folder.clone(),
                ca_file,
                allow_insecure: imap.allow_insecure,
            },
        });
    }
    out
}

fn looks_like_address(s: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[database]
url = "postgres://localhost/x"

[[credential]]
name = "app"
type = "client_credentials"
tenant_id = "t"
client_id = "c"
client_secret = "s3cr3t-value"

[[parser]]
name = "support"
email = "support@contoso.com"
username = "helpdesk@contoso.com"
shared_mailbox = true
credential = "app"
max_message_size = "10 MB"
[parser.imap]
host = "outlook.office365.com"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/etc/m2t.toml"), text)
    }

    #[test]
    fn good_config_gets_defaults() {
        let c = load(GOOD).unwrap();
        let p = &c.parsers[0];
        assert_eq!(p.imap.port, 993);
        assert_eq!(p.imap.encryption, Encryption::Ssl);
        assert_eq!(p.imap.folder, "INBOX");
        assert!(p.add_attachments);
        assert!(!p.add_ccs);
        assert_eq!(p.status, ParserStatus::Active);
        assert_eq!(p.max_message_size, 10 << 20);
        assert_eq!(p.login_user(), "support@contoso.com");
        assert_eq!(p.after, AfterIngest::MarkSeen);
        assert_eq!(p.poll_interval.as_secs(), 60);
        assert_eq!(c.credentials[0].authority, DEFAULT_AUTHORITY);
        assert_eq!(c.credentials[0].scope, DEFAULT_APP_SCOPE);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = load(GOOD).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cr3t-value"), "{debug}");
        assert!(!debug.contains("postgres://localhost/x"), "{debug}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = GOOD.replace("shared_mailbox = true", "shared_mailbox = true\ncolour = 1");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.starts_with("/etc/m2t.toml:"), "{err}");
        assert!(err.contains("colour"), "{err}");
        assert!(
            err.contains("m2t.toml:17:"),
            "line number expected in {err}"
        );
    }

    #[test]
    fn unknown_credential_is_named_with_its_table_line() {
        let text = GOOD.replace("credential = \"app\"", "credential = \"nope\"");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("parser[0].credential"), "{err}");
        assert!(err.contains("\"nope\""), "{err}");
        assert!(
            err.contains("m2t.toml:12:"),
            "the [[parser]] line expected in {err}"
        );
    }

    #[test]
    fn plaintext_imap_to_a_remote_host_is_refused() {
        let text = GOOD.replace(
            "host = \"outlook.office365.com\"",
            "host = \"imap.example.com\"\nencryption = \"none\"",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("parser[0].imap.encryption"), "{err}");
        let text = text.replace(
            "encryption = \"none\"",
            "encryption = \"none\"\nallow_insecure = true",
        );
        load(&text).unwrap();
        let local = GOOD.replace(
            "host = \"outlook.office365.com\"",
            "host = \"127.0.0.1\"\nencryption = \"none\"",
        );
        load(&local).unwrap();
    }

    #[test]
    fn all_problems_are_reported_together() {
        let text = GOOD
            .replace("tenant_id = \"t\"\n", "")
            .replace("email = \"support@contoso.com\"", "email = \"nobody\"");
        let err = load(&text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"credential[0].tenant_id"), "{keys:?}");
        assert!(keys.contains(&"parser[0].email"), "{keys:?}");
    }

    #[test]
    fn duplicate_parser_names_are_refused() {
        let second = &GOOD[GOOD.find("[[parser]]").unwrap()..];
        let text = format!("{GOOD}\n{second}");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("already defined"), "{err}");
    }

    fn credential(body: &str) -> String {
        GOOD.replace(
            "type = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s3cr3t-value\"\n",
            body,
        )
    }

    #[test]
    fn password_credentials_need_a_user_and_get_the_delegated_imap_scope() {
        let c = load(&credential(
            "type = \"password\"\ntenant_id = \"t\"\nclient_id = \"c\"\nusername = \"agent@contoso.com\"\npassword = \"pw-value-123\"\n",
        ))
        .unwrap();
        let cred = &c.credentials[0];
        assert_eq!(cred.kind, CredentialKind::Password);
        assert_eq!(cred.scope, DEFAULT_PASSWORD_SCOPE);
        assert!(matches!(cred.client_auth, ClientAuth::Public));
        assert_eq!(cred.user.as_ref().unwrap().username, "agent@contoso.com");
        assert!(!format!("{c:?}").contains("pw-value-123"));
        let err = load(&credential(
            "type = \"password\"\ntenant_id = \"t\"\nclient_id = \"c\"\n",
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(
            keys.contains(&"credential[0].username") && keys.contains(&"credential[0].password"),
            "{keys:?}"
        );
    }

    #[test]
    fn delegated_credentials_need_the_secrets_key_and_offline_access() {
        let delegated = credential("type = \"delegated\"\ntenant_id = \"t\"\nclient_id = \"c\"\n");
        let err = load(&delegated).unwrap_err().to_string();
        assert!(
            err.contains("key `secrets.key`") && err.contains("MAIL2TICKET_KEY"),
            "{err}"
        );
        let with_key = format!("[secrets]\nkey = \"{}\"\n{delegated}", "k".repeat(40));
        let c = load(&with_key).unwrap();
        assert_eq!(c.credentials[0].scope, DEFAULT_DELEGATED_SCOPE);
        assert_eq!(c.credentials[0].redirect_port, 0);
        assert!(!format!("{c:?}").contains(&"k".repeat(40)));
        let short = format!("[secrets]\nkey = \"short\"\n{delegated}");
        assert!(load(&short).unwrap_err().to_string().contains("too short"));
        let no_offline = with_key.replace(
            "client_id = \"c\"\n",
            "client_id = \"c\"\nscope = \"https://outlook.office.com/IMAP.AccessAsUser.All\"\n",
        );
        let err = load(&no_offline).unwrap_err().to_string();
        assert!(
            err.contains("credential[0].scope") && err.contains("offline_access"),
            "{err}"
        );
    }

    #[test]
    fn client_proof_is_a_secret_or_a_certificate_never_both() {
        let both = GOOD.replace(
            "client_secret = \"s3cr3t-value\"\n",
            "client_secret = \"s3cr3t-value\"\ncertificate = \"x\"\nprivate_key = \"y\"\n",
        );
        assert!(load(&both).unwrap_err().to_string().contains("not both"));
        let none = GOOD.replace("client_secret = \"s3cr3t-value\"\n", "");
        let err = load(&none).unwrap_err().to_string();
        assert!(
            err.contains("credential[0].client_secret") && err.contains("private_key"),
            "{err}"
        );
        let lonely = GOOD.replace(
            "client_secret = \"s3cr3t-value\"\n",
            "certificate = \"x\"\n",
        );
        assert!(
            load(&lonely)
                .unwrap_err()
                .to_string()
                .contains("credential[0].private_key")
        );
        let garbage = GOOD.replace(
            "client_secret = \"s3cr3t-value\"\n",
            "certificate = \"not a pem\"\nprivate_key = \"secret-key-text\"\n",
        );
        let err = load(&garbage).unwrap_err().to_string();
        assert!(
            err.contains("credential[0].certificate") && !err.contains("secret-key-text"),
            "{err}"
        );
        let port = GOOD.replace(
            "client_secret = \"s3cr3t-value\"\n",
            "client_secret = \"s3cr3t-value\"\nredirect_port = 8400\n",
        );
        assert!(
            load(&port)
                .unwrap_err()
                .to_string()
                .contains("credential[0].redirect_port")
        );
    }

    #[test]
    fn after_actions() {
        assert_eq!(
            AfterIngest::parse("move:Done").unwrap(),
            AfterIngest::Move("Done".into())
        );
        assert_eq!(AfterIngest::parse("delete").unwrap(), AfterIngest::Delete);
        assert!(AfterIngest::parse("move:").is_err());
        assert!(AfterIngest::parse("archive").is_err());
    }

    #[test]
    fn usernames_must_be_addresses_only_where_they_are_the_xoauth2_user() {
        let password = GOOD
            .replace(
                "username = \"helpdesk@contoso.com\"",
                "username = 'CONTOSO\\jdoe'",
            )
            .replace("credential = \"app\"", "password = \"pw\"");
        let c = load(&password).unwrap();
        assert_eq!(c.parsers[0].username, "CONTOSO\\jdoe");
        // With a credential and shared_mailbox = true, user= is `email`: username is free.
        load(&GOOD.replace("username = \"helpdesk@contoso.com\"", "username = \"jdoe\"")).unwrap();
        // With shared_mailbox = false, username is the XOAUTH2 user= and must be an address.
        let own = GOOD
            .replace("username = \"helpdesk@contoso.com\"", "username = \"jdoe\"")
            .replace("shared_mailbox = true", "shared_mailbox = false");
        let err = load(&own).unwrap_err().to_string();
        assert!(
            err.contains("parser[0].username") && err.contains("XOAUTH2"),
            "{err}"
        );
        let empty = password.replace("username = 'CONTOSO\\jdoe'", "username = \" \"");
        assert!(
            load(&empty)
                .unwrap_err()
                .to_string()
                .contains("parser[0].username")
        );
    }

    #[test]
    fn start_at_values() {
        assert_eq!(load(GOOD).unwrap().parsers[0].start_at, StartAt::Unseen);
        for (text, value) in [
            ("all", StartAt::All),
            ("now", StartAt::Now),
            ("unseen", StartAt::Unseen),
            (
                "2026-11-01",
                StartAt::Since(chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()),
            ),
        ] {
            assert_eq!(StartAt::parse(text).unwrap(), value);
            assert_eq!(value.to_string(), text);
        }
        let bad = GOOD.replace(
            "shared_mailbox = true",
            "shared_mailbox = true\nstart_at = \"yesterday\"",
        );
        let err = load(&bad).unwrap_err().to_string();
        assert!(
            err.contains("parser[0].start_at") && err.contains("2026-11-01"),
            "{err}"
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("35 MB").unwrap(), 35 << 20);
        assert_eq!(parse_byte_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_byte_size("100").unwrap(), 100);
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("MB").is_err());
    }
}
