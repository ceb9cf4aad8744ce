-- Open holds of reserving checks (ReservationHeld), one row each until a usage record
-- settles it, a release drops it, or its key is deleted. An expired hold stays until
-- then; reads count only those with expires_at after the moment they read at.
CREATE TABLE governance_holds (
    reservation_id     text        PRIMARY KEY,
    virtual_key_id     text        NOT NULL,
    provider_config_id text,
    team_id            text,
    customer_id        text,
    -- The budgets and the owners whose rate limits it holds on, as decided.
    budget_ids         text[]      NOT NULL,
    rate_owner_ids     text[]      NOT NULL,
    amount             numeric     NOT NULL,
    tokens             bigint      NOT NULL,
    expires_at         timestamptz NOT NULL,
    position           bigint      NOT NULL
);
CREATE INDEX governance_holds_virtual_key ON governance_holds (virtual_key_id);
CREATE INDEX governance_holds_budgets ON governance_holds USING gin (budget_ids);
CREATE INDEX governance_holds_rate_owners ON governance_holds USING gin (rate_owner_ids);
