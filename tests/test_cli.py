"""The `fedge` command line: every group is reachable, help is cheap, outputs default under runs/."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.cli import build_parser, main
from fedge.cli.outputs import make_parent_dirs

GROUPS = {
    "models": ["list", "pull"],
    "data": ["stats"],
    "draft": ["build"],
    "bench": ["speculative", "kernels", "draft-training", "serving-load", "aggregation", "deployment"],
    "certs": ["create"],
    "simulate": ["federated", "phones"],
    "cloud": ["serve"],
    "edge": ["generate"],
    "privacy": ["dp", "secagg-time"],
    "federation": ["up", "app"],
}
TOP_LEVEL = [*GROUPS, "generate", "demo"]
# Commands that write files and choose where by default (the others require --out).
WRITES_BY_DEFAULT = {("bench", "speculative"), ("bench", "kernels"), ("bench", "draft-training"),
                     ("bench", "serving-load"), ("bench", "aggregation"), ("bench", "deployment"),
                     ("simulate", "federated"),
                     ("simulate", "phones"),
                     ("privacy", "dp"), ("privacy", "secagg-time"),
                     ("demo",)}
OUTPUT_OPTIONS = ("out", "json")


def _fedge_command() -> list[str]:
    script = Path(sys.executable).parent / "fedge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedge.cli"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    children = _subcommands(parser)
    if not children:
        yield path, parser
    for name, child in children.items():
        yield from _leaf_commands(child, (*path, name))


def test_console_script_help_lists_every_group(tmp_path):
    result = subprocess.run([*_fedge_command(), "--help"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for name in TOP_LEVEL:
        assert name in result.stdout
    assert not (tmp_path / "runs").exists(), "--help must not create output directories"


def test_help_does_not_import_the_heavy_stack():
    code = ("import sys; from fedge.cli import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'ray', 'flwr', 'grpc', 'peft'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_help_lists_its_subcommands(group, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([group, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for sub in GROUPS[group]:
        assert re.search(rf"\b{re.escape(sub)}\b", out), f"`fedge {group} --help` does not list {sub}"


def test_parser_tree_is_exactly_the_documented_commands():
    parser = build_parser()
    assert sorted(_subcommands(parser)) == sorted(TOP_LEVEL)
    for group, subs in GROUPS.items():
        assert sorted(_subcommands(_subcommands(parser)[group])) == sorted(subs)


def test_every_output_option_defaults_under_runs():
    seen = set()
    for path, parser in _leaf_commands(build_parser()):
        for action in parser._actions:
            if action.dest not in OUTPUT_OPTIONS or action.required:
                continue
            default = parser.get_default(action.dest)
            if default is None:  # derived from another output option when the command runs
                continue
            seen.add(path)
            parts = Path(default).parts
            assert parts[0] == "runs", f"fedge {' '.join(path)} --{action.dest} defaults to {default}"
            if len(parts) > 1:  # runs/<command>-YYYYmmdd-HHMMSS/...
                assert re.fullmatch(r"[a-z-]+-\d{8}-\d{6}", parts[1]), default
    assert seen == WRITES_BY_DEFAULT


def test_output_directories_are_made_when_a_command_runs(tmp_path):
    args = argparse.Namespace(json=str(tmp_path / "runs" / "bench-x" / "bench.json"), out=None)
    make_parent_dirs(args, "json", "out")
    assert (tmp_path / "runs" / "bench-x").is_dir()


def test_certs_create_writes_where_out_says(tmp_path, capsys):
    from fedge.protocol.tls import CertPaths

    out = tmp_path / "certs"
    assert main(["certs", "create", "--out", str(out), "--devices", "phone-1", "--num-devices", "1"]) == 0
    paths = CertPaths(out)
    for path in (paths.ca_cert, paths.server_cert, paths.device_cert("phone-1"), paths.device_cert("device-0"),
                 paths.signing_key):
        assert path.is_file(), path
    ca = paths.ca_cert.read_bytes()
    # an existing CA is reused, so devices can be added later without --overwrite
    assert main(["certs", "create", "--out", str(out), "--devices", "phone-2"]) == 0
    assert paths.ca_cert.read_bytes() == ca and paths.device_cert("phone-2").is_file()
    assert "device phone-2" in capsys.readouterr().out


def test_unknown_model_is_a_usage_error(capsys):
    assert main(["models", "pull", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_console_script_is_installed():
    assert shutil.which("fedge", path=str(Path(sys.executable).parent)) is not None
