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
