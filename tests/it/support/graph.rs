//! A Microsoft-Graph-compatible mail endpoint for the tests (Graph cannot be reached from
//! here), written from Graph's v1.0 documentation for the calls mail2ticket makes:
//! - `GET /users/{u}/mailFolders[/{id}][/childFolders]` with `$filter=displayName eq '..'`,
//!   well-known names (`inbox`, `archive`, `deleteditems`, `msgfolderroot`);
//! - `GET /users/{u}/mailFolders/{id}/messages/delta`: rounds of pages
//!   (`Prefer: odata.maxpagesize`, capped at the endpoint's own page size), each with an
//!   `@odata.nextLink` (`$skiptoken`) or, last, an `@odata.deltaLink` (`$deltatoken`); a
//!   later round returns messages created or changed since, and `@removed` entries for
//!   messages that left the folder; a lost sync state answers `410 Gone`;
//! - `GET /users/{u}/messages/{id}/$value` (the MIME), `GET ...?$select=internetMessageHeaders`,
//!   `PATCH` (`isRead`), `POST .../move` (`destinationId`), `DELETE` (to Deleted Items);
//! - tokens checked like Graph does: a valid HS256 JWT from the test Entra (401
//!   `InvalidAuthenticationToken` otherwise), audience `https://graph.microsoft.com`, role
//!   (app-only) or scope (delegated) `Mail.ReadWrite` (`.Shared`), and the `mailboxes`
//!   claim standing for RBAC-for-Applications scoping or the user's FullAccess (403
//!   `ErrorAccessDenied` otherwise); unknown users `404 ErrorInvalidUser`;
//! - faults on demand: `429` with `Retry-After`, `410` for outstanding sync tokens, a
//!   `$value` download cut off mid-body, a `move` failing with `500`.
//!
//! Errors have Graph's shape: `{"error": {"code", "message"}}`.

// A handler's early answers are whole responses; their size does not matter in a test server.
#![allow(clippy::result_large_err)]

use super::entra::Entra;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Largest page the endpoint serves, whatever the client prefers.
pub const PAGE_LIMIT: usize = 10;

/// A message in a mailbox.
#[derive(Clone)]
struct Message {
    id: String,
    folder: String,
    raw: Vec<u8>,
    is_read: bool,
    received: DateTime<Utc>,
    internet_message_id: Option<String>,
    /// The change counter when it was created or last changed in its folder.
    changed: u64,
}

#[derive(Clone)]
struct Folder {
    id: String,
    name: String,
    parent: Option<String>,
    well_known: Option<&'static str>,
}

#[derive(Default)]
struct Mailbox {
    folders: Vec<Folder>,
    messages: Vec<Message>,
    /// (message id, folder it left, change counter).
    removed: Vec<(String, String, u64)>,
}

#[derive(Default)]
struct Data {
    seq: u64,
    next_id: u64,
    /// Sync tokens of earlier generations are gone (410).
    generation: u64,
    mailboxes: HashMap<String, Mailbox>,
    /// The snapshot of every round started: its entries, in order.
    rounds: Vec<Vec<Value>>,
}

struct Shared {
    key: Vec<u8>,
    data: Mutex<Data>,
    /// The next requests answered 429 with this `Retry-After` (empty: none).
    throttled_next: Mutex<(usize, String)>,
    /// The next `$value` downloads cut off after half of the message.
    cut_next: AtomicUsize,
    /// Messages whose every download is cut off.
    cut_always: Mutex<Vec<String>>,
    /// The next this many `move` requests fail with this status.
    fail_next_moves: Mutex<(usize, u16)>,
    /// Every request: "METHOD kind".
    log: Mutex<Vec<String>>,
    base: Mutex<String>,
    /// Requests being answered now, and the most ever at once.
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    /// Each request takes at least this long (to let concurrency build up).
    delay_ms: AtomicUsize,
    /// Mailboxes Graph cannot serve (`MailboxNotEnabledForRESTAPI`).
    not_rest: Mutex<Vec<String>>,
}

