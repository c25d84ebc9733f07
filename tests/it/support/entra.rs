//! An Entra-ID-compatible token endpoint for the tests (the only stand-in in the suite:
//! Microsoft's own endpoint cannot be reached from here).
//!
//! Endpoints, shaped like Entra's v2.0 endpoints under `/{tenant}/oauth2/v2.0/`:
//! - `token` (POST): grants `client_credentials` (client secret or an RS256 client
//!   assertion checked against the registered certificate: signature, `x5t#S256`,
//!   aud = token URL, iss = sub = client id, expiry), `password`, `authorization_code`
//!   (PKCE S256 checked), `refresh_token` (rotating: each refresh token works once; grants
//!   can be revoked or expired) and the device-code grant.
//! - `authorize` (GET): plays the browser sign-in of the user set with
//!   [`Entra::sign_in_as`] and redirects to the loopback `redirect_uri` with a code.
//! - `devicecode` (POST): a device code, approved with [`Entra::approve_device`].
//!
//! Errors are AADSTS-shaped (7000215 bad secret, 700016 unknown client, 90002 unknown
//! tenant, 1002012/70011 bad scope, 50126 bad password, 50076 MFA, 65001 consent, 7000218
//! public-client flow on a confidential app, 700082 expired and 50173 revoked grants,
//! 501481 PKCE mismatch, 700027 bad assertion). Tokens are HS256 JWTs shaped like
//! Exchange's (app-only: aud `https://outlook.office365.com`, roles `IMAP.AccessAsApp`;
//! delegated: aud `https://outlook.office.com`, scp `IMAP.AccessAsUser.All`; for Graph
//! scopes, aud `https://graph.microsoft.com` with role `Mail.ReadWrite` or scp
//! `Mail.ReadWrite.Shared`) plus a claim
//! `mailboxes` (",a@x,b@y,") that stands for Exchange's FullAccess grants so that Dovecot
//! can enforce them (see `dovecot.rs`).

