// A write keeps its Idempotency-Key while it is the very same request, money goes
// back as plain digits, and a bar shows held spend after the spent part, never past
// the end.
import assert from "node:assert/strict";
import test from "node:test";

import { attempt } from "../../service/static/api.js";
import { plainDecimal, shares } from "../../service/static/format.js";

const put = (body, ifMatch = 3) => ({ method: "PUT", path: "/api/governance/teams/t", body, ifMatch });

test("the same request keeps its key; any change makes a new one", () => {
  const first = attempt(null, put({ name: "a" }));
  assert.equal(attempt(first, put({ name: "a" })), first);
  const renamed = attempt(first, put({ name: "b" }));
  assert.notEqual(renamed.key, first.key);
  const reloaded = attempt(first, put({ name: "a" }, 4));
  assert.notEqual(reloaded.key, first.key);
  assert.match(first.key, /^[0-9a-f-]{32,36}$/);
});

test("held spend is a second share after the spent one, clipped to the bar", () => {
  assert.deepEqual(shares("2.5", "1", "10"), { spent: 25, held: 10 });
  assert.deepEqual(shares("9", "5", "10"), { spent: 90, held: 10 });
  assert.deepEqual(shares("12", "5", "10"), { spent: 100, held: 0 });
  assert.deepEqual(shares("2.5", undefined, "10"), { spent: 25, held: 0 });
  assert.deepEqual(shares("0", "0", "0"), { spent: 0, held: 0 });
});

test("money goes back to the service as plain digits", () => {
  assert.equal(plainDecimal("1E-9"), "0.000000001");
  assert.equal(plainDecimal("1.5E+3"), "1500");
  assert.equal(plainDecimal("2.5e1"), "25");
  assert.equal(plainDecimal(1e-7), "0.0000001");
  assert.equal(plainDecimal("-1.25E-2"), "-0.0125");
  assert.equal(plainDecimal("2.50"), "2.50");
  assert.equal(plainDecimal(10), "10");
});
