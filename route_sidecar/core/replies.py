"""What the bot says in the room: texts in a tiny markup (`code`, **bold**) rendered to an
HTML body with a plain fallback, and the Matrix event contents that carry them. Pure."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..config import Target
from .commands import RouteTo, format_command, format_duration
from .history import Call, PastTurn
from .intents import EndReason, Intent, IntentState, Timing, answering, expires_at

_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*([^*\n]+)\*\*")
REACTION_CLAIMED = "✅"
EXCERPT_CHARS = 80
DETAIL_CHARS = 200
ACCOUNT_TURNS = 5  # the turns a route's running account lists, the latest


@dataclass(frozen=True, slots=True)
class Text:
    plain: str
    html: str

    def __add__(self, other: Text) -> Text:
        return Text(plain=self.plain + other.plain, html=self.html + other.html)


def literal(text: str) -> Text:
    """Text shown as it is (someone else's words): escaped, no markup applied."""
    return Text(plain=text, html=html.escape(text, quote=False))


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """A question as one short line: spaces folded, cut with an ellipsis."""
    shown = "".join(ch if ch.isprintable() else " " if ch.isspace() else "" for ch in text)
    line = " ".join(shown.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def render(markup: str) -> Text:
    """`code` → <code>, **bold** → <b>, newlines → <br>; the plain body drops the stars."""
    escaped = html.escape(markup, quote=False)
    body = _CODE.sub(r"<code>\1</code>", escaped)
    body = _BOLD.sub(r"<b>\1</b>", body)
    plain = _BOLD.sub(r"\1", markup)
    return Text(plain=plain, html=body.replace("\n", "<br>"))


def notice_content(
    text: Text, reply_to: str | None = None, thread_root: str | None = None
) -> dict[str, Any]:
    """An m.notice in reply to `reply_to`, inside `thread_root`'s thread when given."""
    content: dict[str, Any] = {
        "msgtype": "m.notice",
        "body": text.plain,
        "format": "org.matrix.custom.html",
        "formatted_body": text.html,
        "m.mentions": {},
    }
    if thread_root is not None:
        content["m.relates_to"] = {
            "rel_type": "m.thread",
            "event_id": thread_root,
            "is_falling_back": False,
            "m.in_reply_to": {"event_id": reply_to or thread_root},
        }
    elif reply_to is not None:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


def edit_content(text: Text, edited_event_id: str | None) -> dict[str, Any]:
    """An edit of an earlier notice; the sender fills in the edited event id."""
    content = notice_content(Text(plain=f"* {text.plain}", html=f"* {text.html}"))
    content["m.new_content"] = notice_content(text)
    content["m.relates_to"] = {"rel_type": "m.replace", "event_id": edited_event_id}
    return content


def edit_of(content: dict[str, Any]) -> dict[str, Any]:
    """An edit that makes an already sent notice show `content` (a notice's content, as
    `notice_content` made it); the sender fills in the edited event id."""
    plain = str(content.get("body", ""))
    shown = str(content.get("formatted_body", html.escape(plain, quote=False)))
    return edit_content(Text(plain=plain, html=shown), None)


def reaction_content(event_id: str, key: str = REACTION_CLAIMED) -> dict[str, Any]:
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}


def _latency(ms: int) -> str:
    return f"{ms} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def _when(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S UTC")


def confirmation(intent: Intent, superseded: Intent | None, timing: Timing, prefix: str) -> Text:
    if intent.is_prebound:
        what = f"Routing the answer to this question to **{intent.target}** (`{intent.model}`)."
    else:
        what = (
            f"Routing {intent.scope.describe()} of the agent in this room to "
            f"**{intent.target}** (`{intent.model}`)."
        )
    lines = [what]
    if superseded is not None:
        lines.append(f"This replaces the earlier route to {superseded.target}.")
    ends = expires_at(intent, timing)
    if ends is not None and not intent.is_prebound and intent.until is None:
        lines.append(
            f"If no turn uses it by {_when(ends)}, it expires. `{prefix} auto` cancels it."
        )
    else:
        lines.append(f"`{prefix} auto` cancels it.")
    lines.append("I will say here which model really answered.")
    return render("\n".join(lines))


