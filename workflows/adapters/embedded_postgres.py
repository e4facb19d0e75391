"""A local PostgreSQL for development and tests, used when DATABASE_URL is unset."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer


class NotInstalled(RuntimeError):
    """The `pgserver` wheel (the `embedded` extra) is not installed."""


class EmbeddedPostgres:
    """The PostgreSQL bundled with the `pgserver` wheel, serving `data_dir` on a unix socket.

    The data persists in `data_dir`. The server stops at `stop()` or when this process
    exits, unless another process started it too: it stops with the last one.
    """

    def __init__(self, data_dir: str) -> None:
        self._data_dir = Path(data_dir)
        self._server: PostgresServer | None = None

    def start(self) -> str:
        """Start the server (or join one already serving `data_dir`); its libpq URL."""
        # Imported only here: a development aid, heavy to load, with import-time effects,
        # one of which is platformdirs warning that XDG_RUNTIME_DIR is unset (it then
        # uses /tmp/runtime-$UID, which suits us).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            try:
                from pgserver.postgres_server import get_server
            except ImportError as error:
                raise NotInstalled(
                    "DATABASE_URL is not set and the embedded PostgreSQL is not installed:"
                    " set DATABASE_URL, or install the extra (pip install 'workflows[embedded]')"
                ) from error

        logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every command
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self._data_dir, cleanup_mode="stop")
        return self._server.get_uri()

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
