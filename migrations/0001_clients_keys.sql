-- Clients, their API keys, and the persisted daily token quota (issue 3).
-- Constraint names are explicit so that errors and future migrations can refer to them.

CREATE TABLE clients (
    id              uuid        NOT NULL,
    name            text        NOT NULL,
    contact         text,
    suspended       boolean     NOT NULL DEFAULT false,
    -- Per-client limit overrides; NULL means "the default from the config file".
    rpm             integer,
    tpm             integer,
    max_concurrent  integer,
    daily_tokens    bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT clients_pkey PRIMARY KEY (id),
    CONSTRAINT clients_name_key UNIQUE (name),
    CONSTRAINT clients_name_check CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    CONSTRAINT clients_contact_check CHECK (contact IS NULL OR length(contact) <= 320),
    CONSTRAINT clients_rpm_check CHECK (rpm IS NULL OR rpm > 0),
    CONSTRAINT clients_tpm_check CHECK (tpm IS NULL OR tpm > 0),
    CONSTRAINT clients_max_concurrent_check CHECK (max_concurrent IS NULL OR max_concurrent > 0),
    CONSTRAINT clients_daily_tokens_check CHECK (daily_tokens IS NULL OR daily_tokens > 0)
);

CREATE TABLE api_keys (
    id            uuid        NOT NULL,
    client_id     uuid        NOT NULL,
    -- SHA-256 of the full key. The plaintext key is shown once at creation and never stored.
    key_hash      bytea       NOT NULL,
    -- `tk_` plus the first characters of the key, so that admins can tell keys apart.
    prefix        text        NOT NULL,
    scopes        text[]      NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz,
    CONSTRAINT api_keys_pkey PRIMARY KEY (id),
    CONSTRAINT api_keys_client_id_fkey FOREIGN KEY (client_id) REFERENCES clients (id) ON DELETE CASCADE,
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash),
    CONSTRAINT api_keys_key_hash_check CHECK (octet_length(key_hash) = 32),
    CONSTRAINT api_keys_prefix_check CHECK (prefix LIKE 'tk\_%' AND length(prefix) <= 16),
    CONSTRAINT api_keys_scopes_check CHECK (
        cardinality(scopes) >= 1 AND scopes <@ ARRAY['teacher', 'admin']::text[]
    )
);

CREATE INDEX api_keys_client_id_idx ON api_keys (client_id);

-- Tokens spent per client and UTC day. Reservations are added before the work runs and the
-- unused part is subtracted when it ends, so a crash can only over-count, never under-count.
CREATE TABLE client_daily_usage (
    client_id  uuid   NOT NULL,
    day        date   NOT NULL,
    tokens     bigint NOT NULL DEFAULT 0,
    CONSTRAINT client_daily_usage_pkey PRIMARY KEY (client_id, day),
    CONSTRAINT client_daily_usage_client_id_fkey FOREIGN KEY (client_id) REFERENCES clients (id) ON DELETE CASCADE,
    CONSTRAINT client_daily_usage_tokens_check CHECK (tokens >= 0)
);
