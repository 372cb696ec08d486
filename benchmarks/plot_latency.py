"""Plot benchmarks/results/pi_latency_<gpu>.json (+ pi_latency_compile_<gpu>.json) as one bar chart.

    python benchmarks/plot_latency.py [GPU name as in the file names]   # writes pi_latency_<gpu>.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    gpu = sys.argv[1] if len(sys.argv) > 1 else "NVIDIA_H100_80GB_HBM3"
    res = json.loads((RESULTS / f"pi_latency_{gpu}.json").read_text())
    extra = RESULTS / f"pi_latency_compile_{gpu}.json"
    compiled = json.loads(extra.read_text())["cases"] if extra.exists() else {}
    bars = [("FlashRT native, replay", lambda e, c: e["flashrt"]["tokens_48"]["replay_ms"]["p50"]),
            ("FlashRT native, infer()", lambda e, c: e["flashrt"]["tokens_48"]["infer_ms"]["p50"]),
            ("FlashRT torch ops, replay", lambda e, c: e["flashrt_torch_ops"]["tokens_48"]["replay_ms"]["p50"]),
            ("LeRobot torch.compile", lambda e, c: c["lerobot_compile"]["sample_actions_ms"]["p50"]),
            ("LeRobot eager", lambda e, c: e["lerobot_eager"]["sample_actions_ms"]["p50"])]
    cases = list(res["cases"])
    fig, ax = plt.subplots(figsize=(12, 4.2))
    width = 0.8 / len(bars)
    for j, (label, get) in enumerate(bars):
        xs, ys = [], []
        for i, case in enumerate(cases):
            try:
                ys.append(get(res["cases"][case], compiled.get(case, {})))
                xs.append(i + (j - len(bars) / 2 + 0.5) * width)
            except KeyError:
                continue
        b = ax.bar(xs, ys, width, label=label)
        ax.bar_label(b, fmt="%.1f", fontsize=7)
    for i, case in enumerate(cases):
        floor = res["cases"][case].get("floor_bf16_ms")
        if floor:
            ax.hlines(floor, i - 0.45, i + 0.45, colors="k", linestyles="dashed", label="bf16 floor" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), [c.replace("_", ", ").replace("cam", " cameras") for c in cases])
    ax.set_ylabel("ms per inference (p50, log scale)")
    ax.set_title(f"{res['machine']['gpu']}: bf16, 10 flow steps, chunk 50, 48-token prompt", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = RESULTS / f"pi_latency_{gpu}.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
