-- Batch jobs (issue 14): uploaded files and the batches that run them.
-- File bytes live on disk under `batch.data_dir` (see src/batch/files.rs for why); these tables
-- hold who owns what and how far each batch got, so that a restarted process resumes a batch
-- from its last committed line. client_id/key_id carry no foreign key, like the ToS tables.

CREATE TABLE batch_files (
    id         text        NOT NULL,
    client_id  uuid        NOT NULL,
    purpose    text        NOT NULL,
    filename   text        NOT NULL,
    bytes      bigint      NOT NULL,
    -- `jsonl` or `parquet`.
    format     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT batch_files_pkey PRIMARY KEY (id),
    CONSTRAINT batch_files_purpose_check CHECK (purpose IN ('batch', 'batch_output')),
    CONSTRAINT batch_files_format_check CHECK (format IN ('jsonl', 'parquet')),
    CONSTRAINT batch_files_filename_len CHECK (length(filename) <= 255),
    CONSTRAINT batch_files_bytes_check CHECK (bytes >= 0)
);

CREATE INDEX batch_files_client_idx ON batch_files (client_id, created_at DESC, id DESC);

CREATE TABLE batches (
    id                text        NOT NULL,
    client_id         uuid        NOT NULL,
    key_id            uuid        NOT NULL,
    endpoint          text        NOT NULL,
    input_file_id     text        NOT NULL,
    completion_window text        NOT NULL,
    output_format     text        NOT NULL,
    metadata          jsonb,
    status            text        NOT NULL,
    errors            jsonb,
    output_file_id    text,
    error_file_id     text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    in_progress_at    timestamptz,
    expires_at        timestamptz NOT NULL,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    expired_at        timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz,
    -- Lines of the input, and how they ended.
    total_lines       integer     NOT NULL DEFAULT 0,
    completed_lines   integer     NOT NULL DEFAULT 0,
    failed_lines      integer     NOT NULL DEFAULT 0,
    -- 1-based lines refused at validation (already in the error file; never run).
    invalid_lines     integer[]   NOT NULL DEFAULT '{}',
    -- Resume point: the next 0-based line to run, and the committed sizes of the work files.
    next_line         integer     NOT NULL DEFAULT 0,
    output_offset     bigint      NOT NULL DEFAULT 0,
    error_offset      bigint      NOT NULL DEFAULT 0,
    -- Token progress and the daily-quota reservation of the whole job.
    total_tokens      bigint      NOT NULL DEFAULT 0,
    scored_tokens     bigint      NOT NULL DEFAULT 0,
    reserved_tokens   bigint      NOT NULL DEFAULT 0,
    -- Estimates of the lines processed so far (settled against the reservation).
    settled_tokens    bigint      NOT NULL DEFAULT 0,
    quota_day         date        NOT NULL,
    -- Ledger ids of the first and last line rows (provenance of the output).
    first_ledger_id   bigint,
    last_ledger_id    bigint,
    CONSTRAINT batches_pkey PRIMARY KEY (id),
    CONSTRAINT batches_status_check CHECK (status IN ('validating', 'failed', 'in_progress',
        'finalizing', 'completed', 'expired', 'cancelling', 'cancelled')),
    CONSTRAINT batches_output_format_check CHECK (output_format IN ('jsonl', 'parquet'))
);

CREATE INDEX batches_client_idx ON batches (client_id, created_at DESC, id DESC);
CREATE INDEX batches_active_idx ON batches (created_at)
    WHERE status IN ('in_progress', 'finalizing', 'cancelling');

REVOKE ALL ON batch_files, batches FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON batch_files, batches TO teachd_app;
