"""`vla-export bundle`: one self-contained directory from camera frame + instruction to action.

A bundle holds the artifact (with its external data) and its manifest, a `config.json` that
`data.preprocess.Preprocessor.from_checkpoint` reads (the checkpoint's config without its training section), the
tokenizer files that config names (or, for a checkpoint with its own processor, processor.json and the files it
names instead: `vla_export.processors`), and `bundle.json`: action names/units and their Twist fields, the preprocessing
summary, the artifact's validation and profile rows (or "not validated"/"not profiled"), and the sha256 and size of
every file. Nothing from the training side travels: no weights, optimizer state or episodes.

Refusals (exit 2): an artifact whose files no longer match its manifest, whose source checkpoint changed since it
was built ("stale"), whose manifest says `failed`, or whose validation row failed or predates the artifact. `--force`
bundles it anyway and records why in `bundle.json` (`forced`). An artifact with no validation row is bundled and
marked "not validated".

`verify_bundle` re-hashes every file and refuses a tampered or incomplete bundle with one line naming the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vla_export import manifest as mf
from vla_export.deploy.selftest import DEFAULT_FEEDS, DEFAULT_FRAMES, SELFTEST_ARRAYS, SELFTEST_INFO, build_selftest
from vla_export.errors import UserError

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "vla-export-bundle"
BUNDLE_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
NOT_VALIDATED = "not validated"
NOT_PROFILED = "not profiled"

# geometry_msgs/Twist fields by action name; names outside this table cannot drive a Twist.
TWIST_FIELDS = {
    "linear_x": "linear.x", "linear_y": "linear.y", "linear_z": "linear.z",
    "angular_x": "angular.x", "angular_y": "angular.y", "angular_z": "angular.z",
}


# -- reading what the artifact came from ------------------------------------------------------------------------------
def _source_checkpoint(artifact: Path, manifest: dict[str, Any]) -> Path | None:
    """The checkpoint an artifact was built from: its own `source.checkpoint`, else its parent artifact's."""
    seen = set()
    path, m = artifact, manifest
    while m is not None and str(path) not in seen:
        seen.add(str(path))
        source = m.get("source") or {}
        if source.get("checkpoint"):
            return Path(source["checkpoint"])
        parent = source.get("artifact")
        if not parent:
            return None
        path = Path(parent)
        try:
            m = mf.read_manifest(path)
        except UserError:
            return None
    return None


def _rows_for(report: dict[str, Any] | None, artifact: Path) -> list[dict[str, Any]]:
    """Rows of a validation/profile report about this artifact (matched by resolved path, else by name)."""
    if not report:
        return []
    rows = report.get("results") or report.get("rows") or []
    if isinstance(rows, dict):
        rows = list(rows.values())
    out = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        # validation rows: `path` + `artifact` (name); profile rows: `artifact` (path) + `name`
        where = row.get("path") or row.get("artifact")
        if not where:
            continue
        if "/" in str(where):
            if Path(where).resolve() == artifact.resolve():
                out.append(row)
        elif where == artifact.name:
            out.append(row)
    return out


def _read_report(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); rerun the stage that writes it or pass another file") from e


def _created(stamp: str | None) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(stamp) if stamp else None
    except ValueError:
        return None


def validation_problems(rows: list[dict[str, Any]], report: dict[str, Any] | None,
                        manifest: dict[str, Any]) -> list[str]:
    """Why the artifact's validation does not vouch for it: a failed row, or a row older than the artifact."""
    problems = []
    for row in rows:
        tag = row.get("id") or row.get("artifact")
        if row.get("status") == "failed":
            problems.append(f"validation {tag} failed: {row.get('verdict') or '; '.join(row.get('reasons', []))}")
        recorded = row.get("artifact_sha256") or row.get("sha256")
        if recorded and manifest.get("sha256") and recorded != manifest["sha256"]:
            problems.append(f"validation {tag} is stale: it validated other files (sha256 differs); rerun validate")
    made, checked = _created(manifest.get("created")), _created((report or {}).get("created"))
    if rows and made and checked and checked < made:
        problems.append(f"validation is stale: written {report['created']}, before the artifact ({manifest['created']});"
                        " rerun validate")
    return problems


