import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_example_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens/s" in result.stdout
    assert (tmp_path / "out" / "manifest.json").is_file()
