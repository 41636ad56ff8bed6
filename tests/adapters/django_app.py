"""A minimal Django project, configured in-process, for the adapter tests.

``setup()`` configures ``django.conf.settings`` once per process (Django allows it only once)
and runs ``django.setup()``; this module is also the project's ``ROOT_URLCONF``. The one view,
``pages/<int:pk>``, answers ``page <pk>`` and raises :class:`hardening.ConflictError` for
``pk == 9``. ``MIDDLEWARE`` holds the hardening Django glue: ``RouteMiddleware`` (the matched
pattern for ``MetricsMiddleware``) and ``ErrorResponseMiddleware`` (problem+json answers).
"""

from __future__ import annotations

import threading
from typing import Any

import django
from django.urls import path

from hardening import ConflictError

CONFLICT_PK = 9
_lock = threading.Lock()


def page(request: Any, pk: int) -> Any:
    """``page <pk>``; a ``ConflictError`` (409) for :data:`CONFLICT_PK`."""
    from django.http import HttpResponse

    if pk == CONFLICT_PK:
        raise ConflictError("Page", pk, expected_version=1, current_version=2)
    return HttpResponse(f"page {pk}", content_type="text/plain")


urlpatterns = [path("pages/<int:pk>", page)]


MIDDLEWARE = [
    "hardening.adapters.django.RouteMiddleware",
    "hardening.adapters.django.ErrorResponseMiddleware",
]


def setup() -> None:
    """Configure the settings (once per process) and set Django up.

    When another test configured Django first (``docs/quickstart-django.md`` does, with its own
    URLconf), this project's URLconf and middleware are put over those settings for the rest of
    the process.
    """
    from django.conf import settings
    from django.test import override_settings

    with _lock:
        if not settings.configured:
            settings.configure(
                DEBUG=False,
                ALLOWED_HOSTS=["*"],
                ROOT_URLCONF=__name__,
                SECRET_KEY="hardening-tests-not-secret",
                # the docs' Django quickstart uses the ORM; these tests never touch it
                DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
                INSTALLED_APPS=[],
                MIDDLEWARE=MIDDLEWARE,
                USE_TZ=True,
            )
        elif __name__ != settings.ROOT_URLCONF:
            override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=MIDDLEWARE).enable()
        django.setup()


def wsgi_application() -> Any:
    """The project served as a WSGI app (``django.core.wsgi.get_wsgi_application``)."""
    setup()
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def asgi_application() -> Any:
    """The project served as an ASGI app (``django.core.asgi.get_asgi_application``)."""
    setup()
    from django.core.asgi import get_asgi_application

    return get_asgi_application()
