-- Version 5: events whose handling failed. The homeserver resends a transaction until it
-- is acknowledged, so an event that always fails would stop every room: its failures are
-- counted here, and after a few it is given up (a command is answered with `reference`,
-- which its log line carries too) and the transaction acknowledged. Append-only.
CREATE TABLE event_failures (
    event_key   TEXT PRIMARY KEY,  -- the event id (`<txn>#<position>` for one without)
    room_id     TEXT,
    attempts    INTEGER NOT NULL,
    failed_at   INTEGER NOT NULL,  -- the last failure
    given_up_at INTEGER,
    reference   TEXT
);
