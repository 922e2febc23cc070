"""The code passes the linter: `ruff check` with the rules in pyproject.toml ([tool.ruff]; ruff is pinned in the dev
extra, so a newer ruff's new rules do not fail CI unannounced)."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff is not installed: pip install -e '.[dev]' (scripts/install.sh does)"
    run = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, f"ruff check found problems (fix them, or `ruff check --fix`):\n{run.stdout[-4000:]}"


def test_ruff_catches_what_it_is_configured_to(tmp_path):
    """The configuration is live: an unused import in a file under the repository's rules is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    run = subprocess.run([shutil.which("ruff") or sys.executable, "check", "--no-cache", "--config",
                          str(ROOT / "pyproject.toml"), str(bad)], capture_output=True, text=True)
    assert run.returncode == 1 and "F401" in run.stdout
