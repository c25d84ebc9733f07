-- Threading, auto-reply and loop rules (issue "What a service desk expects").
-- quarantine now also keeps messages that were read fine but deliberately not ticketed:
--   kind 'error'     could not be turned into a ticket (the original meaning)
--   kind 'automatic' an auto-reply, bounce or message from the parser's own address that
--                    threads onto no ticket
--   kind 'loop'      over max_tickets_per_sender within sender_window
alter table quarantine
    add column kind       text null,
    add column sender     text null,
    add column message_id text null;
update quarantine set kind = 'error' where kind is null;
alter table quarantine
    alter column kind set default 'error',
    alter column kind set not null,
    add constraint quarantine_kind_check check (kind in ('error', 'automatic', 'loop'));
create index quarantine_sender_idx on quarantine (parser, kind, sender, created_at);

-- Loop protection counts a sender's recent tickets.
create index tickets_parser_requester_created_idx on tickets (parser, requester_email, created_at);

-- Whether a stored message was automatic (appended auto-replies are marked).
alter table ticket_messages add column automatic_reason text null;
