-- Webhook deliveries. webhook_subscriptions mirrors the [[webhook]] tables of the
-- configuration (written at start and on reload): the statement that writes an event
-- also writes one delivery row per matching active subscription, in the same
-- transaction, so no event is ever missed or fanned out twice. Dispatchers (any number of
-- processes) claim due rows with FOR UPDATE SKIP LOCKED and push next_attempt_at ahead
-- while they try (a claim that dies with its process expires on its own).
CREATE TABLE webhook_subscriptions (
    name       text PRIMARY KEY,
    kinds      text[],            -- null: every kind
    parsers    text[],            -- null: every parser
    active     boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    event_id        bigint      NOT NULL REFERENCES ticket_events (id) ON DELETE CASCADE,
    webhook         text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    dead_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, webhook)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook, next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
