-- mail2ticket schema, version 1.
-- The tables and columns of the README's "Database contract" are read by downstream
-- helpdesk code: add to them, never rename or drop.
-- Conventions: NOT NULL with a DEFAULT wherever a value always exists; bytea payloads use
-- STORAGE EXTERNAL (no pglz compression: ~6x faster inserts, see GUIDE section 5).

create table tickets (
    id              bigint generated always as identity primary key,
    parser          text        not null,
    subject         text        not null default '',
    requester_email text        not null default '',
    requester_name  text        null,
    status          text        not null default 'new',
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);
create index tickets_parser_created_idx on tickets (parser, created_at);
create index tickets_requester_idx on tickets (requester_email);

create table ticket_messages (
    id                 bigint generated always as identity primary key,
    ticket_id          bigint      not null references tickets (id) on delete cascade,
    parser             text        not null,
    message_id         text        not null,
    message_id_derived boolean     not null default false,
    in_reply_to        text        null,
    references_ids     text[]      not null default '{}',
    subject            text        not null default '',
    from_email         text        not null default '',
    from_name          text        null,
    to_emails          text[]      not null default '{}',
    cc_emails          text[]      not null default '{}',
    sent_at            timestamptz null,
    received_at        timestamptz not null default now(),
    body_text          text        not null default '',
    body_html          text        null,
    raw_size           bigint      not null,
    warnings           text[]      not null default '{}',
    unique (parser, message_id)
);
create index ticket_messages_ticket_idx on ticket_messages (ticket_id);

create table attachments (
    id                 bigint generated always as identity primary key,
    ticket_message_id  bigint  not null references ticket_messages (id) on delete cascade,
    filename           text    not null,
    content_type       text    not null,
    size               bigint  not null,
    sha256             text    not null,
    content_id         text    null,
    is_inline          boolean not null default false,
    content            bytea   null
);
alter table attachments alter column content set storage external;
create index attachments_message_idx on attachments (ticket_message_id);

create table participants (
    ticket_id bigint not null references tickets (id) on delete cascade,
    email     text   not null,
    name      text   null,
    role      text   not null check (role in ('requester', 'cc')),
    unique (ticket_id, email, role)
);

-- The raw bytes of a stored message, kept when mail-parser's reading of it is in doubt
-- (see ticket_messages.warnings) so that nothing a person sent is lost.
create table raw_messages (
    ticket_message_id bigint primary key references ticket_messages (id) on delete cascade,
    raw               bytea  not null
);
alter table raw_messages alter column raw set storage external;

create table quarantine (
    id          bigint generated always as identity primary key,
    parser      text        not null,
    reason      text        not null,
    raw         bytea       not null,
    raw_sha256  text        not null,
    raw_size    bigint      not null,
    created_at  timestamptz not null default now(),
    unique (parser, raw_sha256)
);
alter table quarantine alter column raw set storage external;

create table mailbox_state (
    parser      text        not null,
    folder      text        not null,
    uidvalidity bigint      not null,
    last_uid    bigint      not null default 0,
    updated_at  timestamptz not null default now(),
    primary key (parser, folder)
);
