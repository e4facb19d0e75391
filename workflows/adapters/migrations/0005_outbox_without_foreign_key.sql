-- The outbox's foreign key to workflows goes. Each entry is written in the same statement
-- as its workflow (or after locking it, for a replay), and no workflow is ever deleted, so
-- the key checked nothing that can fail; its check ran per entry on the hot path of every
-- POST with the rabbitmq backend and locked the new workflow row (FOR KEY SHARE). Measured
-- (bench/notes.md, 3 alternating rounds on 10,000 rows): POST with rabbitmq, median 1,386 ->
-- 1,536 per second, PostgreSQL's CPU 108-116 -> 95-102 us per request. An entry whose
-- workflow is unknown would do no harm: the relay publishes it, and a consumer skips
-- (acks) a message whose workflow is not queued.
ALTER TABLE outbox DROP CONSTRAINT outbox_workflow_uuid_fkey;
