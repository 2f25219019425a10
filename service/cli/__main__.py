"""``python -m service.cli`` = the ``alignfuse`` command."""

from . import main

main()
