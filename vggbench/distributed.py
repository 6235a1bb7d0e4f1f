"""Where this process sits in a distributed run, and its process group.

`DistEnv.from_environ()` reads the environment a launcher leaves, first match wins:

- torchrun, `python -m vggbench.launch`, submitit's `TorchDistributedEnvironment().export()`
  or an sbatch script exporting them: RANK, WORLD_SIZE, LOCAL_RANK (default: RANK),
  MASTER_ADDR, MASTER_PORT.
- a SLURM job step, i.e. a task started by srun (submitit runs its tasks with srun, so a
  submitit job with tasks_per_node=2 lands here): SLURM_PROCID, SLURM_LOCALID, and the
  step's task count SLURM_STEP_NUM_TASKS (srun sets it for every task; SLURM_NTASKS
  describes the allocation and is > 1 also in a batch script that runs one process
  without srun, which is therefore correctly a single process). MASTER_ADDR defaults to
  the first host of the step's node list (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST,
  else SLURM_NODELIST; compressed syntax such as `node[01-03,07],gpu5` is expanded here,
  no `scontrol` needed), MASTER_PORT to 15000 + SLURM_JOB_ID % 17000.
- neither: one process (world size 1), which trains exactly as it does without this module.

`process_group(env, device, timeout)` joins (and leaves) the process group: NCCL on CUDA,
gloo on the CPU. `rank_device` picks this rank's GPU (cuda:LOCAL_RANK). `main_rank_first(env)`
runs a block (preparing the data) on rank 0 before the others, with its own, longer timeout.
`free_ports(n)` and `port_in_use(port)` serve launchers that pick rank 0's port on this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from vggbench.config import ConfigError

# 15000..31999: below Linux's ephemeral ports (32768..60999), which any outgoing connection
# may hold on rank 0's host, making the rendezvous fail there and the other ranks wait
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 17000
# How long the other ranks wait for rank 0 to prepare the data: a download of CIFAR-100 (161 MB)
# may take far longer than any collective should (--dist-timeout).
DATA_TIMEOUT = timedelta(minutes=30)
_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def parse_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host list: "node[01-03,07],gpu5" -> node01 node02 node03 node07 gpu5.

    Brackets hold comma-separated numbers and ranges; a range keeps the zero padding of its
    start ("[08-10]" -> 08 09 10). Several bracket groups in one name give every
    combination ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2). Raises ValueError for malformed input.
    """
    names, depth, start = [], 0, 0
    for pos, char in enumerate(hostlist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"host list {hostlist!r}: unbalanced or nested brackets")
        if char == "," and depth == 0:
            names.append(hostlist[start:pos])
            start = pos + 1
    if depth:
        raise ValueError(f"host list {hostlist!r}: unbalanced brackets")
    hosts = []
    for name in names:
        if not name:
            raise ValueError(f"host list {hostlist!r}: empty host name")
        expansions = [""]
        for index, part in enumerate(re.split(r"\[([^\[\]]*)\]", name)):  # literal, [group], literal, ...
            if index % 2 == 0 and ("[" in part or "]" in part):
                raise ValueError(f"host list {hostlist!r}: unbalanced brackets in {name!r}")
            choices = _expand_range_group(part, hostlist) if index % 2 else [part]
            expansions = [prefix + choice for prefix in expansions for choice in choices]
        hosts.extend(expansions)
    return hosts


def _expand_range_group(group: str, hostlist: str) -> list[str]:
    """The numbers of one bracket group: "01-03,07" -> 01 02 03 07."""
    numbers = []
    for part in group.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"host list {hostlist!r}: [{group}] is not a list of numbers and ranges")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"host list {hostlist!r}: range {part} runs backwards")
        numbers.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return numbers


