"""Start a distributed training: `python -m vggbench.launch --nproc 2 --device cpu [train options]`.

  --nproc N   N processes on this machine, on the CPU (gloo)
  --gpus N    one process per GPU on this machine (NCCL), cuda:0 .. cuda:N-1
  --slurm     submit to SLURM through submitit (vggbench.slurm; see the SLURM options)

Every other option goes unchanged to `python -m vggbench.train` (see its --help) and is
checked before any process starts. --batch-size is per process: N processes train on
global batches of N x --batch-size. Rank 0 writes the run directory and prints progress.

The job fails fast: when a rank exits with an error the others are stopped at once, the
failing rank's last lines of stderr are shown, and the launcher exits with its status.
Ctrl-C or SIGTERM stops every rank (each rank runs in its own process group, so its
DataLoader workers go too); ranks also end if the launcher is killed.
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import torch

from vggbench.config import ConfigError, TrainConfig, explicit_options
from vggbench.distributed import free_ports
from vggbench.graphs import check_capturable
from vggbench.train import build_parser as build_train_parser

PROG = "python -m vggbench.launch"
GRACE_S = 10.0  # how long stopping ranks may take before they are killed
TAIL_BYTES = 8192  # stderr kept per rank for the failure report
TAIL_LINES = 25
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class LaunchError(Exception):
    """A launch that cannot start; the message says what to change."""


def add_local_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a launch on this machine: --nproc or --gpus."""
    group = parser.add_argument_group("on this machine (one of)")
    group.add_argument("--nproc", type=int, metavar="N",
                       help="N CPU processes (gloo); implies --device cpu, which is forwarded to training")
    group.add_argument("--gpus", type=int, metavar="N",
                       help="one process per GPU, N GPUs (NCCL); implies --device cuda")


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a SLURM submission (used by vggbench.slurm.submit)."""
    group = parser.add_argument_group("on SLURM, through submitit (vggbench.slurm)")
    group.add_argument("--slurm", action="store_true", help="submit the training to SLURM (one task per GPU)")
    group.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    group.add_argument("--gpus-per-node", type=int, default=0, metavar="N",
                       help="GPUs (= tasks) per node; 0 runs CPU tasks (default: 0)")
    group.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    group.add_argument("--time", type=int, default=60, metavar="MINUTES", help="time limit per job (default: 60)")
    group.add_argument("--account", help="SLURM account to charge")
    group.add_argument("--sweep", metavar="FILE", help="submit a grid of trainings described in FILE as a job array")
    group.add_argument("--array-parallelism", type=int, metavar="N", help="most array jobs running at once")
    group.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                       help="slurm, or local: the same path without SLURM, in local processes (default: slurm)")
    group.add_argument("--ntasks-per-node", type=int, metavar="N",
                       help="CPU tasks (ranks) per node when --gpus-per-node is 0 (default: 1)")
    group.add_argument("--cpus-per-task", type=int, metavar="N", help="CPUs per task (default: the cluster's)")
    group.add_argument("--wait", action="store_true",
                       help="wait for the jobs to end, report each, exit non-zero if one failed")


def build_parser() -> argparse.ArgumentParser:
    """The launcher's own options; everything else is left for vggbench.train."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage=f"{PROG} (--nproc N | --gpus N | --slurm ...) [train options]")
    add_local_arguments(parser)
    add_slurm_arguments(parser)
    return parser


def check_train_options(train_argv: list[str]) -> TrainConfig:
    """Parse and validate the training options as vggbench.train will (argparse exits 2 on a bad one)."""
    parser = build_train_parser()
    parser.prog = f"{PROG} ... (a vggbench.train option)"
    return TrainConfig(**vars(parser.parse_args(train_argv))).validate()


