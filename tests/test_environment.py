"""The installed environment is the lock, the lock is the loose requirements, and CI cannot pass by skipping."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict:
    """name -> exact version of every ``name==version`` line of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
            assert m, f"{path.name}: {line!r} is not an exact pin"
            out[canonicalize_name(m[1])] = m[2]
    return out


def loose(path: Path) -> list:
    return [Requirement(x.split("#")[0].strip()) for x in path.read_text().splitlines() if x.split("#")[0].strip()]


def test_lock_satisfies_the_loose_requirements():
    """Every loose requirement (and the torch constraint) is in the lock at a version it allows: an edit of
    requirements*.txt without `make lock` fails here."""
    lock = pins(REPO / "requirements.lock")
    for name in ("requirements.txt", "requirements-data-prep.txt", "requirements-dev.txt", "constraints.txt"):
        for req in loose(REPO / name):
            key = canonicalize_name(req.name)
            assert key in lock, f"{name}: {req} is not in requirements.lock (run `make lock`)"
            assert req.specifier.contains(Version(lock[key]), prereleases=True), (
                f"{name}: {req} but requirements.lock pins {lock[key]} (run `make lock`)"
            )
    assert lock["torch"].endswith("+cpu") and not any(k.startswith("nvidia-") for k in lock), "the CPU lock has CUDA"
    pins(REPO / "requirements-nodeps.txt")  # exact pins too


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
    reason="not running in the project's .venv (made by `make setup` from the lock)",
)
def test_installed_packages_are_the_lock():
    expected = {**pins(REPO / "requirements.lock"), **pins(REPO / "requirements-nodeps.txt")}
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {k: (v, installed.get(k)) for k, v in expected.items() if installed.get(k) != v}
    assert not wrong, f"installed versions differ from the lock (pinned, installed): {wrong}; run `make clean setup`"
    extra = set(installed) - set(expected) - {"albef"}
    assert not extra, f"packages in .venv that the lock does not name: {sorted(extra)}"


def test_ci_fails_where_a_user_skips(tmp_path):
    """Without ../shared/parity a user's run skips the parity tests and says why; under CI=true that is a failure."""
    test = "tests/test_parity.py::test_momentum_update_is_the_official_float32_formula"
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["ALBEF_PARITY_DIR"] = str(tmp_path / "absent")
    cmd = [sys.executable, "-m", "pytest", test, "-q", "-rs", "-p", "no:cacheprovider"]
    user = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert user.returncode == 0 and "1 skipped" in user.stdout, user.stdout[-2000:]
    assert f"official parity file {tmp_path / 'absent'}" in user.stdout  # -rs prints the reason
    ci = subprocess.run(cmd, cwd=REPO, env=dict(env, CI="true"), capture_output=True, text=True, timeout=300)
    assert ci.returncode == 1 and re.search(r"\b1 (failed|error)\b", ci.stdout), ci.stdout[-2000:]  # fixture: error
    assert "skipped under CI=true" in ci.stdout and str(tmp_path / "absent") in ci.stdout


def test_data_prep_does_not_import_torch_and_the_torchvision_fix_still_applies():
    """``import albef`` arms the torchvision fix instead of importing torch: data_prep (which uses albef.fsutil)
    paid 2.8 s of torch/torchvision import per process. timm, which imports torchvision, must still work (on
    machines where pip paired CPU torch with a CUDA torchvision, only the fix makes that import succeed)."""
    code = (
        "import sys, data_prep.download, data_prep.crawl\n"
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'torch imported'\n"
        "import timm, torchvision.transforms\n"
        "import torchvision\n"
        "assert torchvision.__spec__.name == 'torchvision' and torchvision.__spec__.origin.endswith('__init__.py')\n"
        "from albef.models import build_model\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
