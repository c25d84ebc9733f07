-- Microsoft Graph mailboxes keep their cursor in mailbox_state too (one row per parser and
-- folder): the delta link to resume from and when the folder was first met (start_at
-- decides about older mail). Their failed-download counter is keyed by the message's
-- immutable id. IMAP rows keep source = 'imap' and their UID columns; Graph rows leave
-- uidvalidity and last_uid at 0.
ALTER TABLE mailbox_state
    ADD COLUMN source text NOT NULL DEFAULT 'imap',
    ADD COLUMN delta_link text,
    ADD COLUMN first_contact_at timestamptz,
    ADD COLUMN fetch_trouble_key text;