def local_world(args: argparse.Namespace, cfg: TrainConfig, train_argv: list[str]) -> tuple[int, list[str]]:
    """Number of local processes and the training options they get (--device added when not given)."""
    given = explicit_options(train_argv)
    if args.nproc is not None:
        world, device = args.nproc, "cpu"
        if world < 1:
            raise LaunchError(f"--nproc must be >= 1, got {world}")
        if "device" in given and cfg.device != "cpu":
            raise LaunchError(f"--nproc starts CPU processes (gloo), but --device is {cfg.device}: "
                              "use --device cpu, or --gpus N for one process per GPU")
    else:
        world, device = args.gpus, "cuda"
        if world < 1:
            raise LaunchError(f"--gpus must be >= 1, got {world}")
        if "device" in given and cfg.device not in ("cuda", "auto"):
            raise LaunchError(f"--gpus runs one process per GPU, but --device is {cfg.device}: leave --device out "
                              "(or use --device cuda); for CPU processes use --nproc N --device cpu")
        visible = torch.cuda.device_count()
        if visible < world:
            where = f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" \
                if "CUDA_VISIBLE_DEVICES" in os.environ else ""
            raise LaunchError(f"--gpus {world}: CUDA is not available on this machine; use --nproc N --device cpu"
                              if visible == 0 else f"--gpus {world}: only {visible} GPU(s) are visible{where}")
    check_capturable(cfg, torch.device(device), world)  # here, not once per rank
    extra = [] if "device" in given else ["--device", device]
    if "progress" not in given and sys.stderr.isatty():
        extra.append("--progress")  # rank 0's stderr is a pipe to us, not the terminal tqdm looks for
    return world, [*train_argv, *extra]


def free_port() -> int:
    """A TCP port free on this machine right now (the OS picks it)."""
    return free_ports(1)[0]


