-- Each batch asks which of its Message-IDs are stored already, in ticket_messages (its
-- unique key answers) and among the messages quarantined and not replayed. Without an
-- index the second half read every quarantined row of the parser once per batch: a
-- mailbox with a large quarantine paid for it on every batch of a backlog.
create index quarantine_pending_message_idx on quarantine (parser, message_id)
    where replayed_at is null;
