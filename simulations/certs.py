"""`fedge certs create`: a CA, the cloud's server certificate, device certificates, an adapter-signing key."""

from __future__ import annotations

import argparse
import sys

from fedge.protocol.tls import CertificateError, create_certificates


def _device_ids(args: argparse.Namespace) -> list[str]:
    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    devices += [f"{args.device_prefix}-{i}" for i in range(args.num_devices)]
    return devices


def main(args: argparse.Namespace) -> int:
    try:
        devices = _device_ids(args)
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        paths = create_certificates(args.out, devices=devices, hosts=hosts, days=args.days, overwrite=args.overwrite)
    except CertificateError as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    print(f"certificates in {paths.root}:")
    print(f"  CA               {paths.ca_cert} (key {paths.ca_key}: keep it offline)")
    print(f"  server           {paths.server_cert} for {', '.join(hosts)}")
    for device_id in devices:
        print(f"  device {device_id:<10}{paths.device_cert(device_id)}")
    print(f"  adapter signing  {paths.signing_key} (public: {paths.signing_public_key})")
    return 0
