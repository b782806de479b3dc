"""A venv with mergekit 0.1.5 beside the project's venv, for tests that use mergekit as an oracle.

mergekit is a test oracle, not a dependency: it lives in its own venv under the evomerge cache
(`$EVOMERGE_CACHE_DIR` or ~/.cache/evomerge), which sees the project's packages through a .pth
file, so installing it adds only mergekit and its two small extra dependencies (seconds, not a
second torch) and never changes the project's venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

MERGEKIT_VERSION = "0.1.5"


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE_DIR") or "~/.cache/evomerge").expanduser()


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def mergekit_venv(root: Path | None = None) -> Path:
    """The venv directory (created or reused); its bin/ holds `mergekit-yaml`."""
    venv = (root or cache_root()) / f"mergekit-{MERGEKIT_VERSION}-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], "creating the mergekit venv")
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     "locating the mergekit venv's site-packages").strip())
    ours = sysconfig.get_paths()["purelib"]
    (site / "_evomerge_project.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    check = [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"]
    if subprocess.run(check, capture_output=True, text=True).stdout.strip() != MERGEKIT_VERSION:
        _run([str(py), "-m", "pip", "install", "--quiet", f"mergekit=={MERGEKIT_VERSION}"],
             f"pip install mergekit=={MERGEKIT_VERSION}")
    return venv


def run_mergekit_yaml(venv: Path, config: Path, out: Path) -> None:
    """`mergekit-yaml CONFIG OUT` on CPU, copying the base model's tokenizer."""
    _run([str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--copy-tokenizer"], "mergekit-yaml")
