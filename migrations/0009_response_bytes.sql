-- Bytes served (issue 15): each ledger row records the size of the response body it hashed,
-- and the rollups sum it. Rows written before this column existed have 0 (their chain encoding
-- is unchanged: the field enters a row's encoding only when it is not 0, see
-- src/ledger/chain.rs), and so do their rollups.

ALTER TABLE usage_events ADD COLUMN response_bytes bigint NOT NULL DEFAULT 0
    CHECK (response_bytes >= 0);
ALTER TABLE usage_rollups_hourly ADD COLUMN response_bytes bigint NOT NULL DEFAULT 0;
ALTER TABLE usage_rollups_daily ADD COLUMN response_bytes bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION usage_rollups_add() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO usage_rollups_hourly AS r (hour, client_id, endpoint, model, status_class,
        error_code, events, requests, prompt_tokens, scored_tokens, generated_tokens, judgments,
        latency_ms_sum, response_bytes)
    SELECT date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', client_id, endpoint,
           model, (status / 100)::smallint, error_code, count(*), sum(greatest(refusals, 1)),
           sum(prompt_tokens), sum(scored_tokens), sum(generated_tokens), sum(judgments),
           sum(latency_ms), sum(response_bytes)
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
        latency_ms_sum = r.latency_ms_sum + EXCLUDED.latency_ms_sum,
        response_bytes = r.response_bytes + EXCLUDED.response_bytes;
    INSERT INTO usage_rollups_daily AS r (day, client_id, endpoint, model, status_class,
        error_code, events, requests, prompt_tokens, scored_tokens, generated_tokens, judgments,
        latency_ms_sum, response_bytes)
    SELECT date_trunc('day', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', client_id, endpoint,
           model, (status / 100)::smallint, error_code, count(*), sum(greatest(refusals, 1)),
           sum(prompt_tokens), sum(scored_tokens), sum(generated_tokens), sum(judgments),
           sum(latency_ms), sum(response_bytes)
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
        latency_ms_sum = r.latency_ms_sum + EXCLUDED.latency_ms_sum,
        response_bytes = r.response_bytes + EXCLUDED.response_bytes;
    RETURN NULL;
END
$$;
