"""`vla-export fleet`: build, verify and profile one bundle on every target device at once, through Ray.

- `targets.py`   the targets file (YAML/JSON): target name -> the Ray custom resource its nodes advertise + settings
- `store.py`     content-addressed results (bundle sha256 + target hardware + software + settings), written atomically
- `on_target.py` what runs on a target: TensorRT engine build, AOTInductor compile, verify, profile (plain functions)
- `run.py`       the Ray side: probe each target, skip stored work, schedule the rest by custom resource, faults
- `report.py`    fleet.md + fleet.json + fleet.png, one section per target, no speed ratio across devices
- `ray_validate.py` `validate --ray`: task predictions over episode frames with Ray Data, one ORT session per actor

Ray is an optional extra (`pip install 'vla-export[ray]'`), imported only when a command needs it.
"""

from __future__ import annotations

from vla_export.errors import BackendUnavailable

RAY_INSTALL_HINT = "pip install 'vla-export[ray]'"


def require_ray():
    """The `ray` module, or BackendUnavailable (exit 4, like a missing TensorRT: an optional backend not installed
    here, which pipelines report as skipped) saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise BackendUnavailable(f"this command needs Ray, which is not installed here ({e}); {RAY_INSTALL_HINT}") \
            from e
    return ray


def connect(ray, address: str | None, **init_kwargs) -> bool:
    """`ray.init` unless this process is connected already; True when it connected here (and must shut down).

    A `host:port` that nothing listens on is refused in seconds with one line (exit 2): Ray itself retries the GCS
    for minutes before it gives up."""
    import socket

    from vla_export.errors import UserError

    if ray.is_initialized():
        return False
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--address {address!r}: give the Ray head as host:port (e.g. 10.0.0.5:6379), 'auto' or "
                            "ray://host:10001")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise UserError(f"cannot reach the Ray head at {address} ({e.strerror or e}); start it there with "
                            "`ray start --head --port PORT`, or fix --address") from e
    ray.init(address=address, **({"include_dashboard": False, "log_to_driver": False} | init_kwargs))
    return True
