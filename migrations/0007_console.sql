-- The admin console (issue 15): hourly usage rollups kept by the ledger's own INSERT, console
-- sessions, and the results of ledger verifications.
--
-- Rollups: one row per (UTC hour, client, endpoint, model, status class, error code), added to
-- by a statement-level trigger on `usage_events` in the same statement (and so the same
-- transaction) as the rows: a batch that commits has its rollups, one that rolls back has none,
-- and no row can be missed or counted twice. The writer inserts each batch with one statement,
-- so the trigger runs once per batch. Rows are upserted in key order so that two writers
-- (several processes on one ledger) lock rollup rows in the same order and cannot deadlock.
-- Rollups are derived data, not evidence: they can always be rebuilt from `usage_events`.

CREATE TABLE usage_rollups_hourly (
    hour             timestamptz      NOT NULL,
    client_id        uuid             NOT NULL,
    endpoint         text             NOT NULL,
    model            text,
    -- status / 100: 2 served, 4 refused or bad input, 5 server side.
    status_class     smallint         NOT NULL,
    error_code       text,
    -- Ledger rows behind this rollup row.
    events           bigint           NOT NULL,
    -- Requests: a row standing for N aggregated refusals counts N (greatest(refusals, 1)).
    requests         bigint           NOT NULL,
    prompt_tokens    bigint           NOT NULL,
    scored_tokens    bigint           NOT NULL,
    generated_tokens bigint           NOT NULL,
    judgments        bigint           NOT NULL,
    latency_ms_sum   double precision NOT NULL,
    CONSTRAINT usage_rollups_hourly_key
        UNIQUE NULLS NOT DISTINCT (hour, client_id, endpoint, model, status_class, error_code)
);

CREATE INDEX usage_rollups_hourly_client_idx ON usage_rollups_hourly (client_id, hour);

-- The same per UTC day (`day` is its midnight): a 30-day aggregate reads 30 days of these
-- instead of 720 hours of the hourly ones.
CREATE TABLE usage_rollups_daily (
    day              timestamptz      NOT NULL,
    client_id        uuid             NOT NULL,
    endpoint         text             NOT NULL,
    model            text,
    status_class     smallint         NOT NULL,
    error_code       text,
    events           bigint           NOT NULL,
    requests         bigint           NOT NULL,
    prompt_tokens    bigint           NOT NULL,
    scored_tokens    bigint           NOT NULL,
    generated_tokens bigint           NOT NULL,
    judgments        bigint           NOT NULL,
    latency_ms_sum   double precision NOT NULL,
    CONSTRAINT usage_rollups_daily_key
        UNIQUE NULLS NOT DISTINCT (day, client_id, endpoint, model, status_class, error_code)
);

CREATE INDEX usage_rollups_daily_client_idx ON usage_rollups_daily (client_id, day);

-- SECURITY DEFINER: the app role may read rollups but not write them; only this trigger does.
CREATE FUNCTION usage_rollups_add() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO usage_rollups_hourly AS r (hour, client_id, endpoint, model, status_class,
        error_code, events, requests, prompt_tokens, scored_tokens, generated_tokens, judgments,
        latency_ms_sum)
    SELECT date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', client_id, endpoint,
           model, (status / 100)::smallint, error_code, count(*), sum(greatest(refusals, 1)),
           sum(prompt_tokens), sum(scored_tokens), sum(generated_tokens), sum(judgments),
           sum(latency_ms)
    FROM new_rows
    GROUP BY 1, 2, 3, 4, 5, 6
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (hour, client_id, endpoint, model, status_class, error_code) DO UPDATE SET
        events = r.events + EXCLUDED.events,
        requests = r.requests + EXCLUDED.requests,
        prompt_tokens = r.prompt_tokens + EXCLUDED.prompt_tokens,
        scored_tokens = r.scored_tokens + EXCLUDED.scored_tokens,
        generated_tokens = r.generated_tokens + EXCLUDED.generated_tokens,
        judgments = r.judgments + EXCLUDED.judgments,
        latency_ms_sum = r.latency_ms_sum + EXCLUDED.latency_ms_sum;
    INSERT INTO usage_rollups_daily AS r (day, client_id, endpoint, model, status_class,
        error_code, events, requests, prompt_tokens, scored_tokens, generated_tokens, judgments,
        latency_ms_sum)
    SELECT date_trunc('day', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', client_id, endpoint,
           model, (status / 100)::smallint, error_code, count(*), sum(greatest(refusals, 1)),
           sum(prompt_tokens), sum(scored_tokens), sum(generated_tokens), sum(judgments),
           sum(latency_ms)
    FROM new_rows
    GROUP BY 1, 2, 3, 4, 5, 6
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, client_id, endpoint, model, status_class, error_code) DO UPDATE SET
        events = r.events + EXCLUDED.events,
        requests = r.requests + EXCLUDED.requests,
        prompt_tokens = r.prompt_tokens + EXCLUDED.prompt_tokens,
        scored_tokens = r.scored_tokens + EXCLUDED.scored_tokens,
        generated_tokens = r.generated_tokens + EXCLUDED.generated_tokens,
        judgments = r.judgments + EXCLUDED.judgments,
        latency_ms_sum = r.latency_ms_sum + EXCLUDED.latency_ms_sum;
    RETURN NULL;
