"""Django glue: tell the metrics middleware which URL pattern a request matched.

Django keeps the match on the request object (``request.resolver_match``), out of the WSGI
environ and the ASGI scope the adapters see. Add :class:`RouteMiddleware` to ``MIDDLEWARE``
and it copies the pattern into ``request.META["hardening.route"]`` (the environ, under WSGI)
and ``request.scope["hardening.route"]`` (under ASGI), where ``MetricsMiddleware`` reads it.
Django itself is not imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hardening.adapters._http import ROUTE_KEY, error_response
from hardening.errors import HardeningError

__all__ = ["ErrorResponseMiddleware", "RouteMiddleware", "route_template"]


def route_template(request: Any) -> str | None:
    """The URL pattern Django matched for ``request`` as a path template, e.g. ``/pages/<int:pk>``.

    Args:
        request: a Django ``HttpRequest`` after URL resolution.

    Returns:
        The template, or ``None`` when nothing matched.
    """
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None)
    if not isinstance(route, str) or match is None:
        return None
    return "/" + route.removeprefix("^").removesuffix("$").lstrip("/")


class RouteMiddleware:
    """Django middleware recording the matched URL pattern for ``MetricsMiddleware``.

    Args:
        get_response: the next handler in Django's middleware chain.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        """Handle the request, then record the route it matched."""
        response = self.get_response(request)
        template = route_template(request)
        if template is not None:
            request.META[ROUTE_KEY] = template
            scope = getattr(request, "scope", None)
            if isinstance(scope, dict):
                scope[ROUTE_KEY] = template
        return response


class ErrorResponseMiddleware:
    """Django middleware answering ``hardening`` errors raised by views as problem+json.

    Django turns exceptions into 500 responses before the WSGI/ASGI ``ErrorMiddleware`` could
    see them; this does the same mapping from inside (``process_exception``).

    Args:
        get_response: the next handler in Django's middleware chain.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        """Pass the request on."""
        return self.get_response(request)

    def process_exception(self, request: Any, exception: Exception) -> Any:
        """Answer a ``hardening`` error; leave any other exception to Django."""
        if not isinstance(exception, HardeningError):
            return None
        from django.http import HttpResponse  # type: ignore[import-untyped,unused-ignore]

        status, headers, body = error_response(exception)
        response = HttpResponse(body, status=status, content_type=dict(headers)["content-type"])
        for name, value in headers:
            if name not in ("content-type", "content-length"):
                response[name] = value
        return response
