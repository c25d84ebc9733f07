//! `mail2ticket doctor`: walks each parser's chain (config, DNS, TCP and TLS, token, token
//! claims, AUTHENTICATE, SELECT) and says, step by step, what works and what to fix.
//! It prints no secret and no whole token: only claims that say who the token is for.

use crate::auth::{AuthError, TokenSources, entra_hint};
use crate::config::{Config, CredentialKind, ImapConfig, ParserAuth, ParserConfig, SourceConfig};
use crate::source::imap::first_contact;
use crate::source::imap::{self, ImapError, Login};
use secrecy::ExposeSecret;
use std::time::Instant;

/// One step's result, as printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Passed?
    pub ok: bool,
    /// What was checked.
    pub name: String,
    /// What was found.
    pub detail: String,
    /// What to do about a failure.
    pub fix: Option<String>,
}

impl Step {
    pub(super) fn ok(name: impl Into<String>, detail: impl Into<String>) -> Step {
        Step {
            ok: true,
            name: name.into(),
            detail: detail.into(),
            fix: None,
        }
    }

    pub(super) fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Step {
        let fix = fix.into();
        Step {
            ok: false,
            name: name.into(),
            detail: detail.into(),
            fix: (!fix.is_empty()).then_some(fix),
        }
    }
}

/// The checks of a parser, in order: the runner stops at the first failing one.
const CHECKS: &[Check] = &[
    Check::Dns,
    Check::Connect,
    Check::Login,
    Check::Select,
    Check::StartAt,
];

/// One check of the chain; each adds one or more [`Step`]s.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// The IMAP host resolves.
    Dns,
    /// TCP, TLS and the greeting.
    Connect,
    /// LOGIN, or a token (with its claims) and AUTHENTICATE.
    Login,
    /// The folder opens.
    Select,
    /// What `start_at` would take at first contact.
    StartAt,
}

/// What the checks so far have opened.
struct Checkup<'a> {
    parser: &'a ParserConfig,
    imap: &'a ImapConfig,
    tokens: &'a TokenSources,
    connection: Option<imap::Connection>,
    session: Option<imap::ImapSession>,
    status: Option<imap::FolderStatus>,
}

/// Checks one parser; stops at the first failing step.
pub async fn check_parser(parser: &ParserConfig, tokens: &TokenSources) -> Vec<Step> {
    let mut steps = vec![Step::ok(
        "config",
        format!("mailbox {} as {}", parser.email, parser.login_user()),
    )];
    let imap = match &parser.source {
        SourceConfig::Imap(imap) => imap,
        SourceConfig::Graph(graph) => {
            steps.extend(super::doctor_graph::check(parser, graph, tokens).await);
            return steps;
        }
    };
    let mut checkup = Checkup {
        parser,
        imap,
        tokens,
        connection: None,
        session: None,
        status: None,
    };
    for check in CHECKS {
        let found = checkup.run(*check).await;
        let failed = found.iter().any(|step| !step.ok);
        steps.extend(found);
        if failed {
            break;
        }
    }
    if let Some(session) = checkup.session.take() {
        session.logout().await;
    }
    steps
}