use axum::extract::{Form, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The tenant every test uses (Dovecot's `issuers` names it).
pub const TENANT: &str = "11111111-2222-3333-4444-555555555555";
/// Key id in token headers and in Dovecot's key dictionary.
pub const KID: &str = "k1";
const APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// App-only scope of Microsoft Graph.
pub const GRAPH_APP_SCOPE: &str = "https://graph.microsoft.com/.default";
const IMAP_DELEGATED: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
/// The delegated Graph permission for shared mailboxes.
const GRAPH_DELEGATED: &str = "https://graph.microsoft.com/Mail.ReadWrite.Shared";

/// A certificate registered on an application.
#[derive(Clone)]
pub struct Certificate {
    /// Its public key (PEM, `PUBLIC KEY`).
    pub public_key_pem: String,
    /// base64url SHA-256 of its DER.
    pub thumbprint_s256: String,
}

/// One registered application.
#[derive(Clone)]
pub struct App {
    /// Its client secret ("" = none registered).
    pub secret: String,
    /// A registered certificate.
    pub certificate: Option<Certificate>,
    /// Mailboxes it has FullAccess to (app-only access); `*@domain` grants every mailbox
    /// of the domain (for benchmarks with a thousand mailboxes: Dovecot refuses a SASL
    /// response over 8 KB, and a grant list of a thousand addresses is larger).
    pub mailboxes: Vec<String>,
    /// Token lifetime in seconds.
    pub lifetime: i64,
    /// "Allow public client flows" / a "Mobile and desktop" redirect: delegated grants
    /// may come without a client secret.
    pub public_client: bool,
    /// Admin consent for the delegated IMAP permission.
    pub consented: bool,
    /// The IMAP permission is configured (IMAP.AccessAsApp for app-only tokens); without
    /// it, tokens are issued without the role, as Entra does for an app that lacks it.
    pub imap_permission: bool,
    /// The Graph application permission `Mail.ReadWrite` is granted (role in Graph tokens).
    pub graph_permission: bool,
}

impl Default for App {
    fn default() -> Self {
        App {
            secret: String::new(),
            certificate: None,
            mailboxes: Vec::new(),
            lifetime: 3599,
            public_client: false,
            consented: true,
            imap_permission: true,
            graph_permission: true,
        }
    }
}

/// One user of the tenant.
#[derive(Clone)]
pub struct User {
    /// Password for the password grant.
    pub password: String,
    /// Mailboxes the user can open: the own one and those with FullAccess.
    pub mailboxes: Vec<String>,
    /// Conditional Access demands MFA (the password grant fails).
    pub mfa: bool,
}

struct CodeGrant {
    client_id: String,
    user: String,
    challenge: String,
    redirect_uri: String,
    scope: String,
}

struct RefreshGrant {
    client_id: String,
    user: String,
    scope: String,
}

struct DeviceGrant {
    client_id: String,
    user_code: String,
    scope: String,
    approved_by: Option<String>,
}

#[derive(Default)]
struct Grants {
    codes: HashMap<String, CodeGrant>,
    refresh: HashMap<String, RefreshGrant>,
    revoked: HashSet<String>,
    expired: HashSet<String>,
    devices: HashMap<String, DeviceGrant>,
    browser_user: Option<String>,
}

struct Shared {
    url: String,
    key: Vec<u8>,
    apps: Mutex<HashMap<String, App>>,
    users: Mutex<HashMap<String, User>>,
    grants: Mutex<Grants>,
    requests: AtomicUsize,
    by_grant: Mutex<Vec<(String, std::time::Instant)>>,
    expired_next: AtomicUsize,
    /// The next requests answered 429 with this `Retry-After` value.
    throttled_next: Mutex<(usize, String)>,
}

/// A running token endpoint; stops when dropped.
pub struct Entra {
    /// `http://127.0.0.1:PORT`: the `authority` for credentials.
    pub url: String,
    /// The HS256 signing key (Dovecot gets it base64-encoded).
    pub key: Vec<u8>,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Entra {
    /// Starts the endpoint with applications and no users.
    pub fn start(apps: &[(&str, App)]) -> Entra {
        Self::start_with(apps, &[])
    }

    /// Starts the endpoint on a random loopback port, on a thread of its own (so it
    /// outlives any one test runtime).
    pub fn start_with(apps: &[(&str, App)], users: &[(&str, User)]) -> Entra {
        let key: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            url: url.clone(),
            key: key.clone(),
            apps: Mutex::new(
                apps.iter()
                    .map(|(id, a)| (id.to_string(), a.clone()))
                    .collect(),
            ),
            users: Mutex::new(
                users
                    .iter()
                    .map(|(name, u)| (name.to_lowercase(), u.clone()))
                    .collect(),
            ),
            grants: Mutex::new(Grants::default()),
            requests: AtomicUsize::new(0),
            by_grant: Mutex::new(Vec::new()),
            expired_next: AtomicUsize::new(0),
            throttled_next: Mutex::new((0, String::new())),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new()
                    .route("/{tenant}/oauth2/v2.0/token", axum::routing::post(token))
                    .route(
                        "/{tenant}/oauth2/v2.0/authorize",
                        axum::routing::get(authorize),
                    )
                    .route(
                        "/{tenant}/oauth2/v2.0/devicecode",
                        axum::routing::post(devicecode),
                    )
                    .with_state(state);
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Entra {
            url,
            key,
            shared,
            _stop: stop,
        }
    }

    /// Token requests answered so far (successful or not).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Token requests of one grant type (`refresh_token`, `password`, ...).
    pub fn requests_of(&self, grant_type: &str) -> usize {
        self.request_times(grant_type).len()
    }

    /// When each token request of one grant type arrived.
    pub fn request_times(&self, grant_type: &str) -> Vec<std::time::Instant> {
        let log = self.shared.by_grant.lock().unwrap();
        log.iter()
            .filter(|(g, _)| g == grant_type)
            .map(|(_, at)| *at)
            .collect()
    }

    /// The next `n` tokens are issued already expired (as if the clock had jumped).
    pub fn issue_expired_tokens(&self, n: usize) {
        self.shared.expired_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` token requests are throttled: HTTP 429 with `Retry-After: retry_after`
    /// (seconds or an HTTP date) and Entra's throttling error (AADSTS90055).
    pub fn throttle_next(&self, n: usize, retry_after: &str) {
        *self.shared.throttled_next.lock().unwrap() = (n, retry_after.to_string());
    }

    /// The user the "browser" is signed in as at the authorize endpoint.
    pub fn sign_in_as(&self, user: &str) {
        self.shared.grants.lock().unwrap().browser_user = Some(user.to_lowercase());
    }

    /// Approves a pending device code, as the user would on the verification page.
    pub fn approve_device(&self, user_code: &str, user: &str) -> bool {
        let mut grants = self.shared.grants.lock().unwrap();
        match grants
            .devices
            .values_mut()
            .find(|d| d.user_code == user_code)
        {
            Some(device) => {
                device.approved_by = Some(user.to_lowercase());
                true
            }
            None => false,
        }
    }

    /// Revokes every refresh token of a user (as "Revoke sessions" does): AADSTS50173.
    pub fn revoke_user(&self, user: &str) {
        self.end_user_grants(user, |g| &mut g.revoked);
    }

    /// Expires every refresh token of a user (90 days of inactivity): AADSTS700082.
    pub fn expire_user(&self, user: &str) {
        self.end_user_grants(user, |g| &mut g.expired);
    }

    /// Moves a user's live refresh tokens into the set that says why they died.
    fn end_user_grants(&self, user: &str, why: fn(&mut Grants) -> &mut HashSet<String>) {
        let user = user.to_lowercase();
        let mut grants = self.shared.grants.lock().unwrap();
        let tokens: Vec<String> = grants
            .refresh
            .iter()
            .filter(|(_, g)| g.user == user)
            .map(|(t, _)| t.clone())
            .collect();
        for t in tokens {
            grants.refresh.remove(&t);
            why(&mut grants).insert(t);
        }
    }

    /// Refresh tokens currently valid (rotation keeps one per sign-in).
    pub fn live_refresh_tokens(&self) -> usize {
        self.shared.grants.lock().unwrap().refresh.len()
    }
}

fn aad_error(status: StatusCode, error: &str, code: u32, text: &str) -> Response {
    let description = format!(
        "AADSTS{code}: {text} Trace ID: 0000 Correlation ID: 1111 Timestamp: 2026-01-01 00:00:00Z"
    );
    (
        status,
        Json(json!({"error": error, "error_description": description, "error_codes": [code]})),
    )
        .into_response()
}

/// Entra's answer to a tenant that does not exist (AADSTS90002).
fn unknown_tenant(tenant: &str) -> Option<Response> {
    (tenant != TENANT).then(|| {
        aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant}' not found."),
        )
    })
}

fn random_token(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>())
    )
}

fn sign(key: &[u8], claims: &serde_json::Value) -> String {
    let header = json!({"typ": "JWT", "alg": "HS256", "kid": KID});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fn grant_list(mailboxes: &[String]) -> String {
    format!(
        ",{},",
        mailboxes
            .iter()
            .map(|m| m.to_lowercase())
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// `(iat, exp)` for a new token, honouring `issue_expired_tokens`.
fn times(state: &Shared, lifetime: i64) -> (i64, i64) {
    let expired = state
        .expired_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let now = chrono::Utc::now().timestamp();
    if expired {
        (now - 3600, now - 60)
    } else {
        (now - 5, now + lifetime)
    }
}

fn app_token(state: &Shared, tenant: &str, client_id: &str, app: &App) -> Response {
    let (iat, exp) = times(state, app.lifetime);
    let claims = json!({
        "aud": "https://outlook.office365.com",
        "iss": format!("https://sts.windows.net/{tenant}/"),
        "iat": iat, "nbf": iat, "exp": exp,
        "appid": client_id, "appidacr": "1", "idtyp": "app",
        "oid": format!("sp-{client_id}"), "sub": format!("sp-{client_id}"), "tid": tenant,
        "roles": if app.imap_permission { json!(["IMAP.AccessAsApp"]) } else { json!([]) },
        "ver": "1.0",
        "mailboxes": grant_list(&app.mailboxes),
    });
    Json(json!({
        "token_type": "Bearer",
        "expires_in": app.lifetime,
        "ext_expires_in": app.lifetime,
        "access_token": sign(&state.key, &claims),
    }))
    .into_response()
}

/// An app-only token for Microsoft Graph: aud `https://graph.microsoft.com`, the role
/// `Mail.ReadWrite` when granted, and the same `mailboxes` claim (standing for RBAC for
/// Applications scoping) that the test Graph endpoint enforces.
fn graph_app_token(state: &Shared, tenant: &str, client_id: &str, app: &App) -> Response {
    let (iat, exp) = times(state, app.lifetime);
    let claims = json!({
        "aud": "https://graph.microsoft.com",
        "iss": format!("https://sts.windows.net/{tenant}/"),
        "iat": iat, "nbf": iat, "exp": exp,
        "appid": client_id, "idtyp": "app", "tid": tenant,
        "roles": if app.graph_permission { json!(["Mail.ReadWrite"]) } else { json!([]) },
        "ver": "1.0",
        "mailboxes": grant_list(&app.mailboxes),
    });
    Json(json!({
        "token_type": "Bearer",
        "expires_in": app.lifetime,
        "ext_expires_in": app.lifetime,
        "access_token": sign(&state.key, &claims),
    }))
    .into_response()
}

/// A delegated token for `user`, with a new refresh token when offline_access was asked.
fn user_token(
    state: &Shared,
    tenant: &str,
    client_id: &str,
    app: &App,
    user: &str,
    scope: &str,
) -> Response {
    let mailboxes = state
        .users
        .lock()
        .unwrap()
        .get(user)
        .map(|u| u.mailboxes.clone())
        .unwrap_or_default();
    let (iat, exp) = times(state, app.lifetime);
    // A Graph scope gets a Graph token (the refresh token serves both resources).
    let graph = scope
        .split_whitespace()
        .any(|s| s.starts_with("https://graph.microsoft.com/"));
    let (aud, scp, granted) = if graph {
        (
            "https://graph.microsoft.com",
            "Mail.ReadWrite.Shared",
            GRAPH_DELEGATED,
        )
    } else {
        (
            "https://outlook.office.com",
            "IMAP.AccessAsUser.All",
            IMAP_DELEGATED,
        )
    };
    let claims = json!({
        "aud": aud,
        "iss": format!("https://sts.windows.net/{tenant}/"),
        "iat": iat, "nbf": iat, "exp": exp,
        "appid": client_id, "idtyp": "user",
        "oid": format!("user-{user}"), "sub": format!("user-{user}"), "tid": tenant,
        "upn": user, "unique_name": user,
        "scp": scp, "ver": "1.0",
        "mailboxes": grant_list(&mailboxes),
    });
    let mut body = json!({
        "token_type": "Bearer",
        "scope": granted,
        "expires_in": app.lifetime,
        "ext_expires_in": app.lifetime,
        "access_token": sign(&state.key, &claims),
    });
    if scope.split_whitespace().any(|s| s == "offline_access") {
        let refresh = random_token("rt-");
        state.grants.lock().unwrap().refresh.insert(
            refresh.clone(),
            RefreshGrant {
                client_id: client_id.to_string(),
                user: user.to_string(),
                scope: scope.to_string(),
            },
        );
        body["refresh_token"] = json!(refresh);
    }
    Json(body).into_response()
}

/// Checks the application's own proof: secret, assertion, or (public clients) none.
/// The error is the reply itself (a test endpoint: its size does not matter).
#[allow(clippy::result_large_err)]
fn authenticate_client(
    state: &Shared,
    tenant: &str,
    client_id: &str,
    app: &App,
    form: &HashMap<String, String>,
    grant: &str,
) -> Result<(), Response> {
    if let Some(secret) = form.get("client_secret") {
        if app.secret.is_empty() || *secret != app.secret {
            return Err(aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                "Invalid client secret provided.",
            ));
        }
        return Ok(());
    }
    if let Some(assertion) = form.get("client_assertion") {
        return check_assertion(state, tenant, client_id, app, form, assertion);
    }
    if grant == "client_credentials" {
        return Err(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000216,
            "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.",
        ));
    }
    if !app.public_client {
        return Err(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ));
    }
    Ok(())
}

#[allow(clippy::result_large_err)]
fn check_assertion(
    state: &Shared,
    tenant: &str,
    client_id: &str,
    app: &App,
    form: &HashMap<String, String>,
    assertion: &str,
) -> Result<(), Response> {
    let bad =
        |code: u32, text: &str| aad_error(StatusCode::UNAUTHORIZED, "invalid_client", code, text);
    if form.get("client_assertion_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return Err(bad(
            700025,
            "Client assertion type is missing or not supported.",
        ));
    }
    let Some(certificate) = &app.certificate else {
        return Err(bad(
            700027,
            "The certificate with identifier used to sign the client assertion is not registered on application.",
        ));
    };
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| bad(700027, "Client assertion failed signature validation."))?;
    if header.alg != jsonwebtoken::Algorithm::RS256 {
        return Err(bad(700027, "Client assertion failed signature validation."));
    }
    if header.x5t_s256.as_deref() != Some(certificate.thumbprint_s256.as_str()) {
        return Err(bad(
            700027,
            "The certificate with identifier used to sign the client assertion is not registered on application.",
        ));
    }
    let key =
        jsonwebtoken::DecodingKey::from_rsa_pem(certificate.public_key_pem.as_bytes()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[format!("{}/{tenant}/oauth2/v2.0/token", state.url)]);
    validation.set_issuer(&[client_id]);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &validation).map_err(
        |e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => bad(
                700024,
                "Client assertion is not within its valid time range.",
            ),
            jsonwebtoken::errors::ErrorKind::InvalidAudience => bad(
                700212,
                "No matching federated identity record found for presented assertion audience.",
            ),
            _ => bad(700027, "Client assertion failed signature validation."),
        },
    )?;
    let now = chrono::Utc::now().timestamp();
    let claims = data.claims;
    if claims["sub"].as_str() != Some(client_id) || claims["jti"].as_str().is_none_or(str::is_empty)
    {
        return Err(bad(
            700023,
            "Client assertion audience claim does not match Realm issuer.",
        ));
    }
    if claims["exp"].as_i64().is_none_or(|exp| exp - now > 3600) {
        return Err(bad(
            700024,
            "Client assertion is not within its valid time range.",
        ));
    }
    Ok(())
}