def expired(intent: Intent, timing: Timing) -> Text:
    # A `--for` route waits until its time is up; any other, `intent_ttl`.
    within = (
        f"before {_when(intent.until)}"
        if intent.until is not None
        else f"within {format_duration(timing.intent_ttl)}"
    )
    tail = f" expired unused: no turn of the agent claimed it {within}. Nothing was routed."
    return Text(
        plain=f"Route to {intent.target}{tail}",
        html=f"<del>Route to {html.escape(intent.target)}</del>{html.escape(tail)}",
    )


def cleared(
    previous: Intent | None, after: Intent | None, prefix: str, in_flight: bool = False
) -> Text:
    """The reply to `/route auto`: `previous` as it was, `after` as the command left it;
    `in_flight`: a call of its turn is being answered (`intents.answering`)."""
    if previous is None or after is None:
        return render(f"Automatic routing: nothing was set. `{prefix} help` lists the commands.")
    text = (
        f"Automatic routing again. The route to **{previous.target}** "
        f"({_state_word(previous)} until now) is cancelled."
    )
    if after.is_closed and in_flight:
        text += f" The answer in progress finishes on {previous.target}."
    return render(text)


def _state_word(intent: Intent) -> str:
    return "in use" if intent.state is IntentState.ACTIVE else intent.state.value


_CANCELLED_BY = {
    EndReason.SUPERSEDED: ("replaced by a newer route", "later turns follow the newer route"),
    EndReason.CLEARED: ("cancelled by `{prefix} auto`", "later turns are routed automatically"),
    EndReason.REDACTED: ("the command was deleted", "later turns are routed automatically"),
    EndReason.API: ("cancelled through the API", "later turns are routed automatically"),
}


def cancelled(intent: Intent, prefix: str) -> Text:
    """The confirmation of a route cancelled before any turn used it."""
    reason = intent.closed_by or intent.end_reason or EndReason.API
    unused, _ = (part.format(prefix=prefix) for part in _CANCELLED_BY[reason])
    return render(f"Route to **{intent.target}**: {unused}. Nothing was routed.")


def account(
    intent: Intent,
    reported: Sequence[Sequence[Call]],
    now: datetime,
    timing: Timing,
    prefix: str,
    served: bool = True,
) -> Text:
    """The command's confirmation as the route's running account, true as of `now`: what
    it routed so far and what is true of it now, and (`served`) what the dispatcher
    reported serving each turn. `reported`: each bound turn's reported calls."""
    if not intent.bound_turns:
        if intent.state is IntentState.EXPIRED:
            return expired(intent, timing)
        if not intent.state.is_live:
            return cancelled(intent, prefix)
        return confirmation(intent, None, timing, prefix)
    what = "the answer to this question" if intent.is_prebound else intent.scope.describe()
    lines = [
        f"Route to **{intent.target}** (`{intent.model}`), {what}: "
        f"{progress(intent, reported, now, timing, prefix)}"
    ]
    if served:
        turns = list(zip(intent.bound_turns, reported, strict=True))
        if len(turns) > ACCOUNT_TURNS:
            lines.append(f"• … {len(turns) - ACCOUNT_TURNS} earlier turn(s)")
        for turn, calls in turns[-ACCOUNT_TURNS:]:
            if calls:
                line = _calls_markup(intent, calls)
            elif answering(turn, 0, now, timing):
                line = "answering now."
            else:
                line = "no outcome reported, so I cannot say which model answered."
            lines.append(f"• {line}")
    ends = expires_at(intent, timing)
    if intent.state.is_live and not intent.is_closed and ends is not None:
        capacity = intent.turn_capacity
        if capacity is not None and len(intent.bound_turns) < capacity:
            lines.append(f"If no further turn uses it by {_when(ends)}, it expires.")
        if capacity is None or len(intent.bound_turns) < capacity:
            lines.append(f"`{prefix} auto` cancels it.")
    return render("\n".join(lines))


