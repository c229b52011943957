"""Do slots wait for the Claude agent, and what does a bad day of the API cost? Fake-model studies
on the simulated launcher, printed, not asserted (timings never sit in tests).

The scripted study (tests/fake_anthropic.py `scripted_study`): 8 slots, trials that take
`--trial-seconds` for real and on the virtual clock (so the model's real thinking overlaps them as
it would on real hardware), the scripted PopulationAgent (reflect, combine, rerun, sweep) thinking
`--latency` seconds per call, behind an API that has a bad day: the requested model refuses every
request of waves 2-4 (answered by the fallback model), every request gets a 529 for 20 minutes of
the agent's clock from wave 5 (virtual: the storm costs no real time), the first request after it
gets a 429 asking for an hour's wait, and one reply carries a whitespace-only text block. Prints
the slots' idle share before the last submission (over the whole study, and after the first
wave's candidates started: the first wave has nothing to overlap with), what the API did and what
the agent did about it, and the cost ledger by model (agent/costs.jsonl).

`--compare` also runs the plain study (no storms) with waves in the background and in line (each
ask a wave the slots wait for).

    python benchmarks/claude_slots.py [--trials 56] [--trial-seconds 3] [--latency 0.5] [--compare]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_anthropic import (  # noqa: E402
    FakeMessagesAPI, PopulationAgent, VirtualClock, scripted_study, simulated_study,
)


def ledger(study: Path) -> list[str]:
    rows = [json.loads(line) for line in (study / "agent" / "costs.jsonl").read_text().splitlines()]
    by_model: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        m = by_model[r["model"]]
        m["calls"] += 1
        m["usd"] += r["usd"]
        for k, v in r["tokens"].items():
            m[k] += v
        m["refused"] += r.get("stop_reason") == "refusal"
        m["unbilled"] += "unbilled" in r
        m["estimated"] += bool(r.get("estimated"))
    lines = [f"  {'model':<18} {'calls':>5} {'input':>9} {'cache_wr':>9} {'cache_rd':>9} {'output':>8} "
             f"{'refused':>7} {'estimated':>9} {'usd':>8}"]
    for model, m in sorted(by_model.items()):
        lines.append(f"  {model:<18} {m['calls']:>5.0f} {m['input']:>9.0f} {m['cache_write']:>9.0f} "
                     f"{m['cache_read']:>9.0f} {m['output']:>8.0f} {m['refused']:>7.0f} {m['estimated']:>9.0f} "
                     f"{m['usd']:>8.4f}")
    total = sum(m["usd"] for m in by_model.values())
    lines.append(f"  {'total':<18} {len(rows):>5} {'':>48} {'':>17} {total:>8.4f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=56)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--trial-seconds", type=float, default=3.0)
    parser.add_argument("--latency", type=float, default=0.5, help="the fake model's seconds per API call")
    parser.add_argument("--compare", action="store_true", help="also the plain study, background vs in line")
    args = parser.parse_args()
    os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-benchmark-fake-transport-only")
    load = os.getloadavg()
    print(f"{args.slots} slots, {args.trials} trials of {args.trial_seconds:g} s, model {args.latency:g} s per call; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp, VirtualClock().in_sdk() as clock:
        searcher, finished, idle, api, researcher = scripted_study(
            Path(tmp), clock, slots=args.slots, max_trials=args.trials, trial_seconds=args.trial_seconds,
            latency_s=args.latency)
        s = searcher.summary()
        waves = [json.loads(line) for line in (Path(tmp) / "study" / "agent" / "waves.jsonl").read_text().splitlines()]
        print(f"\nscripted study: idle share {idle['after_first_wave']:.1%} after the first wave "
              f"({idle['all']:.1%} over the whole study); {len(finished)} trials, all "
              f"{'ok' if all(r.status == 'ok' for _, r in finished) else 'NOT ok'}; agent stopped: "
              f"{s['agent_stop_reason'] or 'never'}")
        print(f"  the API: {researcher.events['refusals']} refusals by the requested model, "
              f"{researcher.events['overloaded']} 529s over {clock.offset / 60:.0f} min of the agent's clock, "
              f"{researcher.events['long_retry_after']} retry-after of an hour, "
              f"{researcher.events['blank_blocks']} blank text block")
        print(f"  the agent: {s['agent_fallback_answers']} answers from the fallback model, {s['agent_error_waves']} "
              f"waves lost to errors (backoff {[w for w in clock.slept if w >= 30][:8]} s), "
              f"{sum(w['reason'].startswith('CallTimeLimit: 429') for w in waves)} wave ended at once by the "
              f"retry-after, {s['agent_blank_blocks_dropped']} blank block dropped, {s['agent_waves']} waves, "
              f"{s['agent_idle_waits']} asks waited for the model ({s['agent_idle_wait_seconds']:.1f} s)")
        print("  cost ledger (agent/costs.jsonl):")
        print("\n".join(ledger(Path(tmp) / "study")))
    if not args.compare:
        return
    print("\nplain study (no storms):")
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
