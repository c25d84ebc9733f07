-- Delegated sign-ins (mail2ticket login): one row per [[credential]] of type "delegated".
-- The refresh token is encrypted with [secrets] key (see src/sealed.rs); every rotated
-- token replaces it in the same statement that records the new access-token expiry.
CREATE TABLE credential_grants (
    credential        text PRIMARY KEY,
    tenant_id         text NOT NULL,
    client_id         text NOT NULL,
    signed_in_as      text,
    refresh_token     bytea,
    access_expires_at timestamptz,
    refreshed_at      timestamptz,
    signed_in_at      timestamptz NOT NULL DEFAULT now(),
    -- 'ok', or 'needs_login' once Entra refused the grant (expired, revoked, ...).
    status            text NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'needs_login')),
    status_reason     text,
    status_since      timestamptz NOT NULL DEFAULT now()
);