/// A request being answered; counted in `in_flight` until dropped.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running Graph endpoint; stops when dropped.
pub struct GraphFake {
    /// `http://127.0.0.1:PORT/v1.0`: the `base_url` for parsers.
    pub url: String,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl GraphFake {
    /// Starts the endpoint, trusting the tokens of `entra`, with `mailboxes`.
    pub async fn start(entra: &Entra, mailboxes: &[&str]) -> GraphFake {
        let shared = Arc::new(Shared {
            key: entra.key.clone(),
            data: Mutex::default(),
            throttled_next: Mutex::new((0, String::new())),
            cut_next: AtomicUsize::new(0),
            cut_always: Mutex::default(),
            fail_next_moves: Mutex::new((0, 500)),
            log: Mutex::default(),
            base: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            delay_ms: AtomicUsize::new(0),
            not_rest: Mutex::default(),
        });
        for m in mailboxes {
            shared.data.lock().unwrap().mailboxes.insert(
                m.to_lowercase(),
                Mailbox {
                    folders: default_folders(),
                    ..Mailbox::default()
                },
            );
        }
        let router = axum::Router::new()
            .route(
                "/v1.0/users/{user}/mailFolders",
                axum::routing::get(folders),
            )
            .route(
                "/v1.0/users/{user}/mailFolders/{folder}",
                axum::routing::get(folder),
            )
            .route(
                "/v1.0/users/{user}/mailFolders/{folder}/childFolders",
                axum::routing::get(child_folders),
            )
            .route(
                "/v1.0/users/{user}/mailFolders/{folder}/messages/delta",
                axum::routing::get(delta),
            )
            .route(
                "/v1.0/users/{user}/messages/{id}",
                axum::routing::get(message).patch(patch).delete(delete),
            )
            .route(
                "/v1.0/users/{user}/messages/{id}/$value",
                axum::routing::get(value),
            )
            .route(
                "/v1.0/users/{user}/messages/{id}/move",
                axum::routing::post(move_message),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://127.0.0.1:{}/v1.0",
            listener.local_addr().unwrap().port()
        );
        *shared.base.lock().unwrap() = url.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        GraphFake {
            url,
            shared,
            _stop: stop,
        }
    }

    /// Puts a message into `folder` (a well-known name or a display name) of `mailbox`.
    pub fn deliver(
        &self,
        mailbox: &str,
        folder: &str,
        raw: &[u8],
        is_read: bool,
        received: DateTime<Utc>,
    ) -> String {
        let mut data = self.shared.data.lock().unwrap();
        data.seq += 1;
        data.next_id += 1;
        let (seq, n) = (data.seq, data.next_id);
        let mbox = data
            .mailboxes
            .get_mut(&mailbox.to_lowercase())
            .expect("a known mailbox");
        let folder = find_folder(mbox, folder).expect("a known folder").id;
        let id = format!("AAMkImmutable{n:06}=");
        let internet_message_id = header_value(raw, "Message-ID");
        mbox.messages.push(Message {
            id: id.clone(),
            folder,
            raw: raw.to_vec(),
            is_read,
            received,
            internet_message_id,
            changed: seq,
        });
        id
    }

    /// Adds a folder named `name` under `parent` (a well-known name or display name).
    pub fn add_folder(&self, mailbox: &str, parent: &str, name: &str) {
        let mut data = self.shared.data.lock().unwrap();
        let mbox = data.mailboxes.get_mut(&mailbox.to_lowercase()).unwrap();
        let parent = find_folder(mbox, parent).unwrap().id;
        let id = format!("AAMkFolder{}", mbox.folders.len());
        mbox.folders.push(Folder {
            id,
            name: name.to_string(),
            parent: Some(parent),
            well_known: None,
        });
    }

    /// The messages in `folder` of `mailbox`: (id, isRead).
    pub fn messages(&self, mailbox: &str, folder: &str) -> Vec<(String, bool)> {
        let data = self.shared.data.lock().unwrap();
        let mbox = &data.mailboxes[&mailbox.to_lowercase()];
        let folder = find_folder(mbox, folder).unwrap().id;
        mbox.messages
            .iter()
            .filter(|m| m.folder == folder)
            .map(|m| (m.id.clone(), m.is_read))
            .collect()
    }

    /// The next `n` requests are answered `429` with `Retry-After: retry_after`.
    pub fn throttle_next(&self, n: usize, retry_after: &str) {
        *self.shared.throttled_next.lock().unwrap() = (n, retry_after.to_string());
    }

    /// Every outstanding sync token is lost: the next request with one gets `410 Gone`.
    pub fn lose_sync_state(&self) {
        self.shared.data.lock().unwrap().generation += 1;
    }

    /// The next `n` downloads (`$value`) are cut off half way.
    pub fn cut_next_downloads(&self, n: usize) {
        self.shared.cut_next.store(n, Ordering::SeqCst);
    }

    /// Every download of message `id` is cut off half way (a message the server never
    /// manages to send).
    pub fn cut_always(&self, id: &str) {
        self.shared.cut_always.lock().unwrap().push(id.to_string());
    }

    /// The next `n` moves fail with `status` (500: `generalException`, a server fault;
    /// 403: `ErrorAccessDenied`, a refusal); the message stays.
    pub fn fail_next_moves(&self, n: usize, status: u16) {
        *self.shared.fail_next_moves.lock().unwrap() = (n, status);
    }

    /// Every request takes at least `ms` milliseconds.
    pub fn slow_down(&self, ms: usize) {
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// The most requests ever answered at the same time.
    pub fn most_in_flight(&self) -> usize {
        self.shared.most_in_flight.load(Ordering::SeqCst)
    }

    /// `mailbox` cannot be read through Graph (an on-premises mailbox, say).
    pub fn disable_rest(&self, mailbox: &str) {
        self.shared
            .not_rest
            .lock()
            .unwrap()
            .push(mailbox.to_lowercase());
    }

    /// How many requests of `kind` (`delta`, `$value`, `patch`, `move`, `delete`,
    /// `headers`, `folders`, `throttled`) were made.
    pub fn requests(&self, kind: &str) -> usize {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|k| *k == kind)
            .count()
    }
}

fn default_folders() -> Vec<Folder> {
    let folder = |id: &str, name: &str, parent: Option<&str>, well_known| Folder {
        id: id.to_string(),
        name: name.to_string(),
        parent: parent.map(str::to_string),
        well_known: Some(well_known),
    };
    vec![
        folder(
            "AAMkRoot",
            "Top of Information Store",
            None,
            "msgfolderroot",
        ),
        folder("AAMkInbox", "Inbox", Some("AAMkRoot"), "inbox"),
        folder("AAMkArchive", "Archive", Some("AAMkRoot"), "archive"),
        folder(
            "AAMkDeleted",
            "Deleted Items",
            Some("AAMkRoot"),
            "deleteditems",
        ),
    ]
}

/// A folder by id, well-known name or display name.
fn find_folder(mbox: &Mailbox, key: &str) -> Option<Folder> {
    let lower = key.to_lowercase();
    mbox.folders
        .iter()
        .find(|f| {
            f.id == key || f.well_known == Some(lower.as_str()) || f.name.to_lowercase() == lower
        })
        .cloned()
}

fn header_value(raw: &[u8], name: &str) -> Option<String> {
    header_fields(raw)
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The header fields of a message, unfolded.
fn header_fields(raw: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(raw);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            fields.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    fields
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Checks the bearer token for `user` (and writing when `write`), counts the request
/// (and how many are answered at once), plays throttling and slowness.
async fn admit(
    state: &Arc<Shared>,
    headers: &HeaderMap,
    user: &str,
    kind: &str,
    write: bool,
) -> Result<InFlight, Response> {
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let guard = InFlight(state.clone());
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay as u64)).await;
    }
    check(state, headers, user, kind, write)?;
    Ok(guard)
}

