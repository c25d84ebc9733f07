//! `mail2ticket doctor`: walks each parser's chain (config, DNS, TCP and TLS, token, token
//! claims, AUTHENTICATE, SELECT) and says, step by step, what works and what to fix.
//! It prints no secret and no whole token: only claims that say who the token is for.

use crate::auth::{AuthError, TokenSources, entra_hint};
use crate::config::{Config, CredentialKind, ParserAuth, ParserConfig};
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
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Step {
        Step {
            ok: true,
            name: name.into(),
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Step {
        let fix = fix.into();
        Step {
            ok: false,
            name: name.into(),
            detail: detail.into(),
            fix: (!fix.is_empty()).then_some(fix),
        }
    }
}

/// Checks one parser; stops at the first failing step.
pub async fn check_parser(parser: &ParserConfig, tokens: &TokenSources) -> Vec<Step> {
    let mut steps = vec![Step::ok(
        "config",
        format!("mailbox {} as {}", parser.email, parser.login_user()),
    )];
    let imap = &parser.imap;

    let started = Instant::now();
    match tokio::net::lookup_host((imap.host.as_str(), imap.port)).await {
        Ok(addrs) => {
            let addrs: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            steps.push(Step::ok(
                "DNS",
                format!("{} -> {}", imap.host, addrs.join(", ")),
            ));
        }
        Err(e) => {
            steps.push(Step::fail(
                "DNS",
                format!("{}: {e}", imap.host),
                "check imap.host and the machine's DNS",
            ));
            return steps;
        }
    }

    let connection = match imap::connect(imap).await {
        Ok(c) => {
            let tls = match imap.encryption {
                crate::config::Encryption::None => "no TLS (plain)",
                _ => "TLS certificate valid",
            };
            steps.push(Step::ok(
                "connect",
                format!(
                    "{}:{} {:?}, {tls} ({} ms)",
                    imap.host,
                    imap.port,
                    imap.encryption,
                    started.elapsed().as_millis()
                ),
            ));
            c
        }
        Err(e @ ImapError::Tls { .. }) => {
            steps.push(Step::fail("TLS", e.to_string(), "the server's certificate is not trusted for this host name: fix the host name, or add its CA with imap.ca_file"));
            return steps;
        }
        Err(e) => {
            steps.push(Step::fail("connect", e.to_string(), "check imap.host, imap.port and imap.encryption (993 = ssl, 143 = starttls), and that a firewall lets the connection out"));
            return steps;
        }
    };

    let session = match &parser.auth {
        ParserAuth::Password(password) => match connection
            .login(Login::Password {
                user: parser.login_user(),
                password,
            })
            .await
        {
            Ok(s) => {
                steps.push(Step::ok("LOGIN", format!("as {}", parser.login_user())));
                s
            }
            Err(e) => {
                steps.push(Step::fail(
                    "LOGIN",
                    e.to_string(),
                    "check the username and password (username defaults to email)",
                ));
                return steps;
            }
        },
        ParserAuth::Credential(name) => {
            let Some(source) = tokens.get(name) else {
                steps.push(Step::fail(
                    "token",
                    format!("no credential {name:?}"),
                    "fix the parser's credential key",
                ));
                return steps;
            };
            let token = match source.token().await {
                Ok(t) => {
                    let minutes = t
                        .expires_at
                        .saturating_duration_since(Instant::now())
                        .as_secs()
                        / 60;
                    steps.push(Step::ok(
                        "token",
                        format!("from credential {name:?}, valid for {minutes} min"),
                    ));
                    t
                }
                Err(e) => {
                    let fix = match &e {
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
                            "check certificate and private_key (an unencrypted RSA key in PEM)"
                                .to_string()
                        }
                        AuthError::Store { .. } => {
                            "check [database] url and that Postgres runs".to_string()
                        }
                        AuthError::Throttled { .. } => {
                            "Entra is throttling this application: wait (the daemon retries when Entra says) and run doctor again later".to_string()
                        }
                        _ => String::new(),
                    };
                    steps.push(Step::fail("token", e.to_string(), fix));
                    return steps;
                }
            };
            match crate::auth::token_claims(token.secret.expose_secret()) {
                Ok(claims) => {
                    let claim_step = check_claims(&claims, source.kind());
                    let ok = claim_step.ok;
                    steps.push(claim_step);
                    if !ok {
                        return steps;
                    }
                }
                Err(e) => steps.push(Step::ok(
                    "token claims",
                    format!("not a JWT ({e}); not checked"),
                )),
            }
            match connection
                .login(Login::OAuth {
                    user: parser.login_user(),
                    token: &token.secret,
                })
                .await
            {
                Ok(s) => {
                    steps.push(Step::ok(
                        "AUTHENTICATE",
                        format!("XOAUTH2 as {}", parser.login_user()),
                    ));
                    s
                }
                Err(e) => {
                    steps.push(Step::fail(
                        "AUTHENTICATE",
                        e.to_string(),
                        "the token is good but Exchange refused it for this mailbox: register the service principal with the Enterprise Application's object id (New-ServicePrincipal -AppId <app id> -ServiceId <enterprise app object id>) and grant it FullAccess on the mailbox (Add-MailboxPermission -Identity <mailbox> -User <service principal id> -AccessRights FullAccess); with shared_mailbox = true, user= is the mailbox address",
                    ));
                    return steps;
                }
            }
        }
    };

    let mut session = session;
    match session.select(&imap.folder).await {
        Ok(status) => {
            steps.push(Step::ok("SELECT", format!("{}: {} messages (UIDVALIDITY {})", imap.folder, status.exists, status.uid_validity)));
            steps.push(match first_contact::choose(&mut session, &imap.folder, &status, parser.start_at).await {
                Ok(start) => Step::ok("start_at", format!("at first contact, {} (once mail2ticket has read the folder, its checkpoint decides)", start.report)),
                Err(e) => Step::fail("start_at", e.to_string(), "the server refused UID SEARCH; check the folder"),
            });
        }
        Err(e @ ImapError::NotConnected { .. }) => steps.push(Step::fail(
            "SELECT",
            e.to_string(),
            "logged in but the mailbox cannot be opened: give the app FullAccess on the mailbox, check the address, and that IMAP is enabled for it (Set-CASMailbox -ImapEnabled $true)",
        )),
        Err(e) => steps.push(Step::fail("SELECT", e.to_string(), "check imap.folder (the folder must exist; INBOX is the default)")),
    }
    session.logout().await;
    steps
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
