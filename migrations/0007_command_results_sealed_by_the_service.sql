-- Answers kept for Idempotency-Keys are sealed from now on under a key derived from
-- the service's own secret (GOVLEDGER_SECRET_KEY, or the key file beside the data
-- directory; see service/idempotency.py), which is never in the database.
--
-- The answers kept until now were sealed under a key derived from the client's own
-- Idempotency-Key: from a copy of the database, anyone who guessed a key could read
-- its answer, a virtual key's secret included. They cannot be sealed again without
-- those keys, so they are dropped: a retry of a command sent before this upgrade is
-- executed afresh instead of replayed. Every serving process must run the new code
-- (the old one would keep writing answers the new one cannot open).
DELETE FROM command_results;

COMMENT ON TABLE command_results IS
    'Answers of commands sent with an Idempotency-Key (every answer but a 5xx): '
    'idempotency_key is a salted SHA-256 of the key, body is sealed with AES-GCM '
    'under the service''s secret, which is not in the database.';
