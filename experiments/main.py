"""Train the models of a comparison config, then write a report.

  python -m experiments.main                                   # the main job: contour task, 3 models
  python -m experiments.main --config experiments/configs/cifar10.py --workdir runs/cifar10
  python -m experiments.main --config experiments/configs/contour.py:smoke --workdir /tmp/smoke
  python -m experiments.main --only lccnn --config.model.num_steps=8
  python -m experiments.main --only lceicnn --config.model.ei_mode=project --config.model.ei_weight=0 --dry_run

Each model trains in ``<workdir>/<variant>`` and resumes there when rerun; ``<workdir>/report.md``
compares them.  ``--config.<field>=<value>`` overrides win over the variant's defaults (the model
kind is chosen with ``--only``); ``--dry_run`` prints each variant's resolved config and exits.
Multi-host (TPU pod slices, GPU clusters): pass ``--distributed`` on every host
(``jax.distributed.initialize()`` reads the cluster from the environment), or give
``--coordinator``, ``--num_processes`` and ``--process_id`` explicitly.

Exit status: 0 done; 2 refused before training (bad flag, config, input or run folder; the
message says what and how to fix it); 3 training stopped on a non-finite or diverged loss
(earlier checkpoints kept); 75 preempted (SIGTERM): a checkpoint was saved, rerun the same
command to resume.
"""

from __future__ import annotations

import os
import sys

from experiments import preemption

if __name__ == "__main__":  # SIGTERM exits 75 from the first moment (training replaces it: save, then 75)
    preemption.exit_75_on_sigterm()

import copy
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments.configs import base
from lateral_jax.training import checkpoint, programs, run, rundir, train
from lateral_jax.training.config import MODEL_KIND_FAMILIES, RunConfig, to_dict
from lateral_jax.training.data import sources
from lateral_jax.training.rundir import ON_CONFIG_CHANGE

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "contour.py")
# Model kinds the neurophysiology analysis (lateral_jax.neuro.probe) measures: the LateralCNN family.
PROBED_KINDS = tuple(k for k, family in MODEL_KIND_FAMILIES.items() if family == "lateral_cnn")


def define_flags(
    fv: flags.FlagValues, config: ml_collections.ConfigDict | None = None, argv: list[str] | None = None
) -> None:
    """Defines the command line's flags on ``fv``; ``--config.<field>=<value>`` overrides apply to
    ``config`` (the loaded config file, or a variant of it), in ml_collections' own way
    (``argv``: the arguments the overrides come from, default ``sys.argv``)."""
    config_flags.DEFINE_config_dict(
        "config",
        config if config is not None else ml_collections.ConfigDict(),
        "Comparison config file (path[:variant]; default: the contour main job); --config.<field>=<value> "
        "overrides its fields.",
        flag_values=fv,
        sys_argv=argv,
    )
    fv["config"].default_as_str = repr(os.path.relpath(DEFAULT_CONFIG))  # --help shows the file, not its fields
    flags.DEFINE_string("workdir", "runs/main", "Output folder; rerunning resumes.", flag_values=fv)
    flags.DEFINE_list("only", [], "Train only these variants (default: the config's `models`).", flag_values=fv)
    flags.DEFINE_enum(
        "on_config_change",
        "error",
        list(ON_CONFIG_CHANGE),
        "A run folder holding checkpoints of another config: refuse (error), or move that run to "
        "<folder>.superseded-<time> and start afresh (move_aside).",
        flag_values=fv,
    )
    flags.DEFINE_bool("dry_run", False, "Print each variant's resolved config and exit.", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host, explicit).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, explicit).", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host, explicit).", flag_values=fv)
    flags.DEFINE_bool("no_report", False, "Skip report.md.", flag_values=fv)
    flags.DEFINE_bool(
        "verbose", False, "Libraries' log lines and progress bars, and a traceback with errors.", flag_values=fv
    )
    flags.DEFINE_bool(
        "analyze", True, "Run experiments/analyze.py on the trained models (<workdir>/analysis).", flag_values=fv
    )


class UsageError(ValueError):
    """The command line cannot run: the message names the flag, the value and the fix."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a command line trains: one resolved ``RunConfig`` per run, and where.

    ``run_configs`` is keyed by run name, the run's folder under ``workdir``: the variant's name
    when the config has one seed, ``<variant>_seed<N>`` for each of its ``seeds`` otherwise.
    ``variants`` maps each variant to its runs' names, in seed order.
    """

    dataset: str
    workdir: Path
    run_configs: dict[str, RunConfig]
    variants: dict[str, list[str]] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _config_spec(argv: list[str]) -> tuple[str, str, list[str]]:
    """``(path, variant, rest)``: the ``--config=path[:variant]`` of ``argv`` (or the default) and
    ``argv`` without it (its ``--config.<field>`` overrides stay)."""
    spec, rest, skip = DEFAULT_CONFIG, [], False
    for i, arg in enumerate(argv):  # --config=path[:variant] or --config path[:variant]
        if skip:
            skip = False
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec, skip = argv[i + 1], True
        else:
            rest.append(arg)
    path, _, variant = spec.partition(":")
    return path, variant, rest


