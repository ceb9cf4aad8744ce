-- The governance read model folded from the log by projections/governance.py:
-- customers, teams, virtual keys, provider configs, their budgets and rate limits,
-- and usage per budget (or rate limit) per period.
--
-- Ids are text, stored exactly as the events carry them: a log with an unexpected id
-- spelling then reads as it is instead of stalling the projector on a cast error.
-- `version` is the stream version of the last event that wrote the row (the owner's
-- stream for budgets, provider configs and rate limits); an update applies only when
-- the event's version is newer, so re-applying an event is a no-op.
-- created_at/updated_at are the recorded_at of the events, never the projector's clock.

CREATE TABLE governance_customers (
    id         text        PRIMARY KEY,
    name       text        NOT NULL,
    version    bigint      NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

-- Parents are referenced with ON DELETE SET NULL; a reference to a parent that does
-- not exist when the event is applied is stored as NULL (dangling references are
-- tolerated: a team whose customer is gone behaves as if it had none).
CREATE TABLE governance_teams (
    id          text        PRIMARY KEY,
    name        text        NOT NULL,
    customer_id text        REFERENCES governance_customers (id) ON DELETE SET NULL,
    version     bigint      NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX governance_teams_customer_idx ON governance_teams (customer_id);

-- Only the SHA-256 of a key's secret is kept, never the secret.
CREATE TABLE governance_virtual_keys (
    id           text        PRIMARY KEY,
    name         text        NOT NULL,
    value_sha256 text        NOT NULL UNIQUE,
    value_hint   text        NOT NULL,
    team_id      text        REFERENCES governance_teams (id) ON DELETE SET NULL,
    customer_id  text        REFERENCES governance_customers (id) ON DELETE SET NULL,
    is_active    boolean     NOT NULL,
    version      bigint      NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX governance_virtual_keys_team_idx ON governance_virtual_keys (team_id);
CREATE INDEX governance_virtual_keys_customer_idx
    ON governance_virtual_keys (customer_id);

-- allowed_models NULL: every model; '{}': none. `ordinal` keeps the event's order.
CREATE TABLE governance_provider_configs (
    id             text        PRIMARY KEY,
    virtual_key_id text        NOT NULL
                               REFERENCES governance_virtual_keys (id) ON DELETE CASCADE,
    provider       text        NOT NULL,
    allowed_models text[],
    ordinal        integer     NOT NULL,
    version        bigint      NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    UNIQUE (virtual_key_id, provider)
);

-- Exactly one owner column is set; owner_type/owner_id are derived from it so one
-- literal query serves every owner type. Periods: anchor is the recorded_at of the
-- event that created the budget; usage counts only from usage_floor on (creation,
-- or the latest reset).
CREATE TABLE governance_budgets (
    id                 text        PRIMARY KEY,
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
    max_limit          numeric     NOT NULL,
    reset_duration     text        NOT NULL,
    calendar_aligned   boolean     NOT NULL,
    anchor             timestamptz NOT NULL,
    usage_floor        timestamptz NOT NULL,
    ordinal            integer     NOT NULL,
    version            bigint      NOT NULL,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    CONSTRAINT governance_budgets_one_owner
        CHECK (num_nonnulls(customer_id, team_id, virtual_key_id, provider_config_id) = 1),
    CONSTRAINT governance_budgets_owner_duration_key
        UNIQUE (owner_type, owner_id, reset_duration)
);

-- Spend per budget per period, so past periods stay queryable. period_start is the
-- start of the *effective* period: the later of the period's start and the budget's
-- usage floor. A reset inside a period therefore opens a fresh row at the reset
-- instant, and the spend before it stays on record under the period's start.
CREATE TABLE governance_budget_spend (
    budget_id    text        NOT NULL
                             REFERENCES governance_budgets (id) ON DELETE CASCADE,
    period_start timestamptz NOT NULL,
    spend        numeric     NOT NULL,
    PRIMARY KEY (budget_id, period_start)
);

-- One rate limit per owner. Each kind (tokens, requests) is anchored at the
-- recorded_at of the event that set it or changed its reset duration; its usage
-- floor is that instant too.
CREATE TABLE governance_rate_limits (
    id                     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id            text        REFERENCES governance_customers (id)
                                       ON DELETE CASCADE,
    team_id                text        REFERENCES governance_teams (id)
                                       ON DELETE CASCADE,
    virtual_key_id         text        REFERENCES governance_virtual_keys (id)
                                       ON DELETE CASCADE,
    provider_config_id     text        REFERENCES governance_provider_configs (id)
                                       ON DELETE CASCADE,
    owner_type             text        NOT NULL GENERATED ALWAYS AS (
        CASE
            WHEN customer_id IS NOT NULL THEN 'customer'
            WHEN team_id IS NOT NULL THEN 'team'
            WHEN virtual_key_id IS NOT NULL THEN 'virtual_key'
            ELSE 'provider_config'
        END) STORED,
    owner_id               text        NOT NULL GENERATED ALWAYS AS (
        coalesce(customer_id, team_id, virtual_key_id, provider_config_id)) STORED,
    token_max_limit        bigint,
    token_reset_duration   text,
    token_anchor           timestamptz,
    token_usage_floor      timestamptz,
    request_max_limit      bigint,
    request_reset_duration text,
    request_anchor         timestamptz,
    request_usage_floor    timestamptz,
    version                bigint      NOT NULL,
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    CONSTRAINT governance_rate_limits_one_owner
        CHECK (num_nonnulls(customer_id, team_id, virtual_key_id, provider_config_id) = 1),
    CONSTRAINT governance_rate_limits_owner_key UNIQUE (owner_type, owner_id)
);

-- Tokens or requests used per rate limit (and so per owner) per effective period.
CREATE TABLE governance_rate_limit_usage (
    rate_limit_id bigint      NOT NULL
                              REFERENCES governance_rate_limits (id) ON DELETE CASCADE,
    kind          text        NOT NULL CHECK (kind IN ('tokens', 'requests')),
    period_start  timestamptz NOT NULL,
    used          bigint      NOT NULL,
    PRIMARY KEY (rate_limit_id, kind, period_start)
);

-- The version guard of the unversioned usage streams: the last (tx_id, position)
-- charged per stream. Within one stream the projector sees events in (tx_id,
-- global_position) order, so anything at or below this row was already charged.
-- Kept after the key is deleted: a late usage event still charges its team/customer.
CREATE TABLE governance_usage_streams (
    stream_id     text   PRIMARY KEY,
    last_tx_id    xid8   NOT NULL,
    last_position bigint NOT NULL
);
