"""SLURM job names that say what a job trains: `python -m vggbench.jobname [vggbench.train options]`.

vggbench.slurm names its submitit jobs with `job_name`; slurm/vgg38.sh, whose ``#SBATCH``
name is fixed before its options are known, renames its job at start with the name this
command prints (``scontrol update JobId=... JobName=...``).
"""

from __future__ import annotations

import sys

from vggbench.config import TrainConfig
from vggbench.train import build_parser


def job_name(cfg: TrainConfig) -> str:
    """E.g. "vggbench-vgg08-plain-lr0.01-seed3": model, variant, learning rate and seed."""
    return f"vggbench-{cfg.model}-{cfg.variant}-lr{cfg.lr:g}-seed{cfg.seed}"


def main(argv: list[str] | None = None) -> int:
    """Print the job name of the vggbench.train command line `argv` (argparse exits 2 on a bad option)."""
    print(job_name(TrainConfig(**vars(build_parser().parse_args(argv)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
