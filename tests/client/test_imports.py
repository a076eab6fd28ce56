"""A data holder installs fedlora-worker without the lab extras: the daemon must not need them."""

from __future__ import annotations

import subprocess
import sys


def test_the_daemon_and_the_audit_import_without_the_lab_extras() -> None:
    # Prepare: make faker (the lab's data generator) unimportable in a fresh interpreter.
    code = (
        "import sys; sys.modules['faker'] = None\n"
        "import fedlora_worker.daemon, fedlora_worker.audit, fedlora_worker.cli\n"
        "assert 'fedlora_lab' not in sys.modules\n"
    )

    # Execute
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)

    # Assert
    assert result.returncode == 0, result.stderr[-2000:]