def rank_environments(world: int, port: int) -> list[dict[str, str]]:
    """The environment of each local rank: torchrun's variables, and a fair share of the CPU threads."""
    threads = str(max(1, len(os.sched_getaffinity(0)) // world))
    return [{**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
             "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
            for rank in range(world)]


def _end_with_launcher() -> None:
    """In a child before exec: get SIGTERM when the launcher dies, even by SIGKILL (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RankProcess:
    """One rank: its process (leading its own process group), its stderr copied to ours, the tail kept."""

    def __init__(self, rank: int, argv: Sequence[str], env: dict[str, str], exits: queue.Queue) -> None:
        self.rank = rank
        self.proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=_end_with_launcher)  # noqa: PLW1509 (no thread of ours runs yet: see start_watching)
        self._tail = b""
        self._exits = exits
        self._threads = [threading.Thread(target=self._copy_stderr, daemon=True),
                         threading.Thread(target=self._wait, daemon=True)]

    def start_watching(self) -> None:
        """Start copying stderr and waiting for the exit (after every rank is spawned: no fork with threads)."""
        for thread in self._threads:
            thread.start()

    def _copy_stderr(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
            self._tail = (self._tail + chunk)[-TAIL_BYTES:]

    def _wait(self) -> None:
        self.proc.wait()
        self._exits.put(self)

    def signal(self, signum: int) -> None:
        """Send `signum` to the rank and everything it started (DataLoader workers)."""
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group has exited already

    def describe_exit(self) -> str:
        """How the rank ended: "exit code 1" or "killed by signal SIGKILL"."""
        code = self.proc.returncode
        return f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"

    def stderr_tail(self) -> str:
        """The last lines the rank wrote to stderr (once everything holding its stderr has ended)."""
        self._threads[0].join(timeout=5)
        lines = self._tail.decode(errors="replace").rstrip().splitlines()[-TAIL_LINES:]
        return "\n".join(f"  | {line}" for line in lines) or "  | (nothing)"


def exit_status(code: int) -> int:
    """A launcher exit status for a rank's return code: the same code, or 128 + signal."""
    return code if code > 0 else 128 - code


def run_ranks(argvs: Sequence[Sequence[str]], envs: Sequence[dict[str, str]]) -> int:
    """Run one process per rank (argvs[r] with envs[r]) until all succeed, one fails, or we are stopped.

    Returns 0 when every rank exits 0. When a rank fails, the others get SIGTERM at once
    (SIGKILL after GRACE_S), its stderr tail is reported, and its status is returned. On
    SIGINT/SIGTERM every rank gets the same signal (SIGKILL after GRACE_S, or at a second
    signal) and 128 + signal is returned. No rank or child of one is left running.
    """
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    exits: queue.Queue[RankProcess] = queue.Queue()
    ranks: list[RankProcess] = []
    try:
        ranks = [RankProcess(rank, argv, env, exits) for rank, (argv, env) in enumerate(zip(argvs, envs))]
        for rank in ranks:
            rank.start_watching()
        print(f"{PROG}: started rank pids {' '.join(str(r.proc.pid) for r in ranks)}", file=sys.stderr, flush=True)
        running = set(ranks)
        while running:
            if received:
                print(f"{PROG}: {signal.Signals(received[0]).name}: stopping every rank", file=sys.stderr, flush=True)
                _stop(running, exits, received, received[0])
                return 128 + received[0]
            try:
                ended = exits.get(timeout=0.1)
            except queue.Empty:
                continue
            running.discard(ended)
            if ended.proc.returncode != 0:
                ended.signal(signal.SIGKILL)  # whatever it started (DataLoader workers) ends with it
                _stop(running, exits, received, signal.SIGTERM)
                tail = ended.stderr_tail()
                print(f"{PROG}: rank {ended.rank} (pid {ended.proc.pid}) failed: {ended.describe_exit()}; "
                      f"stopped the other ranks. Its last lines of stderr:\n{tail}", file=sys.stderr, flush=True)
                return exit_status(ended.proc.returncode)
        return 0
    finally:
        for rank in ranks:
            rank.signal(signal.SIGKILL)  # leftovers of ranks that have ended
            rank.proc.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(running: set[RankProcess], exits: queue.Queue, received: list[int], signum: int) -> None:
    """Send `signum` to the running ranks; SIGKILL those still running after GRACE_S or a further signal."""
    for rank in running:
        rank.signal(signum)
    signals_so_far = len(received)
    deadline = time.monotonic() + GRACE_S
    while running and time.monotonic() < deadline and len(received) == signals_so_far:
        try:
            running.discard(exits.get(timeout=0.1))
        except queue.Empty:
            pass
    for rank in running:
        rank.signal(signal.SIGKILL)


def submit_to_slurm(args: argparse.Namespace, train_argv: list[str]) -> int:
    """--slurm: hand over to vggbench.slurm.submit(args, train_argv)."""
    if importlib.util.find_spec("vggbench.slurm") is None:
        raise LaunchError("--slurm needs vggbench.slurm (SLURM support through submitit), which this "
                          "installation lacks; run on this machine with --nproc N or --gpus N")
    from vggbench import slurm

    return slurm.submit(args, train_argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: check everything, then run the ranks here or submit them; bad input exits with status 2."""
    parser = build_parser()
    args, train_argv = parser.parse_known_args(argv)
    modes = [name for name, chosen in (("--nproc", args.nproc is not None), ("--gpus", args.gpus is not None),
                                       ("--slurm", args.slurm)) if chosen]
    if len(modes) != 1:
        parser.error("choose where the ranks run: --nproc N (CPU processes), --gpus N (one per GPU) or --slurm"
                     if not modes else f"{' and '.join(modes)} exclude each other; choose one")
    try:
        cfg = check_train_options(train_argv)
        if args.slurm:
            return submit_to_slurm(args, train_argv)
        world, rank_argv = local_world(args, cfg, train_argv)
    except (ConfigError, LaunchError) as err:
        parser.exit(2, f"{PROG}: error: {err}\n")
    port = free_port()
    print(f"{PROG}: {world} rank(s) on 127.0.0.1:{port}, global batch {world} x {cfg.batch_size} = "
          f"{world * cfg.batch_size}, run directory {cfg.run_dir}", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "vggbench.train", *rank_argv]
    return run_ranks([command] * world, rank_environments(world, port))


if __name__ == "__main__":
    sys.exit(main())