impl Checkup<'_> {
    async fn run(&mut self, check: Check) -> Vec<Step> {
        match check {
            Check::Dns => vec![self.dns().await],
            Check::Connect => vec![self.connect().await],
            Check::Login => match &self.parser.auth {
                ParserAuth::Password(password) => vec![self.login(password).await],
                ParserAuth::Credential(name) => self.authenticate(name).await,
            },
            Check::Select => vec![self.select().await],
            Check::StartAt => vec![self.start_at().await],
        }
    }

    async fn dns(&mut self) -> Step {
        let imap = self.imap;
        match tokio::net::lookup_host((imap.host.as_str(), imap.port)).await {
            Ok(addrs) => {
                let addrs: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
                Step::ok("DNS", format!("{} -> {}", imap.host, addrs.join(", ")))
            }
            Err(e) => Step::fail(
                "DNS",
                format!("{}: {e}", imap.host),
                "check imap.host and the machine's DNS",
            ),
        }
    }

    async fn connect(&mut self) -> Step {
        let imap = self.imap;
        let started = Instant::now();
        match imap::connect(imap).await {
            Ok(c) => {
                self.connection = Some(c);
                let tls = match imap.encryption {
                    crate::config::Encryption::None => "no TLS (plain)",
                    _ => "TLS certificate valid",
                };
                let ms = started.elapsed().as_millis();
                let detail = format!(
                    "{}:{} {:?}, {tls} ({ms} ms)",
                    imap.host, imap.port, imap.encryption
                );
                Step::ok("connect", detail)
            }
            Err(e @ ImapError::Tls { .. }) => Step::fail(
                "TLS",
                e.to_string(),
                "the server's certificate is not trusted for this host name: fix the host name, or add its CA with imap.ca_file",
            ),
            Err(e) => Step::fail(
                "connect",
                e.to_string(),
                "check imap.host, imap.port and imap.encryption (993 = ssl, 143 = starttls), and that a firewall lets the connection out",
            ),
        }
    }

    async fn login(&mut self, password: &secrecy::SecretString) -> Step {
        let user = self.parser.login_user();
        let connection = self.connection.take().expect("connect ran first");
        match connection.login(Login::Password { user, password }).await {
            Ok(session) => {
                self.session = Some(session);
                Step::ok("LOGIN", format!("as {user}"))
            }
            Err(e) => Step::fail(
                "LOGIN",
                e.to_string(),
                "check the username and password (username defaults to email)",
            ),
        }
    }

    /// A token from the credential, its claims, then AUTHENTICATE.
    async fn authenticate(&mut self, name: &str) -> Vec<Step> {
        let Some(source) = self.tokens.get(name) else {
            let fix = "fix the parser's credential key";
            return vec![Step::fail("token", format!("no credential {name:?}"), fix)];
        };
        let token = match source.token().await {
            Ok(token) => token,
            Err(e) => return vec![Step::fail("token", e.to_string(), token_fix(&e))],
        };
        let minutes = token
            .expires_at
            .saturating_duration_since(Instant::now())
            .as_secs()
            / 60;
        let mut steps = vec![Step::ok(
            "token",
            format!("from credential {name:?}, valid for {minutes} min"),
        )];
        steps.push(
            match crate::auth::token_claims(token.secret.expose_secret()) {
                Ok(claims) => check_claims(&claims, source.kind()),
                Err(e) => Step::ok("token claims", format!("not a JWT ({e}); not checked")),
            },
        );
        if steps.iter().any(|s| !s.ok) {
            return steps;
        }
        let user = self.parser.login_user();
        let connection = self.connection.take().expect("connect ran first");
        let oauth = Login::OAuth {
            user,
            token: &token.secret,
        };
        steps.push(match connection.login(oauth).await {
            Ok(session) => {
                self.session = Some(session);
                Step::ok("AUTHENTICATE", format!("XOAUTH2 as {user}"))
            }
            Err(e) => Step::fail(
                "AUTHENTICATE",
                e.to_string(),
                "the token is good but Exchange refused it for this mailbox: register the service principal with the Enterprise Application's object id (New-ServicePrincipal -AppId <app id> -ServiceId <enterprise app object id>) and grant it FullAccess on the mailbox (Add-MailboxPermission -Identity <mailbox> -User <service principal id> -AccessRights FullAccess); with shared_mailbox = true, user= is the mailbox address",
            ),
        });
        steps
    }

    async fn select(&mut self) -> Step {
        let folder = &self.imap.folder;
        let session = self.session.as_mut().expect("login ran first");
        match session.select(folder).await {
            Ok(status) => {
                self.status = Some(status);
                let detail = format!(
                    "{folder}: {} messages (UIDVALIDITY {})",
                    status.exists, status.uid_validity
                );
                Step::ok("SELECT", detail)
            }
            Err(e @ ImapError::NotConnected { .. }) => Step::fail(
                "SELECT",
                e.to_string(),
                "logged in but the mailbox cannot be opened: give the app FullAccess on the mailbox, check the address, and that IMAP is enabled for it (Set-CASMailbox -ImapEnabled $true)",
            ),
            Err(e) => Step::fail(
                "SELECT",
                e.to_string(),
                "check imap.folder (the folder must exist; INBOX is the default)",
            ),
        }
    }

    /// Read-only: what the policy would take if the folder were met for the first time.
    async fn start_at(&mut self) -> Step {
        let (folder, start_at) = (&self.imap.folder, self.parser.start_at);
        let session = self.session.as_mut().expect("login ran first");
        let status = self.status.as_ref().expect("select ran first");
        match first_contact::choose(session, folder, status, start_at).await {
            Ok(start) => Step::ok(
                "start_at",
                format!(
                    "at first contact, {} (once mail2ticket has read the folder, its checkpoint decides)",
                    start.report
                ),
            ),
            Err(e) => Step::fail(
                "start_at",
                e.to_string(),
                "the server refused UID SEARCH; check the folder",
            ),
        }
    }
}

