"""The administrators' console: server-rendered pages over HTTPS, served by `serve`.

    browser -> server (uvicorn thread) -> app (routes, error page) -> views
            -> security (headers, cookie, CSRF, Origin, roles)
            -> reads (SQL, read-only) | collector.triage / users / trail (every change)

No build step and no CDN: Jinja2 templates (autoescaped), our CSS and one small script,
and htmx vendored in static/ (see static/htmx.VERSION).
"""
