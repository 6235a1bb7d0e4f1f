"""Train, continuing the run when its directory already holds epoch checkpoints.

`python -m vggbench.resume [vggbench.train options]` is `python -m vggbench.train` with
`--resume` added whenever the run directory (--out-dir, or the default one) holds epoch
checkpoints. Jobs that SLURM may requeue, preempt or restart run it (slurm/vgg38.sh under
srun; vggbench.slurm's submitit jobs call `resumable_argv`): the first start is a fresh
run, every later start continues from the newest checkpoint, losing no completed epoch.

In a distributed run every rank decides before it joins the process group, that is before
rank 0 can write anything, so all ranks decide alike (train checks that they agree).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from vggbench.checkpoint import epoch_checkpoints
from vggbench.config import TrainConfig, explicit_options
from vggbench.train import build_parser
from vggbench.train import main as train_main


def resumable_argv(train_argv: Sequence[str]) -> list[str]:
    """`train_argv`, plus `--resume` when its run directory holds epoch checkpoints and no --resume is given."""
    argv = list(train_argv)
    if "resume" in explicit_options(argv):
        return argv
    run_dir = TrainConfig(**vars(build_parser().parse_args(argv))).run_dir
    return [*argv, "--resume"] if epoch_checkpoints(run_dir / "checkpoints") else argv


def main(argv: list[str] | None = None) -> int:
    """Entry point: vggbench.train's, on the resumable command line."""
    return train_main(resumable_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
