"""`python -m runtime serve --config FILE` / `python -m runtime client ...` (the same as the entry points)."""

import sys

from .cli import client_main, serve_main

commands = {"serve": serve_main, "client": client_main}
if len(sys.argv) < 2 or sys.argv[1] not in commands:
    sys.exit("usage: python -m runtime {serve|client} [args]")
sys.exit(commands[sys.argv[1]](sys.argv[2:]))
