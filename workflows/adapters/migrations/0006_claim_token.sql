-- Each claim transaction writes a token of its own (a random uuid) into the rows it marks
-- consumed. When the connection dies with the COMMIT, the rows tell whether it committed:
-- they carry the token only if it did. The transaction id could not tell (after a crash,
-- PostgreSQL may give a lost transaction's id to a new one). Nullable, no default: adding
-- it rewrites nothing.
ALTER TABLE workflows ADD COLUMN claim_token uuid;
