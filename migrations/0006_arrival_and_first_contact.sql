-- Loop protection counts by when messages arrived, not by when they were processed: a
-- backlog (first contact with a full mailbox, a catch-up after downtime) is not a loop.
-- arrived_at is the IMAP INTERNALDATE, or for `ingest` a plausible Date header, else the
-- ingest time. Existing rows take the time they were stored.
ALTER TABLE tickets ADD COLUMN arrived_at timestamptz;
UPDATE tickets SET arrived_at = created_at;
ALTER TABLE tickets ALTER COLUMN arrived_at SET NOT NULL, ALTER COLUMN arrived_at SET DEFAULT now();
CREATE INDEX tickets_parser_requester_arrived_idx ON tickets (parser, requester_email, arrived_at);

ALTER TABLE ticket_messages ADD COLUMN arrived_at timestamptz;
UPDATE ticket_messages SET arrived_at = received_at;
ALTER TABLE ticket_messages ALTER COLUMN arrived_at SET NOT NULL, ALTER COLUMN arrived_at SET DEFAULT now();

ALTER TABLE quarantine ADD COLUMN arrived_at timestamptz;
UPDATE quarantine SET arrived_at = created_at;
ALTER TABLE quarantine ALTER COLUMN arrived_at SET NOT NULL, ALTER COLUMN arrived_at SET DEFAULT now();
CREATE INDEX quarantine_loop_arrived_idx ON quarantine (parser, sender, arrived_at) WHERE kind = 'loop';

-- start_at: what the mail already in a folder at first contact becomes. Messages with a UID
-- up to backlog_until are taken only when listed in backlog_uids (chosen once, at first
-- contact, so a restart or \Seen set meanwhile cannot change the choice); later UIDs are
-- always taken. Cleared once the checkpoint passes backlog_until or UIDVALIDITY changes.
ALTER TABLE mailbox_state
    ADD COLUMN backlog_until bigint,
    ADD COLUMN backlog_uids bigint[];
