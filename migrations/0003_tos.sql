-- Terms of Service: published versions and client acceptances.
-- The current version is the one published last (highest `seq`). Acceptances are history:
-- a client may accept again (e.g. with a new purpose); its latest acceptance of a version counts.
-- client_id/key_id carry no foreign key, so this migration does not depend on 0001's tables.

CREATE TABLE tos_versions (
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    version      text        NOT NULL,
    text         text        NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tos_versions_pkey PRIMARY KEY (seq),
    CONSTRAINT tos_versions_version_key UNIQUE (version),
    CONSTRAINT tos_versions_version_not_blank CHECK (length(btrim(version)) > 0)
);

CREATE TABLE tos_acceptances (
    id            bigint GENERATED ALWAYS AS IDENTITY,
    client_id     uuid        NOT NULL,
    key_id        uuid        NOT NULL,
    version       text        NOT NULL,
    purpose       text        NOT NULL,
    student_model text        NOT NULL,
    commercial    boolean     NOT NULL,
    accepted_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tos_acceptances_pkey PRIMARY KEY (id),
    CONSTRAINT tos_acceptances_version_fkey FOREIGN KEY (version) REFERENCES tos_versions (version)
);

CREATE INDEX tos_acceptances_client_version_idx ON tos_acceptances (client_id, version, id DESC);

-- Published versions and acceptances are evidence too: append-only.
CREATE TRIGGER tos_versions_append_only
    BEFORE UPDATE OR DELETE ON tos_versions
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER tos_acceptances_append_only
    BEFORE UPDATE OR DELETE ON tos_acceptances
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

REVOKE ALL ON tos_versions, tos_acceptances FROM PUBLIC;
GRANT SELECT, INSERT ON tos_versions, tos_acceptances TO teachd_app;