def progress(
    intent: Intent, reported: Sequence[Sequence[Call]], now: datetime, timing: Timing, prefix: str
) -> str:
    """Where a route that has taken turns stands, true as of `now` (never "in progress"
    once no call of its turns is in flight)."""
    used = len(intent.bound_turns)
    turns = f"{used} turn{'s' if used != 1 else ''}"
    in_flight = any(
        answering(turn, len(calls), now, timing)
        for turn, calls in zip(intent.bound_turns, reported, strict=True)
    )
    reason = intent.closed_by or intent.end_reason
    if reason is not None and reason in _CANCELLED_BY:
        _, later = (part.format(prefix=prefix) for part in _CANCELLED_BY[reason])
        finishing = f" (the answer in progress finishes on {intent.target})" if in_flight else ""
        return f"used for {turns}{finishing}; {later}."
    if in_flight:
        return f"answering now ({turns} so far)." if used > 1 else "answering now."
    capacity = intent.turn_capacity
    if intent.state is IntentState.DONE or (capacity is not None and used >= capacity):
        return f"used for {turns}; later turns are routed automatically."
    if capacity is not None:
        return f"{used} of {capacity} turns used."
    until = intent.until
    return f"used for {turns} so far, until {_when(until)}." if until else f"used for {turns}."


def status(
    intent: Intent | None,
    reported: Sequence[Sequence[Call]],
    now: datetime,
    timing: Timing,
    prefix: str,
) -> Text:
    if intent is None:
        return render(
            f"Automatic routing: no route is set in this room. "
            f"`{prefix} <target>` sets one; `{prefix} targets` lists them."
        )
    ends = expires_at(intent, timing)
    state = (
        progress(intent, reported, now, timing, prefix)
        if intent.bound_turns
        else "waiting for the agent's next turn."
    )
    lines = [
        f"Route to **{intent.target}** (`{intent.model}`), {intent.scope.describe()}, "
        f"set by {intent.sender}.",
        f"State: {state}",
    ]
    capacity = intent.turn_capacity
    has_room = capacity is None or len(intent.bound_turns) < capacity
    if ends is not None and has_room and not intent.is_closed:
        lines.append(f"Ends at {_when(ends)} at the latest. `{prefix} auto` cancels it.")
    return render("\n".join(lines))


def targets_list(targets: Sequence[Target], prefix: str, raw_allowed: bool) -> Text:
    if not targets:
        return render("No target is open to you here. Ask the admin for a permission level.")
    lines = ["Targets you may use:"]
    for target in targets:
        aliases = f" (also {', '.join(f'`{a}`' for a in target.aliases)})" if target.aliases else ""
        description = f": {target.description}" if target.description else ""
        lines.append(f"• `{target.name}`{aliases} → `{target.model}`{description}")
    if raw_allowed:
        lines.append(f"Raw model ids from the allow-list: `{prefix} model:<id>`.")
    lines.append(f"Example: `{prefix} {targets[0].name}`.")
    return render("\n".join(lines))


def help_text(prefix: str, prefixes: Sequence[str]) -> Text:
    other = [p for p in prefixes if p != prefix]
    also = f" (`{other[0]}` works the same)" if other else ""
    lines = [
        f"**Route the agent's LLM calls from this room**{also}:",
        f"`{prefix} <target>`: the agent's next turn uses that target",
        f"`{prefix} <target>` + new line + question: that question is answered there",
        f"`{prefix} <target> --turns N`: the next N turns",
        f"`{prefix} <target> --for 30m`: every turn for a while (s, m, h)",
        f"`{prefix} auto`: back to automatic routing (also `off`, `cancel`)",
        f"`{prefix} status`: what is set now",
        f"`{prefix} <target> again`: re-ask the room's last question there (also `retry`)",
        f"`{prefix} targets`: the targets you may use",
        f"`{prefix} history`: the last routed and failed turns",
        f"`{prefix} leave`: the bot leaves this room (room admins: who may kick)",
        f"`{prefix} help`: this text",
    ]
    if any(p.startswith("/") for p in other):
        lines.append(
            f'In Element Web, a command starting with `/` opens an "Unknown command" dialog '
            f'(choose "Send as message"); `{prefix}` never does.'
        )
    return render("\n".join(lines))


