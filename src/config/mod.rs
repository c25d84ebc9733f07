//! The TOML configuration: schema, loading, validation.
//!
//! Loading is two steps: serde reads the file into `Raw*` structs (unknown keys are errors,
//! with line and column from the TOML parser), then [`Config::load`] checks what serde
//! cannot (references between tables, required keys per credential type, unsafe settings)
//! and resolves secrets. Every error names the file, the key and what to do about it, and
//! all of them are reported at once so that one `check-config` run shows everything.

mod cluster;
mod credentials;
mod database;
mod parsers;
mod problems;
mod raw;
pub mod secret;
#[cfg(test)]
mod tests;
mod webhooks;

pub use parsers::is_loopback;
pub use problems::{ConfigError, ConfigProblem};

use problems::{Problems, column_of, line_of};
use raw::RawConfig;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

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
/// Default scope of app-only tokens for Microsoft Graph.
pub const DEFAULT_GRAPH_APP_SCOPE: &str = "https://graph.microsoft.com/.default";
/// Default scope of user tokens for Microsoft Graph (shared mailboxes need `.Shared`).
pub const DEFAULT_GRAPH_USER_SCOPE: &str =
    "https://graph.microsoft.com/Mail.ReadWrite.Shared offline_access";
/// Default Microsoft Graph endpoint.
pub const DEFAULT_GRAPH_BASE_URL: &str = "https://graph.microsoft.com/v1.0";
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
    /// `[http]`: the status and health listener; off when absent.
    pub http: Option<HttpConfig>,
    /// `[[webhook]]`: where events are delivered.
    pub webhooks: Vec<WebhookConfig>,
    /// `[events]`: how long delivered events are kept.
    pub events: EventsConfig,
    /// `[cluster]`: this replica's name and the lease TTL (several replicas share the
    /// mailboxes through leases in the database).
    pub cluster: ClusterConfig,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Names this process in `mailbox_leases.owner` and `replicas` (default: host name and
    /// process id, unique per process).
    pub replica_name: String,
    /// How long a lease lasts without renewal; renewed every third of it.
    pub lease_ttl: std::time::Duration,
}

/// Every kind of event the outbox holds.
pub const EVENT_KINDS: [&str; 6] = [
    "ticket.created",
    "ticket.message_added",
    "message.held",
    "message.quarantined",
    "mailbox.state_changed",
    "credential.needs_login",
];

/// `[[webhook]]`: an endpoint that receives events, signed (Standard Webhooks).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Unique name, the key of its delivery rows.
    pub name: String,
    /// Where events are POSTed.
    pub url: String,
    /// `whsec_` + base64 of the signing key.
    pub secret: SecretString,
    /// The kinds it receives (`None`: every kind).
    pub events: Option<Vec<String>>,
    /// The parsers whose events it receives (`None`: every parser).
    pub parsers: Option<Vec<String>>,
    /// One attempt may take this long.
    pub timeout: std::time::Duration,
    /// Ticket events carry the message's `body_text`.
    pub include_body: bool,
}

impl WebhookConfig {
    /// The HMAC key (the secret's bytes after `whsec_`), checked when the file loaded.
    pub fn signing_key(&self) -> Vec<u8> {
        webhooks::signing_key(self.secret.expose_secret()).expect("validated on load")
    }
}

impl PartialEq for WebhookConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.url == other.url
            && same_secret(&self.secret, &other.secret)
            && self.events == other.events
            && self.parsers == other.parsers
            && self.timeout == other.timeout
            && self.include_body == other.include_body
    }
}

/// `[events]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsConfig {
    /// Events whose deliveries are all done are deleted after this many days.
    pub keep_days: u32,
}

