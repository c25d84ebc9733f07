//! SQL of `mailbox_state`: each mailbox's cursor (saved in the transaction of the rows it
//! covers), the settle that commit still owes the server, and its failed-fetch counter.
//! The loop treats the cursor as opaque; this module maps each kind of [`Cursor`] to its
//! columns.

use super::StoreError;
use crate::source::Cursor;
use sqlx::PgConnection;

/// The messages at or below `until` that `start_at` chose at first contact: only those
/// listed in `uids` are taken (see `migrations/0006_arrival_and_first_contact.sql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    /// The highest UID that existed at first contact.
    pub until: i64,
    /// The UIDs up to `until` to take, sorted.
    pub uids: Vec<i64>,
}

/// Failed fetches counted against one message (see `migrations/0005_fetch_trouble.sql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchTrouble {
    /// The key of the first message of the fetch that failed (IMAP: its UID; Graph: its
    /// id).
    pub key: String,
    /// How many fetches starting there failed.
    pub failures: i32,
}

/// What `mailbox_state` holds for one mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Where reading goes on.
    pub cursor: Cursor,
    /// Failed fetches counted against one message, if any.
    pub trouble: Option<FetchTrouble>,
    /// Keys of committed messages not yet settled on the server (the pass that committed
    /// them ended before its settle succeeded); empty when nothing is owed.
    pub unsettled: Vec<String>,
}

/// One `mailbox_state` row.
#[derive(sqlx::FromRow)]
struct Row {
    source: String,
    uidvalidity: i64,
    last_uid: i64,
    fetch_trouble_uid: Option<i64>,
    fetch_trouble_key: Option<String>,
    fetch_failures: i32,
    backlog_until: Option<i64>,
    backlog_uids: Option<Vec<i64>>,
    delta_link: Option<String>,
    first_contact_at: Option<chrono::DateTime<chrono::Utc>>,
    unsettled: Option<Vec<String>>,
}

/// The saved cursor of (parser, key), if one was ever recorded (one read per pass).
pub async fn load(
    conn: &mut PgConnection,
    parser: &str,
    key: &str,
) -> Result<Option<Saved>, StoreError> {
    let row: Option<Row> = sqlx::query_as(
        "select source, uidvalidity, last_uid, fetch_trouble_uid, fetch_trouble_key, fetch_failures,
                backlog_until, backlog_uids, delta_link, first_contact_at, unsettled
         from mailbox_state where parser = $1 and folder = $2",
    )
    .bind(parser)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| {
        let failures = r.fetch_failures;
        let unsettled = r.unsettled.unwrap_or_default();
        if r.source == "graph" {
            return Saved {
                cursor: Cursor::Graph {
                    link: r.delta_link,
                    first_contact_at: r.first_contact_at.unwrap_or_default(),
                },
                trouble: r
                    .fetch_trouble_key
                    .map(|key| FetchTrouble { key, failures }),
                unsettled,
            };
        }
        let last_uid = r.last_uid;
        Saved {
            cursor: Cursor::Imap {
                uidvalidity: r.uidvalidity,
                last_uid,
                backlog: r
                    .backlog_until
                    .filter(|until| *until > last_uid)
                    .map(|until| Backlog {
                        until,
                        uids: r.backlog_uids.unwrap_or_default(),
                    }),
            },
            trouble: r.fetch_trouble_uid.map(|uid| FetchTrouble {
                key: uid.to_string(),
                failures,
            }),
            unsettled,
        }
    }))
}

