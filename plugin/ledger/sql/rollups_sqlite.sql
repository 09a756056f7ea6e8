-- SQLite: the usage rollups kept by the database itself, in the ledger row's own statement.
-- Same sums as plugin/ledger/rollups.py's `add_on` (which Postgres uses) and `backfill`: whole
-- seconds only, as the backfill reads them (strftime would round a fraction up past the hour).
-- One writer at a time holds SQLite's write lock, so the upserts' order cannot deadlock.
CREATE TRIGGER IF NOT EXISTS meterline_ledger_rollups AFTER INSERT ON ledger
BEGIN
    INSERT INTO usage_hours (customer_id, hour, credits_ucr, requests, saved_ucr)
    VALUES (NEW.customer_id, CAST(strftime('%s', substr(NEW.created_at, 1, 19)) AS INTEGER) / 3600,
            NEW.credits_ucr, 1, NEW.saved_ucr)
    ON CONFLICT (customer_id, hour) DO UPDATE SET
        credits_ucr = credits_ucr + excluded.credits_ucr, requests = requests + 1,
        saved_ucr = saved_ucr + excluded.saved_ucr;
    INSERT INTO usage_days (customer_id, day, dimension, name, credits_ucr, requests, saved_ucr)
    SELECT NEW.customer_id, CAST(strftime('%s', substr(NEW.created_at, 1, 19)) AS INTEGER) / 86400, dimension, name,
           NEW.credits_ucr, 1, NEW.saved_ucr
    FROM (SELECT 'model' AS dimension, NEW.model AS name
          UNION ALL SELECT 'action', NEW.action
          UNION ALL SELECT 'member', NEW.member)
    WHERE true
    ON CONFLICT (customer_id, day, dimension, name) DO UPDATE SET
        credits_ucr = credits_ucr + excluded.credits_ucr, requests = requests + 1,
        saved_ucr = saved_ucr + excluded.saved_ucr;
END