/// What to do about a failed token request.
pub(super) fn token_fix(e: &AuthError) -> String {
    match e {
        AuthError::Entra {
            aadsts: Some(code), ..
        } => entra_hint(*code)
            .trim()
            .trim_start_matches("Fix: ")
            .to_string(),
        AuthError::Unreachable { .. } => {
            "check the credential's authority and outbound HTTPS".to_string()
        }
        AuthError::NeedsLogin { command, .. } => {
            format!("a user must sign in again: {command}")
        }
        AuthError::Certificate { .. } => {
            "check certificate and private_key (an unencrypted RSA key in PEM)".to_string()
        }
        AuthError::Store { .. } => "check [database] url and that Postgres runs".to_string(),
        AuthError::Throttled { .. } => {
            "Entra is throttling this application: wait (the daemon retries when Entra says) \
             and run doctor again later"
                .to_string()
        }
        _ => String::new(),
    }
}

/// Audience must be Exchange Online; an app-only token must carry the role
/// IMAP.AccessAsApp, a user's token (password or delegated) the scope
/// IMAP.AccessAsUser.All.
pub fn check_claims(claims: &serde_json::Value, kind: CredentialKind) -> Step {
    let app_only = kind == CredentialKind::ClientCredentials;
    let aud = claims["aud"].as_str().unwrap_or_default();
    if !aud.starts_with("https://outlook.office365.com")
        && !aud.starts_with("https://outlook.office.com")
        && aud != "00000002-0000-0ff1-ce00-000000000000"
    {
        let scope = if app_only {
            crate::config::DEFAULT_APP_SCOPE
        } else {
            crate::config::DEFAULT_PASSWORD_SCOPE
        };
        return Step::fail(
            "token claims",
            format!("audience is {aud:?}, not Exchange Online"),
            format!("set the credential's scope to {scope} (or remove scope to get the default)"),
        );
    }
    let roles: Vec<&str> = claims["roles"]
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let scp = claims["scp"].as_str().unwrap_or_default();
    if app_only && roles.contains(&"IMAP.AccessAsApp") {
        return Step::ok(
            "token claims",
            format!("audience {aud}, role IMAP.AccessAsApp (app-only)"),
        );
    }
    if !app_only && scp.split(' ').any(|s| s == "IMAP.AccessAsUser.All") {
        let user = ["upn", "preferred_username", "unique_name"]
            .iter()
            .find_map(|k| claims[k].as_str())
            .unwrap_or("?");
        return Step::ok(
            "token claims",
            format!("audience {aud}, scope IMAP.AccessAsUser.All (user {user})"),
        );
    }
    if app_only {
        Step::fail(
            "token claims",
            format!("roles {roles:?}: no IMAP.AccessAsApp"),
            "add the API permission Office 365 Exchange Online > Application permissions > IMAP.AccessAsApp and grant admin consent",
        )
    } else {
        Step::fail(
            "token claims",
            format!("scp {scp:?}: no IMAP.AccessAsUser.All"),
            "add the delegated API permission Microsoft Graph > IMAP.AccessAsUser.All (or Office 365 Exchange Online > IMAP.AccessAsUser.All), grant consent, and sign in again",
        )
    }
}

