"""scripts/demo.py is the README's promise to a new user: it must run to the
end, show the offer and the payments, and leave nothing running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_to_the_end():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "offer book holds alice's signed offer" in out
    assert "[streaming from alice]" in out and "job done: 48 tokens" in out
    assert "identical ledger on every node" in out and "1012.5" in out
    assert out.rstrip().endswith("All demo processes stopped.")