/// The checks of [`admit`].
fn check(
    state: &Shared,
    headers: &HeaderMap,
    user: &str,
    kind: &str,
    write: bool,
) -> Result<(), Response> {
    {
        let mut throttled = state.throttled_next.lock().unwrap();
        if throttled.0 > 0 {
            throttled.0 -= 1;
            state.log.lock().unwrap().push("throttled".into());
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, throttled.1.parse().unwrap());
            return Err(response);
        }
    }
    state.log.lock().unwrap().push(kind.into());
    let unauthorized = || {
        error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Access token validation failure. Invalid audience.",
        )
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(unauthorized)?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["https://graph.microsoft.com"]);
    validation.leeway = 0;
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(&state.key),
        &validation,
    )
    .map_err(|_| unauthorized())?
    .claims;
    let roles: Vec<&str> = claims["roles"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let scopes: Vec<&str> = claims["scp"]
        .as_str()
        .unwrap_or_default()
        .split(' ')
        .collect();
    let has = |p: &str| {
        roles.contains(&p)
            || scopes.contains(&p)
            || scopes.contains(&format!("{p}.Shared").as_str())
    };
    let allowed = has("Mail.ReadWrite") || (!write && has("Mail.Read"));
    let granted = claims["mailboxes"]
        .as_str()
        .unwrap_or_default()
        .contains(&format!(",{},", user.to_lowercase()));
    if !state
        .data
        .lock()
        .unwrap()
        .mailboxes
        .contains_key(&user.to_lowercase())
    {
        return Err(error(
            StatusCode::NOT_FOUND,
            "ErrorInvalidUser",
            &format!("The requested user '{user}' is invalid."),
        ));
    }
    if !allowed || !granted {
        return Err(error(
            StatusCode::FORBIDDEN,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        ));
    }
    if state
        .not_rest
        .lock()
        .unwrap()
        .contains(&user.to_lowercase())
    {
        return Err(error(
            StatusCode::NOT_FOUND,
            "MailboxNotEnabledForRESTAPI",
            "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
        ));
    }
    Ok(())
}

