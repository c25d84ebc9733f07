//! What the mailbox loop stores in one transaction: a batch of pending messages, bounded
//! by count and bytes, downloaded in order, decided (MIME parsing) on a blocking thread.
//!
//! Batches exist for two reasons: one commit (and one round of lookups) for many messages,
//! and a bound on memory: at most two batches are held at once (one being stored while the
//! next downloads and is parsed), so a process never holds more than 2 x [`BATCH_BYTES`]
//! of mail per mailbox (plus one message per batch where sizes are unknown until
//! downloaded, and the parsed form of those two batches) however large the backlog.

use crate::pipeline::{self, Arrival, Decision, Incoming, Pipeline};
use crate::source::{Fetched, Pending, SourceError, SourceSession};
use std::collections::HashSet;

/// Messages fetched per batch (and per transaction).
pub const BATCH_MESSAGES: usize = 100;
/// Bytes fetched per batch, at most (async-imap buffers a whole response in memory).
pub const BATCH_BYTES: u64 = 24 << 20;

/// One message of a batch as downloaded: its bytes, or only its header with the reason
/// (too large: it stays on the server).
pub struct Body {
    /// The raw bytes (or the header).
    pub raw: Vec<u8>,
    /// Set when only the header was fetched: why.
    pub header_only: Option<String>,
}

/// A batch downloaded and not yet stored.
pub struct FetchedBatch<'p> {
    /// Every message of the batch; the cursor moves past the last one with the commit.
    pub batch: &'p [Pending],
    /// The messages of `batch` not stored already, in order, each with its body.
    pub fresh: Vec<&'p Pending>,
    /// Their bodies, in the same order.
    pub bodies: Vec<Body>,
    /// Their decisions, when made ahead ([`FetchedBatch::decide_ahead`]).
    decided: Option<Vec<Option<Decision>>>,
}

impl<'p> FetchedBatch<'p> {
    /// A batch whose messages are all stored already: only the cursor moves.
    pub fn stored_already(batch: &'p [Pending]) -> Self {
        FetchedBatch {
            batch,
            fresh: Vec::new(),
            bodies: Vec::new(),
            decided: None,
        }
    }

    /// The batch's last message (whose cursor the commit saves).
    pub fn last(&self) -> &'p Pending {
        self.batch.last().expect("a batch is never empty")
    }

    /// The messages as the pipeline takes them.
    pub fn items(&self) -> Vec<Incoming<'_>> {
        self.fresh
            .iter()
            .zip(&self.bodies)
            .map(|(m, body)| incoming(m, &body.raw, body.header_only.as_deref()))
            .collect()
    }

    /// The messages that may leave the "new" state once committed (not those only kept
    /// by their header: they stay on the server untouched).
    pub fn settled(&self) -> Vec<&'p Pending> {
        self.fresh
            .iter()
            .zip(&self.bodies)
            .filter(|(_, body)| body.header_only.is_none())
            .map(|(m, _)| *m)
            .collect()
    }

    /// Decides every message on a blocking thread (the runtime's threads stay free for the
    /// network), or hands over the decisions made ahead. Fails only when the runtime is
    /// shutting down.
    pub async fn decide(
        &mut self,
        pipeline: &Pipeline,
    ) -> Result<Vec<Option<Decision>>, tokio::task::JoinError> {
        if let Some(decided) = self.decided.take() {
            return Ok(decided);
        }
        if self.bodies.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = pipeline.clone();
        let bodies = std::mem::take(&mut self.bodies);
        let (bodies, decisions) = tokio::task::spawn_blocking(move || {
            // The arrival plays no part in deciding.
            let items: Vec<Incoming> = bodies
                .iter()
                .map(|body| Incoming {
                    raw: &body.raw,
                    arrival: Arrival::FromDateHeader,
                    header_only: body.header_only.as_deref(),
                })
                .collect();
            let decisions = pipeline::decide_batch(&pipeline, &items);
            drop(items);
            (bodies, decisions)
        })
        .await?;
        self.bodies = bodies;
        Ok(decisions)
    }

    /// Decides the batch as soon as it is downloaded, while the batch before is still
    /// being committed, so that parsing is off the database's critical path; [`decide`]
    /// hands the decisions over (or, should this fail, decides again and reports it).
    ///
    /// [`decide`]: FetchedBatch::decide
    pub async fn decide_ahead(&mut self, pipeline: &Pipeline) {
        if let Ok(decided) = self.decide(pipeline).await {
            self.decided = Some(decided);
        }
    }
}

/// A fetched message as the pipeline takes it: arrival from the server (INTERNALDATE),
/// or the Date header when the server gave none.
pub fn incoming<'a>(
    message: &Pending,
    raw: &'a [u8],
    header_only: Option<&'a str>,
) -> Incoming<'a> {
    Incoming {
        raw,
        arrival: message.arrived.map_or(Arrival::FromDateHeader, Arrival::At),
        header_only,
    }
}

/// The messages of `batch` not stored already.
pub fn fresh<'p>(batch: &'p [Pending], known: &HashSet<String>) -> Vec<&'p Pending> {
    batch.iter().filter(|m| !is_known(m, known)).collect()
}

/// True when the source told the message's Message-ID and it is stored already.
pub fn is_known(message: &Pending, known: &HashSet<String>) -> bool {
    message
        .message_id
        .as_ref()
        .is_some_and(|id| known.contains(id))
}

