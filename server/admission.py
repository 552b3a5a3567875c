"""Admission: the one owner of the in-flight count and of the rule that every /v1 request is
observed (metrics) exactly once, whether it is refused, answered, streamed, or cancelled at any
point (before its stream first runs included).

A request that passed validation takes a `Ticket` (or a 429); the ticket holds its slot until
`finish()`, which is idempotent: the first call releases the slot and observes the request,
later calls do nothing. Whoever ends the request calls it: the serving code on an answer or an
error, the stream's generator when it ends, and `TicketStream` after the response was sent (or
failed to be), which covers a stream whose generator never ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from server.errors import APIError
from server.metrics import RequestRecord

log = logging.getLogger("remix_serve.admission")

Observer = Callable[[RequestRecord], None]

CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer


class Ticket:
    """One admitted (or refused) request's slot and record."""

    def __init__(self, admission: Admission, record: RequestRecord, holds_slot: bool) -> None:
        self.admission = admission
        self.record = record
        self.holds_slot = holds_slot
        self.finished = False
        self.on_finish: list[Callable[[], None]] = []  # releases of what the request held

    def hold(self, release: Callable[[], None]) -> None:
        """Release what this request acquired once it finishes, however it ends."""
        self.on_finish.append(release)

    def finish(self, status: int, completion_tokens: int | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.record.status = status
        if completion_tokens is not None:
            self.record.completion_tokens = completion_tokens
        if self.holds_slot:
            self.admission.in_flight -= 1
        for release in self.on_finish:
            release()
        self.admission.observe(self.record)

    def fail(self, exc: BaseException) -> None:
        """Finish with the status that `exc` will answer (cancelled: the client went away)."""
        if isinstance(exc, APIError):
            self.finish(exc.status)
        elif isinstance(exc, asyncio.CancelledError):
            self.finish(CLIENT_CLOSED)
        else:
            self.finish(500)

    def stream(self, events: AsyncIterator[str]) -> StreamingResponse:
        """The SSE response that owns this ticket from here on."""
        return TicketStream(self, events)


class TicketStream(StreamingResponse):
    """A server-sent-event stream that finishes its ticket however the response ends."""

    def __init__(self, ticket: Ticket, events: AsyncIterator[str]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.ticket = ticket
        self.events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass  # nobody is left to answer
        finally:
            # Closing runs the generator's own cleanup (aborting its engine requests) if it
            # started; a generator that never ran has nothing to clean, and the ticket is
            # finished here instead.
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
            self.ticket.finish(CLIENT_CLOSED)


class Admission:
    """At most `max_in_flight` requests admitted at once; past it, 429 with Retry-After."""

    def __init__(self, max_in_flight: int, retry_after_s: int = 1) -> None:
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.observers: list[Observer] = []

    def observe(self, record: RequestRecord) -> None:
        record.e2e_s = time.perf_counter() - record.started
        for fn in self.observers:
            try:
                fn(record)
            except Exception:
                log.exception("observer failed")

    @staticmethod
    def record(request: Request, endpoint: str) -> RequestRecord:
        """The request's record, made on first use and kept on `request.state.record`: the
        serving code fills in what it learns (its model, its tokens) and whoever finishes the
        request observes it, so a request refused after its model was known keeps the model."""
        record: RequestRecord | None = getattr(request.state, "record", None)
        if record is None:
            record = RequestRecord(endpoint=endpoint, status=200)
            request.state.record = record
        return record

    def admit(self, request: Request, endpoint: str) -> Ticket:
        """The request's ticket, kept on `request.state.ticket`; raises 429 (observed) when
        the server is at capacity."""
        full = self.in_flight >= self.max_in_flight
        ticket = Ticket(self, self.record(request, endpoint), holds_slot=not full)
        request.state.ticket = ticket
        if full:
            ticket.finish(429)
            raise APIError(
                429,
                f"The server is at capacity ({self.max_in_flight} requests in flight); retry later",
                type="rate_limit_error",
                code="too_many_requests",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.in_flight += 1
        return ticket

    def refused(self, request: Request, endpoint: str, status: int) -> None:
        """Observe an error answer: finishes the request's ticket, or counts a request refused
        before it took one (a body that failed validation)."""
        ticket: Ticket | None = getattr(request.state, "ticket", None)
        if ticket is None:
            ticket = Ticket(self, self.record(request, endpoint), False)
            request.state.ticket = ticket
        ticket.finish(status)
