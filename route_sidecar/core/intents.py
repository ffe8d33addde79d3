"""The intent state machine: create, supersede, cancel, expire, bind turns, end.

Pure: every function takes the current time as an argument and returns a new `Intent`;
nothing here reads the clock, the database or the network. SPEC.md "Intents" lives here.

    pending ──claim binds a turn──▶ active ──last turn idle / duration over──▶ done
       │                              │
       ├──TTL passes, never claimed──▶ expired
       └──superseded / auto / redacted / DELETE ──▶ cancelled  (also from active)

Cancelling never switches an answer in progress: an intent with an open turn is only
*closed* (no new turn binds it) and stays active until that turn ends, then becomes
cancelled. A room may so hold closed intents besides its current one (`claim_among`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from .commands import Scope, ScopeKind
from .turns import Placement, TurnKey


class IntentState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    DONE = "done"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def is_live(self) -> bool:
        return self in (IntentState.PENDING, IntentState.ACTIVE)


class EndReason(StrEnum):
    DONE = "done"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"
    CLEARED = "cleared"
    REDACTED = "redacted"
    API = "cancelled via the API"


@dataclass(frozen=True, slots=True)
class Timing:
    intent_ttl: timedelta = timedelta(minutes=15)
    turn_idle: timedelta = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class BoundTurn:
    key: TurnKey | None  # None: a request-scoped claim, consumed by its single call
    bound_at: datetime
    last_claim_at: datetime
    claims: int = 1

    def is_open(self, now: datetime, timing: Timing) -> bool:
        return self.key is not None and now < self.ends_at(timing)

    def ends_at(self, timing: Timing) -> datetime:
        return self.bound_at if self.key is None else self.last_claim_at + timing.turn_idle

    def called(self, now: datetime, timing: Timing) -> BoundTurn | None:
        """This turn after one more call at `now`; None when it is no longer open."""
        if not self.is_open(now, timing):
            return None
        return BoundTurn(self.key, self.bound_at, now, self.claims + 1)


@dataclass(frozen=True, slots=True)
class Intent:
    id: str
    room_id: str
    target: str
    model: str
    scope: Scope
    sender: str
    command_event_id: str
    command_thread_id: str | None
    command_at: datetime  # when the command reached the room (homeserver time)
    created_at: datetime  # when the side-car recorded it
    state: IntentState = IntentState.PENDING
    bound_turns: tuple[BoundTurn, ...] = ()
    # Pre-bound (multi-line form, `again`): the question's hash; the first turn must match
    # it or be the command message itself.
    question_hash: str | None = None
    ended_at: datetime | None = None
    end_reason: EndReason | None = None
    # Superseded or cleared while a turn was open: why and when. No new turn binds it.
    closed_at: datetime | None = None
    closed_by: EndReason | None = None
    # An `again`: its question is one the agent plugin puts in the command's place.
    reasks: bool = False

    @property
    def is_closed(self) -> bool:
        return self.closed_at is not None

    @property
    def is_prebound(self) -> bool:
        return self.question_hash is not None

    @property
    def until(self) -> datetime | None:
        """End of a `--for` intent."""
        if self.scope.kind is ScopeKind.DURATION and self.scope.duration is not None:
            return self.created_at + self.scope.duration
        return None

    @property
    def turn_capacity(self) -> int | None:
        """How many distinct turns it may bind; None: unlimited until `until`."""
        return None if self.scope.kind is ScopeKind.DURATION else self.scope.turns


def new_intent(
    *,
    intent_id: str,
    room_id: str,
    target: str,
    model: str,
    scope: Scope,
    sender: str,
    command_event_id: str,
    command_thread_id: str | None,
    command_at: datetime,
    now: datetime,
    question_hash: str | None = None,
    reasks: bool = False,
) -> Intent:
    return Intent(
        id=intent_id,
        room_id=room_id,
        target=target,
        model=model,
        scope=scope,
        sender=sender,
        command_event_id=command_event_id,
        command_thread_id=command_thread_id,
        command_at=command_at,
        created_at=now,
        question_hash=question_hash,
        reasks=reasks,
    )


def reask_not_taken(intent: Intent, now: datetime, again_wait: timedelta) -> bool:
    """An `again` whose question no turn has taken within `again_wait`: the room is told
    (SPEC "Retry"); the intent stays pending until its TTL."""
    return (
        intent.reasks
        and intent.state is IntentState.PENDING
        and not intent.bound_turns
        and not intent.is_closed
        and now - intent.created_at >= again_wait
    )


def expires_at(intent: Intent, timing: Timing) -> datetime | None:
    """When the intent ends if nothing else happens; None once it has ended."""
    if not intent.state.is_live:
        return None
    if intent.closed_at is not None:  # when its last open turn ends
        return max([intent.closed_at, *(t.ends_at(timing) for t in intent.bound_turns)])
    if intent.until is not None:
        open_ends = [t.ends_at(timing) for t in intent.bound_turns if t.key is not None]
        return max([intent.until, *open_ends])
    if not intent.bound_turns:
        return intent.created_at + timing.intent_ttl
    last_end = max(t.ends_at(timing) for t in intent.bound_turns)
    if len(intent.bound_turns) >= (intent.turn_capacity or 0):
        return last_end
    # `--turns N` with turns left: waits for the next turn as a new intent would.
    last_activity = max(t.last_claim_at for t in intent.bound_turns)
    return max(last_end, last_activity + timing.intent_ttl)


# A turn whose dispatcher reports no outcome is taken to be answering for this long after
# its latest claim: "claimed moments ago" (SPEC "Intents": the room is told an answer is in
# progress only while a call of its turn is in flight).
ANSWERING_WITHOUT_REPORT = timedelta(seconds=60)


def answering(turn: BoundTurn, reported: int, now: datetime, timing: Timing) -> bool:
    """Whether a call of the turn is in flight at `now`: claimed and not yet reported
    (`reported`: the calls of the turn the dispatcher reported), or, where no report of
    the turn came at all, claimed moments ago. Never once the turn has ended."""
    if not turn.is_open(now, timing):
        return False
    if reported == 0:
        return now < turn.last_claim_at + ANSWERING_WITHOUT_REPORT
    return reported < turn.claims


def answering_ends_at(
    intent: Intent, reported: Sequence[int], now: datetime, timing: Timing
) -> datetime | None:
    """When what is said of the intent's turns may change with no event (a turn stops
    answering as time passes: its quiet window or the turn itself ends); None: not so."""
    ends = [
        min(turn.ends_at(timing), turn.last_claim_at + ANSWERING_WITHOUT_REPORT)
        if calls == 0
        else turn.ends_at(timing)
        for turn, calls in zip(intent.bound_turns, reported, strict=True)
        if answering(turn, calls, now, timing)
    ]
    return min(ends) if ends else None


def whole_second(moment: datetime) -> datetime:
    """`moment` to the whole second, as the lookup API gives times."""
    return moment.replace(microsecond=0)


def expiry_second_holds_until(intent: Intent, now: datetime, timing: Timing) -> datetime:
    """Until when later calls of the turn claimed at `now` leave `expires_at`, to the
    whole second, as it is after that claim. A call moves the intent's end by at most the
    time since the previous call, and never back (the end is the latest of fixed times and
    of the turn's last call plus a fixed time), so the second holds until the end could
    reach the next one. `now` itself when the intent has ended."""
    end = expires_at(intent, timing)
    if end is None:
        return now
    return now + (whole_second(end) + timedelta(seconds=1) - end)


def advance(intent: Intent, now: datetime, timing: Timing) -> Intent:
    """Apply the passing of time: a live intent whose time is over becomes done or expired."""
    end = expires_at(intent, timing)
    if end is None or now < end:
        return intent
    if intent.closed_by is not None:
        return replace(
            intent, state=IntentState.CANCELLED, ended_at=end, end_reason=intent.closed_by
        )
    if intent.bound_turns:
        return replace(intent, state=IntentState.DONE, ended_at=end, end_reason=EndReason.DONE)
    return replace(intent, state=IntentState.EXPIRED, ended_at=end, end_reason=EndReason.EXPIRED)


def cancel(intent: Intent, now: datetime, reason: EndReason, timing: Timing) -> Intent:
    """Supersede, clear, redact or DELETE: what is left of a live intent is cancelled (no
    new turn binds it). A turn still open finishes on its route ("next" means next): the
    intent is then closed, active until that turn ends. Ended intents stay as they are."""
    intent = advance(intent, now, timing)
    if not intent.state.is_live or intent.is_closed:
        return intent
    if any(turn.is_open(now, timing) for turn in intent.bound_turns):
        return replace(intent, closed_at=now, closed_by=reason)
    return replace(intent, state=IntentState.CANCELLED, ended_at=now, end_reason=reason)


def unused_part_cancelled(before: Intent, after: Intent) -> bool:
    """Whether cancelling `before` (giving `after`) took a part no turn had used yet: a
    pending intent, or turns or time it still had to give. A route whose turns were all
    served, or are being answered, was not replaced."""
    if not before.state.is_live or before.is_closed:
        return False
    if not before.bound_turns:
        return True
    capacity = before.turn_capacity
    if capacity is not None:
        return len(before.bound_turns) < capacity
    until = before.until
    return until is not None and (after.closed_at or after.ended_at or until) < until


def cancel_on_redaction(intent: Intent, now: datetime, timing: Timing) -> Intent:
    """Redacting the command cancels its intent only while it is still pending."""
    if intent.state is not IntentState.PENDING:
        return intent
    return cancel(intent, now, EndReason.REDACTED, timing)


UNPLACED = Placement(arrived_at=None, is_command=False)


@dataclass(frozen=True, slots=True)
class ClaimedTurn:
    """The turn of one LLM call, as far as the side-car can place it."""

    key: TurnKey | None
    placement: Placement = UNPLACED


class ClaimResult(StrEnum):
    """Why a claim got (or did not get) an override; also the metrics label."""

    BOUND = "bound"  # a new turn bound to the intent: override
    CONTINUED = "continued"  # a later call of a bound turn: override
    NO_INTENT = "no_intent"
    AMBIGUOUS_ROOM = "ambiguous_room"  # no room given, and the text was seen in several
    OTHER_TURN = "other_turn"  # the intent is bound to (or waits for) another turn
    EARLIER_TURN = "earlier_turn"  # the turn's message came before the command
    COMMAND_TURN = "command_turn"  # the agent answering a /route message itself
    ENDED_TURN = "ended_turn"  # a bound turn that went idle

    @property
    def override(self) -> bool:
        return self in (ClaimResult.BOUND, ClaimResult.CONTINUED)


METADATA_VALUE_MAX = 512  # OpenAI metadata: at most 16 string pairs of this length


@dataclass(frozen=True, slots=True)
class Route:
    """What an override routes to, and on whose word: from the intent."""

    intent_id: str
    target: str
    model: str
    sender: str


@dataclass(frozen=True, slots=True)
class ClaimAnswer:
    override: bool
    result: ClaimResult
    room_id: str | None
    turn_id: str | None
    route: Route | None = None  # set when `override`
    expires_at: datetime | None = None  # the intent's end, to the whole second
    asker: str | None = None  # who sent the turn's message, when known

    def metadata(self) -> dict[str, str]:
        """Who and where, for a dispatcher to attribute the call (SPEC "The lookup API"):
        every placed call names its room, turn and asker; a routed one adds the route.
        OpenAI-compatible: at most 16 string pairs, values ≤ 512 chars."""
        cap = METADATA_VALUE_MAX
        data: dict[str, str] = {}
        if self.room_id:
            data["matrix_room_id"] = self.room_id[:cap]
        if self.turn_id:
            data["route_turn_id"] = self.turn_id[:cap]
        if self.asker and self.room_id:
            data["matrix_sender"] = self.asker[:cap]
        if self.route is not None:
            data["route_target"] = self.route.target[:cap]
            data["route_intent_id"] = self.route.intent_id[:cap]
            data["route_origin"] = "/route"
            data["route_set_by"] = self.route.sender[:cap]
        return data


@dataclass(frozen=True, slots=True)
class Claimed:
    intent: Intent
    result: ClaimResult
    turn_position: int | None = None  # index of the bound turn that the claim belongs to

    @property
    def override(self) -> bool:
        return self.result.override


def continue_turn(
    intent: Intent, key: TurnKey | None, now: datetime, timing: Timing
) -> Claimed | None:
    """`claim` for a later call of a bound turn that is still open, in one scan; None when
    the call is not one. (A live intent with an open turn cannot have ended: `expires_at`
    is never before the end of an open turn, so `advance` is skipped.)"""
    position = latest_bound(intent, key) if intent.state.is_live else None
    if position is None:
        return None
    continued = intent.bound_turns[position].called(now, timing)
    if continued is None:
        return None
    return Claimed(with_turn(intent, position, continued), ClaimResult.CONTINUED, position)


def claim(intent: Intent, turn: ClaimedTurn, now: datetime, timing: Timing) -> Claimed:
    """The routing decision for one LLM call against the room's live intent."""
    intent = advance(intent, now, timing)
    if not intent.state.is_live:
        return Claimed(intent, ClaimResult.NO_INTENT)
    position = latest_bound(intent, turn.key)
    if position is not None:
        bound = intent.bound_turns[position]
        continued = bound.called(now, timing)
        if continued is not None:
            return Claimed(with_turn(intent, position, continued), ClaimResult.CONTINUED, position)
        arrived_at = turn.placement.arrived_at
        if arrived_at is None or arrived_at <= bound.bound_at:
            return Claimed(intent, ClaimResult.ENDED_TURN, position)
        # Same key, but a newer message with the same text: a new turn, treated as such.
    refusal = _refuse_new_turn(intent, turn, now)
    if refusal is not None:
        return Claimed(intent, refusal)
    bound = BoundTurn(key=turn.key, bound_at=now, last_claim_at=now)
    bound_intent = replace(
        intent, state=IntentState.ACTIVE, bound_turns=(*intent.bound_turns, bound)
    )
    # A request-scoped claim is consumed by its single call: advance ends a full intent.
    return Claimed(advance(bound_intent, now, timing), ClaimResult.BOUND, len(intent.bound_turns))


def claim_among(
    intents: Sequence[Intent], turn: ClaimedTurn, now: datetime, timing: Timing
) -> Claimed | None:
    """`claim` in a room that may hold closed intents besides its current one (oldest
    first): a call of a turn still open on any of them continues there; any other call
    is the current intent's to decide. None: nothing in the room applies (no current
    intent, and the turn is none of the closed ones')."""
    for intent in reversed(intents):
        if not intent.state.is_live:
            continue
        position = latest_bound(intent, turn.key)
        if position is not None and intent.bound_turns[position].is_open(now, timing):
            return claim(intent, turn, now, timing)
    current = current_of(intents)
    return claim(current, turn, now, timing) if current is not None else None


def current_of(intents: Sequence[Intent]) -> Intent | None:
    """The room's current intent: the newest live one that is not closed."""
    for intent in reversed(intents):
        if intent.state.is_live and not intent.is_closed:
            return intent
    return None


def latest_bound(intent: Intent, key: TurnKey | None) -> int | None:
    """The position of the latest bound turn with this key (a key may be bound again as
    a new turn when its message is newer), or None."""
    if key is None:
        return None
    turns = intent.bound_turns
    for position in range(len(turns) - 1, -1, -1):
        if turns[position].key == key:
            return position
    return None


def with_turn(intent: Intent, position: int, bound: BoundTurn) -> Intent:
    """The intent with its bound turn at `position` replaced (a later call counted)."""
    turns = intent.bound_turns
    return replace(intent, bound_turns=(*turns[:position], bound, *turns[position + 1 :]))


def _refuse_new_turn(intent: Intent, turn: ClaimedTurn, now: datetime) -> ClaimResult | None:
    """Why a turn not yet bound may not bind the intent, or None when it may."""
    if turn.placement.is_command:
        return ClaimResult.COMMAND_TURN
    if intent.is_closed:
        return ClaimResult.OTHER_TURN
    capacity = intent.turn_capacity
    if capacity is not None and len(intent.bound_turns) >= capacity:
        return ClaimResult.OTHER_TURN
    if intent.until is not None and now >= intent.until:
        return ClaimResult.OTHER_TURN
    if intent.is_prebound and not intent.bound_turns:
        placed = turn.placement.message
        if turn.key is None or not (
            turn.key.turn_id == intent.command_event_id
            or turn.key.message_hash == intent.question_hash
            # An agent without the plugin answers the command message's whole text.
            or (placed is not None and placed.event_id == intent.command_event_id)
        ):
            return ClaimResult.OTHER_TURN
        # The same question asked before the command (the turn `again` re-asks, maybe
        # still running) is not the turn the command asks for.
        arrived_at = turn.placement.arrived_at
        if arrived_at is not None and arrived_at < intent.command_at:
            return ClaimResult.EARLIER_TURN
        return None
    arrived_at = turn.placement.arrived_at
    if arrived_at is not None and arrived_at <= intent.command_at:
        return ClaimResult.EARLIER_TURN
    return None
