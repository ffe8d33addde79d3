-- Version 3: encrypted events waiting for their room key. Append-only.
-- The event as the homeserver pushed it (ciphertext only, never the decrypted text): the
-- transaction that carried it is acknowledged, so a crash while it waits must not lose it.
CREATE TABLE undecrypted (
    event_id    TEXT PRIMARY KEY,
    room_id     TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    event       TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
