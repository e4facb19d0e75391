-- Workflows and their outbox. Each migration runs in one transaction (see migrate()):
-- no BEGIN/COMMIT here, and nothing that refuses a transaction (CREATE INDEX CONCURRENTLY).

CREATE TYPE workflow_status AS ENUM ('inserted', 'consumed');

CREATE TABLE workflows (
    uuid uuid PRIMARY KEY,
    status workflow_status NOT NULL,
    -- The client's exact text (json keeps it verbatim: key order, number text, spacing);
    -- read it back as data_text::text. `data` is the same document as jsonb, for queries,
    -- derived so the two can never disagree.
    data_text json NOT NULL,
    data jsonb GENERATED ALWAYS AS (data_text::jsonb) STORED NOT NULL,
    steps text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    delivery_attempts integer NOT NULL DEFAULT 0
);

-- The queue (oldest INSERTED row first) and listing with a status filter, both in uuid
-- order. A partial index on INSERTED rows alone was measured redundant: the planner picks
-- this one for the claim query too.
CREATE INDEX workflows_status_uuid_idx ON workflows (status, uuid);

CREATE TABLE outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow_uuid uuid NOT NULL REFERENCES workflows (uuid),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX outbox_workflow_uuid_idx ON outbox (workflow_uuid);