def load_config_file(path: str, variant: str) -> ml_collections.ConfigDict:
    """The config file's ``get_config([variant])`` — the one load of the file; its errors are a
    :class:`UsageError` carrying the error's message."""
    if not Path(path).is_file():
        raise UsageError(f"--config={path!r}: no such config file; pass one of experiments/configs/*.py[:variant].")
    try:
        module_spec = importlib.util.spec_from_file_location("_lateral_jax_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except Exception as e:  # noqa: BLE001 - any error of the user's config file is reported, not raised
        raise UsageError(f"--config={path}{':' + variant if variant else ''}: {type(e).__name__}: {e}") from None


def _unknown_override(config: ml_collections.ConfigDict, argv: list[str]) -> str | None:
    """The message for the first ``--config.<path>=`` whose path ``config`` does not have."""
    for arg in argv:
        match = re.match(r"--config\.([\w.]+)", arg)
        if match is None:
            continue
        node, parts = config, match[1].split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join(["config", *parts[:i]])
                names = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                hint = f"its fields are {', '.join(names)}" if names else f"{parent} is a value, not a group"
                return f"{arg.split('=', 1)[0]}: {parent} has no field {part!r}; {hint}."
            node = node[part]
    return None


def _parse_onto(fv: flags.FlagValues, config: ml_collections.ConfigDict, argv: list[str]) -> list[str]:
    """Defines the flags on ``fv`` with ``config`` under ``--config`` and parses ``argv`` (without
    the config file's spec) into it; a bad flag or override is a :class:`UsageError`."""
    try:
        define_flags(fv, config, argv)
        rest = fv(argv)
        _check_tuple_overrides(fv.config, argv)
        return rest
    except (AttributeError, KeyError, TypeError, IndexError) as e:  # an override of a field the config lacks
        raise UsageError(_unknown_override(config, argv) or f"bad config override: {e}") from None
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise UsageError(re.sub(r"^\w+(Error|Exception): ", "", lines[0])) from None


def parse_flags(fv: flags.FlagValues, argv: list[str]) -> list[str]:
    """Loads the config file once, defines the flags on ``fv`` and parses ``argv`` into it (the
    overrides applied to a copy of the file's config); a bad flag is a :class:`UsageError` (no
    traceback).  The file's own config and the command line stay on the flag
    (``fv["config"].file_config``, ``.command_line``) for :func:`plan`, which applies each variant
    to the file's config before the command line's overrides."""
    path, variant, rest = _config_spec(argv)
    file_config = load_config_file(path, variant)
    remaining = _parse_onto(fv, copy.deepcopy(file_config), rest)
    fv["config"].file_config, fv["config"].command_line = file_config, rest
    return remaining


def _check_tuple_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """A tuple field overridden by a bare value (``--config.model.widths=8``, which ml_collections
    reads as the 1-tuple ``(8,)``) is refused: the tuple must be written out."""
    for arg in argv:
        name, eq, value = arg.partition("=")
        if not (eq and name.startswith("--config.")):
            continue
        node: object = config
        for part in name[len("--config.") :].split("."):
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if isinstance(node, tuple) and not value.strip().startswith(("(", "[")):
            raise UsageError(
                f"{name}={value}: {name[2:]} is a tuple; write it out, e.g. {name}='({value.strip()},)' for "
                "one element."
            )


def _variant_config(fv: flags.FlagValues, variant: str) -> ml_collections.ConfigDict:
    """The config file's config with ``variant`` applied, then the command line's overrides: the
    precedence file < variant < command line is ml_collections' own (no replay)."""
    variant_config = base.with_variant(fv["config"].file_config, variant)
    _parse_onto(flags.FlagValues(), variant_config, fv["config"].command_line)
    return variant_config


def plan(fv: flags.FlagValues) -> Plan:
    """The runs a parsed command line asks for; every variant is resolved and validated."""
    config = fv.config
    set_on_command_line = frozenset(config_flags.get_override_values(fv["config"]))
    if "model.kind" in set_on_command_line:
        raise UsageError(
            f"--config.model.kind={config.model.kind!r} clashes with the variant names, which set the model kind; "
            f"choose models with --only (e.g. --only {config.model.kind}), not --config.model.kind."
        )
    variants = fv.only or list(config.models)
    seeds = tuple(config.get("seeds", None) or (config.seed,))
    if len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise UsageError(f"--config.seeds={seeds}: give distinct integer seeds, e.g. --config.seeds='(0, 1, 2)'.")
    if "seed" in set_on_command_line and config.get("seeds", None) and "seeds" not in set_on_command_line:
        raise UsageError(
            f"--config.seed={config.seed} would be ignored: this config trains the seeds {tuple(config.seeds)}; "
            f"pass --config.seeds='({config.seed},)' instead."
        )
    configs, runs = {}, {}
    try:
        for v in variants:
            resolved = base.from_config_dict(_variant_config(fv, v))
            runs[v] = [v if len(seeds) == 1 else f"{v}_seed{s}" for s in seeds]
            for name, seed in zip(runs[v], seeds, strict=True):
                configs[name] = dataclasses.replace(resolved, seed=seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Plan(config.data.dataset, Path(fv.workdir), configs, runs)


def parse(argv: list[str]) -> Plan:
    """The :class:`Plan` of a command line (``argv[0]`` is the program), on fresh flags."""
    fv = flags.FlagValues()
    parse_flags(fv, argv)
    return plan(fv)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def analysed_runs(the_plan: Plan) -> list[str]:
    """The runs the neurophysiology analysis measures: each variant's first seed, for the kinds
    the probe handles (:data:`PROBED_KINDS`; not the ResNets)."""
    return [runs[0] for runs in the_plan.variants.values() if the_plan.run_configs[runs[0]].model.kind in PROBED_KINDS]


def _refuse(message: str) -> None:
    """Exit 2 with one line on stderr (``--verbose``: the traceback of the error being handled first)."""
    if "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.verbose and sys.exc_info()[0]:
        import traceback

        traceback.print_exc()
    print(f"error: {rundir.one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(run.EXIT_REFUSED)


def _train_all(the_plan: Plan, on_config_change: str) -> bool:
    """Trains every run, seed by seed (each seed's models, then the next seed); ``False`` when a
    preemption stopped it."""
    order = [runs[i] for i in range(max(map(len, the_plan.variants.values()))) for runs in the_plan.variants.values()]
    for name in order:
        result = run.train_and_evaluate(
            the_plan.run_configs[name], the_plan.workdir / name, on_config_change=on_config_change
        )
        if result.get("preempted"):
            print(f"preempted during {name}; rerun the same command to resume.", flush=True)
            return False
        print(f"{name}: validation accuracy {result['validation_accuracy']:.4f}", flush=True)
    return True


def main(argv):
    del argv
    fv = flags.FLAGS
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    programs.quiet_libraries(fv["verbose"].value if "verbose" in fv else False)
    import jax

    try:
        the_plan = plan(fv)
    except UsageError as e:
        _refuse(str(e))
    if fv.dry_run:
        for variant, run_config in the_plan.run_configs.items():
            print(json.dumps({"variant": variant, "workdir": str(the_plan.workdir / variant), **to_dict(run_config)}))
        return
    programs.enable_compilation_cache()
    if fv.coordinator:
        jax.distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
    elif fv.distributed:
        jax.distributed.initialize()
    missing = [m for m in ("matplotlib", "scipy") if importlib.util.find_spec(m) is None]
    if missing and (fv.analyze or not fv.no_report):
        _refuse(
            f"the analysis and the report need {', '.join(missing)} (the 'analysis' extra): "
            'pip install "lateral_jax[analysis]", or pass --noanalyze --no_report to train only.'
        )
    variants = list(the_plan.variants)
    seeds = sorted({c.seed for c in the_plan.run_configs.values()})
    print(
        f"lateral_jax: {len(variants)} model(s) {', '.join(variants)} × seed(s) {', '.join(map(str, seeds))} "
        f"on {the_plan.dataset}; "
        f"{jax.device_count()} device(s) ({jax.devices()[0].platform}); workdir {the_plan.workdir}",
        flush=True,
    )
    try:
        finished = _train_all(the_plan, fv.on_config_change)
    except (
        run.RunFolderError,
        checkpoint.CheckpointMismatchError,
        checkpoint.DiskFullError,
        sources.DataError,
        FileNotFoundError,
    ) as e:
        _refuse(str(e))
    except (train.NonFiniteLossError, run.DivergenceError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(run.EXIT_DIVERGED)
    if not finished:
        sys.exit(run.EXIT_PREEMPTED)
    probed = analysed_runs(the_plan)
    if jax.process_index() == 0 and fv.analyze and len(probed) < len(variants):
        left_out = ", ".join(v for v, runs in the_plan.variants.items() if runs[0] not in probed)
        print(f"analysis: the neurophysiology probe measures the small CNNs only; left out {left_out}", flush=True)
    if jax.process_index() == 0 and fv.analyze and probed:
        from experiments import analyze

        analyze.main([str(the_plan.workdir / v) for v in probed] + ["--out", str(the_plan.workdir / "analysis")])
    if jax.process_index() == 0 and not fv.no_report:
        from experiments import report  # matplotlib: only when a report is written

        title = f"{the_plan.dataset}: {', '.join(variants)}"
        path = report.write_report(the_plan.workdir, the_plan.variants, title=title)
        print(f"report: {path}", flush=True)


def _parse_command_line(argv: list[str]) -> list[str]:
    try:
        return parse_flags(flags.FLAGS, argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(run.EXIT_REFUSED)


def cli() -> None:
    """The command line (``python -m experiments.main``): parses ``sys.argv`` and runs :func:`main`."""
    app.run(main, flags_parser=_parse_command_line)


if __name__ == "__main__":
    cli()
