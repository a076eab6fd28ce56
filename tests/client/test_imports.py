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


def test_every_name_of_the_public_api_resolves_to_its_implementation() -> None:
    import fedlora_worker

    resolved = {name: getattr(fedlora_worker, name) for name in fedlora_worker.__all__}

    assert resolved["Worker"].__module__ == "fedlora_worker.daemon"
    assert resolved["Coordinator"].__module__ == "fedlora_worker.coordinator"
    assert all(getattr(value, "__name__", name) == name for name, value in resolved.items())


def test_the_protection_pipeline_and_the_session_do_not_load_torch() -> None:
    # The coordinator's protocol tests and benchmarks drive them: seconds of torch import for nothing.
    code = (
        "import sys\n"
        "import fedlora_worker, fedlora_worker.protect, fedlora_worker.secagg_session, fedlora_worker.coordinator\n"
        "assert 'torch' not in sys.modules\n"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
