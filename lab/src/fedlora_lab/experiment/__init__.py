"""`fedlora-lab experiment`: the paper's comparison, methods x seeds, each run a local federation then audited.

``config`` reads the experiment file, ``runner`` runs it (one run: ``execute``; its audit:
``audit``; where the runs go, threads or Ray: ``executors``), ``summary``, ``plots`` and ``report``
turn results.json into the report.
"""

from fedlora_lab.experiment.config import ExperimentConfig, MethodConfig, federation_plan, load_experiment_config
from fedlora_lab.experiment.execute import PlannedRun, execute_run
from fedlora_lab.experiment.executors import CellExecutor, LocalExecutor, RayExecutor, open_executor
from fedlora_lab.experiment.report import experiment_document, write_experiment_report
from fedlora_lab.experiment.runner import ExperimentOutcome, plan_runs, run_experiment
from fedlora_lab.experiment.summary import Interval, MethodSummary, format_interval, mean_ci, summarize

__all__ = [
    "CellExecutor",
    "ExperimentConfig",
    "ExperimentOutcome",
    "Interval",
    "LocalExecutor",
    "MethodConfig",
    "MethodSummary",
    "PlannedRun",
    "RayExecutor",
    "execute_run",
    "experiment_document",
    "federation_plan",
    "format_interval",
    "load_experiment_config",
    "mean_ci",
    "open_executor",
    "plan_runs",
    "run_experiment",
    "summarize",
    "write_experiment_report",
]
