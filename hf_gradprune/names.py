"""What a card, a report or a published command calls a model, a dataset or a file.

Everything `--push` uploads must name things a reader can resolve, and nothing of the file system of the machine the
defence ran on: a Hub id stays a Hub id, a local folder becomes `./<its name>` (or the Hub id the user says it lives
at), a file becomes its name and sha256. The CLI, the report, the card and the Space all name things through here.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import UserError

HUB_ID = re.compile(r"^[\w\-][\w.\-]*/[\w.\-]+$")  # org/name
_HUB_NAME = re.compile(r"^[\w\-][\w.\-]*(/[\w.\-]+)?$")  # org/name, or a legacy un-namespaced id ("mnist")


def model_name(source: str) -> str:
    """'org/resnet' and './models/resnet/' are both 'resnet': the name outputs and repos are called after."""
    return Path(source.rstrip("/")).name


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not Path(source).exists()


def local_name(path: str | Path) -> str:
    """`./<name>` of a folder or file: where it lives on this machine stays on this machine."""
    name = Path(os.path.abspath(os.path.expanduser(str(path)))).name
    return f"./{name or 'folder'}"


def public_name(source: str, hub_id: str | None = None) -> str:
    """A model or dataset as a reader can find it: the Hub id it lives at (given with --source-id / --data-id, or
    MODEL / --data itself), else `./<folder name>`."""
    if hub_id:
        return hub_id
    if _HUB_NAME.match(source) and not Path(source).expanduser().exists():
        return source
    return local_name(source)


def hub_id_of(source: str, given: str | None = None) -> str | None:
    """The Hub repo a model or dataset lives at, for the card's base_model / datasets: --source-id / --data-id, or
    MODEL / --data itself when it is a Hub id; None for a local folder nobody named."""
    return given or (source if is_hub_id(source) else None)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_name(path: str | Path) -> str:
    """A file by its name only, as the published command gives a trigger file."""
    return Path(path).name


def file_ref(path: str | Path) -> dict:
    """A trigger file as the report publishes it: its name and the sha256 that says which file it was (None for a
    file given to a trigger that does not read it and that is not there)."""
    return {"name": file_name(path), "sha256": sha256_of(path) if Path(path).is_file() else None}


def file_label(path: str | Path) -> str:
    ref = file_ref(path)
    return f"{ref['name']} (sha256 {ref['sha256']})"


def check_hub_id(flag: str, value: str | None, source: str, source_flag: str) -> None:
    """--source-id / --data-id become the card's metadata, so they must be Hub ids, and a Hub MODEL / --data is
    already named by its own id."""
    if value is None:
        return
    if not HUB_ID.match(value):
        raise UserError(f"{flag} {value}: not a Hub id; give the repo where {source_flag} lives on the Hub as "
                        f"org/name, or leave {flag} out to name the local folder by its name")
    if is_hub_id(source) and value != source:
        raise UserError(f"{flag} {value}: {source_flag} {source} is a Hub id already, and the card names it; "
                        f"leave {flag} out")
