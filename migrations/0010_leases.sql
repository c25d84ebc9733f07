-- Several replicas share the mailboxes through leases (see src/store/leases.rs).
-- Only the database's clock decides expiry. A lease row is never deleted: its epoch only
-- grows, and every batch transaction checks (owner, epoch) inside the transaction, so a
-- replica that lost a lease (paused, cut off) can never commit for that mailbox again.
CREATE TABLE mailbox_leases (
    parser      text        PRIMARY KEY,
    owner       text        NOT NULL,
    epoch       bigint      NOT NULL,
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);

-- The replicas that run (a live one renews heartbeat_at with its leases); the balance
-- counts those whose heartbeat is younger than the lease TTL.
CREATE TABLE replicas (
    name         text        PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
