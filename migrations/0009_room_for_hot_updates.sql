-- The projector rewrites the same rows at every batch: each ledger's clock, the
-- spend and usage cells being filed to, the usage streams' guard, and its own
-- checkpoint. While other transactions' snapshots still see a row's previous
-- versions, a full page has no room for the next one, and the update goes to
-- another page with a new entry in every index of the table (under full-rate
-- ingest, about 40% of these updates did). Half of each page is left free so that
-- the new version stays on its page (a HOT update: no index entry, the old version
-- pruned in place). Existing pages keep their fill until they are rewritten; new
-- pages, and the tables a replay swaps in, use the setting.
ALTER TABLE governance_ledgers SET (fillfactor = 50);
ALTER TABLE governance_budget_spend SET (fillfactor = 50);
ALTER TABLE governance_rate_limit_usage SET (fillfactor = 50);
ALTER TABLE governance_usage_streams SET (fillfactor = 50);
ALTER TABLE projection_checkpoints SET (fillfactor = 50);
