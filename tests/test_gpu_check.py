"""scripts/gpu_check.py is run only when a session is lent a GPU; its scorer part runs here on the
CPU so that it follows the scorer's code (it once compared logits with log-probs after the check's
arguments changed, and nothing noticed)."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_the_gpu_checks_scorer_part_runs_on_a_cpu_and_finds_the_honest_model_causal():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--scorer-only", "--device", "cpu",
                           "--preset", "tiny"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "program vs module forward (fp32, 4 rows): largest logit difference" in proc.stdout
    difference = float(re.search(r"largest logit difference (\S+)", proc.stdout).group(1))
    assert difference < 1e-4, "the program computes what the module computes"
    noise = float(re.search(r"honest causal-check noise on cpu: (\S+) nats", proc.stdout).group(1))
    assert 0 <= noise < 1e-4 and proc.stdout.rstrip().endswith("fits")
    assert re.search(r"evaluation on cpu: \d+ rows of \d+ and \d+ causality checks", proc.stdout)
