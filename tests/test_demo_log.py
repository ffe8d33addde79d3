"""Issue 18 item 7: with `make run ARGS=--keep`, the demo's dispatcher goes on printing
one line per LLM call after the scripted conversation, for whoever connects an agent."""

from __future__ import annotations

import logging

import pytest

from demo.run import DispatcherLog


def test_the_dispatcher_log_is_printed_live_once_the_conversation_is_over(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger = logging.getLogger("dispatcher.test-demo-log")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = DispatcherLog()
    logger.addHandler(handler)
    try:
        logger.info("call model=local during the conversation")
        assert capsys.readouterr().out == ""  # kept, printed in the summary
        handler.live = True
        logger.info("call model=ollama-cloud/glm-5.1 routed=yes")
        assert "dispatcher │ call model=ollama-cloud/glm-5.1 routed=yes" in capsys.readouterr().out
        assert len(handler.lines) == 2
    finally:
        logger.removeHandler(handler)