/// Downloads `fresh` (the messages of `batch` to store), in order: whole messages, and
/// only the header of those over `max` (by the listed size, or found while downloading),
/// with the reason. Where sizes are unknown the download may stop early (see
/// [`download`]): the batch then ends with the last message in hand, and the caller goes
/// on after [`FetchedBatch::batch`].
pub async fn fetch<'p, T: SourceSession>(
    session: &mut T,
    batch: &'p [Pending],
    fresh: Vec<&'p Pending>,
    max: u64,
) -> Result<FetchedBatch<'p>, SourceError> {
    let whole: Vec<&Pending> = fresh.iter().copied().filter(|m| m.size <= max).collect();
    let downloaded = download(session, &whole, max).await?;
    let (batch, fresh) = if downloaded.len() < whole.len() {
        // Stopped early: the batch ends with the last message downloaded.
        let last = &whole[downloaded.len() - 1].key;
        let in_batch = batch.iter().position(|m| m.key == *last);
        let in_fresh = fresh.iter().position(|m| m.key == *last);
        let (Some(in_batch), Some(in_fresh)) = (in_batch, in_fresh) else {
            unreachable!("`whole` is taken from `fresh`, itself from `batch`")
        };
        (&batch[..=in_batch], fresh[..=in_fresh].to_vec())
    } else {
        (batch, fresh)
    };
    let mut downloaded = downloaded.into_iter();
    let mut bodies = Vec::with_capacity(fresh.len());
    for message in &fresh {
        let size = if message.size > max {
            message.size
        } else {
            match downloaded
                .next()
                .expect("fetch returns one result per message")
            {
                Fetched::Whole(raw) => {
                    bodies.push(Body {
                        raw,
                        header_only: None,
                    });
                    continue;
                }
                Fetched::TooLarge { at_least } => at_least,
            }
        };
        let header = session.fetch_header(message).await?;
        bodies.push(Body {
            raw: header,
            header_only: Some(too_large(message, size, max)),
        });
    }
    Ok(FetchedBatch {
        batch,
        fresh,
        bodies,
        decided: None,
    })
}

/// Downloads `whole`, in order. When the source listed every size, in one request (the
/// batch's bytes were bounded by [`split`]); otherwise (Graph lists none) one message at
/// a time, stopping once [`BATCH_BYTES`] are in hand, so that memory stays bounded by bytes
/// there too: at most [`BATCH_BYTES`] plus one message (itself at most `max`, cut off
/// while downloading). The rest waits for the next batch.
async fn download<T: SourceSession>(
    session: &mut T,
    whole: &[&Pending],
    max: u64,
) -> Result<Vec<Fetched>, SourceError> {
    if whole.iter().all(|m| m.size > 0) {
        return match whole {
            [] => Ok(Vec::new()),
            _ => session.fetch(whole, max).await,
        };
    }
    let mut fetched = Vec::with_capacity(whole.len());
    let mut bytes = 0u64;
    for message in whole {
        let one = session.fetch(&[message], max).await?;
        let one = one.into_iter().next().expect("one result per message");
        if let Fetched::Whole(raw) = &one {
            bytes += raw.len() as u64;
        }
        fetched.push(one);
        if bytes >= BATCH_BYTES {
            break;
        }
    }
    Ok(fetched)
}

/// Why a message is only kept by its header.
fn too_large(message: &Pending, size: u64, max: u64) -> String {
    let counted = if size > message.size {
        format!("at least {size} bytes (cut off while downloading)")
    } else {
        format!("{size} bytes (by the server's count)")
    };
    format!(
        "message is {counted}, over max_message_size ({max} bytes); only its header is kept here, the message stays in the mailbox ({})",
        message.location
    )
}

/// The next batch: up to [`BATCH_MESSAGES`] messages and [`BATCH_BYTES`] (always at least
/// one message; oversized ones count as nothing, since only their header is fetched; one
/// of unknown size too: [`download`] bounds those by the bytes it receives).
pub fn split(pending: &[Pending], max_message_size: u64) -> (&[Pending], &[Pending]) {
    let mut bytes = 0u64;
    let mut end = 0;
    for (i, m) in pending.iter().enumerate() {
        let size = match m.size {
            size if size > max_message_size => 0,
            size => size,
        };
        if i >= BATCH_MESSAGES || (i > 0 && bytes + size > BATCH_BYTES) {
            break;
        }
        bytes += size;
        end = i + 1;
    }
    pending.split_at(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Cursor;

    fn listed(sizes: &[(i64, u64)]) -> Vec<Pending> {
        sizes
            .iter()
            .map(|&(key, size)| Pending {
                key: key.to_string(),
                size,
                message_id: None,
                arrived: None,
                location: format!("UID {key}"),
                after: Cursor::Imap {
                    uidvalidity: 1,
                    last_uid: key,
                    backlog: None,
                },
            })
            .collect()
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let small: Vec<(i64, u64)> = (1..=120).map(|key| (key, 1000)).collect();
        let small = listed(&small);
        assert_eq!(split(&small, 1 << 30).0.len(), BATCH_MESSAGES);
        let big = listed(&[(1, 20 << 20), (2, 20 << 20), (3, 1)]);
        assert_eq!(split(&big, 1 << 30).0.len(), 1);
        let huge = listed(&[(1, 100 << 20), (2, 100 << 20)]);
        assert_eq!(split(&huge, 1 << 30).0.len(), 1, "one message always fits");
        assert_eq!(
            split(&huge, 1 << 20).0.len(),
            2,
            "oversized count as nothing"
        );
        let unknown: Vec<(i64, u64)> = (1..=120).map(|key| (key, 0)).collect();
        assert_eq!(
            split(&listed(&unknown), 1 << 30).0.len(),
            BATCH_MESSAGES,
            "unknown sizes are bounded while downloading"
        );
    }
}
