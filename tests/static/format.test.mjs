// The page shows money exactly, as the service keeps it (to the nano), and a share
// of a limit as 100% only when the limit is reached.
import assert from "node:assert/strict";
import test from "node:test";

import {
  compareDecimal,
  money,
  percent,
  typedMoney,
  utcLabel,
} from "../../service/static/format.js";

test("money shows every digit the service wrote, grouped by thousands", () => {
  assert.equal(money("0.000000001"), "0.000000001");
  assert.equal(money("1E-9"), "0.000000001");
  assert.equal(money("0.333333333"), "0.333333333");
  assert.equal(money("1000.005"), "1,000.005");
  assert.equal(money("1.000E+11"), "100,000,000,000");
  assert.equal(money("15.00"), "15");
  assert.equal(money("123456789012345678.123456789"), "123,456,789,012,345,678.123456789");
  assert.equal(money("-2.50"), "-2.5");
  assert.equal(money("0"), "0");
  assert.equal(money(12.345678912), "12.345678912");
});

test("decimals compare exactly, whatever their spelling", () => {
  assert.equal(compareDecimal("1.000E+11", "100000000000"), 0);
  assert.equal(compareDecimal("0.999999999", "1"), -1);
  assert.equal(compareDecimal("1000.005", "1000.004999999"), 1);
  assert.equal(compareDecimal("0.10", "0.1"), 0);
  assert.equal(compareDecimal("-1", "0"), -1);
  assert.equal(compareDecimal("2", "10"), -1);
});

test("a share is 100% and full only when the limit is reached", () => {
  assert.deepEqual(percent("0.999999999", "1"), { p: 99.9, text: "99.9%" });
  assert.deepEqual(percent("1", "1"), { p: 100, text: "100%" });
  assert.equal(percent("1000.003999999", "1000.005").text, "99.9%");
  assert.equal(percent("0.29", "1").text, "29%");
  assert.equal(percent("0.333333333", "0.000000001").text, ">1000%");
  assert.equal(percent("0.0001", "10").text, "<0.1%");
  assert.equal(percent("0", "10").text, "0%");
  assert.equal(percent("3", "0").text, "0%");
});

test("a reset instant names its year when not this one, its seconds when not 0", () => {
  const now = new Date("2026-12-05T05:00:00Z");
  assert.equal(utcLabel(new Date("2026-12-07T00:00:00Z"), now), "Dec 7, 00:00 UTC");
  assert.equal(utcLabel(new Date("2027-12-05T05:02:00Z"), now), "Dec 5 2027, 05:02 UTC");
  assert.equal(utcLabel(new Date("2026-12-05T05:00:15Z"), now), "Dec 5, 05:00:15 UTC");
});

test("an amount typed as the board shows it is taken without its commas", () => {
  assert.equal(typedMoney("1,000"), "1000");
  assert.equal(typedMoney(" 1,234,567.25 "), "1234567.25");
  assert.equal(typedMoney("1000"), "1000");
  assert.equal(typedMoney("1,00"), "1,00"); // not thousands: as typed
  assert.equal(typedMoney("12,3456"), "12,3456");
});
