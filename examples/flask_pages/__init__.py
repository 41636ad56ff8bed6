"""The pages service on WSGI (Flask): the API of ``examples.pages_service`` over the same store.

``app.create_app`` builds the Flask app behind ``hardening.adapters.wsgi``;
``wsgi.app`` and ``gunicorn.conf.py`` serve it with gunicorn; ``python -m examples.flask_pages``
runs it on localhost.
"""