fn scope_has(scope: &str, wanted: &str) -> bool {
    scope
        .split_whitespace()
        .any(|s| s == wanted || s == "IMAP.AccessAsUser.All" && wanted == IMAP_DELEGATED)
}

async fn token(
    State(state): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    state
        .by_grant
        .lock()
        .unwrap()
        .push((grant.clone(), std::time::Instant::now()));
    if let Some(reply) = unknown_tenant(&tenant) {
        return reply;
    }
    {
        let mut throttled = state.throttled_next.lock().unwrap();
        if throttled.0 > 0 {
            throttled.0 -= 1;
            let mut reply = aad_error(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                90055,
                "Too many requests from this client; retry after the interval in Retry-After.",
            );
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, throttled.1.parse().unwrap());
            return reply;
        }
    }
    let client_id = form.get("client_id").cloned().unwrap_or_default();
    let Some(app) = state.apps.lock().unwrap().get(&client_id).cloned() else {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'."
            ),
        );
    };
    if let Err(reply) = authenticate_client(&state, &tenant, &client_id, &app, &form, &grant) {
        return reply;
    }
    let scope = form.get("scope").cloned().unwrap_or_default();
    let invalid_grant =
        |code: u32, text: &str| aad_error(StatusCode::BAD_REQUEST, "invalid_grant", code, text);
    match grant.as_str() {
        "client_credentials" => {
            if scope == GRAPH_APP_SCOPE {
                return graph_app_token(&state, &tenant, &client_id, &app);
            }
            if scope != APP_SCOPE {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    1002012,
                    "The provided value for scope is not valid.",
                );
            }
            app_token(&state, &tenant, &client_id, &app)
        }
        "password" => {
            let username = form
                .get("username")
                .cloned()
                .unwrap_or_default()
                .to_lowercase();
            let user = state.users.lock().unwrap().get(&username).cloned();
            match user {
                Some(u) if form.get("password") == Some(&u.password) => {
                    if u.mfa {
                        return invalid_grant(
                            50076,
                            "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
                        );
                    }
                }
                _ => {
                    return invalid_grant(
                        50126,
                        "Error validating credentials due to invalid username or password.",
                    );
                }
            }
            if !scope_has(&scope, IMAP_DELEGATED) && !scope_has(&scope, GRAPH_DELEGATED) {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    70011,
                    "The provided value for the input parameter 'scope' is not valid.",
                );
            }
            if !app.consented {
                return invalid_grant(
                    65001,
                    "The user or administrator has not consented to use the application.",
                );
            }
            user_token(&state, &tenant, &client_id, &app, &username, &scope)
        }
        "authorization_code" => {
            let code = form.get("code").cloned().unwrap_or_default();
            let Some(grant) = state.grants.lock().unwrap().codes.remove(&code) else {
                return invalid_grant(
                    54005,
                    "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
                );
            };
            if grant.client_id != client_id || form.get("redirect_uri") != Some(&grant.redirect_uri)
            {
                return invalid_grant(
                    50148,
                    "The code_verifier or redirect_uri does not match the authorization request.",
                );
            }
            let verifier = form.get("code_verifier").cloned().unwrap_or_default();
            if URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != grant.challenge {
                return invalid_grant(
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                );
            }
            user_token(&state, &tenant, &client_id, &app, &grant.user, &grant.scope)
        }
        "refresh_token" => {
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            let found = {
                let mut grants = state.grants.lock().unwrap();
                if grants.revoked.contains(&presented) {
                    Err(invalid_grant(
                        50173,
                        "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.",
                    ))
                } else if grants.expired.contains(&presented) {
                    Err(invalid_grant(
                        700082,
                        "The refresh token has expired due to inactivity.",
                    ))
                } else {
                    grants.refresh.remove(&presented).ok_or_else(|| invalid_grant(9002313, "Invalid request. Request is malformed or invalid: the refresh token was already redeemed or never issued."))
                }
            };
            let grant = match found {
                Ok(g) => g,
                Err(reply) => return reply,
            };
            if grant.client_id != client_id {
                return invalid_grant(
                    70000,
                    "The provided grant is not valid for this application.",
                );
            }
            let scope = if scope.is_empty() { grant.scope } else { scope };
            user_token(&state, &tenant, &client_id, &app, &grant.user, &scope)
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            let device_code = form.get("device_code").cloned().unwrap_or_default();
            let mut grants = state.grants.lock().unwrap();
            let Some(device) = grants.devices.get(&device_code) else {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "expired_token",
                    70020,
                    "The provided value for the input parameter 'device_code' is not valid.",
                );
            };
            let Some(user) = device.approved_by.clone() else {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "authorization_pending",
                    70016,
                    "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                );
            };
            let device = grants.devices.remove(&device_code).unwrap();
            drop(grants);
            if device.client_id != client_id {
                return invalid_grant(
                    70000,
                    "The provided grant is not valid for this application.",
                );
            }
            user_token(&state, &tenant, &client_id, &app, &user, &device.scope)
        }
        _ => aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        ),
    }
}

