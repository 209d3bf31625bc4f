"""One error type for user mistakes: the CLI prints its message in one line and exits 2."""

from typing import Optional


class ZhtrainError(Exception):
    """A problem with the user's input. The message names the input and says what to do."""


def run_command(fn, argv=None) -> None:
    """Run a command's `main`, turning a ZhtrainError into one line on stderr and exit code 2."""
    import sys

    try:
        fn(argv)
    except ZhtrainError as err:
        message = str(err)
        # Raised in a DataLoader worker (--lazy_preprocess), it comes back re-raised by torch with the
        # worker's traceback in the message: the user's sentence is what follows the last error name.
        if "Original Traceback" in message and "ZhtrainError: " in message:
            message = message.rsplit("ZhtrainError: ", 1)[1]
        message = " ".join(message.strip().split("\n"))
        print(f"zhtrain: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def at_least(value: Optional[int], minimum: int, flag: str) -> None:
    """A count flag (None: not given) below its minimum, as one line at parse time rather than a
    traceback after the model has loaded."""
    if value is not None and value < minimum:
        raise ZhtrainError(f"{flag} {value}: must be at least {minimum}")


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


def check_not_an_input(output, flag: str, inputs, under: Optional[str] = None) -> None:
    """Refuse, before any work, an output path that writing would replace one of the inputs with.

    `inputs`: (flag, path) pairs; None paths are skipped. An input is at risk when it *is* the
    output, or lies inside it: anywhere (`under=None`: merge's --overwrite replaces the whole
    folder) or in a top-level subfolder matching the glob `under` (a training run removes its
    old `checkpoint-*` folders)."""
    import fnmatch
    from pathlib import Path

    out = Path(output).resolve()
    for input_flag, source in inputs:
        if not source:
            continue
        src = Path(source).resolve()
        if src == out:
            raise ZhtrainError(
                f"{flag} {output} is also {input_flag}: writing there could overwrite it; choose another path"
            )
        if out in src.parents and (under is None or fnmatch.fnmatch(src.relative_to(out).parts[0], under)):
            raise ZhtrainError(
                f"{flag} {output} holds {input_flag} {source}, which writing there could delete; choose another path "
                "(or move the input out first)"
            )


def check_output_file(path, flag: str, inputs) -> None:
    """A file a command writes at the end (predictions, encoded samples), checked before any work:
    not one of the `inputs` ((flag, path) pairs), not a folder, in a writable place."""
    from pathlib import Path

    check_not_an_input(path, flag, inputs)
    if Path(path).is_dir():
        raise ZhtrainError(f"{flag} {path} is a folder; pass a file path")
    check_writable(Path(path).parent, flag)


def check_distinct(values, flag: str) -> None:
    """The same path given twice in a comma-separated list (an adapter applied twice, a file trained twice)."""
    from pathlib import Path

    seen: dict = {}
    for value in values:
        key = Path(value).resolve()
        if key in seen:
            raise ZhtrainError(f"{flag}: {value} is given twice ({seen[key]} and {value}); list each once")
        seen[key] = value


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
