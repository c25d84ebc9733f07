-- A message the IMAP server fails to return (the connection is cut, or the FETCH comes back
-- short, every time it is sent) must not block its mailbox. The poller counts failed
-- fetches here, keyed by the first UID of the failing fetch; the counter survives restarts
-- and is cleared when the checkpoint passes that UID (or UIDVALIDITY changes).
ALTER TABLE mailbox_state
    ADD COLUMN fetch_trouble_uid bigint,
    ADD COLUMN fetch_failures integer NOT NULL DEFAULT 0;