/// Records the cursor a pass starts from (a first contact, with what `start_at` chose, or
/// a reset after a UIDVALIDITY change or a lost Graph sync state, without): the
/// failed-fetch counter and any settle still owed are cleared (after a UIDVALIDITY change
/// the recorded UIDs name other messages, or none).
pub async fn save_start(
    conn: &mut PgConnection,
    parser: &str,
    key: &str,
    cursor: &Cursor,
) -> Result<(), StoreError> {
    let (uidvalidity, last_uid, backlog) = match cursor {
        Cursor::Imap {
            uidvalidity,
            last_uid,
            backlog,
        } => (uidvalidity, last_uid, backlog),
        Cursor::Graph { .. } => return save_graph(conn, parser, key, cursor, true, None).await,
    };
    let backlog = backlog.as_ref().filter(|b| b.until > *last_uid);
    sqlx::query(
        "insert into mailbox_state (parser, folder, uidvalidity, last_uid, updated_at, backlog_until, backlog_uids)
         values ($1, $2, $3, $4, now(), $5, $6)
         on conflict (parser, folder) do update
         set source = 'imap', uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid,
             updated_at = now(), fetch_trouble_uid = null, fetch_trouble_key = null, fetch_failures = 0,
             backlog_until = excluded.backlog_until, backlog_uids = excluded.backlog_uids,
             delta_link = null, first_contact_at = null, unsettled = null",
    )
    .bind(parser)
    .bind(key)
    .bind(uidvalidity)
    .bind(last_uid)
    .bind(backlog.map(|b| b.until))
    .bind(backlog.map(|b| b.uids.as_slice()))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records progress; call it in the transaction that stored the messages it covers, with
/// the keys of those of them the server must still settle (replacing what was recorded:
/// the loop settles one batch before it commits the next). A failed-fetch counter and the
/// first-contact choice survive only while they are ahead of the cursor (the choice is
/// never rewritten, only dropped once passed).
pub async fn save(
    conn: &mut PgConnection,
    parser: &str,
    key: &str,
    cursor: &Cursor,
    unsettled: &[&str],
) -> Result<(), StoreError> {
    let unsettled = (!unsettled.is_empty()).then_some(unsettled);
    let (uidvalidity, last_uid) = match cursor {
        Cursor::Imap {
            uidvalidity,
            last_uid,
            ..
        } => (uidvalidity, last_uid),
        Cursor::Graph { .. } => {
            return save_graph(conn, parser, key, cursor, false, unsettled).await;
        }
    };
    sqlx::query(
        "insert into mailbox_state (parser, folder, uidvalidity, last_uid, updated_at, unsettled)
         values ($1, $2, $3, $4, now(), $5)
         on conflict (parser, folder) do update
         set uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, updated_at = now(),
             unsettled = excluded.unsettled,
             fetch_trouble_uid = case
               when mailbox_state.uidvalidity = excluded.uidvalidity
                and mailbox_state.fetch_trouble_uid > excluded.last_uid
               then mailbox_state.fetch_trouble_uid end,
             fetch_failures = case
               when mailbox_state.uidvalidity = excluded.uidvalidity
                and mailbox_state.fetch_trouble_uid > excluded.last_uid
               then mailbox_state.fetch_failures else 0 end,
             backlog_until = case
               when mailbox_state.uidvalidity = excluded.uidvalidity
                and mailbox_state.backlog_until > excluded.last_uid
               then mailbox_state.backlog_until end,
             backlog_uids = case
               when mailbox_state.uidvalidity = excluded.uidvalidity
                and mailbox_state.backlog_until > excluded.last_uid
               then mailbox_state.backlog_uids end",
    )
    .bind(parser)
    .bind(key)
    .bind(uidvalidity)
    .bind(last_uid)
    .bind(unsettled)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Forgets the settle recorded with the last commit once the server has done it (or
/// refused it for good). Only a record of exactly these keys is cleared: a replica that
/// took the mailbox over meanwhile keeps its own.
pub async fn forget_unsettled(
    conn: &mut PgConnection,
    parser: &str,
    key: &str,
    keys: &[&str],
) -> Result<(), StoreError> {
    sqlx::query(
        "update mailbox_state set unsettled = null
         where parser = $1 and folder = $2 and unsettled = $3::text[]",
    )
    .bind(parser)
    .bind(key)
    .bind(keys)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A Graph cursor: the link and the first-contact time, with the settle owed (`None`:
/// nothing). A start clears the failed-fetch counter; progress keeps it (Graph ids have no
/// order to tell whether it was passed; a counter for a message no longer first in line is
/// never used).
async fn save_graph(
    conn: &mut PgConnection,
    parser: &str,
    key: &str,
    cursor: &Cursor,
    start: bool,
    unsettled: Option<&[&str]>,
) -> Result<(), StoreError> {
    let Cursor::Graph {
        link,
        first_contact_at,
    } = cursor
    else {
        unreachable!("called for Graph cursors")
    };
    sqlx::query(
        "insert into mailbox_state (parser, folder, source, uidvalidity, last_uid, updated_at, delta_link, first_contact_at, unsettled)
         values ($1, $2, 'graph', 0, 0, now(), $3, $4, $6)
         on conflict (parser, folder) do update
         set source = 'graph', uidvalidity = 0, last_uid = 0, updated_at = now(),
             delta_link = excluded.delta_link, first_contact_at = excluded.first_contact_at,
             unsettled = excluded.unsettled,
             fetch_trouble_uid = null, backlog_until = null, backlog_uids = null,
             fetch_trouble_key = case when $5 then null else mailbox_state.fetch_trouble_key end,
             fetch_failures = case when $5 then 0 else mailbox_state.fetch_failures end",
    )
    .bind(parser)
    .bind(key)
    .bind(link)
    .bind(first_contact_at)
    .bind(start)
    .bind(unsettled)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records a failed fetch; call it outside the batch's transaction (which is abandoned).
pub async fn save_fetch_trouble(
    conn: &mut PgConnection,
    parser: &str,
    key: &str,
    trouble: FetchTrouble,
) -> Result<(), StoreError> {
    sqlx::query(
        "update mailbox_state
         set fetch_trouble_uid = case when source = 'imap' then $3 end,
             fetch_trouble_key = case when source = 'graph' then $5 end,
             fetch_failures = $4, updated_at = now()
         where parser = $1 and folder = $2",
    )
    .bind(parser)
    .bind(key)
    .bind(trouble.key.parse::<i64>().ok())
    .bind(trouble.failures)
    .bind(&trouble.key)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