fn folder_json(mbox: &Mailbox, f: &Folder) -> Value {
    let inside: Vec<&Message> = mbox.messages.iter().filter(|m| m.folder == f.id).collect();
    json!({
        "id": f.id,
        "displayName": f.name,
        "parentFolderId": f.parent,
        "totalItemCount": inside.len(),
        "unreadItemCount": inside.iter().filter(|m| !m.is_read).count(),
    })
}

/// Folders under `parent`, filtered by `displayName eq '...'` when asked.
fn list_folders(
    state: &Shared,
    user: &str,
    parent: &str,
    query: &HashMap<String, String>,
) -> Response {
    let data = state.data.lock().unwrap();
    let mbox = &data.mailboxes[&user.to_lowercase()];
    let Some(parent) = find_folder(mbox, parent) else {
        return error(
            StatusCode::NOT_FOUND,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        );
    };
    let wanted = query.get("$filter").and_then(|f| {
        f.strip_prefix("displayName eq '")
            .and_then(|rest| rest.strip_suffix('\''))
            .map(|name| name.replace("''", "'"))
    });
    let value: Vec<Value> = mbox
        .folders
        .iter()
        .filter(|f| f.parent.as_deref() == Some(parent.id.as_str()))
        .filter(|f| wanted.as_ref().is_none_or(|w| &f.name == w))
        .map(|f| folder_json(mbox, f))
        .collect();
    Json(json!({"value": value})).into_response()
}

async fn folders(
    State(state): State<Arc<Shared>>,
    Path(user): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let _in_flight = match admit(&state, &headers, &user, "folders", false).await {
        Ok(guard) => guard,
        Err(r) => return r,
    };
    list_folders(&state, &user, "msgfolderroot", &query)
}