def slurm_master_port(job_id: int) -> int:
    """A port every task of a SLURM job derives alike (15000 + job id % 17000)."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct TCP ports free on every address of this machine right now (the OS picks them)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:  # all bound at once: the OS cannot hand out one port twice
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]


def port_in_use(port: int) -> bool:
    """Whether rank 0 could not listen on `port` here: another socket holds it (TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore does
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def _int_var(environ: Mapping[str, str], name: str, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer environment variable within bounds, or a ConfigError naming it."""
    text = environ.get(name, "")
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConfigError(f"environment variable {name}={value} must be {bounds}")
    return value


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: rank (global), local rank (on its node), world size, rendezvous.

    The default is a single process (rank 0 of 1).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @property
    def distributed(self) -> bool:
        """More than one process: DDP, sharded data, collectives."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints progress."""
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read the launcher's environment (see the module docstring); ConfigError when it is inconsistent."""
        environ = os.environ if environ is None else environ
        if "RANK" in environ or "WORLD_SIZE" in environ:
            return cls._from_torchrun(environ)
        if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
            return cls._from_slurm(environ)
        return cls()

    @classmethod
    def _from_torchrun(cls, environ: Mapping[str, str]) -> DistEnv:
        if ("RANK" in environ) != ("WORLD_SIZE" in environ):
            given, missing = ("RANK", "WORLD_SIZE") if "RANK" in environ else ("WORLD_SIZE", "RANK")
            raise ConfigError(f"{given} is set but {missing} is not: a distributed launch sets both "
                              f"(unset {given} for a single process)")
        world_size = _int_var(environ, "WORLD_SIZE", minimum=1)
        rank = _int_var(environ, "RANK", maximum=world_size - 1)
        local_rank = _int_var(environ, "LOCAL_RANK", maximum=rank) if "LOCAL_RANK" in environ else rank
        if world_size == 1:
            return cls()
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not environ.get(name):
                raise ConfigError(f"WORLD_SIZE={world_size} but {name} is not set: every rank needs the address "
                                  "and port of rank 0 (MASTER_ADDR, MASTER_PORT)")
        return cls(rank, local_rank, world_size, environ["MASTER_ADDR"],
                   _int_var(environ, "MASTER_PORT", minimum=1, maximum=65535))

    @classmethod
    def _from_slurm(cls, environ: Mapping[str, str]) -> DistEnv:
        world_size = _int_var(environ, "SLURM_STEP_NUM_TASKS", minimum=1)
        rank = _int_var(environ, "SLURM_PROCID", maximum=world_size - 1)
        if world_size == 1:
            return cls()
        if "SLURM_LOCALID" not in environ:
            raise ConfigError("SLURM_PROCID is set but SLURM_LOCALID is not: start the tasks with srun")
        local_rank = _int_var(environ, "SLURM_LOCALID", maximum=rank)
        master_addr = environ.get("MASTER_ADDR") or _first_slurm_host(environ)
        if environ.get("MASTER_PORT"):
            master_port = _int_var(environ, "MASTER_PORT", minimum=1, maximum=65535)
        elif environ.get("SLURM_JOB_ID"):
            master_port = slurm_master_port(_int_var(environ, "SLURM_JOB_ID"))
        else:
            raise ConfigError("a SLURM step without SLURM_JOB_ID: set MASTER_PORT for the rendezvous")
        return cls(rank, local_rank, world_size, master_addr, master_port)


def _first_slurm_host(environ: Mapping[str, str]) -> str:
    """The first host of the step's (else the job's) node list: where task 0 runs."""
    name = next((n for n in _NODELIST_VARS if environ.get(n)), None)
    if name is None:
        raise ConfigError(f"a SLURM step without a node list ({', '.join(_NODELIST_VARS)}): "
                          "set MASTER_ADDR to the host of task 0")
    try:
        return parse_hostlist(environ[name])[0]
    except ValueError as err:
        raise ConfigError(f"{name}: {err}; set MASTER_ADDR to the host of task 0") from None


def rank_device(device: torch.device, env: DistEnv) -> torch.device:
    """The device this rank trains on: cuda:LOCAL_RANK for CUDA runs, else `device` itself.

    Where the scheduler gives each task exactly one GPU (CUDA_VISIBLE_DEVICES holding one
    device, as srun --gpus-per-task and submitit's export() do), every rank uses cuda:0.
    """
    if not env.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"--device {device} names one GPU, but this run has {env.world_size} ranks: use "
                          "--device cuda (each rank then uses cuda:LOCAL_RANK)")
    count = torch.cuda.device_count()
    if env.local_rank < count:
        return torch.device("cuda", env.local_rank)
    if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return torch.device("cuda", 0)
    raise ConfigError(f"rank {env.rank} has local rank {env.local_rank}, but only {count} GPU(s) are visible on "
                      f"this node: start at most {count} process(es) per node (one per GPU)")


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device, timeout: timedelta) -> Iterator[None]:
    """Join the default process group for the block (nothing for a single process), then leave it.

    `timeout` bounds every collective: a rank waiting longer for the others fails instead
    of hanging (`vggbench.launch --nproc/--gpus` also stops the remaining ranks as soon as one fails).
    """
    if not env.distributed:
        yield
        return
    backend = backend_for(device)
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise ConfigError("this torch has no NCCL: distributed CUDA training is not possible; use --device cpu")
        torch.cuda.set_device(device)
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
    try:
        dist.init_process_group(backend, init_method=f"tcp://{host}:{env.master_port}", rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
    except (RuntimeError, ValueError) as err:  # DistNetworkError, DistStoreError (timeouts) are RuntimeErrors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"rank {env.rank} could not join the {backend} process group of {env.world_size} ranks at "
                          f"{env.master_addr}:{env.master_port} ({first_line}); check MASTER_ADDR/MASTER_PORT "
                          "(the port must be free on rank 0's host)") from None
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_rank_first(env: DistEnv, timeout: timedelta = DATA_TIMEOUT) -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks once it has finished there.

    The others wait up to `timeout` (not the process group's timeout) in a gloo group of
    their own, which also notices at once when rank 0 fails in the block (NCCL would not).
    Nothing happens around the block in a single process.
    """
    if not env.distributed:
        yield
        return
    # left to process_group's teardown, which destroys every group: destroying it here, while
    # the other rank may still be finishing the barrier, made ranks abort at exit now and then
    group = dist.new_group(backend="gloo", timeout=timeout)
    if not env.is_main:
        dist.barrier(group)
    yield
    if env.is_main:
        dist.barrier(group)
