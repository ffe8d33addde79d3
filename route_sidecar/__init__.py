"""route-sidecar: steer an AI agent's LLM routing from its Matrix room."""

__version__ = "0.1.0"
