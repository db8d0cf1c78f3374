"""The Ray side of `vla-export fleet`: one bundle, every target, faults reported per target.

1. Check the bundle here (`verify_bundle`) and that some alive node advertises each target's resource.
2. Put the bundle's files into Ray's object store once; every target node pulls them from there.
3. Probe each target (a tiny task on its resource): its hardware and software make its work key (store.py).
4. A key already in the result store is skipped; the rest run `on_target.run_target` as one task per target,
   scheduled by the target's custom resource, each in a fresh worker process (`max_calls=1`), never retried
   (`max_retries=0`: the only node with that resource is the one that just failed).
5. A task whose node died raises (NodeDiedError) and its target is failed with that reason; a task still waiting
   for a resource that no alive node advertises any more is cancelled and failed; the other targets go on.
6. Finished results go into the store (atomically) and fleet.md/json/png are written from the records.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vla_export import manifest as mf
from vla_export.errors import UserError
from vla_export.fleet import connect, require_ray
from vla_export.fleet.on_target import probe, read_files, run_target
from vla_export.fleet.store import ResultStore, work_key
from vla_export.fleet.targets import Target

POLL_S = 0.5
EventHook = Callable[[str, str, str], None]  # (target, step, state)


def _tasks(ray):
    """The remote functions and the event actor, made once per process (ray is imported lazily)."""
    if getattr(_tasks, "cache", None) is None:
        def probe_task():
            ctx = ray.get_runtime_context()
            return probe() | {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}

        def target_task(bundle_files, target, checkpoint_files, events):
            def report(step, state):
                if events is not None:
                    events.post.remote(target["name"], step, state)  # fire and forget: progress only
            record = run_target(bundle_files, target, checkpoint_files, report)
            ctx = ray.get_runtime_context()
            return record | {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}

        class FleetEvents:
            """Step starts and ends posted by the targets, drained by the driver for progress (and for tests,
            which kill a node at a known step)."""

            def __init__(self):
                self.events: list[tuple[str, str, str]] = []

            def post(self, target, step, state):
                self.events.append((target, step, state))

            def drain(self):
                out, self.events = self.events, []
                return out

        _tasks.cache = (ray.remote(num_cpus=0, max_retries=0)(probe_task),
                        ray.remote(max_retries=0, max_calls=1)(target_task),
                        ray.remote(num_cpus=0, max_restarts=0)(FleetEvents))
    return _tasks.cache


def alive_resources(ray) -> set[str]:
    return {r for n in ray.nodes() if n.get("Alive") for r, v in (n.get("Resources") or {}).items() if v > 0}


def _failure(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}"


class _Waiter:
    """Waits for one task per target; fails those whose node died or whose resource left the cluster."""

    def __init__(self, ray, progress, on_event: EventHook | None, events_actor, timeout_s: float | None):
        self.ray, self.progress, self.on_event = ray, progress, on_event
        self.events_actor, self.timeout_s = events_actor, timeout_s

    def events(self):
        if self.events_actor is None:
            return
        try:
            drained = self.ray.get(self.events_actor.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is best effort, never the reason a run fails
            return
        for target, step, state in drained:
            self.progress(target, f"{step}: {state}")
            if self.on_event is not None:
                self.on_event(target, step, state)

    def gather(self, refs: dict[str, Any], resources: dict[str, str], what: str) -> dict[str, tuple[bool, Any]]:
        """{target: (ok, value or failure reason)} for every target in `refs`."""
        ray = self.ray
        pending = dict(refs)
        started = {name: time.monotonic() for name in refs}
        done: dict[str, tuple[bool, Any]] = {}
        by_ref = {ref: name for name, ref in pending.items()}
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=POLL_S)
            for ref in ready:
                name = by_ref[ref]
                del pending[name]
                try:
                    done[name] = (True, ray.get(ref))
                except ray.exceptions.NodeDiedError as e:
                    done[name] = (False, f"its node died during {what} ({_failure(e)})")
                except ray.exceptions.RayError as e:
                    done[name] = (False, f"{what} failed on the target ({_failure(e)})")
            self.events()
            if not pending:
                break
            alive = alive_resources(ray)
            for name in list(pending):
                reason = None
                if resources[name] not in alive:
                    reason = (f"no alive node advertises {resources[name]} any more (its node died or left the "
                              f"cluster) before {what} finished")
                elif self.timeout_s and time.monotonic() - started[name] > self.timeout_s:
                    reason = f"{what} timed out after {self.timeout_s:g} s"
                if reason:
                    ray.cancel(pending.pop(name), force=True)
                    done[name] = (False, reason)
        self.events()
        return done


def run_fleet(bundle_dir: str | Path, targets: list[Target], out_dir: str | Path, *, address: str | None = None,
              store_dir: str | Path | None = None, force: bool = False, timeout_s: float | None = None,
              on_event: EventHook | None = None, progress: bool = True, command: str | None = None,
              ray_init: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every target's steps through Ray; write fleet.md/json/png into `out_dir`; return fleet.json's content.

    `address`: a running cluster ("auto", "ray://..." or host:port); None starts a local one (or uses the one this
    process is connected to). Never raises for a target's failure: the report says which passed."""
    from vla_export.checkpoint import checkpoint_sha256
    from vla_export.deploy.bundle import verify_bundle
    from vla_export.fleet.report import write_fleet_report
    from vla_export.validate.validate import _progress

    ray = require_ray()
    bundle_dir = Path(bundle_dir)
    info = verify_bundle(bundle_dir)  # a bad bundle is one line here (exit 2), before any cluster work
    if not targets:
        raise UserError("no targets given; list them in the targets file")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise UserError(f"target names must be unique, got {names}")
    out_dir = mf.check_writable_dir(out_dir)
    store = ResultStore(store_dir or out_dir / "store")
    leftovers = store.clean_staging()

    checkpoints: dict[str, str] = {}
    for t in targets:
        ckpt = t.aoti.get("checkpoint") if "aoti" in t.steps else None
        if ckpt and ckpt not in checkpoints:
            if not (Path(ckpt) / "config.json").is_file():
                raise UserError(f"targets.{t.name}.aoti.checkpoint {ckpt} is not a checkpoint directory (no "
                                "config.json); fix the path in the targets file")
            checkpoints[ckpt] = checkpoint_sha256(ckpt)

    try:
        connected_here = connect(ray, address, **(ray_init or {}))
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {address} ({e}); start one with `ray start --head` "
                        "or fix --address") from e
    records: dict[str, dict[str, Any]] = {}
    started = time.time()
    events = None
    try:
        probe_fn, target_fn, events_cls = _tasks(ray)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        events = events_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        resources = {t.name: t.resource for t in targets}
        with _progress(progress) as bar:
            ids = {t.name: bar.add_task(f"{t.name}: probe", total=None) for t in targets}

            def show(name, text):
                bar.update(ids[name], description=f"{name}: {text}")

            waiter = _Waiter(ray, show, on_event, events, timeout_s)
            alive = alive_resources(ray)
            runnable = []
            for t in targets:
                base = {"name": t.name, "resource": t.resource, "steps_planned": t.steps, "cached": False}
                if t.resource not in alive:
                    records[t.name] = base | {"status": "failed", "reason": (
                        f"no alive node in the cluster advertises resource {t.resource}; start one on that device "
                        f"with ray start --address HEAD:6379 --resources '{{\"{t.resource}\": 1}}'")}
                else:
                    records[t.name] = base
                    runnable.append(t)

            probes = waiter.gather({t.name: probe_fn.options(resources={t.resource: 0.001}).remote()
                                    for t in runnable}, resources, "probe")
            todo = []
            for t in runnable:
                ok, value = probes[t.name]
                if not ok:
                    records[t.name] |= {"status": "failed", "reason": value}
                    continue
                settings = t.settings()
                if "aoti" in t.steps and t.aoti.get("checkpoint"):
                    settings["aoti"]["checkpoint_sha256"] = checkpoints[t.aoti["checkpoint"]]
                key = work_key(info["bundle_sha256"], value["hardware"], value["software"], t.name, settings)
                records[t.name] |= {"key": key, "node_id": value["node_id"], "node_ip": value["node_ip"],
                                    "machine": value["machine"], "versions": value["versions"]}
                stored = None if force else store.get(key)
                if stored is not None:
                    records[t.name] |= {k: stored[k] for k in ("status", "reason", "steps", "wall_s")} | {
                        "cached": True, "store": str(store.path(key)), "stored_node_ip": stored.get("node_ip")}
                    show(t.name, f"{stored['status']} (stored result, nothing to do)")
                    continue
                todo.append((t, settings))

            bundle_ref = ray.put(read_files(bundle_dir)) if todo else None
            ckpt_refs = {c: ray.put(read_files(c)) for c in {t.aoti.get("checkpoint") for t, _ in todo} if c}
            refs = {}
            for t, settings in todo:
                ckpt = t.aoti.get("checkpoint") if "aoti" in t.steps else None
                show(t.name, "scheduled")
                refs[t.name] = target_fn.options(resources={t.resource: 1}).remote(
                    bundle_ref, {"name": t.name, **settings}, ckpt_refs.get(ckpt) if ckpt else None, events)
            results = waiter.gather(refs, resources, "the run")
            for t, _settings in todo:
                ok, value = results[t.name]
                if not ok:
                    records[t.name] |= {"status": "failed", "reason": value}
                    continue
                files = value.pop("files")
                record = {k: value[k] for k in ("status", "reason", "steps", "wall_s", "node_id", "node_ip",
                                                "machine", "versions")}
                records[t.name] |= record
                if record["status"] != "failed":  # a failure may be the environment's: run it again next time
                    entry = store.put(records[t.name]["key"], {"target": t.name, "bundle_sha256":
                                                               info["bundle_sha256"], **record}, files)
                    records[t.name]["store"] = str(entry)
                show(t.name, record["status"])
    finally:
        if events is not None:  # progress only; a connection that outlives this run should not keep it
            with contextlib.suppress(Exception):
                ray.kill(events)
        if connected_here:
            ray.shutdown()

    fleet = {
        **mf.run_header(command),
        "bundle": {"path": str(bundle_dir.resolve()), "artifact": info["artifact"], "backend": info["backend"],
                   "precision": info.get("precision"), "bundle_sha256": info["bundle_sha256"]},
        "store": str(store.root.resolve()), "removed_staging": leftovers, "wall_s": round(time.time() - started, 3),
        "targets": [records[t.name] for t in targets],
    }
    fleet["counts"] = {s: sum(r["status"] == s for r in fleet["targets"]) for s in ("passed", "failed", "skipped")}
    fleet["passed"] = fleet["counts"]["passed"] == len(targets)
    return write_fleet_report(fleet, out_dir)
