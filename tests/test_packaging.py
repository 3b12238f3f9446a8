import subprocess
import sys
from pathlib import Path


def test_fedge_kernels_package_is_not_mistaken_for_hf_kernels():
    from transformers.utils.import_utils import is_kernels_available

    import kernels  # noqa: F401  (our package is importable under this name)

    assert is_kernels_available() is False


def test_console_script_installed():
    exe = Path(sys.executable).parent / "fedge"
    assert exe.exists(), f"the fedge console script is not installed beside {sys.executable}"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "models" in result.stdout


def test_layering_cloud_and_edge_do_not_import_each_other():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    for own, other in (("cloud", "edge"), ("edge", "cloud")):
        for path in (root / own).rglob("*.py"):
            text = path.read_text()
            assert not re.search(rf"^\s*(from|import)\s+{other}\b", text, re.M), f"{path} imports {other}"
