"""LeRobot's saved processor pipelines -> a vla-export `Processor`, reading JSON and safetensors only.

LeRobot 0.4 writes `policy_preprocessor.json` / `policy_postprocessor.json` (steps by `registry_name` with a plain
`config`, and a `state_file` of tensors for steps that have them) beside the weights. The steps a policy needs at
inference map one to one: `rename_observations_processor` -> `rename`, `normalizer_processor` -> `normalize`,
`unnormalizer_processor` -> `unnormalize` (same modes, same stats, same eps), for a policy with a prompt (SmolVLA)
`tokenizer_processor` -> `tokenize` (its tokenizer saved as a `tokenizers` JSON file) with
`smolvla_new_line_processor` as the step's "\\n" suffix. `to_batch_processor` and
`device_processor` have no counterpart: the processor batches by itself and runs on numpy. Any other step is refused
by name, so a policy is never exported with part of its preprocessing silently missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vla_export.errors import UserError
from vla_export.manifest import read_json

PREPROCESSOR_JSON = "policy_preprocessor.json"
POSTPROCESSOR_JSON = "policy_postprocessor.json"
NO_OP_STEPS = {"to_batch_processor", "device_processor"}
MODES = {"MEAN_STD": "mean_std", "MIN_MAX": "min_max", "QUANTILES": "quantiles", "QUANTILE10": "quantile10",
         "IDENTITY": "identity"}


def read_pipeline(src: Path, name: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """[(registry_name, config, state)] of one saved LeRobot pipeline."""
    from safetensors.numpy import load_file

    path = src / name
    data = read_json(path, missing="a LeRobot 0.4 pretrained_model folder has policy_preprocessor.json and "
                     "policy_postprocessor.json beside model.safetensors (re-save it with LeRobot >= 0.4)",
                     invalid="re-save the policy with LeRobot's save_pretrained")
    steps = []
    for i, entry in enumerate(data.get("steps") or []):
        reg = entry.get("registry_name")
        if reg is None:
            raise UserError(f"{path}: step {i} has no registry_name (a class path: {entry.get('class')!r}); "
                            "vla-export reads registered LeRobot steps only")
        state = {}
        if entry.get("state_file"):
            state_path = src / entry["state_file"]
            if "/" in entry["state_file"] or not state_path.is_file():
                raise UserError(f"{path}: step {i} names state file {entry['state_file']!r}, which is not in {src}")
            try:
                state = load_file(str(state_path))
            except Exception as e:  # SafetensorError
                raise UserError(f"{state_path} is not a readable safetensors file ({str(e)[:160]})") from e
        steps.append((reg, entry.get("config") or {}, state))
    return steps


def _norm_features(config: dict[str, Any], state: dict[str, Any], actions: bool) -> tuple[dict[str, str], dict]:
    """{key: mode} and {key: {stat: array}} of a LeRobot (un)normalizer step, for observations or the action."""
    norm_map = config.get("norm_map") or {}
    features, stats = {}, {}
    for key, feat in (config.get("features") or {}).items():
        if (feat["type"] == "ACTION") != actions:
            continue
        mode = MODES.get(norm_map.get(feat["type"], "IDENTITY"))
        if mode is None:
            raise UserError(f"normalisation mode {norm_map.get(feat['type'])!r} of {key} is not supported")
        own = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == key}
        if mode != "identity" and not own:
            mode = "identity"  # LeRobot leaves a feature without stats unchanged
        features[key] = mode
        if own:
            stats[key] = own
    normalize_keys = config.get("normalize_observation_keys")
    if normalize_keys is not None and not actions:
        features = {k: v for k, v in features.items() if k in normalize_keys}
    return features, stats


def processor_from_lerobot(src: str | Path, model_config: dict[str, Any], arch_module, files_dir: Path | None = None):
    """The vla-export processor of a LeRobot pretrained_model folder; `arch_module` adds the policy's own steps
    (`processor_steps`: observation schema + steps before/after normalisation, `chunk_step`) and, for a policy with
    a task prompt, `tokenize_step`, which writes the tokenizer file into `files_dir` (the processor is bound to it,
    so saving the processor copies that file)."""
    from vla_export.processors import NormalizeStep, Processor, RenameStep, UnnormalizeStep
    from vla_export.processors.core import FLOAT64_ARRAY_MSG

    src = Path(src)
    observation, before, after = arch_module.processor_steps(model_config)
    pre, post = [], []
    renames: dict[str, str] = {}
    newline = False
    text_steps = ["tokenizer_processor", "smolvla_new_line_processor"] if hasattr(arch_module, "tokenize_step") else []
    for reg, config, state in read_pipeline(src, PREPROCESSOR_JSON):
        if reg in NO_OP_STEPS:
            continue
        if reg == "smolvla_new_line_processor" and text_steps:
            newline = True  # LeRobot appends "\n" to a task lacking it, before its tokenizer step
        elif reg == "tokenizer_processor" and text_steps:
            if files_dir is None:
                raise UserError("a tokenizer step needs a directory for its tokenizer file")
            pre.append(arch_module.tokenize_step(model_config, config, newline, files_dir))
        elif reg == "rename_observations_processor":
            renames.update(config.get("rename_map") or {})
        elif reg == "normalizer_processor":
            features, stats = _norm_features(config, state, actions=False)
            pre.append(NormalizeStep.with_stats(features, stats, eps=config.get("eps", 1e-8)))
        else:
            supported = ["rename_observations_processor", "normalizer_processor", *text_steps, *sorted(NO_OP_STEPS)]
            raise UserError(f"{src / PREPROCESSOR_JSON}: step {reg!r} is not supported by vla-export's LeRobot "
                            f"import yet (supported: {', '.join(supported)})")
    for reg, config, state in read_pipeline(src, POSTPROCESSOR_JSON):
        if reg in NO_OP_STEPS:
            continue
        if reg == "unnormalizer_processor":
            features, stats = _norm_features(config, state, actions=True)
            post.append(UnnormalizeStep.with_stats(features, stats, eps=config.get("eps", 1e-8)))
        else:
            raise UserError(f"{src / POSTPROCESSOR_JSON}: step {reg!r} is not supported by vla-export's LeRobot "
                            "import yet (supported: unnormalizer_processor, to_batch_processor, device_processor)")
    steps = [*before, *pre, *after]
    if renames:  # the robot's keys are the rename map's sources
        inverse = {new: old for old, new in renames.items()}
        observation = {inverse.get(k, k): v for k, v in observation.items()}
        steps.insert(0, RenameStep(renames, keep_others=True))
    chunk = arch_module.chunk_step(model_config)
    # The actions are joint targets (LeRobot's arms are position-controlled), so the node holds the last command on
    # bad input: a zero target would move every joint to 0. No joint_names: LeRobot 0.4 saves features as
    # PolicyFeature(type, shape) only (lerobot/configs/types.py: config.json's output_features and the normalizer
    # steps' features alike) and the dataset's action names stay in the dataset's meta/info.json, so a
    # JointTrajectory needs the node's joint_names; a Float64MultiArray is the action vector in action order.
    output = {"kind": "joint", "msg_type": FLOAT64_ARRAY_MSG, "fail_safe": "hold"}
    return Processor(observation, steps, [chunk, *post], action_key="action",
                     action_dim=int(model_config["action_dim"]), output=output, base_dir=files_dir)
