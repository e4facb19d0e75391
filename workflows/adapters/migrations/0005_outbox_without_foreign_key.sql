-- The outbox's foreign key to workflows goes. Each entry is written in the same statement
-- as its workflow (or after locking it, for a replay), and no workflow is ever deleted, so
-- the key checked nothing that can fail; its check ran per entry on the hot path of every
-- POST with the rabbitmq backend and locked the new workflow row (FOR KEY SHARE). Measured
-- (bench/notes.md, 3 alternating rounds): POST with rabbitmq 838/1,009/1,422 -> 1,289/
-- 1,586/2,002 per second. An entry whose workflow is unknown would do no harm: the relay
-- publishes it, and a consumer skips (acks) a message whose workflow is not queued.
ALTER TABLE outbox DROP CONSTRAINT outbox_workflow_uuid_fkey;
