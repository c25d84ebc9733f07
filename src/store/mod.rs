//! The only module that speaks SQL, split by table family: [`tickets`], [`quarantine`],
//! [`mailbox`] (cursors of the mail sources), [`grants`] (delegated sign-ins), [`leases`]
//! (which replica reads which mailbox), [`events`] and [`webhooks`] (the outbox); here the
//! connection pool, migrations and the error type.
//!
//! Functions take a `&mut PgConnection` so that the caller owns the transaction: `ingest`
//! wraps one message in one transaction, the IMAP poller adds its UID checkpoint to it.

pub mod batch_rows;
pub mod events;
pub mod grants;
pub mod leases;
pub mod mailbox;
pub mod quarantine;
pub mod tickets;
pub mod webhooks;

use crate::config::DatabaseConfig;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// The embedded migrations (`migrations/*.sql`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A failure talking to the database. Never holds the connection URL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL could not be read.
    #[error("the database URL is not valid: {0}")]
    BadUrl(String),
    /// Connecting, querying or committing failed.
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// A migration failed.
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The transaction was rolled back: this replica no longer holds the mailbox's lease.
    #[error(transparent)]
    LeaseLost(#[from] leases::LeaseLost),
}

impl StoreError {
    /// True when Postgres refused this particular message's data (bad bytes, a value too
    /// big for an index): the message belongs in quarantine, and retrying cannot help.
    /// Anything else (connection lost, disk full) must fail the message so it is retried.
    pub fn is_refused_data(&self) -> bool {
        match self {
            StoreError::Sql(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("54")),
            StoreError::Sql(sqlx::Error::Encode(_)) => true,
            _ => false,
        }
    }

    /// True when a unique key refused a row: another writer stored the same thing first.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Sql(sqlx::Error::Database(db))
            if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
    }
}

/// Connects a pool; fails fast (10 s) when the database cannot be reached.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, StoreError> {
    // Parse errors from sqlx may quote the URL: report a fixed text instead.
    let options = PgConnectOptions::from_str(config.url.expose_secret()).map_err(|_| {
        StoreError::BadUrl("expected postgres://user[:password]@host[:port]/database".into())
    })?;
    let options = options.application_name("mail2ticket");
    // One direct connection first: a pool reports only "timed out" after retrying, while
    // this gives the real cause (refused, bad password, unknown database) at once.
    let probe = tokio::time::timeout(
        Duration::from_secs(10),
        PgConnection::connect_with(&options),
    )
    .await
    .map_err(|_| StoreError::Sql(sqlx::Error::PoolTimedOut))??;
    probe.close().await?;
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
