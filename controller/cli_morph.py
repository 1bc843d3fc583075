"""The run-time commands: `simulate` and `events`.

They are registered on the `vmflow` group by controller/cli.py, which owns exit codes and shared options.
"""

from __future__ import annotations

COMMANDS: list = []
