#!/usr/bin/env bash
# Runs mail2ticket on the sample mail: a throwaway Postgres, `migrate`, `ingest` of every
# tests/corpus/*.eml, then the tickets created, and the Postgres stopped again.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet
eval "$(scripts/pg-throwaway.sh)"
trap 'scripts/pg-throwaway.sh stop "$PGDIR"' EXIT
cfg="$PGDIR/mail2ticket.toml"
cat >"$cfg" <<TOML
[database]
url = "$DATABASE_URL"

[[parser]]
name = "support"
email = "support@contoso.com"
add_ccs = true
password = "unused-by-ingest"
[parser.imap]
host = "127.0.0.1"
encryption = "none"
TOML
bin=target/release/mail2ticket
$bin check-config --config "$cfg"
$bin migrate --config "$cfg"
echo "== first run"
$bin ingest --config "$cfg" --parser support tests/corpus/*.eml || true
echo "== second run (nothing new)"
$bin ingest --config "$cfg" --parser support tests/corpus/*.eml | tail -1
echo "== tickets"
psql "$DATABASE_URL" -P pager=off -c "
  select t.id, left(t.subject, 40) as subject, t.requester_email,
         (select count(*) from attachments a join ticket_messages m on m.id = a.ticket_message_id
           where m.ticket_id = t.id) as attachments,
         (select count(*) from participants p where p.ticket_id = t.id and p.role = 'cc') as ccs
  from tickets t order by t.id"
echo "== quarantine"
psql "$DATABASE_URL" -P pager=off -c "select id, parser, reason, raw_size from quarantine order by id"
