"""``python -m alignfuse.service.cli`` = the ``alignfuse`` command."""

from . import main

main()
