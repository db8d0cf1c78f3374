#!/usr/bin/env python
"""INT8 artifacts judged by the integer kernels of another CPU: prepare the fp32 reference here, judge under qemu.

ONNX Runtime picks its integer GEMM kernel from CPUID at run time, so user-mode emulation with a CPU model that has
AVX2 but no AVX-512/VNNI (`qemu-x86_64 -cpu Haswell`) runs the artifacts through the AVX2 U8S8 kernel
(`vpmaddubsw`, 16-bit pair sums) on a VNNI host. Torch is not needed in the emulated step: `prepare` runs the PyTorch
fp32 reference natively (gate.load_reference: parity inputs, validation frames, ground truth) and stores inputs and
outputs; `judge` imports only numpy and onnxruntime.

    # natively: reference of the checkpoint the export came from
    .venv/bin/python scripts/int8_kernel_check.py prepare artifacts/model.onnx --episodes data/episodes -o ref.npz
    # emulated AVX2-only CPU (the real interpreter binary: qemu-user does not follow the venv's symlink chain)
    PYTHONPATH=.venv/lib/python3.11/site-packages qemu-x86_64 -cpu Haswell $(readlink -f .venv/bin/python) \
        scripts/int8_kernel_check.py judge ref.npz artifacts/portable/model.int8.onnx artifacts/vnni/model.int8.onnx

`judge` first runs the saturation probe (MatMulInteger of 255s by 127s, and by 64s) and prints which kernel class
the numbers show: `saturating` (AVX2 U8S8) or `exact`. Each artifact gets parity MAE / relative L2 of `actions`
against the reference, the task action MAE rise over the reference's, and batch-1 latency (meaningless under
emulation except as a relative figure). JSON goes to --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def prepare(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vla_export import manifest as mf
    from vla_export.quantize import gate as gates

    source = mf.read_manifest(Path(args.onnx))["source"]
    ref = gates.load_reference(source["checkpoint"], source["checkpoint_sha256"], episodes=args.episodes,
                               parity_n=args.parity_n, task_frames=args.task_frames)
    if ref.spec.state:
        sys.exit("recurrent heads need a rollout; this check covers feed-forward heads (the demo's mlp)")
    arrays = {f"parity_in/{k}": v for k, v in ref.parity_feeds.items()}
    arrays |= {f"parity_out/{k}": v for k, v in ref.parity_out.items()}
    arrays |= {f"task_in/{k}": v for k, v in ref.task_feeds.items()}
    arrays |= {f"task_out/{k}": v for k, v in ref.task_out.items()}
    arrays["truth"] = np.asarray(ref.task.actions, dtype=np.float64)
    np.savez(args.output, **arrays)
    print(f"wrote {args.output}: {len(ref.parity_out['actions'])} parity inputs, {len(arrays['truth'])} task frames")


def saturation_probe() -> dict:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k = 64
    result = {}
    for wmax in (127, 64):
        a = np.full((1, k), 255, np.uint8)
        w = np.full((k, 4), wmax, np.int8)
        graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 4])],
                                  [onnx.numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = int(sess.run(None, {"a": a})[0][0, 0])
        result[f"weights_{wmax}"] = {"exact": 255 * k * wmax, "ort": got}
    result["kernel"] = ("saturating (U8S8 16-bit pair sums)" if result["weights_127"]["ort"] !=
                        result["weights_127"]["exact"] else "exact (VNNI / 32-bit accumulation)")
    return result


def judge(args) -> None:
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vla_export.validate.metrics import latency_stats  # numpy only: no torch under emulation

    data = np.load(args.reference)

    def group(prefix):
        return {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(prefix + "/")}

    parity_in, parity_out, task_in, task_out = (group(p) for p in ("parity_in", "parity_out", "task_in", "task_out"))
    truth = data["truth"]
    dim = truth.shape[-1]
    probe = saturation_probe()
    print(f"saturation probe: {probe['kernel']}; 127s: {probe['weights_127']}, 64s: {probe['weights_64']}")
    report = {"probe": probe, "ort": ort.__version__, "artifacts": {}}
    ref_task_mae = float(np.abs(task_out["actions"][:, :dim] - truth).mean())
    for path in args.artifacts:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if args.threads:
            opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run(feeds, names=names, sess=sess, batch=4):
            n = len(next(iter(feeds.values())))
            outs = [sess.run(["actions"], {k: feeds[k][i:i + batch] for k in names})[0] for i in range(0, n, batch)]
            return np.concatenate(outs).astype(np.float64)

        pred = run(parity_in)
        ref = parity_out["actions"].astype(np.float64)
        diff = pred - ref
        task = run(task_in)
        art_task_mae = float(np.abs(task[:, :dim] - truth).mean())
        one = {k: parity_in[k][:1] for k in names}
        for _ in range(args.warmup):
            sess.run(None, one)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            sess.run(None, one)
            times.append((time.perf_counter() - t0) * 1e3)
        row = {"parity_mae": float(np.abs(diff).mean()),
               "parity_rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-12)),
               "task_reference_mae": ref_task_mae, "task_artifact_mae": art_task_mae,
               "task_mae_increase": art_task_mae - ref_task_mae,
               "task_parity_mae": float(np.abs(task - task_out["actions"]).mean()),
               "latency_batch1": latency_stats(times)}
        report["artifacts"][path] = row
        print(f"{path}: parity MAE {row['parity_mae']:.4g}, rel L2 {row['parity_rel_l2']:.4g}, task MAE "
              f"{art_task_mae:.4f} (reference {ref_task_mae:.4f}, rise {row['task_mae_increase']:+.4f}), "
              f"p50 {row['latency_batch1']['p50_ms']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("onnx", help="the fp32 export (its manifest names the checkpoint)")
    p.add_argument("--episodes", required=True)
    p.add_argument("--parity-n", type=int, default=8)
    p.add_argument("--task-frames", type=int, default=64)
    p.add_argument("-o", "--output", default="int8_reference.npz")
    j = sub.add_parser("judge")
    j.add_argument("reference")
    j.add_argument("artifacts", nargs="+")
    j.add_argument("--warmup", type=int, default=3)
    j.add_argument("--iters", type=int, default=20)
    j.add_argument("--threads", type=int, default=1)
    j.add_argument("--json", default=None)
    args = ap.parse_args()
    prepare(args) if args.cmd == "prepare" else judge(args)


if __name__ == "__main__":
    main()
