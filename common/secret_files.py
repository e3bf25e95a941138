"""Owner-only files for secrets (keys, certificates, wrapped contexts), written safely.

Shared by the encryption key setup and the TLS/authentication material: both must
never leave a half-written key, never replace one by accident, and never let the
umask widen a folder's permissions. Callers pass their own error type so each command
keeps its one-line messages.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def ensure_dir(path: Path, error: type[Exception]) -> None:
    """Create ``path`` and its missing parents owner-only (mkdir's mode obeys the umask)."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise error(f"{probe} exists and is not a folder; choose another output folder")
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise error(f"cannot create folder {folder}: {exc.strerror or exc}") from None
        os.chmod(folder, DIR_MODE)


def write_private(
    path: Path, data: bytes, *, force: bool, error: type[Exception], hint: str
) -> None:
    """Write ``data`` as a 0o600 file via a temporary file in the same folder.

    Without ``force`` the final step is a hard link, which fails if the name exists, so
    two runs racing each other cannot replace a key either. ``hint`` ends the message
    given when the file exists.
    """
    ensure_dir(path.parent, error)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise error(f"{path} already exists; refusing to overwrite {hint}") from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise error(f"{path} already exists; refusing to overwrite") from None
                os.replace(tmp, path)
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
