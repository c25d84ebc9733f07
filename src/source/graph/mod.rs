//! Microsoft Graph as a mail source, for mailboxes where IMAP is off: [`GraphSource`]
//! implements the [`MailSource`] seam with Graph's delta query.
//!
//! - **Listing**: `GET {base}/users/{email}/mailFolders/{folder}/messages/delta` with a
//!   `$select` of what the loop needs, `Prefer: odata.maxpagesize` and
//!   `Prefer: IdType="ImmutableId"`, following `@odata.nextLink` to `@odata.deltaLink`.
//!   The cursor is the link to resume from: a message is listed with the link of its page
//!   (the last one taken from a page with the page's next link), so a crash re-reads at
//!   most one page; the round's `deltaLink` is saved once every message is done.
//!   `@removed` entries are ignored. A `410 Gone` starts the round from the beginning; the
//!   Message-ID key keeps it free of duplicates, and messages already stored are not
//!   downloaded again (Graph returns a message again whenever it changes, e.g. once it is
//!   marked read).
//! - **Which messages**: those that arrived (`receivedDateTime`) since the first contact
//!   (less five minutes for the clocks), and older ones that `start_at` takes (`all`; `unseen`: not `isRead`; a date: received
//!   on or after it; `now`: none). Skipped messages are never touched.
//! - **Download**: `$value` (the MIME), streamed and cut off past `max_message_size`; an
//!   oversized message keeps only its `internetMessageHeaders`.
//! - **After commit**: `mark_seen` = PATCH `isRead`, `move:<folder>` = POST `move`,
//!   `delete` = DELETE; a message gone already (404) is fine.
//!
//! Requests follow the rules of [`client`] (token, concurrency, throttling, link origin).

pub mod client;

pub use client::{GraphClient, GraphError};

use crate::config::{AfterIngest, GraphConfig, ParserConfig, StartAt};
use crate::source::{
    Cursor, Fetched, Listing, MailSource, Pending, SourceError, SourceSession, WaitEnd,
};
use chrono::{DateTime, Utc};
use reqwest::Method;
use serde::Deserialize;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Mail received this long before the first contact counts as arriving after it: Graph
/// gives times to the second, by Microsoft's clock, and the first contact is ours. Taking
/// a message too many is safe; missing one is not.
const CLOCK_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// Messages per delta page asked for.
const PAGE_SIZE: u32 = 100;
/// What the loop needs of each message.
const SELECT: &str = "id,internetMessageId,receivedDateTime,isRead";
/// Graph's well-known folder names, usable in place of a folder id.
const WELL_KNOWN: &[&str] = &[
    "inbox",
    "archive",
    "clutter",
    "conflicts",
    "conversationhistory",
    "deleteditems",
    "drafts",
    "junkemail",
    "localfailures",
    "msgfolderroot",
    "outbox",
    "recoverableitemsdeletions",
    "scheduled",
    "searchfolders",
    "sentitems",
    "serverfailures",
    "syncissues",
];

/// One parser's folder through Microsoft Graph.
pub struct GraphSource {
    parser: Arc<ParserConfig>,
    graph: GraphConfig,
    client: GraphClient,
}

impl GraphSource {
    /// The source of `parser` as `graph` says, with requests made by `client`.
    pub fn new(parser: Arc<ParserConfig>, graph: GraphConfig, client: GraphClient) -> Self {
        GraphSource {
            parser,
            graph,
            client,
        }
    }
}

impl MailSource for GraphSource {
    type Session = GraphMailbox;

    fn cursor_key(&self) -> &str {
        &self.graph.folder
    }

    /// Resolves the folder (and the `move:` target) once per session.
    async fn open(&self) -> Result<GraphMailbox, SourceError> {
        let user = &self.parser.email;
        let folder = resolve_folder(&self.client, user, &self.graph.folder).await?;
        let move_to = match &self.parser.after {
            AfterIngest::Move(target) => Some(resolve_folder(&self.client, user, target).await?),
            _ => None,
        };
        Ok(GraphMailbox {
            parser: self.parser.clone(),
            graph: self.graph.clone(),
            client: self.client.clone(),
            folder,
            move_to,
        })
    }
}

