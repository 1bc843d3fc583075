"""The controller's commands: `controller`, `status`, `history`, `rollback`.

They are registered on the `vmflow` group by controller/cli.py, which owns exit codes and shared options.
"""

from __future__ import annotations

COMMANDS: list = []
