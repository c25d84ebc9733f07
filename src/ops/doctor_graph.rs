//! `doctor` for a `[parser.graph]` mailbox: the token and its claims for Graph, then the
//! folder (which proves the permission and the mailbox), then its message count. Each
//! failure says what to do; Graph's error codes map to fixes in
//! [`crate::source::graph::client::fix_for`].

use super::doctor::{Step, token_fix};
use crate::auth::TokenSources;
use crate::config::{CredentialKind, GraphConfig, ParserAuth, ParserConfig};
use crate::source::SourceError;
use crate::source::graph::GraphClient;
use reqwest::Method;
use secrecy::ExposeSecret;

/// The Graph chain of one parser; stops at the first failing step.
pub async fn check(parser: &ParserConfig, graph: &GraphConfig, tokens: &TokenSources) -> Vec<Step> {
    let ParserAuth::Credential(name) = &parser.auth else {
        return vec![Step::fail(
            "token",
            "a Graph mailbox needs a credential",
            "set credential = \"...\"",
        )];
    };
    let Some(source) = tokens.graph(name) else {
        return vec![Step::fail(
            "token",
            format!("no credential {name:?}"),
            "fix the parser's credential key",
        )];
    };
    let token = match source.token().await {
        Ok(token) => token,
        Err(e) => return vec![Step::fail("token", e.to_string(), token_fix(&e))],
    };
    let mut steps = vec![Step::ok(
        "token",
        format!("from credential {name:?} for Microsoft Graph"),
    )];
    let claims = match crate::auth::token_claims(token.secret.expose_secret()) {
        Ok(claims) => check_graph_claims(&claims, source.kind()),
        Err(e) => Step::ok("token claims", format!("not a JWT ({e}); not checked")),
    };
    let failed = !claims.ok;
    steps.push(claims);
    if failed {
        return steps;
    }
    let client = match GraphClient::new(&graph.base_url, name, source) {
        Ok(client) => client,
        Err(e) => {
            steps.push(Step::fail("folder", e.to_string(), ""));
            return steps;
        }
    };
    steps.push(folder_step(&client, parser, graph).await);
    steps
}

/// Reads the folder: its name and message count, or Graph's error with the fix.
async fn folder_step(client: &GraphClient, parser: &ParserConfig, graph: &GraphConfig) -> Step {
    let found = async {
        let source = crate::source::graph::GraphSource::new(
            std::sync::Arc::new(parser.clone()),
            graph.clone(),
            client.clone(),
        );
        let id = crate::source::graph::folder_id(&source).await?;
        let path = format!(
            "users/{}/mailFolders/{}",
            crate::source::graph::enc(&parser.email),
            crate::source::graph::enc(&id)
        );
        let answer = client
            .send("the folder", Method::GET, client.url(&path)?, &[], None)
            .await?;
        let text = answer.response.text().await.unwrap_or_default();
        Ok::<_, SourceError>(serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default())
    };
    match found.await {
        Ok(folder) => Step::ok(
            "folder",
            format!(
                "{} of {}: {} messages, {} unread",
                graph.folder,
                parser.email,
                folder["totalItemCount"].as_i64().unwrap_or(-1),
                folder["unreadItemCount"].as_i64().unwrap_or(-1)
            ),
        ),
        Err(SourceError::Graph(e)) => {
            let fix = match &e {
                crate::source::graph::GraphError::Api { fix: Some(fix), .. } => fix.to_string(),
                _ => String::new(),
            };
            Step::fail("folder", e.to_string(), fix)
        }
        Err(e) => Step::fail("folder", e.to_string(), ""),
    }
}

/// Graph tokens: audience Graph; app-only tokens carry the role Mail.Read or
/// Mail.ReadWrite, user tokens the scope Mail.Read(Write)(.Shared).
pub fn check_graph_claims(claims: &serde_json::Value, kind: CredentialKind) -> Step {
    let aud = claims["aud"].as_str().unwrap_or_default();
    if aud != "https://graph.microsoft.com" && aud != "00000003-0000-0000-c000-000000000000" {
        return Step::fail(
            "token claims",
            format!("audience is {aud:?}, not Microsoft Graph"),
            "set the credential's graph_scope (https://graph.microsoft.com/.default for app-only), or remove it for the default",
        );
    }
    let mail = |p: &str| {
        matches!(
            p,
            "Mail.Read" | "Mail.ReadWrite" | "Mail.Read.Shared" | "Mail.ReadWrite.Shared"
        )
    };
    if kind == CredentialKind::ClientCredentials {
        let roles: Vec<&str> = claims["roles"]
            .as_array()
            .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        return match roles.iter().find(|r| mail(r)) {
            Some(role) => Step::ok(
                "token claims",
                format!("audience {aud}, role {role} (app-only)"),
            ),
            None => Step::fail(
                "token claims",
                format!("the token has no Mail role (roles: {roles:?})"),
                "add the application permission Mail.ReadWrite to the app registration and grant admin consent; then scope it to the mailboxes with RBAC for Applications",
            ),
        };
    }
    let scp = claims["scp"].as_str().unwrap_or_default();
    match scp.split(' ').find(|s| mail(s)) {
        Some(scope) => Step::ok("token claims", format!("audience {aud}, scope {scope}")),
        None => Step::fail(
            "token claims",
            format!("the token has no Mail scope (scp: {scp:?})"),
            "add the delegated permission Mail.ReadWrite.Shared, consent, and sign in again",
        ),
    }
}
