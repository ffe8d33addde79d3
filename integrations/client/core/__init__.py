"""The two rules of the side-car's pure core the client uses: reading a turn from an
OpenAI request body (turns.py) and telling a `/route` command line (commands.py).
Symbolic links to route_sidecar/core/: one source for each rule; the wheel holds copies."""
