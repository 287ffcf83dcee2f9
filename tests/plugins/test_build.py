"""The kernels compile for every target architecture with nvcc alone (runs on CPU machines)."""

import shutil
import subprocess

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
