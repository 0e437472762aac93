"""The command line, a face of the runtime: ``lowbit`` and its parser (entry.py), the commands (commands.py), the
chat REPL (repl.py, its slash commands in repl_commands.py, soft-wrapped streaming in wrap.py)."""

from lowbit.runtime.cli.entry import main

__all__ = ["main"]
