-- Request ids are per client (issue 10): one tenant must not be able to burn another's ids, so
-- the ledger's uniqueness is (client_id, request_id), and the stored bodies follow.
-- Aggregated refusal rows: past `ledger.max_refusal_rows_per_minute`, a client's refusals are
-- written as one row per minute whose `refusals` says how many requests it stands for.
-- Free-text fields get length caps, so that storage stays bounded per request.
--
-- Nothing here rewrites a ledger row: new columns get a constant default (no UPDATE fires) and
-- constraints are added or dropped only.

ALTER TABLE usage_events DROP CONSTRAINT usage_events_request_id_key;
ALTER TABLE usage_events
    ADD CONSTRAINT usage_events_client_request_id_key UNIQUE (client_id, request_id);
ALTER TABLE usage_events ADD COLUMN refusals bigint NOT NULL DEFAULT 0;
ALTER TABLE usage_events
    ADD CONSTRAINT usage_events_refusals_check CHECK (refusals >= 0);

-- Bodies stored before this migration keep a NULL client (their request ids were global).
ALTER TABLE usage_bodies ADD COLUMN client_id uuid;
ALTER TABLE usage_bodies DROP CONSTRAINT usage_bodies_pkey;
ALTER TABLE usage_bodies
    ADD CONSTRAINT usage_bodies_client_request_id_key UNIQUE (client_id, request_id);

-- Caps on client-supplied text (checked by the API first, with a 400 that names the field).
ALTER TABLE tos_acceptances
    ADD CONSTRAINT tos_acceptances_purpose_len CHECK (length(purpose) <= 2000) NOT VALID;
ALTER TABLE tos_acceptances
    ADD CONSTRAINT tos_acceptances_student_model_len CHECK (length(student_model) <= 200) NOT VALID;
ALTER TABLE tos_versions
    ADD CONSTRAINT tos_versions_version_len CHECK (length(version) <= 100) NOT VALID;
ALTER TABLE tos_versions
    ADD CONSTRAINT tos_versions_text_len CHECK (length(text) <= 1000000) NOT VALID;
