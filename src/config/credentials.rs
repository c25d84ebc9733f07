//! `[[credential]]` and `[secrets]`: how each credential proves itself to Entra ID, with
//! the fields its type requires.

use super::parsers::looks_like_address;
use super::problems::Problems;
use super::raw::{RawCredential, RawSecrets};
use super::*;
use crate::config::secret::SecretSource;
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashSet;
use std::path::Path;
use toml::Spanned;

/// Checks every `[[credential]]`.
pub(super) fn validate_credentials(
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
        let user = password_user(c, config_dir, &key, at, problems);
        if c.redirect_port.is_some() && c.kind != CredentialKind::Delegated {
            problems.add(
                key("redirect_port"),
                at,
                "only a \"delegated\" credential has redirect_port; remove it",
            );
        }
        let (authority, scope) = authority_and_scope(c, &key, at, problems);
        let graph_scope = c.graph_scope.clone().unwrap_or_else(|| {
            match c.kind {
                CredentialKind::ClientCredentials => DEFAULT_GRAPH_APP_SCOPE,
                CredentialKind::Password | CredentialKind::Delegated => DEFAULT_GRAPH_USER_SCOPE,
            }
            .to_string()
        });
        out.push(CredentialConfig {
            name: c.name.clone(),
            kind: c.kind,
            tenant_id,
            client_id,
            client_auth,
            user,
            authority,
            scope,
            graph_scope,
            redirect_port: c.redirect_port.unwrap_or(0),
        });
    }
    out
}

/// The user of a `password` credential; any other type must not name one.
fn password_user(
    c: &RawCredential,
    config_dir: &Path,
    key: &dyn Fn(&str) -> String,
    at: Option<usize>,
    problems: &mut Problems,
) -> Option<PasswordUser> {
    let kind = c.kind.as_str();
    match c.kind {
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
                Some(source) => resolve_secret(source, config_dir, &key("password"), at, problems),
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
    }
}

/// The authority URL and the scope (the type's default unless set).
fn authority_and_scope(
    c: &RawCredential,
    key: &dyn Fn(&str) -> String,
    at: Option<usize>,
    problems: &mut Problems,
) -> (String, String) {
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
    (authority, scope)
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

/// Checks `[secrets]` (needed by delegated credentials).
pub(super) fn validate_secrets(
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
