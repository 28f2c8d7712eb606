"""tools/ensure_chromium.sh, make test's first step: present, it passes; missing and not root,
it stops at once with the one command to run. (Installing as root is not run here.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "ensure_chromium.sh"


def run(tmp_path: Path, chromium: str, uid: int) -> subprocess.CompletedProcess:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "id").write_text(f"#!/bin/sh\necho {uid}\n")  # who the script thinks runs it
    (fake / "id").chmod(0o755)
    path = f"{fake}:/usr/bin:/bin"
    return subprocess.run(["sh", str(SCRIPT)], env={"PATH": path, "CHROMIUM": chromium},
                          capture_output=True, text=True, timeout=60)


def test_present_chromium_passes(tmp_path):
    done = run(tmp_path, shutil.which("sh"), uid=1000)  # any executable stands in for it
    assert done.returncode == 0 and done.stderr == ""


def test_missing_chromium_without_root_stops_with_the_command(tmp_path):
    done = run(tmp_path, "no-such-chromium", uid=1000)
    assert done.returncode == 1
    assert "make test needs Debian's chromium" in done.stderr
    if shutil.which("apt-get"):
        assert "sudo sh -c 'apt-get update && apt-get install -y chromium'" in done.stderr
    else:
        assert "install Chromium" in done.stderr
