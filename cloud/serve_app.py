"""The cloud as a Ray Serve application: `serve run`, Serve config files, `serve.run(build_app(...))`.

    serve run fedge.cloud.serve_app:build_app model=tiny-random-llama port=50051 replicas=2
    serve build fedge.cloud.serve_app:build_app -o fedge.yaml   # then: serve deploy fedge.yaml

`build_app(args)` is Serve's application-builder convention: the arguments come as strings from
the command line (or typed values from a config file's `args:`), named after `ServeConfig`,
`Scaling` and `Limits` fields (`replicas`, `autoscale_min`, `cpus_per_replica`, `max_sessions`, ...).
The application has two deployments: the verifier (`fedge.cloud.verifier_deployment`, scaled as
asked, session-affine routing) and `GrpcIngress`, one replica that runs the same gRPC front end as
`fedge cloud serve` (`fedge.cloud.serve.FrontEnd`: Verifier, Adapters, grpc.health.v1) inside Serve,
calling the verifier through the handle Serve gives it. Serve restarts a failed ingress like any replica.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedge.cloud.engine import Limits
from fedge.cloud.serve import FrontEnd, ServeConfig, live_replica_ids, verifier_app
from fedge.cloud.verifier_deployment import Scaling


def _coerce(name: str, type_text: str, value: Any) -> Any:
    """A command-line string (or a config file's value) as the field's type."""
    if value is None or (isinstance(value, str) and value.lower() in ("", "none") and "None" in type_text):
        return None
    try:
        if type_text.startswith("bool"):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if type_text.startswith("int"):
            return int(value)
        if type_text.startswith("float"):
            return float(value)
    except ValueError:
        raise ValueError(f"argument {name}={value!r} is not a valid {type_text}") from None
    return str(value)


def config_from_args(args: Mapping[str, Any]) -> ServeConfig:
    """`ServeConfig` from builder arguments; an unknown name is an error listing the known ones."""
    groups: dict[type, dict[str, Any]] = {ServeConfig: {}, Scaling: {}, Limits: {}}
    fields = {f.name: (cls, f.type) for cls in groups for f in dataclasses.fields(cls)
              if f.name not in ("scaling", "limits")}
    for name, value in args.items():
        if name not in fields:
            raise ValueError(f"unknown argument {name!r}; known: {', '.join(sorted(fields))}")
        cls, type_text = fields[name]
        groups[cls][name] = _coerce(name, str(type_text), value)
    return ServeConfig(**groups[ServeConfig], scaling=Scaling(**groups[Scaling]), limits=Limits(**groups[Limits]))


def ingress_deployment():
    """The gRPC front end as a Serve deployment (one replica, no CPU reserved: it only relays)."""
    from ray import serve

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0},
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
    class GrpcIngress:
        async def __init__(self, verifier, cfg: ServeConfig):
            app_name = serve.get_replica_context().app_name  # the verifier's router is this app's
            self.front = FrontEnd(cfg, verifier, live_replica_ids(app_name))
            await self.front.start()

        async def port(self) -> int:
            return self.front.bound_port

        async def __del__(self):
            await self.front.stop()

    return GrpcIngress


def build_app(args: Mapping[str, Any] | None = None):
    """Serve's application builder: the verifier deployment behind the gRPC front end."""
    cfg = config_from_args(args or {})
    return ingress_deployment().bind(verifier_app(cfg), cfg)
