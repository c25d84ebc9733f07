//! SQL of `mailbox_state`: each mailbox's cursor (saved in the transaction of the rows it
//! covers) and its failed-fetch counter. The loop treats the cursor as opaque; this module
//! maps each kind of [`Cursor`] to its columns.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchTrouble {
    /// The key of the first message of the fetch that failed (IMAP: its UID).
    pub key: i64,
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
}

/// The saved cursor of (parser, key), if one was ever recorded (one read per pass).
pub async fn load(
    conn: &mut PgConnection,
    parser: &str,
    key: &str,
) -> Result<Option<Saved>, StoreError> {
    type Row = (i64, i64, Option<i64>, i32, Option<i64>, Option<Vec<i64>>);
    let row: Option<Row> = sqlx::query_as(
        "select uidvalidity, last_uid, fetch_trouble_uid, fetch_failures, backlog_until, backlog_uids
         from mailbox_state where parser = $1 and folder = $2",
    )
    .bind(parser)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(
        |(uidvalidity, last_uid, trouble_key, failures, until, uids)| Saved {
            cursor: Cursor::Imap {
                uidvalidity,
                last_uid,
                backlog: until
                    .filter(|until| *until > last_uid)
                    .map(|until| Backlog {
                        until,
                        uids: uids.unwrap_or_default(),
                    }),
            },
            trouble: trouble_key.map(|key| FetchTrouble { key, failures }),
        },
    ))
}

/// Records the cursor a pass starts from (a first contact, with what `start_at` chose, or
/// a reset after a UIDVALIDITY change, without): the failed-fetch counter is cleared.
pub async fn save_start(
    conn: &mut PgConnection,
    parser: &str,
    key: &str,
    cursor: &Cursor,
) -> Result<(), StoreError> {
    let Cursor::Imap {
        uidvalidity,
        last_uid,
        backlog,
    } = cursor;
    let backlog = backlog.as_ref().filter(|b| b.until > *last_uid);
    sqlx::query(
        "insert into mailbox_state (parser, folder, uidvalidity, last_uid, updated_at, backlog_until, backlog_uids)
         values ($1, $2, $3, $4, now(), $5, $6)
         on conflict (parser, folder) do update
         set uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, updated_at = now(),
             fetch_trouble_uid = null, fetch_failures = 0,
             backlog_until = excluded.backlog_until, backlog_uids = excluded.backlog_uids",
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

/// Records progress; call it in the transaction that stored the messages it covers. A
/// failed-fetch counter and the first-contact choice survive only while they are ahead of
/// the cursor (the choice is never rewritten, only dropped once passed).
pub async fn save(
    conn: &mut PgConnection,
    parser: &str,
    key: &str,
    cursor: &Cursor,
) -> Result<(), StoreError> {
    let Cursor::Imap {
        uidvalidity,
        last_uid,
        ..
    } = cursor;
    sqlx::query(
        "insert into mailbox_state (parser, folder, uidvalidity, last_uid, updated_at)
         values ($1, $2, $3, $4, now())
         on conflict (parser, folder) do update
         set uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, updated_at = now(),
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
        "update mailbox_state set fetch_trouble_uid = $3, fetch_failures = $4, updated_at = now()
         where parser = $1 and folder = $2",
    )
    .bind(parser)
    .bind(key)
    .bind(trouble.key)
    .bind(trouble.failures)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
