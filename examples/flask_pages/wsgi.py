"""The app for WSGI servers, configured from the environment.

    gunicorn -c examples/flask_pages/gunicorn.conf.py examples.flask_pages.wsgi:app

Under gunicorn the indexing thread is not started here (this module may be imported in the
master with ``--preload``): ``gunicorn.conf.py`` starts one in each worker process. Any other
server imports this module in the process that serves, so the thread starts here.
"""

from __future__ import annotations

import logging
import sys

from examples.flask_pages.app import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = create_app(start_worker="gunicorn" not in sys.modules)
