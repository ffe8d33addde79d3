-- Version 2: retry (SPEC "Retry") and `/route history`. Append-only.

-- Who sent a message seen: tells whose targets a failed turn's suggestion lists.
ALTER TABLE seen_messages ADD COLUMN sender TEXT;

-- The turn an outcome belongs to (`<turn id>/<message hash>`, as route_sidecar.core.turns.TurnKey.ref),
-- for calls with and without an intent, and who asked the turn's question when known.
ALTER TABLE outcomes ADD COLUMN turn TEXT;
ALTER TABLE outcomes ADD COLUMN asker TEXT;
CREATE INDEX outcomes_room_turn ON outcomes (room_id, turn, id);

-- An effect held back until this time (ms): a failed turn's suggestion waits until the
-- turn has been quiet for `routing.failure_grace`, and is dropped if a later call succeeds.
ALTER TABLE effects ADD COLUMN not_before INTEGER;