def _summarise_validation(rows: list[dict[str, Any]], report: dict[str, Any] | None) -> Any:
    if not any(r.get("status") in ("passed", "failed") for r in rows):
        return NOT_VALIDATED  # no rows, or only "skipped" ones (a backend this machine could not run)
    keep = ("id", "status", "verdict", "device", "provider", "precision", "variant", "parity_mae", "parity_rel_l2", "parity_max_abs",
            "parity_cosine", "task", "rollout", "tolerance", "reasons")
    return {"run_id": (report or {}).get("run_id"), "created": (report or {}).get("created"),
            "machine": (report or {}).get("machine"),  # where it was judged: INT8 kernels differ by CPU
            "rows": [{k: r[k] for k in keep if k in r} for r in rows]}


def _summarise_profile(rows: list[dict[str, Any]], report: dict[str, Any] | None) -> Any:
    if not rows:
        return NOT_PROFILED
    return {"run_id": (report or {}).get("run_id"), "created": (report or {}).get("created"),
            "machine": (report or {}).get("machine"), "rows": rows}


def preprocessing_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing section plus what the Preprocessor reads from model_config."""
    mc = config.get("model_config", {})
    return {
        **config.get("preprocessing", {}),
        "latent_query_num": (mc.get("kosmos") or {}).get("latent_query_num"),
        "text_len": mc.get("text_len"),
        "clip_text_len": mc.get("clip_text_len"),
        "head": mc.get("head"),
        "head_dim": mc.get("head_dim"),
        "image_size": config.get("preprocessing", {}).get("image_size", mc.get("image_size")),
    }


def _preprocessing_files(ckpt: Path, config: dict[str, Any]) -> list[str]:
    """File names the preprocessing section names (tokenizers, any other file key a preprocessor adds)."""
    names = []
    for key, value in config.get("preprocessing", {}).items():
        if isinstance(value, str) and (key.endswith("tokenizer") or (ckpt / value).is_file()):
            if "/" in value or value in (".", ".."):
                raise UserError(f"{ckpt}/config.json preprocessing.{key} = {value!r} must be a file name inside the "
                                "checkpoint directory")
            if not (ckpt / value).is_file():
                raise UserError(f"checkpoint {ckpt} lacks {value} (preprocessing.{key} in its config.json); copy the "
                                "tokenizer into the checkpoint directory or pass --checkpoint")
            names.append(value)
    return names


def _self_digest(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != "bundle_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=mf._json_default).encode()).hexdigest()


# -- making a bundle ----------------------------------------------------------------------------------------------------
def make_bundle(artifact: str | os.PathLike, out_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                validation: str | os.PathLike | None = None, profile: str | os.PathLike | None = None,
                force: bool = False, log=None, extra: list[str | os.PathLike] | tuple = (),
                episodes: str | os.PathLike | None = None, with_weights: bool = False,
                budgets: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bundle `artifact` into `out_dir` (staged beside it, renamed when verified). Returns bundle.json's content.

    `validation`/`profile` default to validation.json/profile.json beside the artifact. Refuses a modified, stale or
    failed artifact unless `force`. `extra`: more artifacts of the same checkpoint to ship beside it (e.g. the
    static-QDQ or fp16 ONNX that `vla-export trt --bundle` builds engines from on the target). `episodes`: where the
    self-test frames come from (default: the checkpoint's training episodes, if still there). `with_weights`: also
    ship `model.safetensors`, so the bundle is a checkpoint too and `vla-export aoti --bundle` can compile on the
    target. `budgets`: the self-test's gate table (default: validate's defaults)."""
    from vla_export.checkpoint import read_config
    from vla_export.validate.validate import Artifact, provenance_problems, resolve_tolerances

    log = log or (lambda msg: None)
    artifact = Path(artifact)
    if not artifact.exists():
        raise UserError(f"artifact {artifact} does not exist; build it first (vla-export export/quantize/trt/aoti)")
    manifest = mf.read_manifest(artifact)
    for field in ("backend", "io_spec"):
        if field not in manifest:
            raise UserError(f"{mf.manifest_path(artifact)} has no {field!r}; it is not an artifact manifest")

    ckpt = Path(checkpoint) if checkpoint else _source_checkpoint(artifact, manifest)
    if ckpt is None:
        raise UserError(f"{artifact}'s manifest names no source checkpoint; pass --checkpoint DIR (for its "
                        "preprocessing config and tokenizers)")
    if not (ckpt / CONFIG_FILE).exists():
        raise UserError(f"source checkpoint {ckpt} is missing (needed for its preprocessing config and tokenizers); "
                        "pass --checkpoint DIR")
    config = read_config(ckpt)

    problems, _stale = provenance_problems(Artifact(artifact.resolve(), manifest))
    extras = []
    for e in extra:
        e = Path(e)
        if not e.exists():
            raise UserError(f"extra artifact {e} does not exist; build it first or drop --extra {e}")
        em = mf.read_manifest(e)
        if (em.get("source") or {}).get("checkpoint_sha256") != (manifest.get("source") or {}).get("checkpoint_sha256") \
                and _source_checkpoint(e, em) != _source_checkpoint(artifact, manifest):
            raise UserError(f"extra artifact {e.name} was built from another checkpoint than {artifact.name}; a bundle "
                            "holds artifacts of one checkpoint")
        if e.name == artifact.name or e.name in {x.name for x, _ in extras}:
            raise UserError(f"{e.name} is given twice; each artifact goes into a bundle once")
        problems += [f"{e.name}: {p}" for p in provenance_problems(Artifact(e.resolve(), em))[0]]
        extras.append((e, em))
    if checkpoint:  # an explicit --checkpoint replaces the recorded one; it must still hash to the record
        from vla_export.checkpoint import checkpoint_sha256

        problems = [p for p in problems if "no longer exists" not in p and "no source checkpoint" not in p]
        recorded = (manifest.get("source") or {}).get("checkpoint_sha256")
        if recorded and checkpoint_sha256(ckpt) != recorded:
            problems.append(f"stale: checkpoint {ckpt} is not the one the artifact was built from (sha256 differs)")
    if manifest.get("status") == "failed":
        problems.append(f"its manifest says failed: {manifest.get('failure') or 'see the manifest'}")
    validation_path = Path(validation) if validation else artifact.parent / "validation.json"
    profile_path = Path(profile) if profile else artifact.parent / "profile.json"
    val_report, prof_report = _read_report(validation_path), _read_report(profile_path)
    val_rows, prof_rows = _rows_for(val_report, artifact), _rows_for(prof_report, artifact)
    problems += validation_problems(val_rows, val_report, manifest)
    if problems and not force:
        raise UserError(f"refusing to bundle {artifact.name}: {problems[0]}"
                        + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                        + "; fix it, or pass --force to bundle it anyway (recorded in bundle.json)")
    if not val_rows:
        log(f"warning: {artifact.name} has no row in {validation_path}; the bundle says '{NOT_VALIDATED}'")
    elif not any(r.get("status") in ("passed", "failed") for r in val_rows):
        log(f"warning: validation skipped {artifact.name} ({val_rows[0].get('verdict')}); the bundle says "
            f"'{NOT_VALIDATED}'")

    names = list(config.get("action_names") or [])
    units = list(config.get("action_units") or [""] * len(names))
    action_dim = None
    for t in manifest["io_spec"].get("outputs", []):
        if t["name"] == "actions" and isinstance(t["shape"][-1], int):
            action_dim = t["shape"][-1]
    if action_dim is not None:
        names, units = names[:action_dim], units[:action_dim]
        if len(names) < action_dim:
            raise UserError(f"checkpoint config names {len(names)} actions but the artifact outputs {action_dim}; "
                            "fix action_names in config.json")

    art_files = mf.artifact_files(artifact)
    missing = [p.name for p in art_files if not p.exists()]
    if missing:
        raise UserError(f"artifact {artifact.name} is incomplete: {', '.join(missing)} missing; rebuild it")
    from vla_export.processors import has_processor, processor_files

    # A checkpoint with its own processor (processor.json) carries exactly the files its steps name; the hybrid's
    # tokenizer files and preprocessing section do not travel with it.
    with_processor = has_processor(ckpt)
    pre_files = processor_files(ckpt) if with_processor else _preprocessing_files(ckpt, config)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory; choose another -o")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / BUNDLE_FILE).exists():
        raise UserError(f"{out_dir} is a non-empty directory that is not a bundle; choose another -o (it would be "
                        "replaced)")
    if episodes is None:
        recorded = (config.get("training") or {}).get("episodes_dir")
        episodes = Path(recorded) if recorded and Path(recorded).is_dir() else None
    elif not Path(episodes).is_dir():
        raise UserError(f"--episodes {episodes} is not a directory of episodes; pass the episodes the checkpoint was "
                        "trained on (their validation split gives the self-test frames)")
    weights = ckpt / "model.safetensors"
    if with_weights and not weights.is_file():
        raise UserError(f"--with-weights: checkpoint {ckpt} has no model.safetensors; convert it first with "
                        "`vla-export checkpoint --from ...`")
    parent = mf.check_writable_dir(out_dir.resolve().parent)
    with mf.staging_dir(parent) as tmp:
        stage = tmp / out_dir.name
        stage.mkdir()
        for p in art_files:
            shutil.copyfile(p, stage / p.name)
        shutil.copyfile(mf.manifest_path(artifact), stage / mf.manifest_path(artifact).name)
        for e, _em in extras:
            for p in mf.artifact_files(e):
                shutil.copyfile(p, stage / p.name)
            shutil.copyfile(mf.manifest_path(e), stage / mf.manifest_path(e).name)
        for name in pre_files:
            shutil.copyfile(ckpt / name, stage / name)
        if with_weights:
            shutil.copyfile(weights, stage / weights.name)
        deploy_config = {**config, "training": {}}
        if with_processor:
            deploy_config["preprocessing"] = {"processor": pre_files[0]}
        (stage / CONFIG_FILE).write_text(json.dumps(deploy_config, indent=2) + "\n")
        log(f"self-test set: fp32 reference on {DEFAULT_FEEDS} inputs and {DEFAULT_FRAMES} frames")
        selftest = build_selftest(ckpt, config, stage, budgets or resolve_tolerances(),
                                  episodes=Path(episodes) if episodes else None)

        files = {}
        for p in sorted(stage.iterdir()):
            os.chmod(p, 0o644)
            files[p.name] = {"sha256": mf.sha256_file(p), "bytes": p.stat().st_size}
        info: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "artifact": artifact.name,
            "artifact_files": [p.name for p in art_files],
            "manifest": mf.manifest_path(artifact).name,
            "backend": manifest["backend"],
            "precision": manifest.get("precision", "fp32"),
            "variant": manifest.get("variant"),
            "device": manifest.get("device"),
            "config": CONFIG_FILE,
            "architecture": config.get("architecture"),
            "preprocessing": preprocessing_summary(deploy_config),
            "actions": {"names": names, "units": units,
                        "twist": {n: TWIST_FIELDS[n] for n in names if n in TWIST_FIELDS}},
            "source": {"artifact": str(artifact.resolve()), "artifact_sha256": manifest.get("sha256"),
                       "checkpoint": str(ckpt.resolve()),
                       "checkpoint_sha256": (manifest.get("source") or {}).get("checkpoint_sha256")},
            "validation": _summarise_validation(val_rows, val_report),
            "artifacts": {artifact.name: artifact_entry(artifact, manifest),
                          **{e.name: artifact_entry(e, em, _summarise_validation(_rows_for(val_report, e), val_report))
                             for e, em in extras}},
            "selftest": {"arrays": SELFTEST_ARRAYS, "info": SELFTEST_INFO, "feeds": selftest["feeds"],
                         "frames": selftest["frames"], "frames_from": selftest["frames_from"]},
            "weights": weights.name if with_weights else None,
            "profile": _summarise_profile(prof_rows, prof_report),
            "forced": problems if problems else None,
            "total_bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
        }
        info["bundle_sha256"] = _self_digest(info)
        (stage / BUNDLE_FILE).write_text(json.dumps(info, indent=2, default=mf._json_default) + "\n")
        os.chmod(stage / BUNDLE_FILE, 0o644)
        verify_bundle(stage)
        _replace_dir(stage, out_dir)
    return info


