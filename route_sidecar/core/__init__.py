"""The pure core: command parsing, the intent state machine, turn keys, policy,
replies, events as data, history, questions and the live index of intents. No
I/O and no shell (tests/test_layers.py)."""
