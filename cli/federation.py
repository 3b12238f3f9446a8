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
    up.set_defaults(func=_up)
    app = sub.add_parser("app", help="where the installed Flower app folder is (for `flwr run`), or copy it")
    app.add_argument("--out", default=None, help="copy the app folder here (to edit its default options)")
    app.set_defaults(func=_app)


def _app(args: argparse.Namespace) -> int:
    from fedge.simulations.local_federation import APP_DIR, write_app

    print(write_app(args.out) if args.out else APP_DIR)
    return 0


def _up(args: argparse.Namespace) -> int:
    from fedge.simulations.local_federation import FederationSpec, LocalFederation

    spec = FederationSpec(workdir=args.workdir, devices=args.devices, data=args.data, partition=args.partition,
                          device_data=[d for d in args.device_data.split(",") if d], port=args.port,
                          tls=not args.insecure, auth=not args.no_auth, warm=not args.cold)
    federation = LocalFederation(spec)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on SIGTERM as on Ctrl-C
    try:
        federation.start()
        n = args.devices
        line = federation.run_command({"fedge.num-clients": n, "fedge.clients-per-round": n})
        print(f"SuperLink on {federation.address} (TLS {'off' if args.insecure else 'on'}, "
              f"SuperNode auth {'off' if args.no_auth else 'on'}); {n} SuperNodes; logs in {spec.workdir}/logs")
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
