"""Train the models of a comparison config, then write a report.

  python -m experiments.main                                   # the main job: contour task, 3 models
  python -m experiments.main --config experiments/configs/cifar10.py --workdir runs/cifar10
  python -m experiments.main --config experiments/configs/contour.py:smoke --workdir /tmp/smoke
  python -m experiments.main --only lccnn --config.model.num_steps=8

Each model trains in ``<workdir>/<variant>`` and resumes there when rerun; ``<workdir>/report.md``
compares them.  Multi-host (TPU pod slices, GPU clusters): pass ``--distributed`` on every host
(``jax.distributed.initialize()`` reads the cluster from the environment), or give
``--coordinator``, ``--num_processes`` and ``--process_id`` explicitly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "contour.py")

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Comparison config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/main", "Output folder; rerunning resumes.")
_ONLY = flags.DEFINE_list("only", [], "Train only these variants (default: the config's `models`).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host, explicit).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, explicit).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host, explicit).")
_NO_REPORT = flags.DEFINE_bool("no_report", False, "Skip report.md.")
_ANALYZE = flags.DEFINE_bool("analyze", True, "Run experiments/analyze.py on the trained models (<workdir>/analysis).")


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax

    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()
    from experiments.configs import base
    from lateral_jax.training import run

    config = _CONFIG.value
    workdir = Path(_WORKDIR.value)
    variants = _ONLY.value or list(config.models)
    configs = {v: base.to_run_config(config, v) for v in variants}  # validate every variant before training
    for run_config in configs.values():
        run.validate(run_config)
    missing = [m for m in ("matplotlib", "scipy") if importlib.util.find_spec(m) is None]
    if missing and (_ANALYZE.value or not _NO_REPORT.value):
        raise SystemExit(
            f"the analysis and the report need {', '.join(missing)} (the 'analysis' extra): "
            'pip install "lateral_jax[analysis]", or pass --noanalyze --no_report to train only.'
        )
    print(
        f"lateral_jax: {len(variants)} model(s) {', '.join(variants)} on {config.data.dataset}; "
        f"{jax.device_count()} device(s) ({jax.devices()[0].platform}); workdir {workdir}",
        flush=True,
    )
    for variant, run_config in configs.items():
        result = run.train_and_evaluate(run_config, workdir / variant)
        if result.get("preempted"):
            print(f"preempted during {variant}; rerun the same command to resume.", flush=True)
            return
        print(f"{variant}: validation accuracy {result['validation_accuracy']:.4f}", flush=True)
    if jax.process_index() == 0 and _ANALYZE.value:
        from experiments import analyze

        analyze.main([str(workdir / v) for v in variants] + ["--out", str(workdir / "analysis")])
    if jax.process_index() == 0 and not _NO_REPORT.value:
        from experiments import report  # matplotlib: only when a report is written

        path = report.write_report(workdir, variants, title=f"{config.data.dataset}: {', '.join(variants)}")
        print(f"report: {path}", flush=True)


if __name__ == "__main__":
    app.run(main)
