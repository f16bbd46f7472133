"""scripts/_venv.sh, the install step of scripts/demo, scripts/devnet and
scripts/test: the first install must show its progress (issue 9: it was
silent for minutes), keep pip's whole output in .venv/install.log, show its
end when pip fails, and install only once. A fake ``.venv/bin/python``
stands in for pip, so this runs in a moment and needs no network."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/bin/sh
# a stand-in for `python -m pip install ...`
case "$*" in
  *"--upgrade pip"*) echo "Requirement already satisfied: pip in ./lib (25.0)"; exit 0 ;;
esac
echo "Collecting trio>=0.30 (from p2pgpu==0.1.0)"
echo "  Downloading trio-0.30.0-py3-none-any.whl (499 kB)"
echo "Collecting sniffio (from trio>=0.30->p2pgpu==0.1.0)"
echo "Building wheels for collected packages: p2pgpu"
if [ -n "${FAKE_PIP_FAILS:-}" ]; then echo "ERROR: no matching distribution for sniffio"; exit 1; fi
echo "Installing collected packages: sniffio, trio, p2pgpu"
echo "Successfully installed p2pgpu-0.1.0 sniffio-1.3.1 trio-0.30.0"
"""


def project(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = root / ".venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return root


def ensure(root: Path, *args: str, fails: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAKE_PIP_FAILS": "1" if fails else ""}
    script = f'set -euo pipefail; . "{ROOT}/scripts/_venv.sh"; p2pgpu_ensure_venv "$0" "$@"'
    return subprocess.run(["bash", "-c", script, str(root), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_the_install_shows_each_package_and_keeps_pips_output(tmp_path):
    root = project(tmp_path)
    result = ensure(root)
    assert result.returncode == 0, result.stderr
    lines = [re.sub(r"^   \[\d+ s\] ", "   [N s] ", line) for line in result.stderr.splitlines()]
    assert lines[0].startswith("== installing p2pgpu")
    assert lines[1:-1] == [
        "   [N s] Collecting trio>=0.30",
        "   [N s] Collecting sniffio",
        "   [N s] Building wheels for collected packages: p2pgpu",
        "   [N s] Installing collected packages: sniffio, trio, p2pgpu",
        "   [N s] installed 3 packages",
    ]
    assert lines[-1].startswith("== installed in ")
    assert "Downloading" not in result.stderr and not result.stdout
    log = (root / ".venv" / "install.log").read_text()
    assert "Downloading trio" in log and "Requirement already satisfied: pip" in log
    assert (root / ".venv" / ".p2pgpu-installed").exists()
    # installed: the next run says nothing and installs nothing
    again = ensure(root)
    assert again.returncode == 0 and again.stderr == ""


def test_quiet_install_counts_instead_of_listing(tmp_path):
    root = project(tmp_path)
    result = ensure(root, "quiet")
    assert result.returncode == 0, result.stderr
    assert "Collecting" not in result.stderr
    assert "Building wheels for collected packages: p2pgpu" in result.stderr
    assert "installed 3 packages" in result.stderr


def test_a_failed_install_shows_the_end_of_pips_output_and_is_retried(tmp_path):
    root = project(tmp_path)
    result = ensure(root, fails=True)
    assert result.returncode != 0
    assert "== the install failed; the end of" in result.stderr
    assert "  Downloading trio" in result.stderr  # the tail of the log, not just the filtered lines
    assert "ERROR: no matching distribution for sniffio" in result.stderr
    assert not (root / ".venv" / ".p2pgpu-installed").exists()
    assert ensure(root).returncode == 0  # the next run tries again
    assert (root / ".venv" / ".p2pgpu-installed").exists()
