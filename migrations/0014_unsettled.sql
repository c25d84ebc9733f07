-- A batch is settled on the server (marked read, moved, deleted) only after its commit, so
-- a crash or a cut connection between the two left committed messages unsettled for good:
-- the cursor is past them. The commit now records the keys it owes a settle (IMAP: UIDs
-- under the saved UIDVALIDITY; Graph: immutable ids); a successful settle clears them, and
-- the next pass settles whatever is still recorded before anything else.
alter table mailbox_state add column unsettled text[];
