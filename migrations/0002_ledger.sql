-- The usage ledger: one row per authenticated request, hash-chained, append-only.
--
-- Chain: rows are ordered by `id` (assigned by the writer: last id + 1, under an advisory lock,
-- so several teachd processes can share one ledger). `row_hash = sha256(prev_hash || canonical
-- encoding of the row)`; the first row's prev_hash is 32 zero bytes. See src/ledger/chain.rs.
--
-- No foreign keys to clients/api_keys on purpose: the ledger must outlive deleted clients, and it
-- must never refuse a row because of a constraint elsewhere.
--
-- Partitioning: not used. Every usage query is a range over `ts`, which grows with `id`; the ts
-- btree plus per-client indexes keep aggregates over millions of rows well under a second (see
-- BENCH_LEDGER.md). Partitioning would also force `ts` into every unique key (request_id, id).

-- The role the service should log in as (or SET ROLE to). Created NOLOGIN here; an operator gives
-- it LOGIN and a password. Roles are cluster-wide, so concurrent migrations of several databases
-- (tests) may race to create it: the duplicate is ignored.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'teachd_app') THEN
        CREATE ROLE teachd_app NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

CREATE TABLE usage_events (
    id               bigint           NOT NULL,
    request_id       text             NOT NULL,
    ts               timestamptz      NOT NULL,
    client_id        uuid             NOT NULL,
    key_id           uuid             NOT NULL,
    method           text             NOT NULL,
    endpoint         text             NOT NULL,
    model            text,
    status           smallint         NOT NULL,
    error_code       text,
    prompt_tokens    bigint           NOT NULL DEFAULT 0,
    scored_tokens    bigint           NOT NULL DEFAULT 0,
    generated_tokens bigint           NOT NULL DEFAULT 0,
    judgments        bigint           NOT NULL DEFAULT 0,
    top_k            integer,
    latency_ms       double precision NOT NULL,
    request_sha256   bytea            NOT NULL,
    response_sha256  bytea            NOT NULL,
    tos_version      text,
    weights_sha256   text,
    prev_hash        bytea            NOT NULL,
    row_hash         bytea            NOT NULL,
    CONSTRAINT usage_events_pkey PRIMARY KEY (id),
    CONSTRAINT usage_events_request_id_key UNIQUE (request_id),
    CONSTRAINT usage_events_id_positive CHECK (id > 0),
    CONSTRAINT usage_events_hash_len CHECK (
        octet_length(prev_hash) = 32 AND octet_length(row_hash) = 32
        AND octet_length(request_sha256) = 32 AND octet_length(response_sha256) = 32)
);

-- Time-range audits and exports; aggregates by time bucket.
CREATE INDEX usage_events_ts_idx ON usage_events (ts);
-- Per-client usage and per-client event pages (keyset by id).
CREATE INDEX usage_events_client_id_idx ON usage_events (client_id, id);
CREATE INDEX usage_events_client_ts_idx ON usage_events (client_id, ts);

-- Opt-in evidence: full bodies (`ledger.store_bodies`). Same append-only rules as the ledger.
CREATE TABLE usage_bodies (
    request_id    text  NOT NULL,
    request_body  bytea NOT NULL,
    response_body bytea NOT NULL,
    CONSTRAINT usage_bodies_pkey PRIMARY KEY (request_id)
);

-- Append-only, even for the owner: a trigger refuses UPDATE, DELETE and TRUNCATE. Only a
-- superuser or the owner can get past it, and only by visibly disabling the trigger.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the usage ledger is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER usage_events_append_only
    BEFORE UPDATE OR DELETE ON usage_events
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER usage_events_no_truncate
    BEFORE TRUNCATE ON usage_events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER usage_bodies_append_only
    BEFORE UPDATE OR DELETE ON usage_bodies
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER usage_bodies_no_truncate
    BEFORE TRUNCATE ON usage_bodies
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- The app role may only read and append.
REVOKE ALL ON usage_events, usage_bodies FROM PUBLIC;
GRANT SELECT, INSERT ON usage_events, usage_bodies TO teachd_app;