/// `[http]`: where the operations endpoints listen, and the bearer token they require.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Address and port (`127.0.0.1:9187`).
    pub listen: std::net::SocketAddr,
    /// When set, every endpoint but `/livez` and `/readyz` needs `Authorization: Bearer`.
    pub token: Option<SecretString>,
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
#[derive(Debug, Clone, PartialEq)]
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
    /// Requested scope (for IMAP).
    pub scope: String,
    /// Requested scope for Microsoft Graph.
    pub graph_scope: String,
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
#[derive(Debug, Clone, PartialEq)]
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
    /// When a message's raw bytes are kept, store its base64 attachments only there (as
    /// byte ranges, read through the `attachment_files` view) instead of a second time
    /// decoded: about 40 % fewer bytes for mail with attachments.
    pub attachments_in_raw: bool,
    /// What to do on the server with a message once its rows are committed.
    pub after: AfterIngest,
    /// A mailbox with no successful pass or completed wait for this long is `stale`.
    pub stale_after: std::time::Duration,
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
    /// Where the mail comes from: an IMAP server or Microsoft Graph.
    pub source: SourceConfig,
}

/// A parser's mail source: exactly one of `[parser.imap]` and `[parser.graph]`.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// `[parser.imap]`.
    Imap(ImapConfig),
    /// `[parser.graph]`.
    Graph(GraphConfig),
}

impl SourceConfig {
    /// `imap` or `graph` (for status pages and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Imap(_) => "imap",
            SourceConfig::Graph(_) => "graph",
        }
    }
}

/// `[parser.graph]`: a mailbox read through Microsoft Graph.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphConfig {
    /// A well-known folder name (`inbox`, `archive`, ...) or a path (`Inbox/Support`).
    pub folder: String,
    /// The Graph endpoint, without a trailing slash (national clouds and tests change it).
    pub base_url: String,
    /// Time between change rounds.
    pub poll_interval: std::time::Duration,
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
#[derive(Debug, Clone, PartialEq)]
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

/// Equal secrets (for telling a changed configuration on reload; not an authentication
/// check, so a plain comparison is enough).
fn same_secret(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret() == b.expose_secret()
}

impl PartialEq for ClientAuth {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ClientAuth::Public, ClientAuth::Public) => true,
            (ClientAuth::Secret(a), ClientAuth::Secret(b)) => same_secret(a, b),
            (ClientAuth::Certificate(a), ClientAuth::Certificate(b)) => {
                a.thumbprint_s256 == b.thumbprint_s256
                    && same_secret(&a.private_key_pem, &b.private_key_pem)
            }
            _ => false,
        }
    }
}

impl PartialEq for PasswordUser {
    fn eq(&self, other: &Self) -> bool {
        self.username == other.username && same_secret(&self.password, &other.password)
    }
}

impl PartialEq for ParserAuth {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ParserAuth::Credential(a), ParserAuth::Credential(b)) => a == b,
            (ParserAuth::Password(a), ParserAuth::Password(b)) => same_secret(a, b),
            _ => false,
        }
    }
}

impl PartialEq for DatabaseConfig {
    fn eq(&self, other: &Self) -> bool {
        same_secret(&self.url, &other.url) && self.max_connections == other.max_connections
    }
}

impl Config {
    /// True when `other` holds the same `[secrets] key` (delegated credentials seal their
    /// sign-in with it).
    pub fn same_secrets_key(&self, other: &Config) -> bool {
        match (&self.secrets_key, &other.secrets_key) {
            (None, None) => true,
            (Some(a), Some(b)) => same_secret(a, b),
            _ => false,
        }
    }

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
        let database = database::validate_database(raw.database, &config_dir, &mut problems);
        let credentials =
            credentials::validate_credentials(&raw.credential, &config_dir, &mut problems);
        let parsers =
            parsers::validate_parsers(&raw.parser, &credentials, &config_dir, &mut problems);
        let secrets_key =
            credentials::validate_secrets(raw.secrets, &credentials, &config_dir, &mut problems);
        let http = database::validate_http(raw.http, &config_dir, &mut problems);
        let webhooks =
            webhooks::validate_webhooks(&raw.webhook, &parsers, &config_dir, &mut problems);
        let events = webhooks::validate_events(raw.events, &mut problems);
        let cluster = cluster::validate_cluster(raw.cluster, &mut problems);
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
            http,
            webhooks,
            events,
            cluster,
        })
    }

    /// The parser of that name.
    pub fn parser(&self, name: &str) -> Option<&ParserConfig> {
        self.parsers.iter().find(|p| p.name == name)
    }
}
