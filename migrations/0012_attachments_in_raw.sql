-- Attachments stored once. With `attachments_in_raw = true`, a base64 attachment of a
-- message whose raw bytes are kept is not written a second time decoded: its
-- `content` is null and `raw_offset` / `raw_length` give where its base64 text lies in
-- `raw_messages.raw` (0-based, in bytes). The daemon stores a range only after checking
-- that those bytes decode to the attachment. `attachment_files` gives every attachment
-- with its content, decoded from the raw message where needed; `substring` of a
-- STORAGE EXTERNAL column reads only the chunks it needs.
alter table attachments
    add column raw_offset bigint null,
    add column raw_length bigint null;

create view attachment_files as
select a.id, a.ticket_message_id, a.filename, a.content_type, a.size, a.sha256,
       a.content_id, a.is_inline,
       coalesce(a.content,
                decode(convert_from(substring(r.raw from (a.raw_offset + 1)::int for a.raw_length::int),
                                    'SQL_ASCII'),
                       'base64')) as content,
       a.raw_offset is not null as in_raw
  from attachments a
  left join raw_messages r
         on a.raw_offset is not null and r.ticket_message_id = a.ticket_message_id;
