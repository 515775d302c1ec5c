"""Multi-process start-up: `jax.distributed.initialize` from flags, or from the environment of the cluster.

Order of precedence:
  1. `--coordinator_address HOST:PORT --num_processes N --process_id I` (all three, or none);
  2. SLURM (`SLURM_JOB_ID` with more than one task), Cloud TPU VMs (`TPU_WORKER_HOSTNAMES`/`TPU_WORKER_ID` with more
     than one worker), and Kubernetes/`torchrun`-style launchers (`JAX_COORDINATOR_ADDRESS` or `MASTER_ADDR`, with
     `WORLD_SIZE` and `RANK`/`JOB_COMPLETION_INDEX`) are detected; for the first two JAX's own cluster detection
     fills in the details, for the last the values are read here;
  3. otherwise a single process (nothing to initialise).

On CPU the processes talk through gloo collectives, which is how the tests run 2 processes on one machine.

A process that dies (host lost, OOM-killed, `kill -9`) must not leave the others waiting in a collective for
hours: jax's coordination service (run by process 0) marks a process dead when its heartbeats stop for
`--heartbeat_timeout_s` and makes every other process abort, its log naming the lost one ("Task 1 heartbeat
timeout", "tasks are unhealthy (stopped sending heartbeats): 1"); when process 0 itself dies the others lose the
service and abort the same way. The job then exits non-zero and the launcher's restart path (SLURM --requeue, the
JobSet's failure policy, launch/local.sh's retries) resumes it from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

log = logging.getLogger(__name__)

DEFAULT_PORT = 1234
HEARTBEAT_TIMEOUT_S = 100  # jax's default: a lost process is noticed within about this time
SHUTDOWN_TIMEOUT_S = 120  # how long a finishing process waits at exit for the others to finish too


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S


def add_flags(parser) -> None:
    """Adds the three multi-process flags to an argparse parser."""
    parser.add_argument("--coordinator_address", default=None,
                        help="HOST:PORT of process 0's coordinator (multi-process runs)")
    parser.add_argument("--num_processes", type=int, default=None, help="number of processes in the job")
    parser.add_argument("--process_id", type=int, default=None, help="this process's index, 0..num_processes-1")
    parser.add_argument("--heartbeat_timeout_s", type=int, default=HEARTBEAT_TIMEOUT_S,
                        help="seconds without heartbeats after which a process counts as dead and all the others "
                             "exit non-zero (default %(default)s)")
    parser.add_argument("--shutdown_timeout_s", type=int, default=SHUTDOWN_TIMEOUT_S,
                        help="seconds a finished process waits at exit for the others (default %(default)s)")


def args_from(namespace) -> DistributedArgs:
    """The `DistributedArgs` of a parser that `add_flags` extended."""
    return DistributedArgs(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(DistributedArgs)})


def detect(args: DistributedArgs, env: dict[str, str] | None = None) -> tuple[str, dict] | None:
    """(launcher name, kwargs for `jax.distributed.initialize`) or None for a single-process run."""
    env = dict(os.environ if env is None else env)
    given = [args.coordinator_address, args.num_processes, args.process_id]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together; got "
                             f"coordinator_address={args.coordinator_address!r}, num_processes={args.num_processes!r}, "
                             f"process_id={args.process_id!r}")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process_id={args.process_id}: must be in [0, --num_processes={args.num_processes})")
        return "flags", dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                             process_id=args.process_id)
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm", {}  # jax's SlurmCluster reads SLURM_* itself
    if "TPU_WORKER_HOSTNAMES" in env and len(env["TPU_WORKER_HOSTNAMES"].split(",")) > 1:
        return "tpu", {}  # jax's GceTpuCluster / TPU metadata
    coordinator = env.get("JAX_COORDINATOR_ADDRESS") or env.get("MASTER_ADDR")
    world = env.get("WORLD_SIZE") or env.get("JAX_NUM_PROCESSES")
    rank = env.get("RANK") or env.get("JOB_COMPLETION_INDEX") or env.get("JAX_PROCESS_ID")
    if coordinator and world and int(world) > 1:
        if rank is None:
            raise ValueError(f"{world} processes (WORLD_SIZE) at coordinator {coordinator} but no RANK / "
                             "JOB_COMPLETION_INDEX in the environment: set one per pod")
        if ":" not in coordinator:
            coordinator = f"{coordinator}:{env.get('JAX_COORDINATOR_PORT') or env.get('MASTER_PORT') or DEFAULT_PORT}"
        return "kubernetes", dict(coordinator_address=coordinator, num_processes=int(world), process_id=int(rank))
    return None


def initialize(args: DistributedArgs) -> None:
    """Initialises `jax.distributed` when the flags or the environment say this is a multi-process job."""
    found = detect(args)
    if found is None:
        return
    launcher, kwargs = found
    for name in ("heartbeat_timeout_s", "shutdown_timeout_s"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)}: must be at least 1 second")
    if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=args.heartbeat_timeout_s,
                               shutdown_timeout_seconds=args.shutdown_timeout_s)
    log.info("jax.distributed initialised (%s): process %d of %d, %d local / %d global devices", launcher,
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def every_process_flag(flag: bool) -> list[bool]:
    """`flag` as set on each process, in process order (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return [bool(flag)]
    import numpy as np
    from jax.experimental import multihost_utils
    return [bool(f) for f in np.ravel(multihost_utils.process_allgather(np.asarray(flag)))]
