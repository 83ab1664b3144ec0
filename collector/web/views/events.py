"""Event search: who moved what, where, when; newest first, a page at a time.

GET /events -> reads.events (keyset pages over observed_at_ns, rowid)
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from collector.web import filters
from collector.web.context import console_of, page, signed_in

EVENTS_PER_PAGE = 100


def event_search(request: Request) -> Response:
    session = signed_in(request)
    console = console_of(request)
    f = filters.EventFilter.parse(request.query_params)
    size = filters.PageRequest.parse(request.query_params, default_size=EVENTS_PER_PAGE).size
    result = console.reader.events(f, size, filters.cursor(request.query_params))
    return page(
        request,
        "events.html",
        session,
        f=f,
        result=result,
        labels=console.policy.labels,
        first_page="before" not in request.query_params,
        size=size,
    )
