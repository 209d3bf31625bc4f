"""Run many `zhtrain` command lines cheaply: import once, fork one child per command line.

Each child is its own process running the real entry point (`zhtrain.cli.main`, what
`python -m zhtrain` runs) with its own cwd, environment, stdin (/dev/null), stdout/stderr files
and exit status; only the interpreter start-up and the imports (seconds of CPU each) are shared.
The client is helpers.CliRunner. Tests that must see what a fresh `python -m zhtrain` prints at
start-up run one instead (the bad-input catalogue does so once per command).

Protocol: one JSON job per stdin line {"id", "argv", "cwd", "stdout", "stderr", "env"}; one JSON
line {"id", "rc"} on stdout per finished job, as soon as it finishes; at most
ZHTRAIN_FORKSERVER_POOL jobs run at once; stdin closed -> wait for the rest and exit.
"""

from __future__ import annotations

import json
import os
import select
import sys
import traceback

POOL = int(os.environ.get("ZHTRAIN_FORKSERVER_POOL", "4"))


def warm_imports() -> None:
    import importlib

    import peft  # noqa: F401
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401

    from zhtrain.cli import COMMANDS

    for module, _ in COMMANDS.values():
        importlib.import_module(module)
    transformers.utils.logging.get_logger("transformers")


def run_child(job: dict) -> None:
    """In the forked child: become `zhtrain <argv>` and exit with its status."""
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)  # the protocol pipe is the server's, not the command's
    os.close(nothing)
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["zhtrain", *job["argv"]]
    code = 0
    try:
        from zhtrain.cli import main

        main(job["argv"])
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)  # import-time chatter (e.g. DeepSpeed's accelerator note) must not reach the protocol
    warm_imports()
    protocol.write(json.dumps({"ready": True}) + "\n")
    stdin = sys.stdin.fileno()
    running: dict[int, str] = {}
    pending: list[dict] = []
    buffer, open_ = b"", True

    while open_ or pending or running:
        while running:  # report every finished child at once
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            protocol.write(json.dumps({"id": running.pop(pid), "rc": os.waitstatus_to_exitcode(status)}) + "\n")
        while pending and len(running) < POOL:
            job = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                run_child(job)
            running[pid] = job["id"]
        if open_:
            ready, _, _ = select.select([stdin], [], [], 0.02)
            if ready:
                chunk = os.read(stdin, 1 << 16)
                if not chunk:
                    open_ = False
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                pending += [json.loads(line) for line in lines if line.strip()]
        else:
            select.select([], [], [], 0.02)


if __name__ == "__main__":
    main()
