-- Version 4: an intent superseded or cleared while a turn was being answered stays active,
-- closed, until that turn ends (SPEC "Intents": a newer route never switches the answer in
-- progress). Append-only.
ALTER TABLE intents ADD COLUMN closed_at INTEGER;
ALTER TABLE intents ADD COLUMN closed_by TEXT;
