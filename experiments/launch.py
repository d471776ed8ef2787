"""Launch ``experiments.main`` on every worker of a TPU VM pod slice, or as a SLURM job on a GPU cluster.

  python -m experiments.launch tpu --name my-v5e-64 --zone us-west4-a -- \\
      --config experiments/configs/imagenet.py --workdir gs-fuse/runs/imagenet --config.data.archive=/data/ILSVRC2012
  python -m experiments.launch slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 -- \\
      --config experiments/configs/imagenet.py:resnet50 --workdir /shared/runs/imagenet50

Everything after ``--`` is the command line of ``python -m experiments.main``; the launcher adds
``--distributed``, so ``jax.distributed.initialize()`` finds the coordinator, the process count and
this process's index from the environment (the TPU VM metadata, or SLURM's variables).

* ``tpu`` prints the ``gcloud compute tpus tpu-vm ssh --worker=all`` commands that install the
  checkout on every worker and start the run on all of them at once (``--run`` executes them).
* ``slurm`` writes an ``sbatch`` script (one task per GPU; ``--signal=TERM@300`` so the job saves a
  checkpoint before its time limit; exit status 75 — preempted — requeues the job, which resumes
  from the checkpoint) and prints the ``sbatch`` command (``--run`` submits it).

The workdir must be one folder that every host sees (NFS, Lustre, a GCS FUSE mount): checkpoints
are written by all processes together and metrics, reports and ``final.json`` by process 0 only.
docs/scaling.md gives the full recipe.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = "https://github.com/lateral-jax/lateral_jax"


def main_command(main_args: list[str], python: str = ".venv/bin/python") -> str:
    """``python -m experiments.main --distributed <args>``, quoted for a shell."""
    args = [a for a in main_args if a != "--distributed"]
    return shlex.join([python, "-m", "experiments.main", "--distributed", *args])


def tpu_commands(
    name: str, zone: str, main_args: list[str], *, project: str | None, extra: str, checkout: str
) -> list[str]:
    """The two ``gcloud`` commands: install on every worker, then run on every worker."""
    where = ["--zone", zone, *(["--project", project] if project else [])]
    install = (
        f"test -d {checkout} || git clone {REPO} {checkout}; cd {checkout} && git pull --ff-only && "
        f"python3 -m venv .venv && .venv/bin/pip install -q -e '.[{extra}]'"
    )
    start = f"cd {checkout} && {main_command(main_args)}"
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *where, "--worker=all"]
    return [shlex.join([*ssh, f"--command={install}"]), shlex.join([*ssh, f"--command={start}"])]


def slurm_script(
    main_args: list[str],
    *,
    nodes: int,
    gpus_per_node: int,
    partition: str | None,
    time_limit: str,
    job_name: str,
    checkout: str,
) -> str:
    """An ``sbatch`` script: one task per GPU, SIGTERM 300 s before the limit, requeue on exit 75."""
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --signal=TERM@300",
        "#SBATCH --requeue",
        "#SBATCH --output=%x-%j.out",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        "set -u",
        f"cd {shlex.quote(checkout)}",
        "# one process per GPU; jax.distributed.initialize() reads SLURM_* for the coordinator and ranks",
        f"srun --kill-on-bad-exit=1 {main_command(main_args)}",
        "status=$?",
        "# 75: preempted or out of time after saving a checkpoint; the requeued job resumes from it",
        'if [ "$status" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        argv, main_args = argv[:cut], argv[cut + 1 :]
    else:
        main_args = []
    parser = argparse.ArgumentParser(prog="python -m experiments.launch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="target", required=True)
    tpu = sub.add_parser("tpu", help="every worker of a TPU VM pod slice")
    tpu.add_argument("--name", required=True, help="the TPU VM (pod slice) name")
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project", default=None)
    tpu.add_argument("--extra", default="tpu,train,data,analysis", help="pip extras to install on each worker")
    tpu.add_argument("--checkout", default="~/lateral_jax", help="where the repository lives on each worker")
    slurm = sub.add_parser("slurm", help="a SLURM job on a GPU cluster")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default="24:00:00", help="the job's time limit")
    slurm.add_argument("--job-name", default="lateral_jax")
    slurm.add_argument("--checkout", default=str(Path.cwd()), help="the repository on the shared file system")
    slurm.add_argument("--script", default="lateral_jax.sbatch", help="where to write the sbatch script")
    for p in (tpu, slurm):
        p.add_argument("--run", action="store_true", help="execute instead of printing")
    args = parser.parse_args(argv)
    if not main_args:
        parser.error(
            "give the experiments.main command line after '--' (e.g. -- --config experiments/configs/imagenet.py)"
        )
    return args, main_args


def main(argv: list[str] | None = None) -> int:
    args, main_args = parse(sys.argv[1:] if argv is None else argv)
    if args.target == "tpu":
        commands = tpu_commands(
            args.name, args.zone, main_args, project=args.project, extra=args.extra, checkout=args.checkout
        )
    else:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise SystemExit("error: --nodes and --gpus-per-node must be >= 1")
        script = slurm_script(
            main_args,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            partition=args.partition,
            time_limit=args.time,
            job_name=args.job_name,
            checkout=args.checkout,
        )
        Path(args.script).write_text(script)
        print(f"wrote {args.script}")
        commands = [shlex.join(["sbatch", args.script])]
    for command in commands:
        print(command, flush=True)
        if args.run:
            subprocess.run(command, shell=True, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
