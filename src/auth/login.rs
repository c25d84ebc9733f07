//! `mail2ticket login`: signs a user in once for a `type = "delegated"` credential and
//! keeps the refresh token, encrypted, in the database.
//!
//! The default is the authorization-code flow with PKCE (S256) and a loopback redirect
//! (`http://localhost:<port>/`), the way native apps sign in to Entra ID: no public URL is
//! needed. The sign-in URL is printed; the redirect is awaited on loopback and, for a
//! server without a browser, the final redirected address may be pasted on standard input
//! instead. `--device-code` uses the device-code flow.

use crate::auth::sealed::SealingKey;
use crate::auth::{self, AuthError, TokenResponse};
use crate::config::{Config, CredentialConfig};
use crate::store;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How long `login` waits for the user to finish signing in.
pub const SIGN_IN_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Largest HTTP request head read from the browser on the loopback redirect.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Which interactive flow to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Authorization code + PKCE with a loopback redirect (default).
    AuthorizationCode,
    /// Device-code flow.
    DeviceCode,
}

/// Who signed in, as `login` reports it.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The user's name from the token (`upn` / `preferred_username`), when present.
    pub user: Option<String>,
}

/// Signs the user in for `credential` (the caller has checked that it is a delegated one)
/// and stores the sealed refresh token.
pub async fn login(
    config: &Config,
    credential: &CredentialConfig,
    flow: Flow,
    pool: &sqlx::PgPool,
) -> Result<SignedIn, String> {
    let key = SealingKey::new(
        config
            .secrets_key
            .as_ref()
            .ok_or("[secrets] key is missing (check-config explains it)")?,
    );
    let http = auth::http_client()?;
    let response = match flow {
        Flow::AuthorizationCode => authorization_code(credential, &http).await?,
        Flow::DeviceCode => device_code(credential, &http).await?,
    };
    let refresh_token = response.refresh_token.as_ref().ok_or(
        "Entra issued no refresh token: the credential's scope must include offline_access",
    )?;
    let user = auth::token_claims(response.access_token.expose_secret())
        .ok()
        .and_then(|claims| {
            ["upn", "preferred_username", "unique_name", "email"]
                .iter()
                .find_map(|k| claims[k].as_str().map(str::to_string))
        });
    let mut conn = pool.acquire().await.map_err(|e| format!("database: {e}"))?;
    store::grants::save_sign_in(
        &mut conn,
        &credential.name,
        &credential.tenant_id,
        &credential.client_id,
        user.as_deref(),
        &key.seal(&credential.name, refresh_token),
        Duration::from_secs(response.expires_in),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(SignedIn { user })
}

/// The PKCE pair: a random verifier and its S256 challenge.
fn pkce_pair() -> (SecretString, String) {
    let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (SecretString::from(verifier), challenge)
}

async fn authorization_code(
    credential: &CredentialConfig,
    http: &reqwest::Client,
) -> Result<TokenResponse, String> {
    let listener = TcpListener::bind(("127.0.0.1", credential.redirect_port))
        .await
        .map_err(|e| {
            format!(
                "cannot listen on 127.0.0.1:{} for the sign-in redirect: {e}",
                credential.redirect_port
            )
        })?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    // Browsers may resolve "localhost" to ::1 first: listen there too when possible.
    let listener_v6 = TcpListener::bind(("::1", port)).await.ok();
    let redirect_uri = format!("http://localhost:{port}/");
    let (verifier, challenge) = pkce_pair();
    let state = hex::encode(rand::random::<[u8; 16]>());
    let url = url::Url::parse_with_params(
        &credential.endpoint_url("authorize"),
        [
            ("client_id", credential.client_id.as_str()),
            ("response_type", "code"),
            ("redirect_uri", redirect_uri.as_str()),
            ("response_mode", "query"),
            ("scope", credential.scope.as_str()),
            ("state", state.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
            ("prompt", "select_account"),
        ],
    )
    .map_err(|e| format!("the credential's authority does not make a URL: {e}"))?;
    println!(
        "Open this address in a browser and sign in as the user whose mailboxes mail2ticket reads:\n"
    );
    println!("  {url}\n");
    println!(
        "Waiting for the browser to come back to {redirect_uri} (up to {} minutes).",
        SIGN_IN_TIMEOUT.as_secs() / 60
    );
    println!(
        "No browser on this machine? Open the address anywhere, sign in, then paste here the address the browser ends on (it starts with {redirect_uri}; that page may fail to load) and press Enter."
    );
    let pasted = pasted_lines();
    let query = tokio::time::timeout(
        SIGN_IN_TIMEOUT,
        wait_for_redirect(listener, listener_v6, pasted),
    )
    .await
    .map_err(|_| "the sign-in was not finished in time; run login again".to_string())??;
    if let Some(error) = query.get("error") {
        let description = query.get("error_description").cloned().unwrap_or_default();
        let hint = auth::entra::aadsts_code(&description).map_or("", auth::entra_hint);
        return Err(format!(
            "Entra refused the sign-in: {error}: {description}{hint}"
        ));
    }
    if query.get("state") != Some(&state) {
        return Err("the redirected address belongs to another sign-in attempt (state does not match); use the address printed by this run".into());
    }
    let code = query
        .get("code")
        .ok_or("the redirected address holds no code")?;
    redeem(
        credential,
        http,
        vec![
            ("grant_type", "authorization_code".into()),
            ("code", code.clone()),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier.expose_secret().to_string()),
            ("scope", credential.scope.clone()),
        ],
    )
    .await
    .map_err(|e| e.to_string())
}

/// One request to the credential's token endpoint (code or device-code grant).
async fn redeem(
    credential: &CredentialConfig,
    http: &reqwest::Client,
    form: Vec<(&str, String)>,
) -> Result<TokenResponse, AuthError> {
    auth::post_token(
        http,
        &credential.name,
        &credential.token_url(),
        &credential.client_id,
        &credential.client_auth,
        form,
    )
    .await
}

/// Lines typed or pasted on standard input. A plain thread, because tokio's stdin read
/// cannot be cancelled and would hold the runtime open at exit.
fn pasted_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (send, receive) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

type Query = std::collections::HashMap<String, String>;

/// The query of the first redirect carrying `code` or `error`, from the browser or pasted.
async fn wait_for_redirect(
    listener: TcpListener,
    listener_v6: Option<TcpListener>,
    mut pasted: tokio::sync::mpsc::UnboundedReceiver<String>,
) -> Result<Query, String> {
    let mut stdin_open = true;
    loop {
        let accept_v6 = async {
            match &listener_v6 {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted && let Some(query) = answer_browser(stream).await {
                    return Ok(query);
                }
            }
            accepted = accept_v6 => {
                if let Ok((stream, _)) = accepted && let Some(query) = answer_browser(stream).await {
                    return Ok(query);
                }
            }
            line = pasted.recv(), if stdin_open => match line {
                None => stdin_open = false,
                Some(line) if line.trim().is_empty() => {}
                Some(line) => match redirect_query(line.trim()) {
                    Some(query) => return Ok(query),
                    None => println!("That is not the redirected address (it has no code= or error=); paste the whole address from the browser's address bar."),
                },
            },
        }
    }
}

/// The `code`/`error` query of a redirected address, if it has one.
fn redirect_query(address: &str) -> Option<Query> {
    let url = url::Url::parse(address)
        .or_else(|_| url::Url::parse("http://localhost/")?.join(address))
        .ok()?;
    let query: Query = url.query_pairs().into_owned().collect();
    (query.contains_key("code") || query.contains_key("error")).then_some(query)
}

/// Reads one HTTP request from the browser and answers it. Hand-written rather than a web
/// framework: one GET line is all there is to read, and a server crate would be a large
/// dependency for it.
async fn answer_browser(mut stream: tokio::net::TcpStream) -> Option<Query> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()??;
    let head = String::from_utf8_lossy(&head);
    let target = head.lines().next()?.split(' ').nth(1)?.to_string();
    let query = redirect_query(&target);
    let (status, body) = match &query {
        Some(q) if q.contains_key("code") => (
            "200 OK",
            "Signed in. You can close this window and go back to mail2ticket login.",
        ),
        Some(_) => (
            "200 OK",
            "The sign-in failed; mail2ticket login in the terminal says why.",
        ),
        None => ("404 Not Found", "Not found."),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    query
}

#[derive(serde::Deserialize)]
struct DeviceCodeResponse {
    device_code: SecretString,
    #[serde(default)]
    message: String,
    #[serde(default)]
    user_code: String,
    #[serde(default)]
    verification_uri: String,
    expires_in: u64,
    #[serde(default = "default_interval")]
    interval: u64,
}

fn default_interval() -> u64 {
    5
}

async fn device_code(
    credential: &CredentialConfig,
    http: &reqwest::Client,
) -> Result<TokenResponse, String> {
    let url = credential.endpoint_url("devicecode");
    let (status, body) = auth::post_form(
        http,
        &credential.name,
        &url,
        &[
            ("client_id", credential.client_id.clone()),
            ("scope", credential.scope.clone()),
        ],
    )
    .await
    .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(auth::entra::entra_error(&credential.name, &url, status, &body).to_string());
    }
    let device: DeviceCodeResponse = serde_json::from_slice(&body)
        .map_err(|e| format!("the device-code endpoint gave an unexpected answer: {e}"))?;
    if device.message.is_empty() {
        println!(
            "To sign in, open {} and enter the code {}.",
            device.verification_uri, device.user_code
        );
    } else {
        println!("{}", device.message);
    }
    println!(
        "Waiting for the sign-in (up to {} minutes).",
        device.expires_in / 60
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(device.expires_in);
    let mut interval = Duration::from_secs(device.interval.max(1));
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() > deadline {
            return Err(
                "the device code expired before the sign-in finished; run login again".into(),
            );
        }
        let result = redeem(
            credential,
            http,
            vec![
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:device_code".into(),
                ),
                (
                    "device_code",
                    device.device_code.expose_secret().to_string(),
                ),
            ],
        )
        .await;
        match result {
            Ok(response) => return Ok(response),
            Err(AuthError::Entra { error, .. }) if error == "authorization_pending" => {}
            Err(AuthError::Entra { error, .. }) if error == "slow_down" => {
                interval += Duration::from_secs(5);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_challenge_is_the_s256_of_the_verifier() {
        let (verifier, challenge) = pkce_pair();
        assert!(verifier.expose_secret().len() >= 43);
        assert_eq!(
            challenge,
            URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.expose_secret().as_bytes()))
        );
        assert_ne!(pkce_pair().1, challenge);
    }

    #[test]
    fn redirected_addresses_are_read_whole_or_as_a_path() {
        let q = redirect_query("http://localhost:5000/?code=abc&state=s1").unwrap();
        assert_eq!(q["code"], "abc");
        assert_eq!(q["state"], "s1");
        assert!(redirect_query("/?error=access_denied&error_description=x").is_some());
        assert!(redirect_query("/favicon.ico").is_none());
        assert!(redirect_query("hello").is_none());
    }
}
