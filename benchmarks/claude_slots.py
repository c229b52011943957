"""Do slots wait for the Claude agent? A fake-model study on the simulated launcher, printed, not
asserted (timings never sit in tests).

8 slots, trials that take `--trial-seconds` for real and on the virtual clock (so the model's real
thinking overlaps them as it would on real hardware), a scripted model (tests/fake_anthropic.py's
PopulationAgent: reflect, combine, rerun, sweep) that thinks `--latency` seconds per API call. The
same study runs with waves in the background (asks hand out what is ready at once) and in line
(each ask is a wave the slots wait for). Prints the slots' idle share before the last submission,
over the whole study and after the first wave's candidates started.

    python benchmarks/claude_slots.py [--trials 40] [--trial-seconds 3] [--latency 0.5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_anthropic import FakeMessagesAPI, PopulationAgent, simulated_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--trial-seconds", type=float, default=3.0)
    parser.add_argument("--latency", type=float, default=0.5, help="the fake model's seconds per API call")
    args = parser.parse_args()
    os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-benchmark-fake-transport-only")
    print(f"{args.slots} slots, {args.trials} trials of {args.trial_seconds:g} s, model {args.latency:g} s per call")
    for background in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            api = FakeMessagesAPI(policy=PopulationAgent(latency_s=args.latency))
            searcher, finished, idle = simulated_study(
                Path(tmp), api, slots=args.slots, max_trials=args.trials, trial_seconds=args.trial_seconds,
                sleep=True, background=background, idle_wait_s=1.0)
            s = searcher.summary()
            end = max(r.finished_at for _, r in finished)
            print(f"  waves {'in the background' if background else 'in line          '}: idle share "
                  f"{idle['all']:6.1%} (after the first wave {idle['after_first_wave']:6.1%}); study {end:6.1f} "
                  f"virtual s; asks that waited for the model {s['agent_idle_waits']} "
                  f"({s['agent_idle_wait_seconds']:.1f} s); waves {s['agent_waves']}")


if __name__ == "__main__":
    main()
