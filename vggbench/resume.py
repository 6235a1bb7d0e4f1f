"""Resuming a run: which checkpoint and configuration a run continues from, and when to resume.

`resume_state` decides, before any data or model is built, whether a run starts afresh
(refused over another run's checkpoints or results) or continues from an epoch checkpoint
of its own run directory with its saved configuration.

`python -m vggbench.resume [vggbench.train options]` is `python -m vggbench.train` with
`--resume` added whenever the run directory (--out-dir, or the default one) holds epoch
checkpoints. Jobs that SLURM may requeue, preempt or restart run it (slurm/vgg38.sh under
srun; vggbench.slurm's submitit jobs call `resumable_argv`): the first start is a fresh
run, every later start continues from the newest checkpoint, losing no completed epoch.

In a distributed run every rank decides before it joins the process group, that is before
rank 0 can write anything, so all ranks decide alike (train checks that they agree).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vggbench.checkpoint import CheckpointError, epoch_checkpoints, load_checkpoint
from vggbench.config import (
    CHOSEN_AT_START,
    RUNTIME_OPTIONS,
    ConfigError,
    TrainConfig,
    add_config_arguments,
    explicit_options,
    option_argv,
)
from vggbench.run_dir import RunDir


def resume_state(cfg: TrainConfig, explicit: set[str] | None, world_size: int = 1) -> tuple[TrainConfig, dict | None]:
    """The config and checkpoint to continue from (or `cfg`, None for a fresh run).

    The run directory must be writable. A fresh run needs a directory without another
    run's checkpoints or results. A resumed run continues from a checkpoint of its own run
    directory and keeps its saved configuration: options that change what is trained may
    not be given with a different value (`explicit`: the options the user typed; None
    checks them all), and it continues with the number of ranks it was trained with
    (`world_size`; the global batch depends on it). Runtime options (device, workers, data
    dir, ...) not typed are taken from the checkpoint.
    """
    run_dir = RunDir(cfg.run_dir)
    run_dir.check_writable()
    if not cfg.resume:
        run_dir.check_fresh()
        return cfg, None
    path = run_dir.resume_checkpoint(cfg.resume)
    state = load_checkpoint(path)
    # options added since the checkpoint was written have their default there
    saved, given = {**TrainConfig().identity(), **state["config"]}, cfg.identity()
    unknown = set(saved) - set(given)
    if unknown:
        raise CheckpointError(f"checkpoint {path} has config keys this vggbench does not know: {sorted(unknown)}")
    checked = given.keys() if explicit is None else explicit - set(RUNTIME_OPTIONS)
    changed = [f"{' '.join(option_argv(k, given[k]))} (run has {' '.join(option_argv(k, saved[k]))})" for k in checked
               if saved.get(k) != given[k] and not (k in CHOSEN_AT_START and given[k] is None)]
    if changed:
        raise ConfigError(f"cannot change a run's configuration on --resume: {'; '.join(changed)}. "
                          "Start a new run in another --out-dir instead")
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        raise ConfigError(f"{path} was trained by {saved_world} rank(s) (global batch {saved_world} x "
                          f"{saved['batch_size']}); this run has {world_size}. Resume with {saved_world} rank(s) "
                          f"(python -m vggbench.launch --nproc/--gpus {saved_world} ... --resume), or start a new run "
                          "in another --out-dir")
    typed = set(RUNTIME_OPTIONS) if explicit is None else explicit | {"out_dir", "resume"}
    runtime = {k: v if k in typed else state["runtime"].get(k, v) for k, v in cfg.runtime().items()}
    return TrainConfig(**{**given, **saved, **runtime}), state


def resumable_argv(train_argv: Sequence[str]) -> list[str]:
    """`train_argv`, plus `--resume` when its run directory holds epoch checkpoints and no --resume is given."""
    argv = list(train_argv)
    if "resume" in explicit_options(argv):
        return argv
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser)
    run_dir = TrainConfig(**vars(parser.parse_args(argv))).run_dir
    return [*argv, "--resume"] if epoch_checkpoints(run_dir / "checkpoints") else argv


def main(argv: list[str] | None = None) -> int:
    """Entry point: vggbench.train's, on the resumable command line."""
    from vggbench.train import (
        main as train_main,  # train imports this module: import it once both exist
    )

    return train_main(resumable_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
