-- Dead letters: a workflow whose export failed MAX_DELIVERY_ATTEMPTS times is parked out
-- of the live queue (it stays 'inserted'); PATCH to 'inserted' revives it.
ALTER TABLE workflows ADD COLUMN dead_lettered_at timestamptz;

CREATE INDEX workflows_dead_lettered_idx ON workflows (uuid) WHERE dead_lettered_at IS NOT NULL;
