"""`zhtrain launch`: torchrun, with the checks torchrun leaves out. The engine is torchrun's own.

    zhtrain launch --nnodes 2 --node_rank 1 --master_addr A --master_port P --nproc_per_node 8 \\
        pretrain --deepspeed ds_zero2_no_offload.json ...

runs exactly `torchrun <the same launcher flags> -m zhtrain.pretrain <the same command flags>`
(any zhtrain command works: `sft`, ...), plus:

- before any process starts, the rendezvous is checked. Plain torchrun, given a wrong
  --master_addr or --master_port, retries for 10-15 minutes (measured: the agent's TCPStore
  client, "timeout=900000ms") before a C++ stack trace. Here it is one sentence, in seconds on
  node 0 and after --rdzv_conf timeout=S (default 60) on the other nodes;
- each process gets cores / --nproc_per_node threads unless OMP_NUM_THREADS is set (torchrun
  gives every process 1 thread when it starts more than one);
- a failed run ends with one line naming the first rank that failed and how.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from datetime import timedelta

from zhtrain.cli import COMMANDS
from zhtrain.errors import ZhtrainError, run_command

DEFAULT_WAIT_S = 60


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """[launcher flags] <command> [command flags] -> (launcher flags, module, command flags)."""

    for i, token in enumerate(argv):
        if token in COMMANDS:  # no torchrun flag takes a zhtrain command name as its value
            return argv[:i], COMMANDS[token][0], argv[i + 1 :]
    raise ZhtrainError(
        f"zhtrain launch: no command given; usage: zhtrain launch [torchrun flags] <{'|'.join(COMMANDS)}> [its flags]"
    )


def rendezvous_wait(rdzv_conf: str) -> float:
    for item in (rdzv_conf or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "timeout" and value.strip():
            return float(value)
    return DEFAULT_WAIT_S


def check_rendezvous(args) -> None:
    """One sentence for a master address/port that cannot work, before any process starts."""
    if args.standalone or args.rdzv_backend != "static" or args.master_port is None:
        return  # single node with a free port picked by torchrun, or a dynamic rendezvous
    addr, port, node_rank = args.master_addr, int(args.master_port), int(args.node_rank)
    flags = f"--master_addr {addr} --master_port {port}"
    try:
        socket.getaddrinfo(addr, port)
    except socket.gaierror as err:
        raise ZhtrainError(
            f"{flags}: cannot resolve {addr!r} ({err.strerror}); pass node 0's address, the same on every node"
        ) from None
    if node_rank == 0:
        _check_can_host(addr, port, flags)
    else:
        _wait_for_node0(addr, port, flags, rendezvous_wait(args.rdzv_conf))


def _check_can_host(addr: str, port: int, flags: str) -> None:
    """Node 0 hosts the rendezvous: the address must be this machine's and the port free."""
    family = socket.getaddrinfo(addr, port)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((addr, 0))
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                raise ZhtrainError(
                    f"{flags}: {addr} is not an address of this machine, but --node_rank 0 hosts the rendezvous there; "
                    "pass this machine's address as the other nodes reach it"
                ) from None
            raise
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore does
        try:
            probe.bind(("", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ZhtrainError(
                    f"{flags}: port {port} is already in use on this machine; pick a free --master_port (the same on "
                    "every node)"
                ) from None
            raise


def _wait_for_node0(addr: str, port: int, flags: str, wait_s: float) -> None:
    """Other nodes: node 0's rendezvous store must answer (a TCPStore client, which also rejects
    something else listening on that port) within the wait."""
    from torch.distributed import TCPStore

    try:
        TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=wait_s), wait_for_workers=False)
    except Exception as err:  # DistNetworkError / DistStoreError / RuntimeError, by torch version
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ZhtrainError(
            f"{flags}: node 0's rendezvous did not answer within {wait_s:.0f}s ({first[:160]}); pass node 0's "
            "reachable address and its --master_port, the same on every node, and start node 0 too "
            "(--rdzv_conf timeout=S waits longer)"
        ) from None


def set_threads(args) -> None:
    if "OMP_NUM_THREADS" in os.environ:
        return
    from torch.distributed.run import determine_local_world_size

    per_node = determine_local_world_size(args.nproc_per_node)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // max(per_node, 1)))


def describe_failure(err) -> str:
    rank, failure = err.get_first_failure()
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    others = len(err.failures) - 1
    return (
        f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {how}; "
        + (f"{others} other rank(s) failed after it; " if others > 0 else "")
        + "the other processes on this node were stopped. Its log above says why"
    )


def main(argv=None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    launcher, module, command = split_argv(list(argv or []))
    args = parse_args([*launcher, "-m", module, *command])
    check_rendezvous(args)
    set_threads(args)
    try:
        run(args)
    except ChildFailedError as err:
        print(f"zhtrain: error: {describe_failure(err)}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