/// The id (or well-known name) of the source's folder (for `doctor`).
pub async fn folder_id(source: &GraphSource) -> Result<String, SourceError> {
    resolve_folder(&source.client, &source.parser.email, &source.graph.folder).await
}

/// A folder found: the id (or well-known name) Graph takes in URLs.
async fn resolve_folder(
    client: &GraphClient,
    user: &str,
    path: &str,
) -> Result<String, SourceError> {
    let mut parts = path.split('/').map(str::trim);
    let first = parts.next().unwrap_or("inbox");
    let mut id = if WELL_KNOWN.contains(&first.to_ascii_lowercase().as_str()) {
        first.to_ascii_lowercase()
    } else {
        find_child(client, user, None, first).await?
    };
    for name in parts {
        id = find_child(client, user, Some(&id), name).await?;
    }
    Ok(id)
}

/// The id of the folder named `name` under `parent` (the top level when `None`).
async fn find_child(
    client: &GraphClient,
    user: &str,
    parent: Option<&str>,
    name: &str,
) -> Result<String, SourceError> {
    #[derive(Deserialize)]
    struct Folders {
        value: Vec<Folder>,
    }
    #[derive(Deserialize)]
    struct Folder {
        id: String,
    }
    let path = match parent {
        Some(parent) => format!(
            "users/{}/mailFolders/{}/childFolders",
            enc(user),
            enc(parent)
        ),
        None => format!("users/{}/mailFolders", enc(user)),
    };
    let mut url = client.url(&path)?;
    let filter = format!("displayName eq '{}'", name.replace('\'', "''"));
    url.query_pairs_mut().append_pair("$filter", &filter);
    let answer = client
        .send("the folder lookup", Method::GET, url, &[], None)
        .await?;
    let folders: Folders = read_json("the folder lookup", answer).await?;
    match folders.value.into_iter().next() {
        Some(folder) => Ok(folder.id),
        None => Err(GraphError::Api {
            step: "the folder lookup",
            status: 404,
            code: "ErrorFolderNotFound".into(),
            message: format!("no folder named {name:?}"),
            fix: client::fix_for(404, "ErrorFolderNotFound"),
        }
        .into()),
    }
}

/// A path segment, percent-encoded.
pub fn enc(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

async fn read_json<T: serde::de::DeserializeOwned>(
    step: &'static str,
    answer: client::Answer,
) -> Result<T, SourceError> {
    let text = answer
        .response
        .text()
        .await
        .map_err(|e| GraphError::Unreachable {
            step,
            reason: format!("the answer was cut off: {e}"),
        })?;
    serde_json::from_str(&text).map_err(|e| {
        GraphError::Unexpected {
            step,
            reason: e.to_string(),
        }
        .into()
    })
}

/// One page of a delta round.
#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    value: Vec<Item>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink")]
    delta_link: Option<String>,
}

/// A message in a delta page.
#[derive(Deserialize)]
struct Item {
    id: String,
    #[serde(rename = "internetMessageId")]
    internet_message_id: Option<String>,
    #[serde(rename = "receivedDateTime")]
    received: Option<DateTime<Utc>>,
    #[serde(rename = "isRead", default)]
    is_read: bool,
    #[serde(rename = "@removed")]
    removed: Option<serde_json::Value>,
}

/// A logged-in Graph mailbox: the folder resolved.
pub struct GraphMailbox {
    parser: Arc<ParserConfig>,
    graph: GraphConfig,
    client: GraphClient,
    /// The folder's id (or well-known name).
    folder: String,
    /// The `move:` target's id.
    move_to: Option<String>,
}

impl GraphMailbox {
    /// The first page of a round from the beginning.
    fn round_start(&self) -> Result<url::Url, GraphError> {
        let path = format!(
            "users/{}/mailFolders/{}/messages/delta",
            enc(&self.parser.email),
            enc(&self.folder)
        );
        let mut url = self.client.url(&path)?;
        url.query_pairs_mut().append_pair("$select", SELECT);
        Ok(url)
    }