/// The browser's visit to the sign-in page: signs in the [`Entra::sign_in_as`] user and
/// redirects to the loopback address with a code (or an error).
async fn authorize(
    State(state): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if tenant != TENANT {
        return (StatusCode::BAD_REQUEST, "AADSTS90002: Tenant not found.").into_response();
    }
    let client_id = q.get("client_id").cloned().unwrap_or_default();
    let Some(app) = state.apps.lock().unwrap().get(&client_id).cloned() else {
        return (
            StatusCode::BAD_REQUEST,
            "AADSTS700016: Application not found in the directory.",
        )
            .into_response();
    };
    let redirect_uri = q.get("redirect_uri").cloned().unwrap_or_default();
    if !redirect_uri.starts_with("http://localhost:")
        && !redirect_uri.starts_with("http://127.0.0.1:")
    {
        return (StatusCode::BAD_REQUEST, "AADSTS50011: The redirect URI specified in the request does not match the redirect URIs configured for the application.").into_response();
    }
    let state_param = q.get("state").cloned().unwrap_or_default();
    let redirect = |params: &[(&str, &str)]| {
        let url = url::Url::parse_with_params(&redirect_uri, params).unwrap();
        (StatusCode::FOUND, [(header::LOCATION, url.to_string())]).into_response()
    };
    if q.get("code_challenge_method").map(String::as_str) != Some("S256")
        || !q.contains_key("code_challenge")
    {
        return redirect(&[
            ("error", "invalid_request"),
            (
                "error_description",
                "AADSTS9002325: Proof Key for Code Exchange is required for cross-origin authorization code redemption.",
            ),
            ("state", &state_param),
        ]);
    }
    if !app.consented {
        return redirect(&[
            ("error", "consent_required"),
            (
                "error_description",
                "AADSTS65001: The user or administrator has not consented to use the application.",
            ),
            ("state", &state_param),
        ]);
    }
    let Some(user) = state.grants.lock().unwrap().browser_user.clone() else {
        return (
            StatusCode::BAD_REQUEST,
            "nobody is signed in in this test browser",
        )
            .into_response();
    };
    let code = random_token("code-");
    state.grants.lock().unwrap().codes.insert(
        code.clone(),
        CodeGrant {
            client_id,
            user,
            challenge: q["code_challenge"].clone(),
            redirect_uri: redirect_uri.clone(),
            scope: q.get("scope").cloned().unwrap_or_default(),
        },
    );
    redirect(&[
        ("code", &code),
        ("state", &state_param),
        ("session_state", "s"),
    ])
}

