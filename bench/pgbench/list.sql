-- Raw list page: the statement GET /workflow?limit=100 runs (one row more, for the Link;
-- a document over 8 MiB / 101 would be left out, and the page read again by a statement
-- that ends it once its documents pass LIST_PAGE_BYTES: none is, here).
SELECT uuid, status::text, CASE WHEN data_size + steps_size <= 83055 THEN data_text::text END, steps,
       created_at, updated_at, delivery_attempts, dead_lettered_at
FROM workflows WHERE TRUE ORDER BY uuid LIMIT 101;
