//! An Entra-ID-compatible token endpoint for the tests (the only stand-in in the suite:
//! Microsoft's own endpoint cannot be reached from here).
//!
//! POST `/{tenant}/oauth2/v2.0/token` with the client-credentials grant returns
//! `{token_type, expires_in, ext_expires_in, access_token}`; errors are AADSTS-shaped like
//! Entra's (7000215 bad secret, 700016 unknown client, 90002 unknown tenant, 1002012 bad
//! scope, 70003 unsupported grant). Tokens are Exchange-shaped app tokens (aud
//! `https://outlook.office365.com`, iss `https://sts.windows.net/{tid}/`, roles
//! `IMAP.AccessAsApp`) signed HS256, plus a claim `mailboxes` (",a@x,b@y,") that stands for
//! Exchange's FullAccess grants so that Dovecot can enforce them (see `dovecot.rs`).

use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The tenant every test uses (Dovecot's `issuers` names it).
pub const TENANT: &str = "11111111-2222-3333-4444-555555555555";
/// Key id in token headers and in Dovecot's key dictionary.
pub const KID: &str = "k1";
const SCOPE: &str = "https://outlook.office365.com/.default";

/// One registered application.
#[derive(Clone)]
pub struct App {
    /// Its client secret.
    pub secret: String,
    /// Mailboxes it has FullAccess to.
    pub mailboxes: Vec<String>,
    /// Token lifetime in seconds.
    pub lifetime: i64,
}

struct Shared {
    key: Vec<u8>,
    apps: Mutex<HashMap<String, App>>,
    requests: AtomicUsize,
    expired_next: AtomicUsize,
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
    /// Starts the endpoint on a random loopback port, on a thread of its own (so it
    /// outlives any one test runtime).
    pub fn start(apps: &[(&str, App)]) -> Entra {
        let key: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
        let shared = Arc::new(Shared {
            key: key.clone(),
            apps: Mutex::new(
                apps.iter()
                    .map(|(id, a)| (id.to_string(), a.clone()))
                    .collect(),
            ),
            requests: AtomicUsize::new(0),
            expired_next: AtomicUsize::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
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

    /// The next `n` tokens are issued already expired (as if the clock had jumped).
    pub fn issue_expired_tokens(&self, n: usize) {
        self.shared.expired_next.store(n, Ordering::SeqCst);
    }
}

type Reply = Response;

fn aad_error(status: StatusCode, error: &str, code: u32, text: &str) -> Reply {
    let description = format!(
        "AADSTS{code}: {text} Trace ID: 0000 Correlation ID: 1111 Timestamp: 2026-01-01 00:00:00Z"
    );
    (
        status,
        Json(json!({"error": error, "error_description": description, "error_codes": [code]})),
    )
        .into_response()
}

async fn token(
    State(state): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Reply {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if tenant != TENANT {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant}' not found."),
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
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
    if form.get("client_secret") != Some(&app.secret) {
        return aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        );
    }
    if form.get("scope").map(String::as_str) != Some(SCOPE) {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            "The provided value for scope is not valid.",
        );
    }
    let expired = state
        .expired_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let now = chrono::Utc::now().timestamp();
    let (iat, exp) = if expired {
        (now - 3600, now - 60)
    } else {
        (now - 5, now + app.lifetime)
    };
    let claims = json!({
        "aud": "https://outlook.office365.com",
        "iss": format!("https://sts.windows.net/{tenant}/"),
        "iat": iat, "nbf": iat, "exp": exp,
        "appid": client_id, "appidacr": "1", "idtyp": "app",
        "oid": format!("sp-{client_id}"), "sub": format!("sp-{client_id}"), "tid": tenant,
        "roles": ["IMAP.AccessAsApp"], "ver": "1.0",
        "mailboxes": format!(",{},", app.mailboxes.iter().map(|m| m.to_lowercase()).collect::<Vec<_>>().join(",")),
    });
    let header = json!({"typ": "JWT", "alg": "HS256", "kid": KID});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&state.key).unwrap();
    mac.update(signing_input.as_bytes());
    let jwt = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    );
    Json(json!({
        "token_type": "Bearer",
        "expires_in": app.lifetime,
        "ext_expires_in": app.lifetime,
        "access_token": jwt,
    }))
    .into_response()
}