async fn devicecode(
    State(state): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(reply) = unknown_tenant(&tenant) {
        return reply;
    }
    let client_id = form.get("client_id").cloned().unwrap_or_default();
    if !state.apps.lock().unwrap().contains_key(&client_id) {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application not found in the directory.",
        );
    }
    let device_code = random_token("dc-");
    let user_code = hex::encode_upper(rand::random::<[u8; 4]>());
    state.grants.lock().unwrap().devices.insert(
        device_code.clone(),
        DeviceGrant {
            client_id,
            user_code: user_code.clone(),
            scope: form.get("scope").cloned().unwrap_or_default(),
            approved_by: None,
        },
    );
    let verification_uri = format!("{}/devicelogin", state.url);
    Json(json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": verification_uri,
        "expires_in": 900,
        "interval": 1,
        "message": format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {user_code} to authenticate."),
    }))
    .into_response()
}

/// A self-signed certificate and RSA key made with openssl, and the certificate as the
/// endpoint registers it (public key and thumbprint computed by openssl, independently of
/// the code under test).
pub fn make_certificate(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, Certificate) {
    let cert = dir.join("app.pem");
    let key = dir.join("app.key");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=mail2ticket-test-app",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    let public_key_pem = String::from_utf8(run(&[
        "x509",
        "-pubkey",
        "-noout",
        "-in",
        cert.to_str().unwrap(),
    ]))
    .unwrap();
    let der = run(&["x509", "-outform", "DER", "-in", cert.to_str().unwrap()]);
    let thumbprint_s256 = URL_SAFE_NO_PAD.encode(Sha256::digest(&der));
    (
        cert,
        key,
        Certificate {
            public_key_pem,
            thumbprint_s256,
        },
    )
}