def artifact_entry(path: Path, manifest: dict[str, Any], validation: Any = None) -> dict[str, Any]:
    """What bundle.json says of each artifact it holds: its files, how to run it, where it was judged."""
    entry = {"files": [p.name for p in mf.artifact_files(path)], "manifest": mf.manifest_path(path).name,
             "backend": manifest.get("backend"), "precision": manifest.get("precision", "fp32"),
             "variant": manifest.get("variant"), "device": manifest.get("device"),
             "built_on": manifest.get("machine")}
    if validation is not None:
        entry["validation"] = validation
    return entry


def add_artifact(bundle_dir: str | os.PathLike, artifact: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add an artifact made on the target (a TensorRT engine, an AOTI package) to a verified bundle, re-hashed.

    The artifact and its manifest are already in `bundle_dir` (written under temp names and renamed); bundle.json is
    rewritten under a temp name and renamed over the old one, so a reader sees the old bundle or the new one."""
    bundle_dir = Path(bundle_dir)
    info = read_bundle(bundle_dir)
    names = [p.name for p in mf.artifact_files(artifact)] + [mf.manifest_path(artifact).name]
    files = dict(info.get("files") or {})
    for name in names:
        p = bundle_dir / name
        os.chmod(p, 0o644)
        files[name] = {"sha256": mf.sha256_file(p), "bytes": p.stat().st_size}
    info["files"] = files
    info.setdefault("artifacts", {})[artifact.name] = artifact_entry(artifact, manifest) | {
        "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    info["total_bytes"] = sum(f["bytes"] for f in files.values())
    info["bundle_sha256"] = _self_digest(info)
    mf.write_text_atomic(bundle_dir / BUNDLE_FILE, json.dumps(info, indent=2, default=mf._json_default) + "\n")
    os.chmod(bundle_dir / BUNDLE_FILE, 0o644)
    return verify_bundle(bundle_dir)


def bundle_artifacts(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every artifact a bundle holds (bundles of format 1 without an `artifacts` table hold just `artifact`)."""
    return info.get("artifacts") or {info["artifact"]: {"files": info.get("artifact_files", [info["artifact"]]),
                                                         "manifest": info.get("manifest"),
                                                         "backend": info.get("backend"),
                                                         "precision": info.get("precision"),
                                                         "variant": info.get("variant"),
                                                         "device": info.get("device")}}


def _replace_dir(stage: Path, out_dir: Path) -> None:
    """Swap a staged directory in: the old bundle is renamed aside first, so a reader sees the old or the new one."""
    if out_dir.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.resolve().parent))
        os.replace(out_dir, aside / out_dir.name)
        os.replace(stage, out_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(stage, out_dir)


# -- reading and verifying ------------------------------------------------------------------------------------------------
def read_bundle(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / BUNDLE_FILE
    if not bundle_dir.is_dir():
        raise UserError(f"bundle {bundle_dir} does not exist; make one with `vla-export bundle --artifact A -o "
                        f"{bundle_dir}`")
    if not path.exists():
        raise UserError(f"{bundle_dir} is not a bundle (no {BUNDLE_FILE}); make one with `vla-export bundle`")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); the bundle is damaged: rebuild it") from e
    if info.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{path} is not a vla-export bundle (format={info.get('format')!r})")
    return info


def verify_bundle(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Re-hash every file; raise UserError naming the first file that is missing, changed or unexpected."""
    bundle_dir = Path(bundle_dir)
    info = read_bundle(bundle_dir)
    if info.get("bundle_sha256") != _self_digest(info):
        raise UserError(f"{bundle_dir / BUNDLE_FILE} was edited after the bundle was made (its digest does not "
                        "match); rebuild the bundle")
    files = info.get("files") or {}
    for name, meta in sorted(files.items()):
        p = bundle_dir / name
        if not p.is_file():
            raise UserError(f"bundle {bundle_dir} is incomplete: {name} is missing; rebuild the bundle")
        if p.stat().st_size != meta["bytes"] or mf.sha256_file(p) != meta["sha256"]:
            raise UserError(f"bundle {bundle_dir}: {name} does not match its sha256 in {BUNDLE_FILE} (tampered or "
                            "corrupt); rebuild the bundle")
    extra = sorted(p.name for p in bundle_dir.iterdir() if p.name != BUNDLE_FILE and p.name not in files)
    if extra:
        raise UserError(f"bundle {bundle_dir}: {extra[0]} is not part of the bundle (not in {BUNDLE_FILE}); remove it "
                        "or rebuild the bundle")
    for needed in (info.get("artifact"), info.get("manifest"), info.get("config")):
        if needed not in files:
            raise UserError(f"bundle {bundle_dir}: {BUNDLE_FILE} lists no {needed}; rebuild the bundle")
    return info
