"""`fedge certs create`: a CA, the cloud's server certificate, device certificates and Flower SuperNode keys,
an adapter-signing key.

The same directory serves Flower's deployment engine: the SuperLink's TLS (ca.pem, server.pem/key), the
`flwr` connection's `root-certificates` (ca.pem), and one SuperNode authentication key per device.

Certificate creation is fedge.protocol.tls.create_certificates; this module only parses and reports.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    certs = subparsers.add_parser("certs", help="TLS certificates and device identities").add_subparsers(
        dest="action", required=True)
    _add_create(certs)


def _add_create(certs: argparse._SubParsersAction) -> None:
    create = certs.add_parser("create", help="CA, server cert, per-device client certs and SuperNode keys, "
                                             "adapter-signing key")
    create.add_argument("--out", required=True, help="directory to write (an existing CA there is reused)")
    create.add_argument("--devices", default="", help="comma-separated device ids, e.g. phone-1,laptop-2")
    create.add_argument("--num-devices", type=int, default=0, help="also create PREFIX-0 .. PREFIX-(N-1)")
    create.add_argument("--device-prefix", default="device")
    create.add_argument("--hosts", default="localhost,127.0.0.1", help="server certificate names/addresses")
    create.add_argument("--days", type=int, default=825)
    create.add_argument("--overwrite", action="store_true", help="replace an existing CA and keys")
    create.set_defaults(func=_create)


def _device_ids(args: argparse.Namespace) -> list[str]:
    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    devices += [f"{args.device_prefix}-{i}" for i in range(args.num_devices)]
    return devices


def _create(args: argparse.Namespace) -> int:
    from fedge.protocol.secagg import SecAggError
    from fedge.protocol.secagg_identity import create_device_signing_keys
    from fedge.protocol.tls import CertificateError, create_certificates

    try:
        devices = _device_ids(args)
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        paths = create_certificates(args.out, devices=devices, hosts=hosts, days=args.days, overwrite=args.overwrite)
        roster = create_device_signing_keys(paths.root, devices, overwrite=args.overwrite)
    except (CertificateError, SecAggError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    print(f"certificates in {paths.root}:")
    print(f"  CA               {paths.ca_cert} (key {paths.ca_key}: keep it offline)")
    print(f"  server           {paths.server_cert} for {', '.join(hosts)}")
    for device_id in devices:
        print(f"  device {device_id:<10}{paths.device_cert(device_id)}; SuperNode key "
              f"{paths.supernode_key(device_id)} (register {paths.supernode_public_key(device_id)})")
    print(f"  adapter signing  {paths.signing_key} (public: {paths.signing_public_key})")
    print(f"  secagg signing   devices/<id>.sign.key; roster of device keys {roster} (ship it to every client)")
    return 0
