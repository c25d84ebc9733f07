-- The events outbox: one row per thing downstream systems hear about, written in the
-- same transaction as what it reports (so an event exists if and only if that was
-- committed), with NOTIFY mail2ticket_events carrying its id. A duplicate message writes
-- nothing. Kinds: ticket.created, ticket.message_added, message.held,
-- message.quarantined, mailbox.state_changed, credential.needs_login.
CREATE TABLE ticket_events (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind              text        NOT NULL,
    parser            text        NOT NULL,
    ticket_id         bigint,
    ticket_message_id bigint,
    quarantine_id     bigint,
    payload           jsonb       NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ticket_events_created_at ON ticket_events (created_at);