    /// Whether a listed message is taken: it arrived since the first contact (with
    /// [`CLOCK_MARGIN`] for Graph's second-precision times and the two clocks), or
    /// `start_at` takes the older ones like it.
    fn takes(&self, item: &Item, first_contact_at: DateTime<Utc>) -> bool {
        let received = item.received.unwrap_or_else(Utc::now);
        received >= first_contact_at - CLOCK_MARGIN
            || match self.parser.start_at {
                StartAt::All => true,
                StartAt::Now => false,
                StartAt::Unseen => !item.is_read,
                StartAt::Since(day) => received.date_naive() >= day,
            }
    }

    /// The messages of a page that are taken, each with the link to resume from once it is
    /// done: the page's own link, except for the last one taken, which hands over to the
    /// next page (the rest of the page is not taken).
    fn taken_from(
        &self,
        page: &Page,
        page_link: &str,
        first_contact_at: DateTime<Utc>,
    ) -> Vec<Pending> {
        let next = page.next_link.clone().or(page.delta_link.clone());
        let taken: Vec<&Item> = page
            .value
            .iter()
            .filter(|item| item.removed.is_none() && self.takes(item, first_contact_at))
            .collect();
        let count = taken.len();
        taken
            .into_iter()
            .enumerate()
            .map(|(i, item)| Pending {
                key: item.id.clone(),
                size: 0,
                message_id: item
                    .internet_message_id
                    .as_deref()
                    .and_then(crate::pipeline::mime::stored_message_id),
                arrived: item.received,
                location: format!("Graph folder {}; message id {}", self.graph.folder, item.id),
                after: Cursor::Graph {
                    link: if i + 1 == count {
                        next.clone()
                    } else {
                        Some(page_link.to_string())
                    },
                    first_contact_at,
                },
            })
            .collect()
    }

    fn message_url(&self, id: &str, suffix: &str) -> Result<url::Url, GraphError> {
        let path = format!(
            "users/{}/messages/{}{suffix}",
            enc(&self.parser.email),
            enc(id)
        );
        self.client.url(&path)
    }

    /// Downloads one message's MIME, stopping once it passes `max_size`.
    async fn download(&self, message: &Pending, max_size: u64) -> Result<Fetched, SourceError> {
        let url = self.message_url(&message.key, "/$value")?;
        let step = "the download ($value)";
        let mut answer = self.client.send(step, Method::GET, url, &[], None).await?;
        let mut raw = Vec::new();
        loop {
            let chunk = answer
                .response
                .chunk()
                .await
                .map_err(|e| GraphError::Unreachable {
                    step,
                    reason: format!("the download was cut off after {} bytes: {e}", raw.len()),
                })?;
            let Some(chunk) = chunk else { break };
            raw.extend_from_slice(&chunk);
            if raw.len() as u64 > max_size {
                return Ok(Fetched::TooLarge {
                    at_least: raw.len() as u64,
                });
            }
        }
        Ok(Fetched::Whole(raw))
    }
}

