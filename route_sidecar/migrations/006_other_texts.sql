-- Version 6: agents without a plugin (matrix-gptbot). A message the side-car saw may stand
-- for more than one text an agent can answer: a multi-line command's question (what the
-- Hermes plugin leaves) and its whole text (what an agent without it sees); an edit's new
-- text and its `* ` fallback body. The other texts' hashes are kept here, with the message.
-- An `again` intent is marked, so that the room is told when no agent picked its question
-- up (an agent without the plugin never sees it). Append-only.
CREATE TABLE seen_hashes (
    event_id     TEXT NOT NULL REFERENCES seen_messages (event_id) ON DELETE CASCADE,
    message_hash TEXT NOT NULL,
    PRIMARY KEY (event_id, message_hash)
);
CREATE INDEX seen_hashes_by_hash ON seen_hashes (message_hash);
ALTER TABLE intents ADD COLUMN reasks INTEGER NOT NULL DEFAULT 0;
