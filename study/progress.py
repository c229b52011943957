"""Live progress with rich: what a person watching a long study wants at a glance."""
from __future__ import annotations

import time

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


class LiveDisplay:
    def __init__(self, study_name: str, simulated: bool, refresh_s: float = 0.5):
        self.study_name = study_name
        self.simulated = simulated
        self.refresh_s = refresh_s
        self._live = Live(Text(""), refresh_per_second=4, transient=False)
        self._last = 0.0

    def start(self) -> None:
        self._live.start()

    def stop(self) -> None:
        self._live.stop()

    def update(self, state, rules) -> None:
        if time.time() - self._last < self.refresh_s:
            return
        self._last = time.time()
        self._live.update(self.render(state, rules))

    def render(self, state, rules):
        slots = Table(show_header=True, header_style="bold", box=None)
        for col in ("slot", "kind", "trial", "running for", "hypothesis"):
            slots.add_column(col)
        by_slot = {r.slot.name: r for r in state.running.values()}
        for slot in state.slots:
            r = by_slot.get(slot.name)
            if r is None:
                slots.add_row(slot.name, slot.device_kind, "[dim]free[/dim]", "", "")
            else:
                since = state.elapsed - (r.trial.submitted_at or state.elapsed)
                slots.add_row(slot.name, slot.device_kind, r.trial.trial_id, f"{since:.0f}s",
                              (r.trial.candidate.hypothesis or "")[:60])
        done = len(state.history)
        failed = sum(1 for _, r in state.history if r.status != "ok")
        best = (f"{state.best[1].val_bpb:.4f} ({state.best[0].trial_id})" if state.best else "-")
        left = []
        if rules.max_trials:
            left.append(f"{max(0, rules.max_trials - done - len(state.running))} trials")
        if rules.max_hours:
            left.append(f"{max(0.0, rules.max_hours * 60 - state.elapsed / 60):.1f} min")
        clock = " [yellow](simulated clock)[/yellow]" if self.simulated else ""
        head = Text.from_markup(
            f"[bold]{self.study_name}[/bold]{clock}  elapsed {state.elapsed / 60:.1f} min  "
            f"done {done}  failed {failed} ({(failed / done * 100 if done else 0):.0f}%)  best {best}  "
            f"left: {', '.join(left) or '-'}  {'[cyan]searcher thinking...[/cyan]' if state.thinking else ''}")
        return Group(head, slots)