def leaving(previous: Intent | None) -> Text:
    cancelled = (
        f" The route to **{previous.target}** is cancelled: automatic routing."
        if previous is not None
        else ""
    )
    return render(f"👋 Leaving this room, as asked.{cancelled} Invite me again to use it.")


def leave_refused(power_level: int, kick_level: int) -> Text:
    return render(
        f"⛔ Only a room admin may ask me to leave: it takes power level {kick_level} "
        f"(the level to kick), and yours is {power_level}. You may still remove me yourself "
        "if you can kick."
    )


def leave_unchecked() -> Text:
    return render(
        "⛔ I could not read this room's power levels from the homeserver, so I stay. "
        "Try again in a moment."
    )


def refusal(reason: str) -> Text:
    return render(f"⛔ {reason}")


def command_error(message: str) -> Text:
    return render(f"⛔ {message}")


def rate_limited(limit: int) -> Text:
    return render(
        f"⛔ You have set {limit} routes in the last hour, the limit here. "
        "Try again later, or ask the admin to raise `limits.routes_per_hour`."
    )


def receipt(
    intent: Intent, served_models: Sequence[str], statuses: Sequence[str], latency_ms: int | None
) -> Text:
    """One line per turn: what the dispatcher really served, never what was asked."""
    return render(_receipt_markup(intent, served_models, statuses, latency_ms))


def _receipt_markup(
    intent: Intent, served_models: Sequence[str], statuses: Sequence[str], latency_ms: int | None
) -> str:
    calls = len(served_models)
    distinct = sorted(set(served_models))
    errors = sum(1 for s in statuses if s != "ok")
    timing = f", {_latency(latency_ms)}" if latency_ms is not None else ""
    served = ", ".join(f"`{m}`" for m in distinct)
    if errors == calls:
        return (
            f"⚠ The routed turn failed on **{intent.target}**: {calls} call(s), "
            f"all errors ({served}){timing}."
        )
    if distinct == [intent.model]:
        line = f"Answered by **{intent.target}** ({served}): {calls} call(s){timing}."
    else:
        line = (
            f"⚠ Asked for **{intent.target}** (`{intent.model}`) but what answered was "
            f"{served}: {calls} call(s){timing}."
        )
    if errors:
        line += f" {errors} call(s) failed."
    return line


def turn_receipt(intent: Intent, calls: Sequence[Call]) -> Text:
    """`receipt` for the calls of one turn as the dispatcher reported them."""
    return render(_calls_markup(intent, calls))


def _calls_markup(intent: Intent, calls: Sequence[Call]) -> str:
    latencies = [c.latency_ms for c in calls if c.latency_ms is not None]
    return _receipt_markup(
        intent,
        [c.model for c in calls],
        [c.status for c in calls],
        sum(latencies) if latencies else None,
    )


def reask_confirmation(
    intent: Intent,
    question: str | None,
    asked_by: str | None,
    asked_at: datetime,
    superseded: Intent | None,
    prefix: str,
) -> Text:
    """The reply to `<target> again`. `question`: its excerpt, shown from memory only;
    None for the copy that is stored, which names the question by who asked it when."""
    by = f" by {asked_by}" if asked_by else ""
    if question is not None:
        what = render("Re-asking ") + literal(f"“{question}”") + render(f" (asked{by})")
    else:
        what = render(f"Re-asking the room's last question (asked{by} at {_when(asked_at)})")
    lines = [f" on **{intent.target}** (`{intent.model}`)."]
    if superseded is not None:
        lines.append(f"This replaces the earlier route to {superseded.target}.")
    lines.append(f"`{prefix} auto` cancels it.")
    lines.append("I will say here which model really answered.")
    return what + render("\n".join(lines))


