-- Idempotency-Key support for POST /workflow: a key names one request (by fingerprint)
-- and the workflow it created, until it expires. No foreign key: the key row is written
-- first in the same transaction as the workflow, and expired keys are purged apart.
CREATE TABLE idempotency_keys (
    key text PRIMARY KEY,
    fingerprint text NOT NULL,
    workflow_uuid uuid NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
