-- Where each projection stands in the log: the (tx_id, global_position) of the last
-- event it applied, written in the same transaction as its read-model changes.
CREATE TABLE projection_checkpoints (
    projection    text        PRIMARY KEY,
    last_tx_id    xid8        NOT NULL DEFAULT '0',
    last_position bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
