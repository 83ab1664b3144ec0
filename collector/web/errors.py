"""The console's errors: branches of the collector's tree (`collector.errors`).

CollectorError
└── ConsoleError            a request the console refuses; `status` is the HTTP status
    ├── BadRequestError     a parameter or form field is malformed          -> 400
    ├── LoginRequiredError  no valid session (the page redirects to /login) -> 303
    └── ForbiddenError      wrong role, missing CSRF token, foreign Origin  -> 403

The domain layer's own errors (NotFoundError, TriageError, AuthError, ...) reach the
same single error page in `collector.web.app`, mapped to a status there.
"""

from __future__ import annotations

from collector.errors import CollectorError


class ConsoleError(CollectorError):
    status = 400


class BadRequestError(ConsoleError):
    status = 400


class LoginRequiredError(ConsoleError):
    status = 303


class ForbiddenError(ConsoleError):
    status = 403
