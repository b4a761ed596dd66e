"""The authenticator's permit table: per connection, only the next legal request.

    state          permitted request   outcome          next state
    -------------  ------------------  ---------------  -------------
    EXPECT_HELLO   hello               version ok       EXPECT_AUTH
                                       other version    CLOSED
    EXPECT_AUTH    auth                ok               AUTHENTICATED
                                       failed           EXPECT_AUTH
                                       failed, last     CLOSED
                                       backend down     CLOSED (error: temporary)
    AUTHENTICATED  route               answered         AUTHENTICATED
                                       internal failure CLOSED (error: temporary)

Any other request, in any state, is a violation: the connection gets an
`error` naming it and is closed (OpenSSH's monitor does the same). Sans-IO:
no sockets, no clock; the driver asks `admit()` before acting on a request
and reports outcomes back.
"""

from __future__ import annotations

import enum

from sendooway_shared.protocol import VERSION, AuthRequest, Hello, Message, RouteRequest


class State(enum.Enum):
    EXPECT_HELLO = "expect-hello"
    EXPECT_AUTH = "expect-auth"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


class Outcome(enum.Enum):
    HELLO_OK = "hello-ok"
    HELLO_BAD_VERSION = "hello-bad-version"
    AUTH_OK = "auth-ok"
    AUTH_FAILED = "auth-failed"
    AUTH_FAILED_LAST = "auth-failed-last"
    AUTH_UNAVAILABLE = "auth-unavailable"
    ROUTE_ANSWERED = "route-answered"
    ROUTE_TEMPORARY_FAILURE = "route-temporary-failure"


PERMITTED: dict[State, type[Message] | None] = {
    State.EXPECT_HELLO: Hello,
    State.EXPECT_AUTH: AuthRequest,
    State.AUTHENTICATED: RouteRequest,
    State.CLOSED: None,
}

TRANSITIONS: dict[tuple[State, Outcome], State] = {
    (State.EXPECT_HELLO, Outcome.HELLO_OK): State.EXPECT_AUTH,
    (State.EXPECT_HELLO, Outcome.HELLO_BAD_VERSION): State.CLOSED,
    (State.EXPECT_AUTH, Outcome.AUTH_OK): State.AUTHENTICATED,
    (State.EXPECT_AUTH, Outcome.AUTH_FAILED): State.EXPECT_AUTH,
    (State.EXPECT_AUTH, Outcome.AUTH_FAILED_LAST): State.CLOSED,
    (State.EXPECT_AUTH, Outcome.AUTH_UNAVAILABLE): State.CLOSED,
    (State.AUTHENTICATED, Outcome.ROUTE_ANSWERED): State.AUTHENTICATED,
    (State.AUTHENTICATED, Outcome.ROUTE_TEMPORARY_FAILURE): State.CLOSED,
}

# Violations worth their own words; the rest get a generic reason.
_REASONS: dict[tuple[State, str], str] = {
    (State.EXPECT_HELLO, "auth"): "auth before hello",
    (State.EXPECT_HELLO, "route"): "route before hello",
    (State.EXPECT_AUTH, "hello"): "second hello",
    (State.EXPECT_AUTH, "route"): "route before a successful auth",
    (State.AUTHENTICATED, "hello"): "hello after auth",
    (State.AUTHENTICATED, "auth"): "second auth after a successful one",
}


class Violation(Exception):
    """The peer asked for something not permitted now: send error, close."""


class Permits:
    """One connection's place in the table, plus who is authenticated on it."""

    def __init__(self, max_failures: int) -> None:
        self.state = State.EXPECT_HELLO
        self.max_failures = max_failures
        self.failures = 0
        self.user: str | None = None  # set only by AUTH_OK; routes are for this user

    def admit(self, msg: Message) -> None:
        """Raise Violation (and close) unless `msg` is the next legal request."""
        if PERMITTED[self.state] is type(msg):
            return
        reason = _REASONS.get((self.state, msg.TYPE),
                              f"{msg.TYPE} not permitted in state {self.state.value}")
        self.state = State.CLOSED
        raise Violation(reason)

    def hello(self, msg: Hello) -> Outcome:
        outcome = Outcome.HELLO_OK if msg.version == VERSION else Outcome.HELLO_BAD_VERSION
        self._move(outcome)
        return outcome

    def auth_ok(self, user: str) -> Outcome:
        self.user = user
        return self._move(Outcome.AUTH_OK)

    def auth_failed(self) -> Outcome:
        self.failures += 1
        outcome = (Outcome.AUTH_FAILED_LAST if self.failures >= self.max_failures
                   else Outcome.AUTH_FAILED)
        return self._move(outcome)

    def auth_unavailable(self) -> Outcome:
        return self._move(Outcome.AUTH_UNAVAILABLE)

    def route_answered(self) -> Outcome:
        return self._move(Outcome.ROUTE_ANSWERED)

    def route_failed(self) -> Outcome:
        return self._move(Outcome.ROUTE_TEMPORARY_FAILURE)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def _move(self, outcome: Outcome) -> Outcome:
        try:
            self.state = TRANSITIONS[(self.state, outcome)]
        except KeyError:
            raise AssertionError(f"bug: {outcome.value} reported in state {self.state.value}") from None
        return outcome
