-- The read model stores what the one fold of budget and rate-limit usage
-- (service/domain/ledger.py) yields, per owner (customer, team, virtual key,
-- provider config): its clock (the latest recorded_at applied), its pending usage
-- (records whose occurred_at is not before the clock: a later reset or creation
-- may still fall before them), and its usage per cell, keyed as the fold keys it.
--
-- Existing rows: the usage tables were keyed by effective period start, and no
-- clock or pending usage was kept, so rows cannot be converted. This migration
-- empties every governance_* table and drops the governance projection's
-- checkpoint: on start the projector (and `govledger project`) rebuilds the read
-- model from the start of the log, and a cache loaded meanwhile folds the log from
-- position 0 (an empty read model is the start of the log). `govledger replay`
-- rebuilds it the same way, offline.
TRUNCATE governance_customers, governance_teams, governance_virtual_keys,
    governance_provider_configs, governance_budgets, governance_budget_spend,
    governance_rate_limits, governance_rate_limit_usage, governance_usage_streams,
    governance_holds;
DELETE FROM projection_checkpoints WHERE projection = 'governance';

-- One row per owner, written with the owner; gone with it.
CREATE TABLE governance_ledgers (
    customer_id        text        REFERENCES governance_customers (id) ON DELETE CASCADE,
    team_id            text        REFERENCES governance_teams (id) ON DELETE CASCADE,
    virtual_key_id     text        REFERENCES governance_virtual_keys (id)
                                   ON DELETE CASCADE,
    provider_config_id text        REFERENCES governance_provider_configs (id)
                                   ON DELETE CASCADE,
    owner_type         text        NOT NULL GENERATED ALWAYS AS (
        CASE
            WHEN customer_id IS NOT NULL THEN 'customer'
            WHEN team_id IS NOT NULL THEN 'team'
            WHEN virtual_key_id IS NOT NULL THEN 'virtual_key'
            ELSE 'provider_config'
        END) STORED,
    owner_id           text        NOT NULL GENERATED ALWAYS AS (
        coalesce(customer_id, team_id, virtual_key_id, provider_config_id)) STORED,
    clock              timestamptz NOT NULL,
    CONSTRAINT governance_ledgers_one_owner
        CHECK (num_nonnulls(customer_id, team_id, virtual_key_id, provider_config_id) = 1),
    CONSTRAINT governance_ledgers_owner_key UNIQUE (owner_type, owner_id)
);

-- An owner's usage not yet filed into cells, per occurred_at (cost in money, the
-- input plus output tokens, requests); rewritten with the owner's clock.
CREATE TABLE governance_pending_usage (
    owner_type  text        NOT NULL,
    owner_id    text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    cost        numeric     NOT NULL,
    tokens      bigint      NOT NULL,
    requests    bigint      NOT NULL,
    PRIMARY KEY (owner_type, owner_id, occurred_at),
    FOREIGN KEY (owner_type, owner_id)
        REFERENCES governance_ledgers (owner_type, owner_id) ON DELETE CASCADE
);

COMMENT ON COLUMN governance_budget_spend.period_start IS
    'The cell key of the ledger (service/domain/ledger.py): the later of the cell''s '
    'start and the budget''s usage floor when the usage was filed.';
COMMENT ON COLUMN governance_rate_limit_usage.period_start IS
    'The cell key of the ledger (service/domain/ledger.py), as for budget spend.';

-- Two budgets of an owner may swap their reset_durations in one event (a legal
-- PUT); checked per row, the upsert of the first would collide with the second.
ALTER TABLE governance_budgets
    DROP CONSTRAINT governance_budgets_owner_duration_key,
    ADD CONSTRAINT governance_budgets_owner_duration_key
        UNIQUE (owner_type, owner_id, reset_duration) DEFERRABLE INITIALLY DEFERRED;