impl SourceSession for GraphMailbox {
    /// Walks the delta round from the saved link to its `deltaLink`.
    async fn list(&mut self, saved: Option<&Cursor>) -> Result<Listing, SourceError> {
        let (mut link, first_contact_at, mut save_first) = match saved {
            Some(Cursor::Graph {
                link,
                first_contact_at,
            }) => (link.clone(), *first_contact_at, None),
            // A first contact (another source's cursor counts as none).
            _ => {
                let now = Utc::now();
                let fresh = Cursor::Graph {
                    link: None,
                    first_contact_at: now,
                };
                tracing::info!(folder = %self.graph.folder, start_at = %self.parser.start_at,
                    "first contact: messages received from now on are taken, older ones as start_at says");
                (None, now, Some(fresh))
            }
        };
        let prefer = format!("odata.maxpagesize={PAGE_SIZE}, IdType=\"ImmutableId\"");
        let headers = [("Prefer", prefer.as_str())];
        let mut pending = Vec::new();
        let mut restarted = false;
        let save_after = loop {
            let url = match &link {
                Some(link) => self.client.link(link)?,
                None => self.round_start()?,
            };
            let page_link = url.to_string();
            let answer = self
                .client
                .send("the delta listing", Method::GET, url, &headers, None)
                .await;
            let page: Page = match answer {
                Ok(answer) => read_json("the delta listing", answer).await?,
                Err(SourceError::Graph(e)) if e.is_gone() && link.is_some() && !restarted => {
                    tracing::warn!(folder = %self.graph.folder,
                        "Graph lost the sync state (410 Gone): starting the round from the beginning (stored messages are recognised by Message-ID)");
                    restarted = true;
                    link = None;
                    pending.clear();
                    save_first = Some(Cursor::Graph {
                        link: None,
                        first_contact_at,
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            pending.extend(self.taken_from(&page, &page_link, first_contact_at));
            match (page.next_link, page.delta_link) {
                (Some(next), _) => link = Some(next),
                (None, Some(delta)) => {
                    break Cursor::Graph {
                        link: Some(delta),
                        first_contact_at,
                    };
                }
                (None, None) => {
                    return Err(GraphError::Unexpected {
                        step: "the delta listing",
                        reason: "a page with neither @odata.nextLink nor @odata.deltaLink".into(),
                    }
                    .into());
                }
            }
        };
        Ok(Listing {
            pending,
            save_first,
            save_after: Some(save_after),
            first_contact: None,
        })
    }

    async fn fetch(
        &mut self,
        messages: &[&Pending],
        max_size: u64,
    ) -> Result<Vec<Fetched>, SourceError> {
        let mut fetched = Vec::with_capacity(messages.len());
        for message in messages {
            fetched.push(self.download(message, max_size).await?);
        }
        Ok(fetched)
    }

    /// The message's `internetMessageHeaders`, as a header section.
    async fn fetch_header(&mut self, message: &Pending) -> Result<Vec<u8>, SourceError> {
        #[derive(Deserialize)]
        struct Headers {
            #[serde(rename = "internetMessageHeaders", default)]
            headers: Vec<Header>,
        }
        #[derive(Deserialize)]
        struct Header {
            name: String,
            value: String,
        }
        let mut url = self.message_url(&message.key, "")?;
        url.query_pairs_mut()
            .append_pair("$select", "internetMessageHeaders");
        let step = "the header download";
        let answer = self.client.send(step, Method::GET, url, &[], None).await?;
        let found: Headers = read_json(step, answer).await?;
        let mut raw = String::new();
        for h in found.headers {
            // One line per field: a folded value's line breaks are undone.
            let value = h.value.replace(['\r', '\n'], " ");
            raw.push_str(&format!("{}: {value}\r\n", h.name));
        }
        raw.push_str("\r\n");
        Ok(raw.into_bytes())
    }

    async fn settle(&mut self, messages: &[&Pending]) -> Result<(), SourceError> {
        for message in messages {
            let (step, method, url, body) = match &self.parser.after {
                AfterIngest::Nothing => return Ok(()),
                AfterIngest::MarkSeen => (
                    "marking the message read",
                    Method::PATCH,
                    self.message_url(&message.key, "")?,
                    Some(serde_json::json!({"isRead": true})),
                ),
                AfterIngest::Move(_) => (
                    "moving the message",
                    Method::POST,
                    self.message_url(&message.key, "/move")?,
                    Some(serde_json::json!({"destinationId": self.move_to})),
                ),
                AfterIngest::Delete => (
                    "deleting the message",
                    Method::DELETE,
                    self.message_url(&message.key, "")?,
                    None,
                ),
            };
            match self
                .client
                .send(step, method, url, &[], body.as_ref())
                .await
            {
                Ok(_) => {}
                Err(SourceError::Graph(e)) if e.is_not_found() => {
                    tracing::info!(key = %message.key, "the message is gone already: nothing to settle");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Graph has no push on this path: the next round comes after `poll_interval` (never
    /// later than half of `stale_after`).
    async fn wait(&mut self, cancel: &CancellationToken) -> Result<WaitEnd, SourceError> {
        let wait = self.graph.poll_interval.min(self.parser.stale_after / 2);
        tokio::select! {
            _ = tokio::time::sleep(wait) => Ok(WaitEnd::Changed),
            _ = cancel.cancelled() => Ok(WaitEnd::Cancelled),
        }
    }

    async fn close(self) {}
}
