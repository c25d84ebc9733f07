-- Replay of quarantined and held messages (`mail2ticket quarantine replay`).
-- header_only: only the header was downloaded (IMAP message over max_message_size): such a
--   row cannot be replayed; the message itself is still in the mailbox.
-- replayed_at / replay_outcome: set in the transaction that stored the replayed message, so
--   a row is replayed at most once.
alter table quarantine
    add column header_only    boolean     not null default false,
    add column replayed_at    timestamptz null,
    add column replay_outcome text        null;
