"""The ``hf-creative-sparse`` command: `app.main` parses, and each subcommand lives in a
module of this package (``cli/<name>.py``)."""

from .app import main

__all__ = ["main"]
