"""The kernels compile for every target architecture with nvcc alone (runs on CPU machines)."""

import shutil
import subprocess
import sys

import pytest

from moe_compile.plugins import build

pytestmark = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found (CUDA toolkit not installed)")


def test_builds_every_target_architecture():
    library = build.build()
    assert library.exists() and library.stat().st_size > 0
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:  # nvcc succeeded with a -gencode per arch; listing them is extra
        return
    listing = subprocess.run([cuobjdump, "--list-elf", str(library)], capture_output=True, text=True,
                             check=True).stdout
    for arch in build.DEFAULT_ARCHS:
        assert f"sm_{arch}" in listing, f"no sm_{arch} code in {library}"


def test_rebuild_is_skipped_when_sources_are_unchanged():
    first = build.build()
    mtime = first.stat().st_mtime_ns
    assert build.build().stat().st_mtime_ns == mtime


def test_builds_at_once_take_turns(tmp_path):
    # pytest-xdist workers load the library at the same time: one builds, the other waits for it.
    cmd = [sys.executable, "-m", "moe_compile.plugins.build", "--arch", "90", "--out", str(tmp_path), "-v"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outputs]
    library = tmp_path / build.LIBRARY_NAME
    assert [out.splitlines()[-1] for out, _ in outputs] == [str(library)] * 2
    assert sum("nvcc" in out for out, _ in outputs) == 1, "both processes compiled"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".lock", build.LIBRARY_NAME, "stamp"])