async fn child_folders(
    State(state): State<Arc<Shared>>,
    Path((user, parent)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let _in_flight = match admit(&state, &headers, &user, "folders", false).await {
        Ok(guard) => guard,
        Err(r) => return r,
    };
    list_folders(&state, &user, &parent, &query)
}

async fn folder(
    State(state): State<Arc<Shared>>,
    Path((user, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let _in_flight = match admit(&state, &headers, &user, "folders", false).await {
        Ok(guard) => guard,
        Err(r) => return r,
    };
    let data = state.data.lock().unwrap();
    let mbox = &data.mailboxes[&user.to_lowercase()];
    match find_folder(mbox, &key)
        .filter(|f| f.id == key || f.well_known.is_some_and(|w| w == key.to_lowercase()))
    {
        Some(f) => Json(folder_json(mbox, &f)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "ErrorInvalidIdMalformed",
            "Id is malformed.",
        ),
    }
}

/// One page of a delta round: `$skiptoken` = generation.round.offset.upto, `$deltatoken`
/// = generation.upto.
async fn delta(
    State(state): State<Arc<Shared>>,
    Path((user, key)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let _in_flight = match admit(&state, &headers, &user, "delta", false).await {
        Ok(guard) => guard,
        Err(r) => return r,
    };
    let page_size = headers
        .get("Prefer")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .find_map(|p| p.trim().strip_prefix("odata.maxpagesize="))
        })
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(PAGE_LIMIT)
        .min(PAGE_LIMIT);
    let immutable = headers.get_all("Prefer").iter().any(|v| {
        v.to_str()
            .unwrap_or_default()
            .contains("IdType=\"ImmutableId\"")
    });
    let mut data = state.data.lock().unwrap();
    let numbers =
        |token: &str| -> Vec<u64> { token.split('.').filter_map(|n| n.parse().ok()).collect() };
    let generation = data.generation;
    // A round is a snapshot taken when it starts (like Graph's sync state): what changes
    // while it is read comes in the next round.
    let (round, offset, upto) = match (query.get("$skiptoken"), query.get("$deltatoken")) {
        (Some(t), _) => match numbers(t).as_slice() {
            [g, r, o, u] if *g == generation => (*r as usize, *o as usize, *u),
            _ => return gone(),
        },
        (None, Some(t)) => match numbers(t).as_slice() {
            [g, since] if *g == generation => {
                match start_round(&mut data, &user, &key, *since, immutable) {
                    Some(round) => round,
                    None => {
                        return error(
                            StatusCode::NOT_FOUND,
                            "ErrorInvalidIdMalformed",
                            "Id is malformed.",
                        );
                    }
                }
            }
            _ => return gone(),
        },
        (None, None) => match start_round(&mut data, &user, &key, 0, immutable) {
            Some(round) => round,
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "ErrorInvalidIdMalformed",
                    "Id is malformed.",
                );
            }
        },
    };
    let entries = &data.rounds[round];
    let value: Vec<Value> = entries
        .iter()
        .skip(offset)
        .take(page_size)
        .cloned()
        .collect();
    let base = state.base.lock().unwrap().clone();
    let here = format!("{base}/users/{user}/mailFolders/{key}/messages/delta");
    let mut body =
        json!({"@odata.context": format!("{base}/$metadata#Collection(message)"), "value": value});
    if offset + page_size < entries.len() {
        body["@odata.nextLink"] = json!(format!(
            "{here}?$skiptoken={generation}.{round}.{}.{upto}",
            offset + page_size
        ));
    } else {
        body["@odata.deltaLink"] = json!(format!("{here}?$deltatoken={generation}.{upto}"));
    }
    Json(body).into_response()
}

/// Takes the snapshot of a round over the changes after `since`: (round, 0, upto).
fn start_round(
    data: &mut Data,
    user: &str,
    key: &str,
    since: u64,
    immutable: bool,
) -> Option<(usize, usize, u64)> {
    let upto = data.seq;
    let mbox = &data.mailboxes[&user.to_lowercase()];
    let folder = find_folder(mbox, key)?;
    let mut entries: Vec<Value> = Vec::new();
    if since > 0 {
        for (id, _, _) in mbox
            .removed
            .iter()
            .filter(|(_, f, s)| *f == folder.id && *s > since && *s <= upto)
        {
            entries.push(json!({"id": id, "@removed": {"reason": "deleted"}}));
        }
    }
    let mut changed: Vec<&Message> = mbox
        .messages
        .iter()
        .filter(|m| m.folder == folder.id && m.changed > since && m.changed <= upto)
        .collect();
    changed.sort_by_key(|m| (m.changed, m.id.clone()));
    for m in changed {
        let id = if immutable {
            m.id.clone()
        } else {
            format!("mutable-{}", m.id)
        };
        entries.push(json!({
            "@odata.type": "#microsoft.graph.message",
            "id": id,
            "internetMessageId": m.internet_message_id,
            "receivedDateTime": m.received.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "isRead": m.is_read,
        }));
    }
    data.rounds.push(entries);
    Some((data.rounds.len() - 1, 0, upto))
}

fn gone() -> Response {
    error(
        StatusCode::GONE,
        "SyncStateNotFound",
        "The sync state generation is no longer valid.",
    )
}

/// Runs `f` on message `id` of `user`, or answers 404.
fn with_message<T>(
    state: &Shared,
    user: &str,
    id: &str,
    f: impl FnOnce(&mut Data, usize) -> T,
) -> Result<T, Response> {
    let mut data = state.data.lock().unwrap();
    let index = data.mailboxes[&user.to_lowercase()]
        .messages
        .iter()
        .position(|m| m.id == id);
    match index {
        Some(i) => Ok(f(&mut data, i)),
        None => Err(error(
            StatusCode::NOT_FOUND,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        )),
    }
}

