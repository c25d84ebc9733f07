//! SQL of `credential_grants`: delegated sign-ins, their sealed refresh tokens and their
//! "needs login" state.

use super::StoreError;
use sqlx::PgConnection;
use std::time::Duration;

/// A delegated credential's sign-in, as `credential_grants` holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Grant {
    /// Tenant the sign-in was made in.
    pub tenant_id: String,
    /// Application the sign-in was made for.
    pub client_id: String,
    /// Who signed in (from the token), for messages.
    pub signed_in_as: Option<String>,
    /// The sealed refresh token (see `sealed`).
    pub refresh_token: Option<Vec<u8>>,
    /// `ok` or `needs_login`.
    pub status: String,
    /// Why it needs a login.
    pub status_reason: Option<String>,
}

/// The grant of `credential`, locked until the transaction ends so that two processes
/// never redeem the same refresh token (a rotated token would be lost).
pub async fn lock_grant(
    conn: &mut PgConnection,
    credential: &str,
) -> Result<Option<Grant>, StoreError> {
    Ok(sqlx::query_as(
        "select tenant_id, client_id, signed_in_as, refresh_token, status, status_reason
         from credential_grants where credential = $1 for update",
    )
    .bind(credential)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Records a successful refresh: the (possibly rotated) sealed refresh token and the new
/// access token's expiry, in one statement.
pub async fn save_refreshed_grant(
    conn: &mut PgConnection,
    credential: &str,
    sealed_refresh_token: &[u8],
    access_expires_in: Duration,
) -> Result<(), StoreError> {
    sqlx::query(
        "update credential_grants
         set refresh_token = $2, access_expires_at = now() + $3 * interval '1 second',
             refreshed_at = now(), status = 'ok', status_reason = null
         where credential = $1",
    )
    .bind(credential)
    .bind(sealed_refresh_token)
    .bind(access_expires_in.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks the credential as needing `mail2ticket login`, with the reason.
pub async fn mark_needs_login(
    conn: &mut PgConnection,
    credential: &str,
    reason: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "update credential_grants
         set status_since = case when status = 'needs_login' then status_since else now() end,
             status = 'needs_login', status_reason = $2
         where credential = $1",
    )
    .bind(credential)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records a delegated credential nobody has signed in with yet as needing a login, so
/// the state is visible in the database (an existing row is left alone).
pub async fn record_missing_sign_in(
    conn: &mut PgConnection,
    credential: &str,
    tenant_id: &str,
    client_id: &str,
    reason: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into credential_grants (credential, tenant_id, client_id, status, status_reason)
         values ($1, $2, $3, 'needs_login', $4)
         on conflict (credential) do nothing",
    )
    .bind(credential)
    .bind(tenant_id)
    .bind(client_id)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Stores a new sign-in (from `mail2ticket login`), replacing any earlier one.
pub async fn save_sign_in(
    conn: &mut PgConnection,
    credential: &str,
    tenant_id: &str,
    client_id: &str,
    signed_in_as: Option<&str>,
    sealed_refresh_token: &[u8],
    access_expires_in: Duration,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into credential_grants
           (credential, tenant_id, client_id, signed_in_as, refresh_token, access_expires_at,
            refreshed_at, signed_in_at, status, status_reason, status_since)
         values ($1, $2, $3, $4, $5, now() + $6 * interval '1 second', now(), now(), 'ok', null, now())
         on conflict (credential) do update set
           tenant_id = excluded.tenant_id, client_id = excluded.client_id,
           signed_in_as = excluded.signed_in_as, refresh_token = excluded.refresh_token,
           access_expires_at = excluded.access_expires_at, refreshed_at = now(),
           signed_in_at = now(), status = 'ok', status_reason = null, status_since = now()",
    )
    .bind(credential)
    .bind(tenant_id)
    .bind(client_id)
    .bind(signed_in_as)
    .bind(sealed_refresh_token)
    .bind(access_expires_in.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
