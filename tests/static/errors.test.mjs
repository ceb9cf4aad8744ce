// A refused write finds the field it concerns: from the path a decoding error
// names, or from the value a rule of the service names (messages as the service
// words them).
import assert from "node:assert/strict";
import test from "node:test";

import { errorPath } from "../../service/static/errors.js";

const key = {
  name: "ci",
  team_id: null,
  customer_id: null,
  budgets: [
    { max_limit: "10", reset_duration: "1d", calendar_aligned: false },
    { max_limit: "0", reset_duration: "1M", calendar_aligned: false },
  ],
  rate_limit: { token_max_limit: 100, token_reset_duration: "1h", request_max_limit: null, request_reset_duration: null },
  provider_configs: [
    {
      provider: "openai",
      allowed_models: ["*"],
      budgets: [{ max_limit: "0", reset_duration: "1d", calendar_aligned: false }],
      rate_limit: { token_max_limit: null, token_reset_duration: "1h", request_max_limit: null, request_reset_duration: null },
    },
    { provider: "openai", allowed_models: [], budgets: [], rate_limit: null },
  ],
};

const path = (code, message, body = key) => errorPath({ code, message }, body);

test("a decoding error names its path", () => {
  assert.equal(
    path("invalid_request", "the request body is invalid: Invalid decimal string - at `$.budgets[1].max_limit`"),
    "$.budgets[1].max_limit",
  );
  assert.equal(path("invalid_request", "the request body is invalid: Object contains unknown field `x` - at `$`"), null);
});

test("a bad max_limit lands on the budget of that duration whose limit is bad", () => {
  assert.equal(
    path("invalid_max_limit", "max_limit of the '1d' budget must be greater than 0, got '0'"),
    "$.provider_configs[0].budgets[0].max_limit",
  );
  assert.equal(
    path("invalid_max_limit", "max_limit of the '1M' budget must be greater than 0, got '0'"),
    "$.budgets[1].max_limit",
  );
});

test("reset durations, alignment and duplicates land on their budget", () => {
  const body = {
    name: "t",
    budgets: [
      { max_limit: "1", reset_duration: "1d", calendar_aligned: false },
      { max_limit: "1", reset_duration: "2d", calendar_aligned: true },
      { max_limit: "1", reset_duration: "1d", calendar_aligned: false },
      { max_limit: "1", reset_duration: "1x", calendar_aligned: false },
    ],
  };
  assert.equal(
    path("invalid_reset_duration", "reset_duration '1x' is not valid: expected a positive whole count", body),
    "$.budgets[3].reset_duration",
  );
  assert.equal(
    path("invalid_calendar_alignment", "calendar_aligned needs a reset_duration of 1d, 1w, 1M, 1Q or 1Y, got '2d'", body),
    "$.budgets[1].calendar_aligned",
  );
  assert.equal(
    path("duplicate_reset_duration", "budgets name reset_duration '1d' more than once; an owner has at most one budget per reset_duration", body),
    "$.budgets[2].reset_duration",
  );
});

test("a rate-limit error lands on the half and the limit that break the rule", () => {
  assert.equal(
    path("invalid_rate_limit", "token_reset_duration '1h' needs a token_max_limit"),
    "$.provider_configs[0].rate_limit.token_max_limit",
  );
  const body = { name: "t", rate_limit: { token_max_limit: 5, token_reset_duration: null, request_max_limit: null, request_reset_duration: null } };
  assert.equal(path("invalid_rate_limit", "token_max_limit needs a token_reset_duration", body), "$.rate_limit.token_reset_duration");
  const zero = { name: "t", rate_limit: { token_max_limit: null, token_reset_duration: null, request_max_limit: 0, request_reset_duration: "1h" } };
  assert.equal(
    path("invalid_rate_limit", "request_max_limit must be a whole number from 1 to 9223372036854775807, got 0", zero),
    "$.rate_limit.request_max_limit",
  );
  const bad = { name: "t", rate_limit: { token_max_limit: 5, token_reset_duration: "soon", request_max_limit: null, request_reset_duration: null } };
  assert.equal(
    path("invalid_rate_limit", "token_reset_duration: reset_duration 'soon' is not valid", bad),
    "$.rate_limit.token_reset_duration",
  );
});

test("providers, names and references land on their field", () => {
  assert.equal(
    path("duplicate_provider", "provider_configs name provider 'openai' more than once; a virtual key has at most one config per provider"),
    "$.provider_configs[1].provider",
  );
  assert.equal(path("invalid_request", "the team needs a non-empty name"), "$.name");
  const blank = { name: "k", provider_configs: [{ provider: "openai" }, { provider: "  " }] };
  assert.equal(path("invalid_request", "a provider config needs a non-empty provider", blank), "$.provider_configs[1].provider");
  assert.equal(path("unknown_reference", "team 0b1e does not exist"), "$.team_id");
  assert.equal(path("unknown_reference", "customer 0b1e does not exist"), "$.customer_id");
  assert.equal(path("conflicting_owner", "a virtual key belongs to a team or to a customer, not both"), "$.team_id");
  assert.equal(path("version_conflict", "team x is at version 4"), null);
});
