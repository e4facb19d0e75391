-- Raw list page: the statement GET /workflow?limit=100 runs (one row more, for the Link;
-- the page ends early once its documents pass LIST_PAGE_BYTES, 8 MiB).
SELECT uuid, status::text, data_text::text, steps, created_at, updated_at, delivery_attempts,
       dead_lettered_at
FROM (
    SELECT uuid, status, data_text, steps, created_at, updated_at, delivery_attempts,
           dead_lettered_at,
           sum(size) OVER running - size - lag(size, 1, 0) OVER running AS before_last
    FROM workflows, coalesce(data_size, octet_length(data_text::text)) AS size
    WHERE TRUE
    WINDOW running AS (ORDER BY uuid ROWS UNBOUNDED PRECEDING)
    ORDER BY uuid LIMIT 101
) page
WHERE before_last < 8388608
ORDER BY uuid;