def reask_not_taken(intent: Intent, waited: timedelta, timing: Timing, prefix: str) -> Text:
    """The `again` reply once no agent took the question within `again_wait`."""
    left = intent.created_at + timing.intent_ttl
    return render(
        f"⚠️ No agent picked up the question to re-ask on **{intent.target}** "
        f"(`{intent.model}`) within {format_duration(waited)}: an agent without the "
        "route-sidecar plugin never sees the question that `again` re-asks. Type the "
        f"question again before {_when(left)} and it goes to {intent.target}. "
        f"`{prefix} auto` cancels the route."
    )


def nothing_to_reask(target: str, prefix: str, ttl: timedelta) -> Text:
    return render(
        f"⛔ Nothing to re-ask: I have seen no question in this room in the last "
        f"{format_duration(ttl)} (I keep questions in memory only, and forget them when I "
        f"restart). Nothing was routed. Ask it again with `{prefix} {target}` and the "
        "question on the next line (Shift+Enter)."
    )


def failure_suggestion(
    model: str, detail: str | None, targets: Sequence[Target], prefix: str
) -> Text:
    """Posted once in a turn whose calls ended in an error: what failed, and the exact
    command that re-asks the question on each other target."""
    head = render(f"⚠ The agent's LLM call failed on `{model}`")
    if detail:
        head += literal(f" ({excerpt(detail, DETAIL_CHARS)})")
    head += render(".")
    if not targets:
        return head + render(
            "\nNo other target is open to you here; ask the admin for a permission level."
        )
    lines = ["", "To ask the same question on another model, send:"]
    for target in targets:
        command = format_command(RouteTo(target=target.name, again=True), prefix)
        description = f": {target.description}" if target.description else ""
        lines.append(f"• `{command}`{description}")
    return head + render("\n".join(lines))


def history(turns: Sequence[PastTurn], prefix: str) -> Text:
    if not turns:
        return render(f"No routed or failed turn in this room yet. `{prefix} <target>` routes one.")
    lines = ["**Last routed and failed turns here**, newest first:"]
    for turn in turns:
        lines.append(f"• {_when(turn.at)} · {_past_turn(turn)}")
    return render("\n".join(lines))


def _past_turn(turn: PastTurn) -> str:
    served = ", ".join(f"`{m}`" for m in sorted({c.model for c in turn.calls}))
    calls = len(turn.calls)
    seconds = f", {_latency(turn.latency_ms)}" if turn.latency_ms is not None else ""
    errors = sum(1 for c in turn.calls if c.status != "ok")
    failed = f", {errors} failed" if errors and errors < calls else ""
    if not turn.routed:
        who = turn.who or "someone"
        return (
            f"⚠ failed on automatic routing ({served}), asked by {who}: "
            f"{calls} call(s), the last one an error{seconds}"
        )
    routed = f"routed to **{turn.target}** by {turn.who}"
    if not turn.calls:
        return f"{routed}: no outcome reported ({turn.claims} claim(s))"
    if turn.failed:
        return f"{routed}: ⚠ failed ({served}), {calls} call(s){failed}{seconds}"
    if {c.model for c in turn.calls} != {turn.model}:
        return f"{routed}: ⚠ asked for `{turn.model}`, served {served}, {calls} call(s){seconds}"
    return f"{routed}: served {served}, {calls} call(s){failed}{seconds}"


def cannot_decrypt(sender: str, prefix: str) -> Text:
    return render(
        f"🔒 I could not decrypt a message from {sender} here, so if it was a `{prefix}` "
        "command it did nothing. Its room key did not reach my device (a key sent while I "
        "was down is lost). In Element, type `/discardsession` in this room, then send the "
        "command again. If this keeps happening, allow sending keys to unverified sessions "
        "in this room, or verify my session."
    )


def encryption_off() -> Text:
    return render(
        "🔒 This room is encrypted and my encryption support is switched off, so I cannot "
        "read `/route` commands here. Ask the admin to set `encryption.enabled: true` (with "
        "python-olm installed), or use a room without encryption."
    )


def command_failed(reference: str) -> Text:
    return render(
        f"⛔ Failed to handle command: it hit an error that retrying did not clear, so it did "
        f"nothing (reference: {reference}). The room's other messages are handled as usual; "
        "send the command again, and if it fails the same way, give the admin the reference."
    )
