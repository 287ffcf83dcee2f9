"""Which ONNX Runtime is installed. `onnxruntime` (CPU) and `onnxruntime-gpu` (CUDA) are two distributions
of one module, so with both installed the one unpacked last wins; moe-compile's extras `[cpu]` and `[gpu]`
each bring exactly one. Every command that needs ONNX Runtime imports it through `import_onnxruntime`."""

from __future__ import annotations

from importlib import metadata

from packaging.utils import canonicalize_name

from ..errors import MoeCompileError

MODULE = "onnxruntime"
EXTRAS = {"onnxruntime": "cpu", "onnxruntime-gpu": "gpu"}  # distribution -> the moe-compile extra that brings it
INSTALL = "pip install 'moe-compile[cpu]' (or 'moe-compile[gpu]' for CUDA GPUs)"


class OrtMissing(MoeCompileError):
    """No importable ONNX Runtime."""


def distributions(path: list[str] | None = None) -> list[str]:
    """The installed distributions (canonical names) that provide the `onnxruntime` module, on `path`
    (default sys.path)."""
    found = set()
    for dist in metadata.distributions(**({"path": path} if path is not None else {})):
        top = (dist.read_text("top_level.txt") or "").split()
        if not top:  # wheels without top_level.txt: the first folder of each installed file
            top = [f.parts[0] for f in dist.files or () if len(f.parts) > 1]
        if MODULE in top:
            found.add(canonicalize_name(dist.metadata["Name"]))
    return sorted(found)


def conflict(found: list[str]) -> str | None:
    """What is wrong with these providers of the module, or None when exactly one is installed."""
    if not found:
        return f"no ONNX Runtime is installed: {INSTALL}"
    if len(found) > 1:
        return (f"{' and '.join(found)} are installed together and overwrite one onnxruntime module: "
                f"pip uninstall -y {' '.join(found)}, then pip install 'moe-compile[gpu]' (CUDA) or 'moe-compile[cpu]'")
    return None


def import_onnxruntime():
    """The `onnxruntime` module, or one line naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        found = distributions()
        if not found:
            raise OrtMissing(conflict(found)) from None
        raise OrtMissing(f"{', '.join(found)} is installed but does not import ({str(exc).splitlines()[0]}); "
                         f"reinstall it: pip install --force-reinstall {found[0]}") from None
    return onnxruntime
