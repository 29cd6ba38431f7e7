"""Scene paths as GDAL sees them, inputs that must never be outputs, and leftovers of killed runs.

Scenes are kept as text, never ``pathlib.Path``: ``Path("https://host/a.tif")`` collapses the
``//`` and breaks the URL. Anything GDAL opens is a scene (local files, ``/vsicurl/``,
``/vsis3/``, ``/vsizip/``, ``vrt://``, ``.vrt`` files); whether it exists is GDAL's to judge,
except for plain local paths, where "does not exist" is the clearer message.

Partial outputs are hidden siblings named ``.NAME.partial-PID.SUFFIX`` (``.cog-PID`` while a COG
is copied) and scratch folders ``.rsseg-PID-XXXX``; a later run removes those whose process is
gone (see :func:`remove_stale_partials`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

# URL schemes GDAL reads through its virtual file systems (what `gdalinfo s3://...` accepts).
_SCHEMES = {
    "http": "/vsicurl/", "https": "/vsicurl/", "ftp": "/vsicurl/",
    "s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/", "azure": "/vsiaz/", "oss": "/vsioss/",
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def gdal_path(scene: str | os.PathLike[str]) -> str:
    """The path to hand GDAL: URLs mapped to their ``/vsi`` forms, everything else unchanged."""
    text = os.fspath(scene)
    m = _SCHEME.match(text)
    if m and m.group(1).lower() in _SCHEMES:
        scheme = m.group(1).lower()
        prefix = _SCHEMES[scheme]
        if prefix == "/vsicurl/":
            return prefix + text  # /vsicurl/ keeps the whole URL
        return prefix + text[m.end():]
    return text


def is_local_file(scene: str | os.PathLike[str]) -> bool:
    """True for a plain file-system path (not a URL, /vsi path, vrt:// or inline VRT XML)."""
    text = os.fspath(scene)
    return not (_SCHEME.match(text) or text.startswith("/vsi") or text.lstrip().startswith("<"))


def scene_name(scene: str | os.PathLike[str]) -> str:
    """The file name of a scene for messages and progress bars (URLs: the last path part)."""
    text = os.fspath(scene)
    if _SCHEME.match(text):
        text = urlsplit(text).path
    text = text.rstrip("/")
    return text.rsplit("/", 1)[-1] or text


def scene_stem(scene: str | os.PathLike[str]) -> str:
    """``scene_name`` without its last suffix (what ``{stem}`` in an output template becomes)."""
    name = scene_name(scene)
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: symlinks, relative paths and hard links resolved."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def clashing_input(output: Path, inputs: Iterable[Path]) -> Path | None:
    """The first of ``inputs`` that ``output`` would overwrite, or None."""
    for path in inputs:
        if same_file(output, path):
            return path
    return None


# ----------------------------------------------------------------------------- leftovers

_PARTIAL_FILE = re.compile(
    r"^\..+\.(?:partial|cog)-(?P<pid>\d+)\.[^.]+(?:\.aux\.xml|\.ovr|\.msk|-journal|-wal|-shm)?$"
)
_SCRATCH_DIR = re.compile(r"^\.rsseg-(?P<pid>\d+)-")


def scratch_prefix() -> str:
    """Prefix of this process's scratch folders (the pid lets a later run tell they are stale)."""
    return f".rsseg-{os.getpid()}-"


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete partial outputs and scratch folders in ``folder`` left by processes that are gone
    (killed runs); returns what was removed. Partials of live processes are left alone."""
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _PARTIAL_FILE.match(entry.name) or _SCRATCH_DIR.match(entry.name)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or process_alive(pid):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # another run got there first, or no permission: not ours to fight over
    return removed
