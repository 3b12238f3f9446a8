"""A device's SuperExec that starts each ClientApp by forking a warm process, not a fresh interpreter.

Flower 1.41 runs one `flwr-clientapp` process per message, in both isolation modes of
`flower-supernode` (`subprocess`: the SuperNode starts `flower-superexec`, which starts the process;
`process`: you start `flower-superexec` yourself); its warm executors exist only on Kubernetes and
not for ClientApps. So every training or evaluation message pays a Python start and the imports of
torch, transformers and peft (several seconds on a phone-class CPU; the model load itself is small).

This is Flower's own SuperExec (`flower-superexec`'s command line and loop) with one change: the
ClientApp task runs Flower's own `run_clientapp` in a `fork()` of this process, which imported the
ClientApp's heavy modules once at start (no torch thread pool exists yet; start it without
`--parent-pid`, whose watcher thread a fork could catch holding a lock). Each
message still gets its own process (Flower's isolation and exit semantics are kept); it just starts
warm. Use it with `flower-supernode --isolation process`:

    flower-supernode ... --isolation process --port 9094 &
    python -m fedge.edge.warm_superexec --runtime-api-address 127.0.0.1:9094 --insecure \
        --preload-model smollm2-135m-instruct --preload-client-model draft \
        --preload-node-config 'data="jsonl:/data/notes.jsonl"'

With `--preload-node-config` (the SuperNode's own `--node-config`) the device's data is read here once,
and with `--preload-model` its models load here too, once, before the first fork: the base it
trains on (`--preload-client-model` draft or target, `--preload-draft-quant`, `--preload-draft-layers`)
and, for a draft, the target it evaluates on (unless `--no-preload-target`). A fork shares them
copy-on-write and wraps only its own adapter around its copy (`fedge.edge.training_model.preload_base`),
so what one message trains never reaches the parent or the next message; a run that asks for another
model loads it in its fork, as without preloading. The parent stays single-threaded in torch
(`torch.set_num_threads(1)` before loading: no OpenMP pool exists at a fork; a fork sets its own threads).
What is loaded by then is frozen out of the garbage collector (`gc.freeze`), so a fork copies only
the pages it writes. A fork starts within a poll of its task, often before the SuperNode has
downloaded the message's arrays; it retries after 20 ms, not Flower's 1 s (`fedge.flower_waits`).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from fedge.flower_waits import shorten_object_pulls

# what a ClientApp message imports (fedge.edge.federated_client imports these lazily in its handlers)
WARM_MODULES = ("torch", "transformers", "peft", "fedge.edge.federated_client", "fedge.edge.secagg_mods",
                "fedge.edge.training_model", "fedge.edge.lora_trainer", "fedge.peft_methods.lora_model",
                "fedge.peft_methods.aggregation", "fedge.data", "flwr.supernode.runtime.run_clientapp",
                # what fedge.data reads a device's file with (datasets also brings pandas and pyarrow)
                "datasets", "flwr_datasets.partitioner")


def warm_up() -> None:
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)


def fork_task(body: Callable[[], object]) -> int:
    """Run `body` in a fork of this process (its pid); the fork exits when `body` returns (0) or
    raises (SystemExit's code, else 1), without this process's exit handlers."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        body()
        code = 0
    except SystemExit as exc:  # run_clientapp ends with flwr_exit
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_clientapp(spec) -> None:
    """The fork's body: Flower's ClientApp process (`flwr-clientapp`'s main)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    certificates = validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure)
    run_clientapp(spec.runtime_api_address, spec.token, spec.insecure, certificates=certificates,
                  parent_pid=os.getppid(), runtime_dependency_install=spec.runtime_dependency_install)


def fork_executor():
    """Flower's subprocess executor, with ClientApp tasks forked from this (warm) process."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class ForkExecutor(SubprocessExecutor):
        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            fork_task(lambda: _run_clientapp(spec))
            return LaunchResult.accepted()

        def reconcile(self) -> None:  # reap finished ClientApp processes (called every poll)
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass

    return ForkExecutor()


def freeze_heap() -> None:
    """Keep the garbage collector off what is loaded by now (`gc.freeze`): a fork's collections would
    otherwise walk, and so copy, every page of the parent's heap (measured: 0.30 -> 0.045 s CPU per fork)."""
    import atexit
    import gc

    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # a clean exit frees them (extension modules warn about leaks otherwise)


def preload_parser():
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preload-model", default="", help="load this model's base before the first fork")
    parser.add_argument("--preload-client-model", default="draft", choices=("draft", "target"))
    parser.add_argument("--preload-draft-quant", default="int4")
    parser.add_argument("--preload-draft-layers", type=int, default=0)
    parser.add_argument("--no-preload-target", action="store_true",
                        help="with a draft: do not preload the target (that evaluations run on)")
    parser.add_argument("--preload-node-config", default="",
                        help="the SuperNode's --node-config: read the device's data it names before the first fork")
    return parser


def preload(args) -> list[tuple]:
    """The device's bases and data, loaded in this process (see the module docstring); what was loaded."""
    loaded: list[tuple] = []
    if args.preload_node_config:
        from flwr.common.config import parse_config_args

        from fedge.edge.federated_client import preload_data

        node_config = parse_config_args([args.preload_node_config])
        loaded.append(("data", node_config.get("data", ""), preload_data(node_config)))
    if not args.preload_model:
        return loaded
    import torch

    from fedge.edge.training_model import preload_base

    torch.set_num_threads(1)  # no OpenMP thread pool before a fork
    loaded.append(preload_base(args.preload_model, args.preload_client_model, args.preload_draft_quant,
                               args.preload_draft_layers or None))
    if args.preload_client_model == "draft" and not args.no_preload_target:
        loaded.append(preload_base(args.preload_model, "target"))
    return loaded


def main(argv: list[str] | None = None) -> None:
    """`flower-superexec`'s command line (plus the --preload-* options), with the warm fork executor."""
    import time

    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.cli import flower_superexec

    ours, rest = preload_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *rest]  # flower-superexec parses sys.argv
    start = time.perf_counter()
    warm_up()
    keys = preload(ours)
    shorten_object_pulls()  # the forks fetch their message from the SuperNode (fedge.flower_waits)
    freeze_heap()
    print(f"fedge warm SuperExec: imports{' and preloaded ' + ', '.join(map(str, keys)) if keys else ''} in "
          f"{time.perf_counter() - start:.2f} s", flush=True)
    superexec.get_executor = lambda *args, **kwargs: fork_executor()
    flower_superexec()


if __name__ == "__main__":
    main()
