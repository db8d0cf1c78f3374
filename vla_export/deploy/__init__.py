"""Deployment: self-contained bundles (`bundle`), the `Policy` runtime (`policy`), and the ROS 2 node (`ros2_node`)."""

from __future__ import annotations

__all__ = ["Policy", "make_bundle", "verify_bundle"]


def __getattr__(name: str):
    # lazy, so `import vla_export.deploy` stays cheap and never needs rclpy
    if name == "Policy":
        from vla_export.deploy.policy import Policy

        return Policy
    if name in ("make_bundle", "verify_bundle"):
        from vla_export.deploy import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'vla_export.deploy' has no attribute {name!r}")
