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
    python -m fedge.edge.warm_superexec --runtime-api-address 127.0.0.1:9094 --insecure
"""

from __future__ import annotations

import os
import sys

# what a ClientApp message imports (fedge.edge.federated_client imports these lazily in its handlers)
WARM_MODULES = ("torch", "transformers", "peft", "fedge.edge.federated_client", "fedge.edge.secagg_mods",
                "fedge.edge.training_model", "fedge.edge.lora_trainer", "fedge.peft_methods.lora_model",
                "fedge.peft_methods.aggregation", "fedge.data", "flwr.supernode.runtime.run_clientapp")


def warm_up() -> None:
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)


def _run_forked(spec) -> None:
    """The child: Flower's ClientApp process body, then exit without running the parent's exit handlers."""
    code = 1
    try:
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        certificates = validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure)
        run_clientapp(spec.runtime_api_address, spec.token, spec.insecure, certificates=certificates,
                      parent_pid=os.getppid(), runtime_dependency_install=spec.runtime_dependency_install)
        code = 0
    except SystemExit as exc:  # run_clientapp ends with flwr_exit
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def fork_executor():
    """Flower's subprocess executor, with ClientApp tasks forked from this (warm) process."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class ForkExecutor(SubprocessExecutor):
        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            if os.fork() == 0:
                _run_forked(spec)
            return LaunchResult.accepted()

        def reconcile(self) -> None:  # reap finished ClientApp processes (called every poll)
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass

    return ForkExecutor()


def main() -> None:
    """`flower-superexec`'s command line, with the warm fork executor."""
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.cli import flower_superexec

    warm_up()
    superexec.get_executor = lambda *args, **kwargs: fork_executor()
    flower_superexec()


if __name__ == "__main__":
    main()
