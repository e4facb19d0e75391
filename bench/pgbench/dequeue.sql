-- Raw dequeue: claim the oldest queued workflow no one else holds and mark it consumed,
-- returning the row, in one autocommit statement (the service needs three round trips:
-- BEGIN, the same claim-and-mark, COMMIT, with the CSV file written before the commit). The WHERE and ORDER BY are the service's
-- (TAKE_OLDEST_INSERTED in workflows/adapters/postgres/claims.py).
WITH claimed AS (
    SELECT uuid FROM workflows
    WHERE status = 'inserted' AND dead_lettered_at IS NULL
    ORDER BY uuid
    LIMIT 1
    FOR UPDATE SKIP LOCKED)
UPDATE workflows w SET status = 'consumed', updated_at = now()
FROM claimed WHERE w.uuid = claimed.uuid
RETURNING w.uuid, w.status, w.data_text::text, w.steps, w.created_at, w.updated_at;
