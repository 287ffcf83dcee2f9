"""The kernels compile for every target architecture with nvcc alone (runs on CPU machines)."""

import os
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


# Stands in for nvcc in the test below: notes its arguments, then takes a second per call, long enough that two
# processes building without the lock would both run it, and writes its -o file. The kernels' real compile is
# test_builds_every_target_architecture's (sm_90 among them); this test is about the lock, so it costs ~10 s, not
# another nvcc build of every kernel.
FAKE_NVCC = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
while [ $# -gt 1 ]; do [ "$1" = -o ] && out=$2; shift; done
sleep 1
: > "$out"
"""


def test_builds_at_once_take_turns(tmp_path):
    # pytest-xdist workers load the library at the same time: one builds, the other waits for it.
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    (bin_dir / "nvcc").write_text(FAKE_NVCC)
    (bin_dir / "nvcc").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "moe_compile.plugins.build", "--arch", "90", "--out", str(out), "-v"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outputs]
    library = out / build.LIBRARY_NAME
    assert [out.splitlines()[-1] for out, _ in outputs] == [str(library)] * 2
    assert sum("nvcc" in out for out, _ in outputs) == 1, "both processes compiled"
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", build.LIBRARY_NAME, "stamp"])
    calls = (bin_dir / "calls").read_text().splitlines()  # each source once, then the link: by one process
    assert len(calls) == len(list(build.SOURCE_DIR.glob("*.cu"))) + 1, calls
    assert all("arch=compute_90,code=sm_90" in call for call in calls), calls


def test_a_diagnostic_macro_reaches_every_compile_and_the_stamp(tmp_path):
    """--define MOE_COMPILE_PHASES (bench/moe_phases.py's stamps) is passed to each source's compile, and a library
    built with it is not taken for the plain one (nor the other way round): the stamp holds the macros."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    (bin_dir / "nvcc").write_text(FAKE_NVCC.replace("sleep 1\n", ""))
    (bin_dir / "nvcc").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    calls = bin_dir / "calls"
    for define in (["--define", "MOE_COMPILE_PHASES"], [], ["--define", "MOE_COMPILE_PHASES"]):
        calls.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "moe_compile.plugins.build", "--arch", "90", "--out", str(out), *define],
                       check=True, capture_output=True, env=env)
        compiles = [c for c in calls.read_text().splitlines() if " -c " in c]
        assert len(compiles) == len(list(build.SOURCE_DIR.glob("*.cu"))), "the stamp was taken for another build's"
        assert all(("-DMOE_COMPILE_PHASES" in c) == bool(define) for c in compiles), compiles