/// Runs every parser (or the named one) and prints the report; true when all passed.
pub async fn run(config: &Config, only: Option<&str>) -> Result<bool, String> {
    let parsers: Vec<&ParserConfig> = config
        .parsers
        .iter()
        .filter(|p| only.is_none_or(|n| p.name == n))
        .collect();
    if parsers.is_empty() {
        return Err(format!("no parser named {:?}", only.unwrap_or_default()));
    }
    let mut all_ok = true;
    // Delegated sign-ins live in the database: connect only when a checked parser needs it.
    let needs_database = parsers.iter().any(|p| match &p.auth {
        ParserAuth::Credential(name) => config
            .credentials
            .iter()
            .any(|c| &c.name == name && c.kind == CredentialKind::Delegated),
        ParserAuth::Password(_) => false,
    });
    let pool = if needs_database {
        match crate::store::connect(&config.database).await {
            Ok(pool) => match crate::store::migrate(&pool).await {
                Ok(()) => Some(pool),
                Err(e) => {
                    print_step(&Step::fail(
                        "database",
                        e.to_string(),
                        "the delegated sign-ins are kept in the database: check [database] url",
                    ));
                    all_ok = false;
                    None
                }
            },
            Err(e) => {
                print_step(&Step::fail(
                    "database",
                    e.to_string(),
                    "the delegated sign-ins are kept in the database: check [database] url and that Postgres runs",
                ));
                all_ok = false;
                None
            }
        }
    } else {
        None
    };
    let tokens = TokenSources::from_config(config, pool).map_err(|e| e.to_string())?;
    for parser in parsers {
        println!("parser {}", parser.name);
        for step in check_parser(parser, &tokens).await {
            print_step(&step);
            all_ok &= step.ok;
        }
    }
    Ok(all_ok)
}

fn print_step(step: &Step) {
    println!(
        "  {:<4} {:<13} {}",
        if step.ok { "OK" } else { "FAIL" },
        step.name,
        step.detail
    );
    if let Some(fix) = &step.fix {
        println!("       fix: {fix}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claims_need_exchange_audience_and_the_imap_permission_of_the_credential_type() {
        use CredentialKind::*;
        let app = json!({"aud": "https://outlook.office365.com", "roles": ["IMAP.AccessAsApp"]});
        assert!(check_claims(&app, ClientCredentials).ok);
        assert!(!check_claims(&app, Delegated).ok);
        let user = json!({"aud": "https://outlook.office.com", "scp": "IMAP.AccessAsUser.All offline_access", "upn": "a@b.c"});
        assert!(check_claims(&user, Delegated).ok);
        assert!(check_claims(&user, Password).ok);
        let no_role = check_claims(&user, ClientCredentials);
        assert!(!no_role.ok && no_role.fix.unwrap().contains("IMAP.AccessAsApp"));
        let graph = check_claims(
            &json!({"aud": "https://graph.microsoft.com", "scp": "Mail.Read"}),
            Delegated,
        );
        assert!(!graph.ok && graph.detail.contains("graph.microsoft.com"));
        assert!(graph.fix.unwrap().contains("IMAP.AccessAsUser.All"));
        let mail_read = check_claims(
            &json!({"aud": "https://outlook.office.com", "scp": "Mail.Read"}),
            Delegated,
        );
        assert!(!mail_read.ok && mail_read.fix.unwrap().contains("sign in again"));
    }
}
