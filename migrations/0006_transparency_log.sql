-- The transparency log (issue 13): the ledger as an RFC 9162 Merkle tree with signed
-- checkpoints, so that a client or an auditor can check it without trusting this database.
--
-- `ledger_tree` holds every hash of the tree that is complete (leaves and the roots of full
-- subtrees) at its Go-tlog "stored hash index" (src/ledger/tree.rs): leaf i is
-- SHA-256(0x00 || row_hash of usage_events.id = i + 1). The writer inserts a batch's nodes in
-- the same statement as its rows, so the tree and the rows always commit together; proofs and
-- roots for any tree size read O(log n) of these rows. Rows that existed before this migration
-- are added by the writer when it starts (a catch-up that never skips a row).
--
-- `ledger_checkpoints` keeps every signed checkpoint (a C2SP signed note over a
-- tlog-checkpoint) that a teachd process produced. Losing it loses nothing of the proof: the
-- checkpoints that count are the ones clients and witnesses saved.

CREATE TABLE ledger_tree (
    idx  bigint NOT NULL,
    hash bytea  NOT NULL,
    CONSTRAINT ledger_tree_pkey PRIMARY KEY (idx),
    CONSTRAINT ledger_tree_hash_len CHECK (octet_length(hash) = 32)
);

CREATE TABLE ledger_checkpoints (
    tree_size  bigint      NOT NULL,
    root_hash  bytea       NOT NULL,
    note       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_checkpoints_pkey PRIMARY KEY (tree_size),
    CONSTRAINT ledger_checkpoints_root_len CHECK (octet_length(root_hash) = 32)
);

-- Append-only like the ledger itself.
CREATE TRIGGER ledger_tree_append_only
    BEFORE UPDATE OR DELETE ON ledger_tree
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_tree_no_truncate
    BEFORE TRUNCATE ON ledger_tree
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON ledger_checkpoints
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_checkpoints_no_truncate
    BEFORE TRUNCATE ON ledger_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- The runtime role: exactly what `teachd serve` needs. It reads and appends the ledger
-- tables and may not change or remove a row of them (no UPDATE, DELETE, TRUNCATE; not the
-- owner, so it cannot disable a trigger); it reads and writes the tables of clients, keys,
-- quotas (terms: read and append, granted in 0003).
REVOKE ALL ON ledger_tree, ledger_checkpoints FROM PUBLIC;
GRANT SELECT, INSERT ON ledger_tree, ledger_checkpoints TO teachd_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON clients, api_keys, client_daily_usage TO teachd_app;
GRANT USAGE ON SCHEMA public TO teachd_app;
