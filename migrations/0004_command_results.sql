-- Answers of governance commands sent with an Idempotency-Key, so a retry gets the
-- first answer byte for byte and appends nothing. A row is written in the same
-- transaction as the command's events.
--
-- A virtual key's secret is in its create (and rotate) answer but may never be stored
-- in the clear: `idempotency_key` holds a salted SHA-256 of the header's value, and
-- `body` is sealed (AES-GCM, key derived from the value itself; see
-- service/idempotency.py), so only a caller who holds the key can read the answer back.
CREATE TABLE command_results (
    idempotency_key     text        PRIMARY KEY,
    request_fingerprint text        NOT NULL,
    status              integer     NOT NULL,
    body                bytea       NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- Deleting a customer or a team detaches the teams and keys that point at it; these
-- partial indexes find the streams whose entity events ever named it without scanning
-- the usage events. The predicates must match the queries' literal type lists.
CREATE INDEX events_customer_reference_idx ON events ((data ->> 'customer_id'))
    WHERE type IN ('TeamCreated', 'TeamUpdated', 'VirtualKeyCreated',
                   'VirtualKeyUpdated');
CREATE INDEX events_team_reference_idx ON events ((data ->> 'team_id'))
    WHERE type IN ('VirtualKeyCreated', 'VirtualKeyUpdated');
