"""`executor: ray`: the config, ray missing, and the grid on a local Ray against the same grid on the local pool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Final

import psutil
import pytest
import yaml

from fedlora_lab.cli import main
from fedlora_lab.experiment import ExperimentConfig
from tests.lab_fixtures import SMALL_EXPERIMENT, ExperimentRun

WALL_CLOCK: Final = frozenset({"duration_s", "audit_duration_s"})
"""Seconds measured while a run went: they differ between any two runs, on any executor."""
PLACE: Final = frozenset({"out_dir"})
"""Where the run's files are: the two grids need two directories (in one, the second would find the first's
results and run nothing)."""
NICE: Final = 2
"""The grid runs this much nicer than the suite: its simulated runs must run at its priority, not Ray's."""
TAG: Final = "FEDLORA_RAY_TEST"
"""An environment variable that every process started under the Ray grid inherits, to find any left behind."""


def _run_cli(tmp_path: Path, config: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code = main(["experiment", "--config", str(path), "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


def _cells(out: Path) -> dict[str, dict[str, Any]]:
    """Every run's result.json, by method/seed, less what depends on the clock or the directory."""
    return {
        str(path.parent.relative_to(out / "runs")): {
            k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k not in WALL_CLOCK | PLACE
        }
        for path in sorted((out / "runs").glob("*/seed-*/result.json"))
    }


def _loopback_only() -> list[str]:
    """The argv prefix that runs a program in a network namespace of its own, where only loopback exists: a
    local Ray binds its ports on every interface it can see, and there it sees no other."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed (util-linux, iproute2): `make system-tools`")
    return ["unshare", "--net", "--map-root-user", "sh", "-c", 'ip link set lo up && exec "$@"', "loopback-only"]


class _Priorities:
    """The niceness of every simulated run (a `fedlora-lab simulate` process) seen while a grid runs."""

    def __init__(self, tag: str) -> None:
        self.seen: set[int] = set()
        self._tag = tag
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _Priorities:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for process in _tagged(self._tag):
                try:
                    if "simulate" in process.cmdline():
                        self.seen.add(process.nice())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue


def _tagged(tag: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG) == tag:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


# --------------------------------------------------------------------------- config


def test_the_executor_is_local_unless_the_config_names_ray_and_never_changes_a_runs_fingerprint() -> None:
    local = ExperimentConfig.model_validate(SMALL_EXPERIMENT)
    ray = ExperimentConfig.model_validate({**SMALL_EXPERIMENT, "executor": "ray", "ray_address": "auto"})

    fingerprints = {config.fingerprint(config.methods[0], 0) for config in (local, ray)}

    assert (local.executor, local.ray_address) == ("local", None)
    assert (ray.executor, ray.ray_address) == ("ray", "auto")
    assert len(fingerprints) == 1  # a grid moved to Ray resumes: what the pool finished is not redone


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"executor": "dask"}, "executor: Input should be 'local' or 'ray'"),
        ({"ray_address": "auto"}, "ray_address: only with executor: ray"),
        ({"executor": "ray", "ray_address": ""}, "ray_address: String should have at least 1 character"),
    ],
)
def test_a_bad_executor_setting_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: dict[str, Any], message: str
) -> None:
    code, err = _run_cli(tmp_path, {**SMALL_EXPERIMENT, **settings}, capsys)

    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_executor_ray_without_ray_exits_2_naming_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what a missing package does: `import ray` fails
    with pytest.raises(ImportError):
        import ray  # noqa: F401

    code, err = _run_cli(tmp_path, {**SMALL_EXPERIMENT, "executor": "ray"}, capsys)

    assert code == 2
    assert err.strip().endswith("executor: ray is not installed: pip install 'fedlora-lab[ray]'")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the grid on Ray


@pytest.mark.slow
def test_a_local_ray_gives_every_cell_the_result_the_local_pool_gives_at_the_experiment_s_priority(
    small_experiment: ExperimentRun, lab_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work, ray_dir = tmp_path_factory.mktemp("ray-grid"), tmp_path_factory.mktemp("ray")  # short: Ray's socket paths
    config = work / "experiment.yaml"
    config.write_text(yaml.safe_dump({**SMALL_EXPERIMENT, "executor": "ray"}), encoding="utf-8")
    tag = uuid.uuid4().hex
    env = {**os.environ, "HOME": str(work), "RAY_TMPDIR": str(ray_dir), TAG: tag}  # Ray's token and session here
    argv = [sys.executable, "-m", "fedlora_lab", "experiment", "--config", str(config), "--out", str(work / "out")]
    argv += ["--cache-dir", str(lab_cache)]

    with _Priorities(tag) as priorities:  # Ray's own default, nice 15, starves its tasks beside any other work
        done = subprocess.run(
            [*_loopback_only(), "nice", "-n", str(NICE), *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    assert done.returncode == 0, done.stderr
    assert priorities.seen == {os.nice(0) + NICE}
    assert small_experiment.code == 0, small_experiment.stderr
    ran = [log for log in ray_dir.glob("ray/session_*/logs/worker-*.out") if ":task_name:_call" in log.read_text()]
    assert ran, "no Ray worker ran a cell"
    local, ray = _cells(small_experiment.out), _cells(work / "out")
    assert list(ray) == ["full/seed-0", "lora/seed-0"]
    for key, cell in ray.items():
        assert cell["status"] == "ok", cell["error"]
        assert cell == local[key], key
    _, left = psutil.wait_procs(_tagged(tag), timeout=30)
    assert left == [], f"left running: {[p.pid for p in left]}"
