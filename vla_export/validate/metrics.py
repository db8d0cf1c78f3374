"""Numbers shared by every gate and table: output error metrics and latency statistics."""

from __future__ import annotations

import numpy as np


def error_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """MAE, max abs error, relative L2 and cosine similarity, computed in float64 (after Olive's discrepancy check)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(candidate, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, candidate {out.shape}")
    diff = out - ref
    ref_norm = float(np.linalg.norm(ref))
    out_norm = float(np.linalg.norm(out))
    finite = bool(np.isfinite(out).all())
    return {
        "mae": float(np.abs(diff).mean()) if finite else float("inf"),
        "max_abs": float(np.abs(diff).max()) if finite else float("inf"),
        "rel_l2": float(np.linalg.norm(diff) / max(ref_norm, 1e-12)) if finite else float("inf"),
        "cosine": float((ref * out).sum() / max(ref_norm * out_norm, 1e-12)) if finite else float("nan"),
        "ref_mean_abs": float(np.abs(ref).mean()),
        "finite": finite,
    }


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                    names: list[str] | None = None) -> dict[str, dict[str, float]]:
    """`error_metrics` per output name (all reference outputs unless `names`); a missing output raises."""
    names = names or list(reference)
    missing = [n for n in names if n not in candidate]
    if missing:
        raise ValueError(f"candidate lacks outputs {missing} (has {sorted(candidate)})")
    return {n: error_metrics(reference[n], candidate[n]) for n in names}


def latency_stats(times_ms: list[float], batch: int = 1) -> dict[str, float]:
    """mean/std/min/max/p50/p90/p99 in ms and throughput (samples per second at this batch size)."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings")
    mean = float(t.mean())
    return {
        "iters": int(t.size),
        "mean_ms": mean,
        "std_ms": float(t.std(ddof=1)) if t.size > 1 else 0.0,
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "fps": float(batch * 1e3 / mean) if mean > 0 else float("inf"),
    }


def concat_outputs(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks], axis=0) for k in chunks[0]}
