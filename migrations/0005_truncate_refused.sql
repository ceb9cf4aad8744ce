-- TRUNCATE of the log is refused like UPDATE and DELETE. TRUNCATE fires no row
-- trigger, so the row trigger of 0001 never sees it: a statement-level trigger does,
-- with the same function, which refuses every operation but an audited rewrite's
-- UPDATE ('events is append-only: TRUNCATE refused', SQLSTATE GL003).
--
-- The one way past it is PostgreSQL's own: `SET session_replication_role = replica`
-- switches ordinary triggers off for a session, and only a superuser (or a role
-- granted SET on that parameter) may set it: roles that could as well disable or
-- drop the trigger. The service never sets it; the test suite does, to empty its
-- throwaway databases between tests.

CREATE TRIGGER events_append_only_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_mutation();