async fn message(
    State(state): State<Arc<Shared>>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let _in_flight = match admit(&state, &headers, &user, "headers", false).await {
        Ok(guard) => guard,
        Err(r) => return r,
    };
    let found = with_message(&state, &user, &id, |data, i| {
        let m = &data.mailboxes[&user.to_lowercase()].messages[i];
        let fields: Vec<Value> = header_fields(&m.raw)
            .into_iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        json!({"id": m.id, "internetMessageHeaders": fields})
    });
    match found {
        Ok(body) => Json(body).into_response(),
        Err(r) => r,
    }
}

async fn value(
    State(state): State<Arc<Shared>>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let _in_flight = match admit(&state, &headers, &user, "$value", false).await {
        Ok(guard) => guard,
        Err(r) => return r,
    };
    let raw = match with_message(&state, &user, &id, |data, i| {
        data.mailboxes[&user.to_lowercase()].messages[i].raw.clone()
    }) {
        Ok(raw) => raw,
        Err(r) => return r,
    };
    let cut = state.cut_always.lock().unwrap().contains(&id)
        || state
            .cut_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if cut {
        // Half the message, then the connection breaks.
        let half = raw[..raw.len() / 2].to_vec();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            vec![Ok(half), Err(std::io::Error::other("connection reset"))];
        let body = Body::from_stream(futures::stream::iter(chunks));
        return (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], body).into_response();
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], raw).into_response()
}

async fn patch(
    State(state): State<Arc<Shared>>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let _in_flight = match admit(&state, &headers, &user, "patch", true).await {
        Ok(guard) => guard,
        Err(r) => return r,
    };
    let updated = with_message(&state, &user, &id, |data, i| {
        data.seq += 1;
        let seq = data.seq;
        let m = &mut data
            .mailboxes
            .get_mut(&user.to_lowercase())
            .unwrap()
            .messages[i];
        if let Some(read) = body["isRead"].as_bool() {
            m.is_read = read;
        }
        m.changed = seq;
        json!({"id": m.id, "isRead": m.is_read})
    });
    match updated {
        Ok(body) => Json(body).into_response(),
        Err(r) => r,
    }
}

/// Moves message `i` to `folder`, recording that it left its folder.
fn relocate(data: &mut Data, user: &str, i: usize, folder: &str) {
    data.seq += 1;
    let seq = data.seq;
    let mbox = data.mailboxes.get_mut(&user.to_lowercase()).unwrap();
    let m = &mut mbox.messages[i];
    let left = std::mem::replace(&mut m.folder, folder.to_string());
    m.changed = seq;
    let id = m.id.clone();
    mbox.removed.push((id, left, seq));
}

async fn move_message(
    State(state): State<Arc<Shared>>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let _in_flight = match admit(&state, &headers, &user, "move", true).await {
        Ok(guard) => guard,
        Err(r) => return r,
    };
    let failing = {
        let mut failing = state.fail_next_moves.lock().unwrap();
        let fails = failing.0 > 0;
        failing.0 = failing.0.saturating_sub(1);
        fails.then_some(failing.1)
    };
    match failing {
        Some(403) => {
            return error(
                StatusCode::FORBIDDEN,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            );
        }
        Some(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "generalException",
                "An internal server error occurred.",
            );
        }
        None => {}
    }
    let target = body["destinationId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let moved = with_message(&state, &user, &id, |data, i| {
        let folder = find_folder(&data.mailboxes[&user.to_lowercase()], &target)?;
        relocate(data, &user, i, &folder.id);
        Some(json!({"id": id}))
    });
    match moved {
        Ok(Some(body)) => (StatusCode::CREATED, Json(body)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "ErrorInvalidIdMalformed",
            "Id is malformed.",
        ),
        Err(r) => r,
    }
}

async fn delete(
    State(state): State<Arc<Shared>>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let _in_flight = match admit(&state, &headers, &user, "delete", true).await {
        Ok(guard) => guard,
        Err(r) => return r,
    };
    match with_message(&state, &user, &id, |data, i| {
        relocate(data, &user, i, "AAMkDeleted")
    }) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}
