"""After the README's commands: the demo's figures from its output and its MLflow store.

Usage: check_demo.py DEMO_LOG. Exit 1, naming the figure, when one misses its bar.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestration.registry import CHAMPION_ALIAS
from orchestration.tracking import tracking_uri

MIN_VIDEO_TOP1 = 0.90
MIN_ON_TARGET = 2.0


def main(log: Path) -> int:
    text = log.read_text()
    top1 = re.search(r"video top-1 ([\d.]+)%", text)
    on_target = re.search(r"attention on the moving square: ([\d.]+)x uniform", text)
    failures = []
    if top1 is None or float(top1.group(1)) / 100 < MIN_VIDEO_TOP1:
        failures.append(f"video top-1 {top1 and top1.group(1)}% < {MIN_VIDEO_TOP1:.0%}")
    if on_target is None or float(on_target.group(1)) < MIN_ON_TARGET:
        failures.append(f"attention on target {on_target and on_target.group(1)} < {MIN_ON_TARGET}")
    model = MlflowClient(tracking_uri()).get_registered_model("jlstm-demo")
    if CHAMPION_ALIAS not in model.aliases:
        failures.append(f"models:/jlstm-demo@{CHAMPION_ALIAS} does not exist")
    for failure in failures:
        print(f"ci: demo check failed: {failure}", file=sys.stderr)
    if not failures:
        print(f"ci: demo ok: video top-1 {top1.group(1)}%, attention on target "
              f"{on_target.group(1)}x, models:/jlstm-demo@{CHAMPION_ALIAS} is version "
              f"{model.aliases[CHAMPION_ALIAS]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
