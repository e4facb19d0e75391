-- Raw list page: the statement GET /workflow?limit=100 runs (one row more, for the Link).
SELECT uuid, status, data_text::text, steps, created_at, updated_at FROM workflows
WHERE TRUE ORDER BY uuid LIMIT 101;
