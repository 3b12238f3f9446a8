"""Packaging: fedge installs under its own namespace, next to packages with generic names."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The environment as it was when tests were collected: tests that run before this one (Flower's Ray
# backend, for one) change os.environ (PYTHONPATH with the checkout, ...), which would make the fresh
# environment below import or install something other than what it claims to test.
ENV_AT_COLLECTION = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
SOURCE_FOLDERS = ("protocol", "cloud", "edge", "peft_methods", "kernels", "simulations", "cli")


def test_fedge_kernels_package_is_not_mistaken_for_hf_kernels():
    from transformers.utils.import_utils import is_kernels_available

    import fedge.kernels  # noqa: F401

    assert is_kernels_available() is False


def test_console_script_installed():
    exe = Path(sys.executable).parent / "fedge"
    assert exe.exists(), f"the fedge console script is not installed beside {sys.executable}"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "models" in result.stdout


def test_layering_cloud_and_edge_do_not_import_each_other():
    for own, other in (("cloud", "edge"), ("edge", "cloud")):
        for path in (ROOT / own).rglob("*.py"):
            text = path.read_text()
            pattern = rf"^\s*(from|import)\s+(fedge\.)?{other}\b"
            assert not re.search(pattern, text, re.M), f"{path} imports {other}"


@pytest.mark.slow
def test_wheel_installs_under_fedge_namespace_beside_hf_kernels(tmp_path):
    """A fresh virtual environment with fedge's wheel and the PyPI `kernels` package imports both."""
    # build from a copy of the tracked files: an in-tree build would leave build/ in the checkout
    source = tmp_path / "source"
    for name in subprocess.check_output(["git", "ls-files"], cwd=ROOT, text=True).split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    subprocess.run([*build, "-w", str(wheels), str(source)], check=True, capture_output=True, env=ENV_AT_COLLECTION)
    wheel = next(wheels.glob("fedge-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    assert {top for top in tops if not top.endswith(".dist-info")} == {"fedge"}, tops
    for name in SOURCE_FOLDERS:
        assert f"fedge/{name}/__init__.py" in names, f"fedge.{name} is missing from the wheel"
    assert "fedge/protocol/fedge.proto" in names
    assert "fedge/simulations/flower_app/pyproject.toml" in names  # `flwr run` needs the app folder
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=ENV_AT_COLLECTION)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel), "kernels==0.17.2"],
                   check=True, capture_output=True, env=ENV_AT_COLLECTION)
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True, env=ENV_AT_COLLECTION).strip())
    # fedge's own dependencies (torch, transformers, ...) come from the development environment,
    # appended after the fresh site-packages so that the fresh copies win.
    (site / "zz-dev-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = (
        "import kernels, fedge.kernels.verify, fedge.protocol.fedge_pb2_grpc, fedge.edge.draft;"
        "from pathlib import Path;"
        "from fedge.simulations.local_federation import APP_DIR;"
        "assert 'fedge.cloud.server_app:app' in (APP_DIR / 'pyproject.toml').read_text(), APP_DIR;"
        f"site = Path({str(site)!r});"
        "assert Path(kernels.__file__).parent == site / 'kernels', kernels.__file__;"
        "assert Path(fedge.kernels.verify.__file__).parent == site / 'fedge' / 'kernels';"
        "assert hasattr(kernels, 'get_kernel'), 'not the Hugging Face kernels package';"
        "print('ok')"
    )
    result = subprocess.run([str(py), "-c", check], capture_output=True, text=True, cwd=tmp_path,
                            env=ENV_AT_COLLECTION)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
