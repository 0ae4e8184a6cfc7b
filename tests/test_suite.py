"""The test suite's own rule for ../shared: a user's clone (no ../shared beside it) passes with the
real-text tests skipped, naming the missing folder; CI (CI=true) fails them instead of skipping."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_pytest(clone: Path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                          cwd=clone, env=base | env, capture_output=True, text=True, timeout=300)


def test_real_text_tests_skip_in_a_users_clone_and_fail_in_ci(tmp_path):
    clone = tmp_path / "clone"                   # tmp_path/shared does not exist
    (clone / "tests").mkdir(parents=True)
    for name in ("conftest.py", "s3_proxy.py"):         # conftest starts the tests' S3 fault proxy
        shutil.copy2(REPO / "tests" / name, clone / "tests" / name)
    (clone / "tests" / "test_real.py").write_text(
        "def test_real_text(wikitext_splits, shared_model):\n    raise AssertionError('never reached')\n")
    missing = tmp_path / "shared" / "data" / "wikitext-2-splits"
    r = run_pytest(clone)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout + r.stderr
    assert f"needs {missing} (the shared real text and model beside the checkout), which is absent" in r.stdout
    r = run_pytest(clone, CI="true")
    assert r.returncode == 1 and "1 error" in r.stdout, r.stdout + r.stderr
    assert f"needs {missing}" in r.stdout and "with CI=true it must be there" in r.stdout
