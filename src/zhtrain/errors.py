"""One error type for user mistakes: the CLI prints its message in one line and exits 2."""


class ZhtrainError(Exception):
    """A problem with the user's input. The message names the input and says what to do."""


def run_command(fn, argv=None) -> None:
    """Run a command's `main`, turning a ZhtrainError into one line on stderr and exit code 2."""
    import sys

    try:
        fn(argv)
    except ZhtrainError as err:
        message = " ".join(str(err).split("\n"))
        print(f"zhtrain: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_writable(path, flag: str) -> None:
    """Fail before any slow step when a folder cannot be created or written (path under a file,
    read-only filesystem, no permission) instead of after hours of work."""
    import os
    from pathlib import Path

    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ZhtrainError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ZhtrainError(f"{flag} {path}: {existing} is not writable; choose a folder you can write to")


def refused_pickle(where: str, err: Exception) -> ZhtrainError:
    """A legacy .bin is read only with torch.load(weights_only=True); one that needs code to unpickle
    is refused in one line (torch's own message suggests weights_only=False: never)."""
    import re

    wanted = re.search(r"GLOBAL (\S+)", str(err))
    what = f"unpickling it would call {wanted.group(1)}" if wanted else "it holds more than tensors"
    return ZhtrainError(
        f"{where} refused: {what} (zhtrain loads .bin files with torch.load(weights_only=True) only). "
        "Use safetensors weights from a source you trust"
    )
