"""Run many `zhtrain` command lines cheaply: import once, fork one child per command line.

Each child is its own process running the real entry point (`zhtrain.cli.main`, what
`python -m zhtrain` runs) with its own cwd, environment, stdout/stderr files and exit status; only
the interpreter start-up and the imports (seconds of CPU each) are shared. Used by the bad-input
catalogue; a few of its cases still start `python -m zhtrain` from scratch, so anything printed at
start-up would be seen there.

Protocol: one JSON job per stdin line {"id", "argv", "cwd", "stdout", "stderr", "env"}; one JSON
line {"id", "rc"} on stdout per finished job; stdin closed -> wait for the rest and exit.
"""

from __future__ import annotations

import json
import os
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
    running: dict[int, str] = {}

    def reap_one() -> None:
        pid, status = os.wait()
        protocol.write(json.dumps({"id": running.pop(pid), "rc": os.waitstatus_to_exitcode(status)}) + "\n")

    for line in sys.stdin:
        job = json.loads(line)
        while len(running) >= POOL:
            reap_one()
        pid = os.fork()
        if pid == 0:
            run_child(job)
        running[pid] = job["id"]
    while running:
        reap_one()


if __name__ == "__main__":
    main()
