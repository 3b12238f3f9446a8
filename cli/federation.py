"""`fedge federation up`: a local Flower deployment (SuperLink + N SuperNodes on loopback) to try the device path;
`fedge federation app`: the installed Flower app folder (`flwr run $(fedge federation app) <connection>`).

The federation is fedge.simulations.local_federation.LocalFederation; this module only parses, prints
the `flwr run` line and stops every process on Ctrl-C.
"""

from __future__ import annotations

import argparse
import shlex
import signal

from fedge.cli.outputs import run_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    federation = subparsers.add_parser("federation", help="a local Flower deployment (SuperLink + SuperNodes)")
    sub = federation.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start a SuperLink and N SuperNodes on loopback; Ctrl-C stops them")
    up.add_argument("--devices", type=int, default=3)
    up.add_argument("--data", default="stdlib", help="a source split into one local file per device")
    up.add_argument("--partition", default="natural", help="how --data is split over the devices")
    up.add_argument("--device-data", default="", help="comma-separated sources, one per device (instead of --data)")
    up.add_argument("--workdir", default=str(run_dir("federation")), help="certificates, device folders, logs")
    up.add_argument("--port", type=int, default=0, help="the SuperLink's port (default: a free one)")
    up.add_argument("--insecure", action="store_true", help="no TLS on the SuperLink (not for real devices)")
    up.add_argument("--no-auth", action="store_true", help="no SuperNode authentication")
    up.add_argument("--cold", action="store_true", help="Flower's own SuperExec (a fresh interpreter per message) "
                                                        "instead of fedge's warm fork SuperExec")
    up.add_argument("--preload-model", default=None,
                    help="the model each device's warm SuperExec loads once, before forking message processes "
                         "(default: the app's fedge.model; 'none' to load it per message)")
    up.add_argument("--preload-client-model", default=None, choices=["draft", "target"],
                    help="which of it devices train (default: the app's fedge.client-model)")
    up.add_argument("--poll-interval", type=float, default=0.25,
                    help="SuperNodes' idle poll, seconds (fedge.edge.supernode; 0: Flower's flower-supernode, 3 s)")
    up.add_argument("--heartbeat-interval", type=float, default=None,
                    help="SuperNodes' heartbeat, seconds (10-1800; Flower's default 30: a dead device is noticed "
                         "after two)")
    up.set_defaults(func=_up)
    app = sub.add_parser("app", help="where the installed Flower app folder is (for `flwr run`), or copy it")
    app.add_argument("--out", default=None, help="copy the app folder here (to edit its default options)")
    app.set_defaults(func=_app)


def _app(args: argparse.Namespace) -> int:
    from fedge.simulations.local_federation import APP_DIR, write_app

    print(write_app(args.out) if args.out else APP_DIR)
    return 0


def app_defaults() -> dict:
    """The installed Flower app's default options (`[tool.flwr.app.config.fedge]`)."""
    import tomllib

    from fedge.simulations.local_federation import APP_DIR

    return tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]["fedge"]


def _up(args: argparse.Namespace) -> int:
    from fedge.simulations.local_federation import FederationSpec, LocalFederation

    defaults = app_defaults()
    preload = defaults["model"] if args.preload_model is None else args.preload_model
    spec = FederationSpec(workdir=args.workdir, devices=args.devices, data=args.data, partition=args.partition,
                          device_data=[d for d in args.device_data.split(",") if d], port=args.port,
                          tls=not args.insecure, auth=not args.no_auth, warm=not args.cold,
                          preload_model="" if preload == "none" else preload,
                          preload_client_model=args.preload_client_model or defaults["client-model"],
                          poll_interval=args.poll_interval, heartbeat_interval=args.heartbeat_interval)
    federation = LocalFederation(spec)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on SIGTERM as on Ctrl-C
    try:
        federation.start()
        n = args.devices
        line = federation.run_command({"fedge.num-clients": n, "fedge.clients-per-round": n})
        print(f"SuperLink on {federation.address} (TLS {'off' if args.insecure else 'on'}, "
              f"SuperNode auth {'off' if args.no_auth else 'on'}); {n} SuperNodes; logs in {spec.workdir}/logs")
        if spec.warm and spec.preload_model:
            print(f"each device's SuperExec preloads {spec.preload_model} ({spec.preload_client_model}): "
                  "runs of another model load it per message")
        for device_id, source in federation.data.items():
            print(f"  {device_id}: {source}")
        print("start a run with:\n")
        print(f"  FLWR_HOME={shlex.quote(str(federation.flwr_home))} {shlex.join(line)}\n")
        print("Ctrl-C stops the SuperLink and every SuperNode.", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        federation.stop()
    return 0
