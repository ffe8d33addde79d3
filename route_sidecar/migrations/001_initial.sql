-- route-sidecar schema, version 1. Append-only: never edit an applied migration.
-- No message text is stored anywhere: only salted hashes (see route_sidecar/core/turns.py).

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Synapse transactions already handled: a retried one is acknowledged, not reprocessed.
CREATE TABLE transactions (
    txn_id      TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL
);

CREATE TABLE intents (
    id                TEXT PRIMARY KEY,
    room_id           TEXT NOT NULL,
    target            TEXT NOT NULL,
    model             TEXT NOT NULL,
    scope_kind        TEXT NOT NULL,
    scope_turns       INTEGER NOT NULL,
    scope_seconds     INTEGER,
    sender            TEXT NOT NULL,
    command_event_id  TEXT NOT NULL UNIQUE,
    command_thread_id TEXT,
    command_at        INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    state             TEXT NOT NULL,
    question_hash     TEXT,
    ended_at          INTEGER,
    end_reason        TEXT
);
CREATE INDEX intents_live ON intents (state) WHERE state IN ('pending', 'active');
CREATE INDEX intents_room ON intents (room_id, created_at);
CREATE INDEX intents_sender ON intents (sender, created_at);

CREATE TABLE bound_turns (
    intent_id     TEXT NOT NULL REFERENCES intents (id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,
    turn_id       TEXT,
    message_hash  TEXT,
    request_scoped INTEGER NOT NULL,
    bound_at      INTEGER NOT NULL,
    last_claim_at INTEGER NOT NULL,
    claims        INTEGER NOT NULL,
    PRIMARY KEY (intent_id, position)
);

-- Every command event handled, once: a redelivered event gets no second reply.
CREATE TABLE commands (
    event_id   TEXT PRIMARY KEY,
    room_id    TEXT NOT NULL,
    sender     TEXT NOT NULL,
    intent_id  TEXT,
    handled_at INTEGER NOT NULL
);

-- Room messages seen, for placing turns and resolving rooms: hashes, never text.
CREATE TABLE seen_messages (
    event_id     TEXT PRIMARY KEY,
    room_id      TEXT NOT NULL,
    thread_id    TEXT,
    sent_at      INTEGER NOT NULL,
    message_hash TEXT,
    is_command   INTEGER NOT NULL
);
CREATE INDEX seen_by_hash ON seen_messages (message_hash);
CREATE INDEX seen_by_thread ON seen_messages (thread_id);
CREATE INDEX seen_by_time ON seen_messages (sent_at);

-- What the dispatcher reported it served, per call.
CREATE TABLE outcomes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    intent_id  TEXT,
    position   INTEGER,
    room_id    TEXT,
    model      TEXT NOT NULL,
    status     TEXT NOT NULL,
    latency_ms INTEGER,
    detail     TEXT,
    at         INTEGER NOT NULL
);
CREATE INDEX outcomes_turn ON outcomes (intent_id, position);
CREATE INDEX outcomes_room ON outcomes (room_id, at);

-- The outbox: every message, edit and reaction the bot owes the room, written in the
-- same database transaction as the state change it reports, sent (and marked) later.
CREATE TABLE effects (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT NOT NULL UNIQUE,
    room_id    TEXT NOT NULL,
    event_type TEXT NOT NULL,
    content    TEXT NOT NULL,
    edits      TEXT,
    event_id   TEXT,
    created_at INTEGER NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    failed     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX effects_unsent ON effects (id) WHERE event_id IS NULL AND failed = 0;
