-- Version 7: the rooms the bot is in, from its own membership (SPEC "The turn key": every
-- room the bot has joined is a room it is in, whether or not a message arrived there since
-- it started). A room it left or was kicked or banned from stays as `joined = 0`, so that
-- the messages it saw there before no longer make it a room it is in. Append-only.
CREATE TABLE rooms (
    room_id    TEXT PRIMARY KEY,
    joined     INTEGER NOT NULL,
    changed_at INTEGER NOT NULL
);
