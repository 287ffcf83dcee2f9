"""Build the fused-MoE kernels into one shared library with nvcc (no torch, no TensorRT headers).

    python -m moe_compile.plugins.build [--arch 80,86,89,90] [--out DIR] [--jobs N] [--force] [--define NAME]

Writes ``libmoe_compile_kernels.so`` into ``moe_compile/plugins/_build/`` (or ``--out`` /
``$MOE_COMPILE_KERNELS_DIR``). Each ``.cu`` compiles to an object in parallel; a stamp of the
sources and flags skips rebuilds that would change nothing. CUDA's runtime is linked statically,
so the library needs only the driver where it runs. Processes that build at once (pytest-xdist
workers, parallel builds) take turns on a file lock, and the library appears by an atomic rename,
so no process links or loads a half-written file.

    python -m moe_compile.plugins.build --ort-include DIR

also builds ``libmoe_compile_ort.so``, the ONNX Runtime custom-op library (ort_csrc/: the kernels
as ``moe_compile:FusedMoE`` on the CUDA provider). It needs onnxruntime's C API header,
``onnxruntime_c_api.h``, which no pip package ships: DIR is the ``include/`` of an onnxruntime
release archive (any version from 1.18 on), or set ``$ONNXRUNTIME_INCLUDE_DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
ORT_SOURCE_DIR = Path(__file__).resolve().parent / "ort_csrc"
DEFAULT_ARCHS = ("80", "86", "89", "90")
LIBRARY_NAME = "libmoe_compile_kernels.so"
ORT_LIBRARY_NAME = "libmoe_compile_ort.so"
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-lineinfo")


class BuildError(RuntimeError):
    """nvcc is missing or failed; the message carries its output."""


def default_build_dir() -> Path:
    env = os.environ.get("MOE_COMPILE_KERNELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "_build"


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def ort_include_dir(explicit: Path | None = None) -> Path | None:
    """The folder holding onnxruntime_c_api.h: `explicit`, else $ONNXRUNTIME_INCLUDE_DIR; None if neither has it."""
    for candidate in (explicit, os.environ.get("ONNXRUNTIME_INCLUDE_DIR")):
        if candidate:
            folder = Path(candidate)
            for sub in (folder, folder / "onnxruntime", folder / "onnxruntime" / "core" / "session"):
                if (sub / "onnxruntime_c_api.h").is_file():
                    return sub
    return None


def _gencode_flags(archs: tuple[str, ...]) -> list[str]:
    # SASS for each listed arch, plus PTX of the newest so later GPUs can JIT it.
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def _stamp(nvcc: str, archs: tuple[str, ...], defines: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256(" ".join((nvcc, *archs, *NVCC_FLAGS, *defines)).encode())
    for path in sorted(SOURCE_DIR.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def build(out_dir: Path | None = None, archs: tuple[str, ...] = DEFAULT_ARCHS, jobs: int | None = None,
          force: bool = False, verbose: bool = False, defines: tuple[str, ...] = ()) -> Path:
    """Compile (if needed) and return the path of the shared library. defines: macros for a diagnostic build
    (MOE_COMPILE_PHASES: bench/moe_phases.py's stamps)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    out_dir = Path(out_dir) if out_dir else default_build_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    library, stamp_file = out_dir / LIBRARY_NAME, out_dir / "stamp"
    stamp = _stamp(nvcc, archs, defines)

    def up_to_date() -> bool:
        return library.exists() and stamp_file.exists() and stamp_file.read_text() == stamp

    if not force and up_to_date():
        return library
    with FileLock(out_dir / ".lock"):
        if not force and up_to_date():  # another process built it while we waited
            return library
        with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
            _compile_and_link(nvcc, archs, Path(scratch), jobs, verbose, defines)
            os.replace(Path(scratch) / LIBRARY_NAME, library)
        stamp_file.write_text(stamp)
    return library


def build_ort_op(include: Path | None = None, out_dir: Path | None = None, archs: tuple[str, ...] = DEFAULT_ARCHS,
                 force: bool = False, verbose: bool = False, defines: tuple[str, ...] = ()) -> Path:
    """Compile (if needed) the ONNX Runtime custom-op library beside the kernel library; return its path."""
    header_dir = ort_include_dir(include)
    if header_dir is None:
        raise BuildError("onnxruntime_c_api.h not found: pass --ort-include DIR or set ONNXRUNTIME_INCLUDE_DIR to the "
                         "include/ folder of an onnxruntime release archive")
    kernels = build(out_dir, archs, force=force, verbose=verbose, defines=defines)
    out_dir = kernels.parent
    library, stamp_file = out_dir / ORT_LIBRARY_NAME, out_dir / "stamp-ort"
    digest = hashlib.sha256((kernels.parent / "stamp").read_bytes() + str(header_dir).encode())
    for path in sorted(ORT_SOURCE_DIR.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    stamp = digest.hexdigest()
    if not force and library.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return library
    with FileLock(out_dir / ".lock"), tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        target = Path(scratch) / ORT_LIBRARY_NAME
        # host code only; the kernels come from the kernel library, found beside it at load time
        cmd = [find_nvcc(), "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-shared",
               f"-I{SOURCE_DIR}", f"-I{header_dir}", *map(str, sorted(ORT_SOURCE_DIR.glob("*.cc"))),
               f"-L{out_dir}", "-lmoe_compile_kernels", "-Xlinker", "-rpath,$ORIGIN", "-o", str(target)]
        if verbose:
            print(" ".join(cmd), flush=True)
        _run(cmd)
        os.replace(target, library)
        stamp_file.write_text(stamp)
    return library


def _compile_and_link(nvcc: str, archs: tuple[str, ...], out_dir: Path, jobs: int | None, verbose: bool,
                      defines: tuple[str, ...] = ()) -> None:
    sources = sorted(SOURCE_DIR.glob("*.cu"))
    objects = [out_dir / (src.stem + ".o") for src in sources]
    arch_flags = _gencode_flags(archs)
    macros = [f"-D{name}" for name in defines]
    commands = [[nvcc, *NVCC_FLAGS, *macros, *arch_flags, "-c", str(src), "-o", str(obj)]
                for src, obj in zip(sources, objects)]
    if verbose:
        for cmd in commands:
            print(" ".join(cmd), flush=True)
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        list(pool.map(_run, commands))
    _run([nvcc, "-shared", *arch_flags, *map(str, objects), "-o", str(out_dir / LIBRARY_NAME)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(DEFAULT_ARCHS), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: %(default)s -> _build/)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    parser.add_argument("--ort-include", type=Path, default=None,
                        help="onnxruntime's include/ folder: also build the ONNX Runtime custom-op library")
    parser.add_argument("--define", action="append", default=[], metavar="NAME",
                        help="a macro for a diagnostic build: MOE_COMPILE_PHASES (bench/moe_phases.py)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = build(args.out, tuple(args.arch.split(",")), args.jobs, args.force, args.verbose, tuple(args.define))
        if args.ort_include or os.environ.get("ONNXRUNTIME_INCLUDE_DIR"):
            print(path)
            path = build_ort_op(args.ort_include, args.out, tuple(args.arch.split(",")), args.force, args.verbose,
                                tuple(args.define))
    except BuildError as err:
        print(err, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
