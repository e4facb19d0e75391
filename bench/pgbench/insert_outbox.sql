-- Raw insert with an outbox entry: the statement POST /workflow runs with the rabbitmq backend.
WITH added AS (
    INSERT INTO workflows (uuid, status, data_text, data_size, steps, steps_size, created_at, updated_at)
    VALUES (encode(overlay(uuid_send(gen_random_uuid())
                           placing substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                           FROM 1 FOR 6), 'hex')::uuid,
            'inserted', :data, :size, :steps, :steps_size, now(), now())
    RETURNING uuid)
INSERT INTO outbox (workflow_uuid) SELECT uuid FROM added;