END
$$;

-- No row may be appended between the backfill and the trigger's start.
LOCK TABLE usage_events IN SHARE MODE;

INSERT INTO usage_rollups_hourly (hour, client_id, endpoint, model, status_class, error_code,
    events, requests, prompt_tokens, scored_tokens, generated_tokens, judgments, latency_ms_sum)
SELECT date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', client_id, endpoint, model,
       (status / 100)::smallint, error_code, count(*), sum(greatest(refusals, 1)),
       sum(prompt_tokens), sum(scored_tokens), sum(generated_tokens), sum(judgments),
       sum(latency_ms)
FROM usage_events
GROUP BY 1, 2, 3, 4, 5, 6;

INSERT INTO usage_rollups_daily (day, client_id, endpoint, model, status_class, error_code,
    events, requests, prompt_tokens, scored_tokens, generated_tokens, judgments, latency_ms_sum)
SELECT date_trunc('day', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', client_id, endpoint, model,
       status_class, error_code, sum(events), sum(requests), sum(prompt_tokens),
       sum(scored_tokens), sum(generated_tokens), sum(judgments), sum(latency_ms_sum)
FROM usage_rollups_hourly
GROUP BY 1, 2, 3, 4, 5, 6;

CREATE TRIGGER usage_events_rollup
    AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_rollups_add();

REVOKE ALL ON usage_rollups_hourly, usage_rollups_daily FROM PUBLIC;
GRANT SELECT ON usage_rollups_hourly, usage_rollups_daily TO teachd_app;

-- Console sign-ins. The cookie holds a random token; only its SHA-256 is stored. A session
-- lives until it expires or its admin signs out, and dies with its key (revoked keys and
-- suspended clients are refused at every request by the lookup, deleted keys cascade).
CREATE TABLE console_sessions (
    token_hash  bytea       NOT NULL,
    key_id      uuid        NOT NULL,
    csrf_token  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CONSTRAINT console_sessions_pkey PRIMARY KEY (token_hash),
    CONSTRAINT console_sessions_key_id_fkey FOREIGN KEY (key_id) REFERENCES api_keys (id) ON DELETE CASCADE,
    CONSTRAINT console_sessions_token_hash_check CHECK (octet_length(token_hash) = 32)
);

CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);

GRANT SELECT, INSERT, DELETE ON console_sessions TO teachd_app;

-- Each verification of the hash chain (admin API, CLI or console), so that the console can
-- show the last result.
CREATE TABLE ledger_verifications (
    id                 bigint GENERATED ALWAYS AS IDENTITY,
    ran_at             timestamptz NOT NULL DEFAULT now(),
    range_from         timestamptz,
    range_to           timestamptz,
    ok                 boolean     NOT NULL,
    rows_checked       bigint      NOT NULL,
    first_bad_event_id bigint,
    CONSTRAINT ledger_verifications_pkey PRIMARY KEY (id)
);

GRANT SELECT, INSERT ON ledger_verifications TO teachd_app;
