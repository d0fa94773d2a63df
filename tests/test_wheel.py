"""A normal (non-editable) install works outside the checkout: bundled presets and prompts are package data."""

import json
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".venv",
                              "results", "notebooks", "tests")


def test_bench_suite_runs_from_an_installed_wheel(tmp_path):
    src = tmp_path / "src"  # build from a copy, so the checkout gets no build/ or egg-info
    shutil.copytree(REPO, src, ignore=SKIP)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("pass_jax-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    # Dependencies (and pip) come from this interpreter's site-packages, whether it is a system Python or
    # a venv (--system-site-packages would link a venv's *base* interpreter instead): a .pth line puts
    # them after the new venv's own site-packages. Nothing is downloaded, and the checkout's editable
    # install stays out (.pth files in a directory named by a .pth line are not run).
    own = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                         capture_output=True, text=True).stdout.strip()
    Path(own, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([py, "-c", "import infer; print(infer.__file__)"], cwd=work, check=True,
                           capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), where  # the wheel, not the checkout's editable install
    res = subprocess.run([py, "-m", "infer", "bench", "--suite", "passes", "--models", "tiny", "--repeats", "1",
                          "--out", "passes.json"], cwd=work, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    from pass_jax.backends.cpu import ffi

    if ffi._unavailable_reason() is None:  # the kernel's C++ source ships in the wheel
        assert "CPU kernels not used" not in res.stderr, res.stderr
    rows = json.loads((work / "passes.json").read_text())["rows"]
    assert [r["tokens"] for r in rows] == [1, 2, 4, 6, 8, 12, 16] and rows[0]["model"] == "llama-tiny"
