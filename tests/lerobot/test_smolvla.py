"""LeRobot SmolVLA through vla-export: a real pretrained_model folder (LeRobot's own save_pretrained of a tiny
SmolVLA with random weights and its processors, its VLM a tiny local SmolVLM: tests/lerobot/smolvlm.py) -> checkpoint
--from-lerobot -> export (the flow-matching sampler unrolled, noise as an input; parity gate) -> bundle ->
Policy.act, equal to LeRobot's preprocessor + select_action(noise=...) + postprocessor step for step (task
tokenised with LeRobot's newline step, action queue), the noise Policy draws itself, the bundle running with LeRobot
unimportable, and validate's task MAE on held-out episodes of a LeRobot dataset."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.lerobot.policies import (
    assert_same_weights,
    import_export_bundle,
    load_with_processors,
    random_observations,
    save_with_processors,
)

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot", reason="needs LeRobot 0.4: scripts/lerobot_env.sh")
pytest.importorskip("num2words", reason="SmolVLM's processor needs num2words: pip install 'lerobot[smolvla]'")

STATE_DIM, ACTION_DIM, IMAGE = 5, 4, (3, 32, 32)
CHUNK, N_ACTION, FLOW_STEPS, MAX_DIM, N_TOK = 6, 3, 3, 8, 12
CAMS = ("observation.images.top", "observation.images.wrist")
TASKS = ("pick the cube", "stack the cups\n")


def save_pretrained_smolvla(out: Path, vlm: Path, seed: int = 0, **overrides) -> Path:
    """A LeRobot pretrained_model folder written by LeRobot itself: config.json, model.safetensors, processors."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    settings = dict(vlm_model_name=str(vlm), num_vlm_layers=2, chunk_size=CHUNK, n_action_steps=N_ACTION,
                    num_steps=FLOW_STEPS, resize_imgs_with_padding=(IMAGE[2], IMAGE[1]),
                    tokenizer_max_length=N_TOK, pad_language_to="max_length", max_state_dim=MAX_DIM,
                    max_action_dim=MAX_DIM)
    settings.update(overrides)
    cfg = SmolVLAConfig(
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
                        **{k: PolicyFeature(FeatureType.VISUAL, IMAGE) for k in CAMS}},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        device="cpu", push_to_hub=False, **settings)
    torch.manual_seed(seed)
    policy = SmolVLAPolicy(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    # SmolVLA's default normalisation: MEAN_STD for state and action, IDENTITY for cameras
    stats = {"observation.state": {"mean": torch.randn(STATE_DIM, generator=g),
                                   "std": torch.rand(STATE_DIM, generator=g) + 0.5},
             "action": {"mean": torch.randn(ACTION_DIM, generator=g),
                        "std": torch.rand(ACTION_DIM, generator=g) + 0.5}}
    return save_with_processors(policy, cfg, stats, CAMS, g, out)


def observations(n: int, seed: int = 3, tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """`n` observations with a task each (it changes within the episode, as a per-frame task may)."""
    obs = random_observations(n, CAMS, IMAGE, STATE_DIM, seed)
    for i, o in enumerate(obs):
        o["task"] = tasks[(i // 4) % len(tasks)]
    return obs


def model_call_noise(n_steps: int, seed: int = 11) -> dict[int, np.ndarray]:
    """{control step: flow-matching noise [1, chunk, max_action_dim]} for every step at which the model runs."""
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal((1, CHUNK, MAX_DIM)).astype(np.float32) for i in range(0, n_steps, N_ACTION)}


def lerobot_actions(lerobot_policy, obs: list[dict], noise: dict[int, np.ndarray]) -> np.ndarray:
    """LeRobot's own loop from a new episode: preprocessor (newline + tokenizer + normalizer) ->
    SmolVLAPolicy.select_action(batch, noise=...) -> postprocessor, frames as its datasets give them (float CHW in
    [0, 1]); the noise is given at the steps at which the model runs."""
    policy, pre, post = lerobot_policy
    policy.reset()
    out = []
    for i, o in enumerate(obs):
        batch = {k: torch.from_numpy(o[k]).permute(2, 0, 1).float() / 255.0 for k in CAMS}
        batch["observation.state"] = torch.from_numpy(o["observation.state"])
        batch["task"] = o["task"]
        given = torch.from_numpy(noise[i]) if i in noise else None
        with torch.no_grad():
            out.append(post(policy.select_action(pre(batch), noise=given)).numpy()[0])
    return np.stack(out)


def policy_actions(policy, obs: list[dict], noise: dict[int, np.ndarray] | None) -> np.ndarray:
    """Policy.act step by step from a new episode; `noise` (when given) is handed to the processor's noise step
    before the steps at which the model runs, as LeRobot's select_action is given it."""
    from vla_export.lerobot.smolvla import noise_step

    policy.reset()
    out = []
    for i, o in enumerate(obs):
        if noise is not None and i in noise:
            assert not policy.processor.pending()  # the model runs at exactly these steps
            noise_step(policy.processor).give(noise[i])
        out.append(policy.act(o))
    return np.stack(out)


@pytest.fixture(scope="module")
def smolvla_pipeline(tmp_path_factory):
    from tests.lerobot.smolvlm import write_tiny_smolvlm

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("smolvla")
    vlm = write_tiny_smolvlm(root / "smolvlm", image_size=IMAGE[1])
    start = time.perf_counter()
    paths = import_export_bundle(save_pretrained_smolvla(root / "pretrained_model", vlm), root)
    print(f"\nsmolvla import + export ({FLOW_STEPS} flow steps, parity gate) + bundle: "
          f"{time.perf_counter() - start:.1f} s")
    return {**paths, "vlm": vlm}


@pytest.fixture(scope="module")
def lerobot_policy(smolvla_pipeline):
    """LeRobot's SmolVLAPolicy and its processors, loaded from the pretrained_model folder by LeRobot."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    return load_with_processors(SmolVLAPolicy, smolvla_pipeline["pretrained"])


@pytest.fixture(scope="module")
def bundle_policy(smolvla_pipeline):
    from vla_export.deploy import Policy

    with Policy.load(smolvla_pipeline["bundle"], backend="onnxruntime") as policy:
        yield policy


def test_checkpoint_holds_config_weights_tokenizer_and_processor_as_data(smolvla_pipeline):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ckpt = smolvla_pipeline["checkpoint"]
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "processor.json", "processor.safetensors", "tokenizer.json"} <= names
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architecture"] == "lerobot-smolvla"
    assert config["model_config"]["sampler"] == {"type": "flow_matching_euler", "steps": FLOW_STEPS}
    proc = json.loads((ckpt / "processor.json").read_text())
    assert [s["name"] for s in proc["preprocessor"]] == ["image", "tokenize", "normalize", "stack", "noise", "rename"]
    tok_cfg = proc["preprocessor"][1]["config"]
    assert (tok_cfg["max_length"], tok_cfg["suffix"], tok_cfg["padding_side"]) == (N_TOK, "\n", "right")
    assert proc["preprocessor"][4]["config"]["shape"] == [CHUNK, MAX_DIM]
    assert [s["name"] for s in proc["postprocessor"]] == ["action_chunk", "unnormalize"]
    assert proc["observation"]["task"] == {"type": "text"}
    # the stored tokenizer is the VLM's: same ids as transformers' tokenizer, newline included
    theirs_tok = AutoTokenizer.from_pretrained(smolvla_pipeline["vlm"])
    ours_tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    for text in ("pick the cube\n", "stack the cups\n"):
        assert ours_tok.encode(text).ids == theirs_tok(text)["input_ids"]
    assert_same_weights(smolvla_pipeline["pretrained"], ckpt)


def test_exported_graph_takes_fixed_prompt_and_noise_and_passed_its_gate(smolvla_pipeline):
    manifest = json.loads(Path(str(smolvla_pipeline["artifact"]) + ".json").read_text())
    spec = manifest["io_spec"]
    shapes = {t["name"]: t["shape"] for t in spec["inputs"]}
    assert shapes == {"observation_state": ["batch", STATE_DIM],
                      "observation_images": ["batch", len(CAMS), 3, "height", "width"],
                      "input_ids": ["batch", N_TOK], "attention_mask": ["batch", N_TOK],
                      "noise": ["batch", CHUNK, MAX_DIM]}
    assert [o["shape"] for o in spec["outputs"]] == [["batch", CHUNK, ACTION_DIM]]
    assert manifest["status"] == "passed"


def test_policy_act_matches_lerobot_select_action_given_the_same_noise(lerobot_policy, bundle_policy):
    obs = observations(8)  # n_action_steps 3: the model runs at steps 0, 3, 6; the task changes at step 4
    noise = model_call_noise(len(obs))
    want = lerobot_actions(lerobot_policy, obs, noise)
    got = policy_actions(bundle_policy, obs, noise)
    assert got.shape == (8, ACTION_DIM)
    print(f"\nPolicy.act vs LeRobot select_action, same noise: max abs {np.abs(got - want).max():.3g}")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # a new episode (policy_actions resets): queue dropped, the same inputs give the same actions
    np.testing.assert_allclose(policy_actions(bundle_policy, obs, noise), got, atol=1e-6, rtol=0)


def test_the_task_changes_the_actions(lerobot_policy, bundle_policy):
    """The prompt reaches the graph: other task text, other actions (LeRobot's and ours alike), so the equality
    above is not blind to the tokenizer."""
    obs = observations(1)
    noise = model_call_noise(1)
    other = [{**obs[0], "task": "open the drawer"}]
    a, b = policy_actions(bundle_policy, obs, noise), policy_actions(bundle_policy, other, noise)
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_allclose(b, lerobot_actions(lerobot_policy, other, noise), atol=1e-4, rtol=0)


def test_policy_draws_its_own_noise_from_a_seeded_generator(lerobot_policy, bundle_policy):
    """Without given noise the processor draws it (numpy PCG64, seed 0, re-seeded on reset): the same draws given to
    LeRobot give LeRobot's actions."""
    obs = observations(5, seed=4)
    rng = np.random.default_rng(0)
    drawn = {i: rng.standard_normal((1, CHUNK, MAX_DIM), dtype=np.float32) for i in range(0, 5, N_ACTION)}
    want = lerobot_actions(lerobot_policy, obs, drawn)
    got = policy_actions(bundle_policy, obs, None)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_bundle_runs_without_lerobot(smolvla_pipeline, bundle_policy):
    """Policy.load + act in a fresh interpreter in which `import lerobot` (and transformers, which LeRobot's SmolVLA
    loads its VLM and tokenizer with) fail: the robot needs neither; the tokenizer is the bundle's JSON file."""
    root = smolvla_pipeline["root"]
    obs = observations(5, seed=9)
    want = policy_actions(bundle_policy, obs, None)
    np.savez(root / "obs.npz", **{f"{i}|{k}": v for i, o in enumerate(obs) for k, v in o.items() if k != "task"})
    (root / "tasks.json").write_text(json.dumps([o["task"] for o in obs]))
    script = textwrap.dedent(f"""
        import json, sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lerobot", "transformers"):
                    raise ImportError(name + " is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from vla_export.deploy import Policy
        data = np.load({str(root / "obs.npz")!r})
        tasks = json.load(open({str(root / "tasks.json")!r}))
        obs = [{{k.split("|")[1]: data[k] for k in data.files if k.startswith(f"{{i}}|")}} for i in range(5)]
        policy = Policy.load({str(smolvla_pipeline["bundle"])!r}, backend="onnxruntime")
        np.save({str(root / "got.npy")!r}, np.stack([policy.act({{**o, "task": t}}) for o, t in zip(obs, tasks)]))
        assert not any(m.split(".")[0] in ("lerobot", "transformers") for m in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[2], timeout=300)
    np.testing.assert_allclose(np.load(root / "got.npy"), want, atol=1e-6, rtol=0)


def lerobot_first_actions(pretrained: Path, root: Path, episodes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """LeRobot's own task actions: `LeRobotDataset[i]` items of `episodes` (task text included) -> preprocessor ->
    predict_action_chunk(noise=...) -> the chunk's first action -> postprocessor; and the recorded actions. The noise
    is the one vla-export's task data feeds: its processor's `noise` step from a fresh load (numpy PCG64, seed 0),
    one draw of [frames, chunk, max_action_dim] per episode in split order."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from tests.lerobot.datasets import REPO_ID

    policy = SmolVLAPolicy.from_pretrained(pretrained).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(pretrained))
    dataset = LeRobotDataset(REPO_ID, root=root, video_backend="pyav")
    frames = {e: [i for i in range(len(dataset)) if int(dataset.hf_dataset[i]["episode_index"]) == e]
              for e in episodes}
    rng = np.random.default_rng(0)
    got, truth = [], []
    for e in episodes:
        noise = rng.standard_normal((len(frames[e]), CHUNK, MAX_DIM), dtype=np.float32)
        for j, i in enumerate(frames[e]):
            item = dataset[i]
            with torch.no_grad():
                batch = pre({k: item[k] for k in (*CAMS, "observation.state", "task")})
                chunk = policy.predict_action_chunk(batch, noise=torch.from_numpy(noise[j:j + 1]))
                got.append(post(chunk[:, 0]).numpy()[0])
            truth.append(item["action"].numpy())
    return np.stack(got), np.stack(truth)


def test_validate_task_mae_on_held_out_lerobot_episodes(smolvla_pipeline, tmp_path):
    """`validate --episodes DIR` on a LeRobot v3 dataset (written by LeRobot, video, two tasks, a task change within
    episodes): the reference's task MAE is LeRobot's own SmolVLA on LeRobot's own dataset items, val split."""
    from click.testing import CliRunner

    from tests.lerobot.datasets import write_dataset
    from vla_export.cli import main
    from vla_export.data.task import select_episodes

    data = write_dataset(tmp_path / "ds", cams=CAMS, image_hw=IMAGE[1:], state_dim=STATE_DIM, action_dim=ACTION_DIM,
                         lengths=(4, 3, 4, 3, 4), use_videos=True, tasks=TASKS)
    val = [ref.index for ref in select_episodes(smolvla_pipeline["checkpoint"], data, "val")]
    got, truth = lerobot_first_actions(smolvla_pipeline["pretrained"], data, val)
    want = float(np.abs(got.astype(np.float64) - truth).mean())

    out = tmp_path / "validation.json"
    result = CliRunner().invoke(main, ["validate", str(smolvla_pipeline["artifact"].parent), "--episodes", str(data),
                                       "-o", str(out), "--batch", "1,2"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["results"]
    print(f"\nvalidate: task MAE {row['task']['mae']:.6g}, reference {row['task']['reference_mae']:.6g}, "
          f"LeRobot {want:.6g} ({len(truth)} frames)")
    assert row["task"]["reference_mae"] == pytest.approx(want, abs=1e-5)
    assert row["task"]["mae"] == pytest.approx(want, abs=1e-4)  # ORT fp32: the same actions
    assert len(row["task"]["per_episode_mae"]) == len(val)

    # dynamic INT8 on the same held-out frames (every mode: tests/lerobot/test_pipeline.py)
    result = CliRunner().invoke(main, ["quantize", str(smolvla_pipeline["artifact"]), "--mode", "dynamic",
                                       "--episodes", str(data), "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "q" / "model.int8.onnx.json").read_text())
    assert manifest["status"] == "passed"
    assert manifest["metrics"]["task"]["reference_mae"] == pytest.approx(want, abs=1e-5)


def test_a_longest_padded_lerobot_prompt_gives_the_same_actions(lerobot_policy, bundle_policy):
    """SmolVLA's default `pad_language_to` is "longest" (no padding for one prompt); the graph always takes the
    prompt padded to tokenizer_max_length. Padded tokens are masked out of every attention and leave the position
    ids alone, so LeRobot with "longest" padding gives the actions of the fixed-length graph."""
    from lerobot.processor import TokenizerProcessorStep

    policy, pre, post = lerobot_policy
    (step,) = [s for s in pre.steps if isinstance(s, TokenizerProcessorStep)]
    obs = observations(4)
    noise = model_call_noise(len(obs))
    step.padding = "longest"
    try:
        batch = {k: torch.from_numpy(obs[0][k]).permute(2, 0, 1).float() / 255.0 for k in CAMS}
        batch.update({"observation.state": torch.from_numpy(obs[0]["observation.state"]), "task": obs[0]["task"]})
        assert pre(batch)["observation.language.tokens"].shape[1] < N_TOK  # really unpadded
        want = lerobot_actions(lerobot_policy, obs, noise)
    finally:
        step.padding = "max_length"
    np.testing.assert_allclose(policy_actions(bundle_policy, obs, noise), want, atol=1e-4, rtol=0)


def test_a_vlm_that_cannot_be_read_is_refused_in_one_line(smolvla_pipeline, tmp_path):
    """vlm_model_name names SmolVLA's backbone (config, tokenizer): a folder that is not there -> exit 2, one line."""
    import shutil

    from click.testing import CliRunner

    from vla_export.cli import main

    moved = tmp_path / "pm"
    shutil.copytree(smolvla_pipeline["pretrained"], moved)
    config = json.loads((moved / "config.json").read_text())
    config["vlm_model_name"] = str(tmp_path / "no-such-vlm")
    (moved / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["checkpoint", "--from-lerobot", str(moved), "-o", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert "vlm_model_name" in result.output and "no-such-vlm" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()
