"""Installing: the [cpu]/[gpu] extras each bring one ONNX Runtime, the check of which one is installed,
the one line a command prints without any, and `moe-compile doctor`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from moe_compile.doctor import report
from moe_compile.runtime import BACKENDS
from moe_compile.runtime.ort_install import conflict, distributions

ROOT = Path(__file__).resolve().parents[1]
ORTS = {"onnxruntime", "onnxruntime-gpu"}


def requirements(extras: tuple[str, ...]) -> set[str]:
    """Every distribution `pip install 'moe-compile[extras]'` asks for, following the installed ones'
    own requirements (this environment's metadata: `make install` reinstalls it when pyproject changes)."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [("moe-compile", extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            lines = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # not installed here (onnxruntime-gpu, tensorrt): ends the walk
            continue
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in ("", *wanted)):
                continue
            key = (canonicalize_name(requirement.name), tuple(sorted(requirement.extras)))
            if key not in seen:
                seen.add(key)
                todo.append(key)
    return {name for name, _ in seen}


def test_extras_bring_exactly_one_onnxruntime():
    assert not requirements(()) & ORTS  # the base install brings none
    assert requirements(("cpu",)) & ORTS == {"onnxruntime"}
    assert requirements(("gpu",)) & ORTS == {"onnxruntime-gpu"}
    assert not requirements(("test",)) & ORTS  # so '.[gpu,test]' stays clean
    assert not requirements(("tensorrt", "tensorrt-rtx")) & ORTS


def fake_site(path: Path, *names: str, top_level: bool = True) -> list[str]:
    """A site-packages folder holding the metadata of these distributions of the onnxruntime module."""
    for name in names:
        info = path / f"{name.replace('-', '_')}-1.32.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.32.0\n")
        if top_level:
            (info / "top_level.txt").write_text("onnxruntime\n")
        else:  # some wheels list only their files
            (info / "RECORD").write_text("onnxruntime/__init__.py,,\n")
    return [str(path)]


@pytest.mark.parametrize("names,found,words", [
    ((), [], ["no ONNX Runtime is installed", "moe-compile[cpu]", "moe-compile[gpu]"]),
    (("onnxruntime",), ["onnxruntime"], None),
    (("onnxruntime-gpu",), ["onnxruntime-gpu"], None),
    (("onnxruntime", "onnxruntime-gpu"), ["onnxruntime", "onnxruntime-gpu"],
     ["onnxruntime and onnxruntime-gpu", "pip uninstall -y onnxruntime onnxruntime-gpu", "moe-compile[gpu]"]),
], ids=["none", "cpu", "gpu", "both"])
def test_which_onnxruntime_is_installed(tmp_path, names, found, words):
    assert distributions(fake_site(tmp_path, *names)) == found
    problem = conflict(found)
    assert problem is None if words is None else all(word in problem for word in words)


def test_which_onnxruntime_without_top_level_txt(tmp_path):
    assert distributions(fake_site(tmp_path, "onnxruntime-gpu", top_level=False)) == ["onnxruntime-gpu"]


def test_this_environment_has_one_onnxruntime():
    assert len(distributions()) == 1 and conflict(distributions()) is None


def test_without_onnxruntime_commands_name_the_extra(built, tmp_path):
    """A Python whose site-packages is this one without onnxruntime: doctor says so, build and run refuse
    in one line naming the extras."""
    site = tmp_path / "site-packages"
    site.mkdir()
    for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(folder).iterdir():
            if not entry.name.startswith("onnxruntime") and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    script = (f"from moe_compile.cli import main\n"
              f"for args in (['doctor'], ['build', 'qwen2-moe-demo', '-o', {str(tmp_path / 'out')!r}],\n"
              f"             ['run', {str(built('qwen2_moe', form='ort'))!r}, '--input-ids', '1,2']):\n"
              f"    print('rc', main(args), flush=True)\n")
    result = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=600,
                            env={"PYTHONPATH": f"{site}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.stdout.count("rc 1") == 2 and "rc 0" in result.stdout, result.stdout + result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: no ONNX Runtime is installed: pip install "
                                                    "'moe-compile[cpu]'") for line in errors), result.stderr
    assert "no: no onnxruntime" in result.stdout and "cannot build here" in result.stdout
    assert not (tmp_path / "out").exists()


def test_doctor_fits_one_screen():
    import onnxruntime
    import torch

    lines = report()
    text = "\n".join(lines)
    assert len(lines) <= 24 and max(map(len, lines)) <= 160, text
    for needle in (f"torch          {torch.__version__}", "transformers", f"onnxruntime    {onnxruntime.__version__}",
                   "CPUExecutionProvider", "tensorrt_rtx", "GPU"):
        assert needle in text, text
    backends, forms = (dict(line.split(None, 1) for line in section.splitlines()[1:])
                       for section in text.split("\n\n")[1:])
    assert set(backends) == set(BACKENDS) and set(forms) == {"ort", "portable"}
    assert backends["ort"] == "yes" and backends["torch"] == "yes"
    if not torch.cuda.is_available():
        assert backends["torch-cuda"].startswith("no: ") and backends["trt"].startswith("no: ")
    assert forms["ort"] == "builds here; runs here on ort"
    assert forms["portable"].startswith("builds here; runs here on ort, torch")
