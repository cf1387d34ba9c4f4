"""The README's first command, on a reduced configuration: the real main job, end to end."""

import subprocess
import sys

import pytest

from ops.config import PROJECT_ROOT

pytestmark = pytest.mark.smoke


def test_main_job_runs_end_to_end_and_shuts_down(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "--state-dir", str(tmp_path), "demo", "--limit", "3000"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "events applied: 3,000" in out
    assert "dead-lettered: 3" in out
    assert "training log: 3,000 events" in out
    assert "broker: stopped" in out
    assert "Traceback" not in out
    # Nothing left running: the broker recorded for this state dir is gone.
    assert not (tmp_path / "demo" / "stack.json").exists()
