-- Raw insert: the row POST /workflow writes (postgres backend), as one autocommit statement.
-- :data is the benchmark document, :size its UTF-8 bytes, :steps its steps as a text[] literal; the uuid is a
-- time-ordered UUIDv7 made in SQL, like the service's (which makes it in Python).
INSERT INTO workflows (uuid, status, data_text, data_size, steps, steps_size, created_at, updated_at)
VALUES (encode(overlay(uuid_send(gen_random_uuid())
                       placing substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                       FROM 1 FOR 6), 'hex')::uuid,
        'inserted', :data, :size, :steps, :steps_size, now(), now());
