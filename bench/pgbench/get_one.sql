-- Raw point read: one prefilled workflow by uuid (see bench/sql.py for the uuid scheme).
\set n random(1, :rows)
SELECT uuid, status, data_text::text, steps, created_at, updated_at FROM workflows
WHERE uuid = ('01000000-0000-7000-8000-' || lpad(to_hex(:n::bigint), 12, '0'))::uuid;
