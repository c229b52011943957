"""What a newcomer sees of a study in MLflow: one tiny study mirrored to a real `mlflow server`,
read back through the REST endpoints MLflow 3.17's web app calls, and opened once in headless
Chromium (Debian: apt-get install -y chromium) as a person would open the printed link."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request

import mlflow
import pytest

from study.journal import JournalState
from tests.conftest import TINY, MlflowServer, run_arena

NAME = "tpe-local-tiny-s0"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


needs_chromium = pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 3-trial study against a real tracking server, and what it printed."""
    workdir = tmp_path_factory.mktemp("ui")
    server = MlflowServer(workdir).start()
    try:
        proc = run_arena(workdir, *TINY, "launcher.slots=2", "study.max_trials=3", f"mlflow.tracking_uri={server.uri}")
        client = mlflow.MlflowClient(tracking_uri=server.uri)
        exp = client.get_experiment_by_name("autoresearch-arena")
        js = JournalState.load(workdir / "studies" / NAME / "journal.jsonl")
        yield workdir, server, proc, client, exp, js
    finally:
        server.stop()


def api(server, path: str, **query) -> dict:
    """A GET the web app makes (its `ajax-api` prefix)."""
    url = f"{server.uri}/ajax-api/2.0/mlflow/{path}?{urllib.parse.urlencode(query, doseq=True)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def page_dom(url: str, width: int = 1440) -> str:
    """The page's DOM as headless Chromium renders it in a fresh profile, once its scripts have run."""
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},1000",
                           "--virtual-time-budget=30000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180).stdout


def text_of(dom: str) -> str:
    """The page's text, in document order, cells separated by ' | '."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    return html.unescape(re.sub(r"\s*(<[^>]+>\s*)+", " | ", dom))


def printed_link(proc, server) -> str:
    [link] = re.findall(r"open (http://\S+)", proc.stdout)
    return link


def test_the_printed_link_is_the_servers_saved_view_of_the_study(served):
    workdir, server, proc, client, exp, js = served
    link = printed_link(proc, server)
    key = f"arena-{NAME}"
    assert link == f"{server.uri}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={key}&workflowType=machine_learning"
    tags = {t["key"]: t["value"] for t in api(server, "experiments/get", experiment_id=exp.experiment_id)["experiment"]["tags"]}
    state = json.loads(json.loads(tags[f"mlflow.sharedViewState.{key}"])["state"])
    runs = client.search_runs([exp.experiment_id], state["searchFilter"], order_by=["metrics.`val_bpb` ASC"])
    ranked = [t for t, _ in sorted(js.results.items(), key=lambda kv: kv[1].score())]
    assert [r.info.run_name for r in runs] == [f"{NAME}/{t}" for t in ranked]


def test_the_charts_endpoint_returns_the_running_best_as_a_staircase(served):
    """The endpoint the run page's line charts call: points in (step, timestamp) order, each segment
    flat or vertical."""
    _, server, _, client, exp, js = served
    [parent] = client.search_runs([exp.experiment_id], "tags.`arena.kind` = 'study'")
    for key in ("best_val_bpb", "best_val_bpb_by_time"):
        points = api(server, "metrics/get-history-bulk-interval", run_ids=parent.info.run_id, metric_key=key,
                     max_results=320)["metrics"]
        assert len(points) >= len(js.results)
        for a, b in zip(points, points[1:]):
            assert a["value"] == b["value"] or a["step"] == b["step"], (key, a, b)
        assert points[-1]["value"] == pytest.approx(min(r.val_bpb for r in js.results.values() if r.ok))


@needs_chromium
def test_the_link_opens_the_training_runs_table_sorted_by_val_bpb_with_its_columns(served):
    """In a fresh browser profile, 1440 pixels wide (MLflow's assistant panel open): the columns are
    rendered (the grid renders only the columns in view) in this order after the pinned run name."""
    _, server, proc, _, _, js = served
    dom = page_dom(printed_link(proc, server))
    text = text_of(dom)
    assert "Sort: val_bpb" in text and f"{NAME}: trials by val_bpb" in text
    assert "Observability" not in text, "the training sidebar, not the GenAI one"
    headers = {col: int(i) for i, col in re.findall(r'class="ag-header-cell[^>]*aria-colindex="(\d+)" col-id="([^"]+)"', dom)}
    wanted = ["metrics.`val_bpb`", "tags.`status`", "tags.`changes`", "params.`hypothesis`"]
    assert set(wanted) <= set(headers), headers
    assert sorted(wanted, key=headers.get) == wanted and headers[wanted[0]] == 2, headers
    ranked = [t for t, _ in sorted(js.results.items(), key=lambda kv: kv[1].score())]
    names = re.findall(rf"{NAME}/(t\d{{4}})", text)
    assert names[:len(ranked)] == ranked, "best first"


@needs_chromium
def test_a_trial_page_leads_with_its_loss_curve(served):
    _, server, _, client, exp, _ = served
    [child] = client.search_runs([exp.experiment_id], "tags.`arena.trial_id` = 't0001'")
    text = text_of(page_dom(f"{server.uri}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}/model-metrics"
                            "?workflowType=machine_learning"))
    assert f"{NAME}/t0001" in text
    sections = re.findall(r"\| (train|Model metrics) \| \((\d+)\)", text)
    assert sections[:2] == [("train", "1"), ("Model metrics", "4")], text[:3000]


@needs_chromium
@pytest.mark.parametrize("width, shorter_than", [(620, 30), (1100, 70)])
def test_the_side_by_side_diff_reads_at_the_width_of_the_artifact_preview(served, tmp_path, width, shorter_than):
    """At a 1440-pixel window with the assistant panel open MLflow 3.17 gives an HTML artifact about
    620 pixels; closed, or on a wider screen, over 1000. At either width nothing needs a horizontal
    scroll and no changed line that fits the width is wrapped (the old diff cut every line at 42
    characters, however wide the preview)."""
    _, _, _, client, exp, js = served
    changed = next(t for t in js.results if t != "t0000")
    [child] = client.search_runs([exp.experiment_id], f"tags.`arena.trial_id` = '{changed}'")
    page = client.download_artifacts(child.info.run_id, "train_diff.html", str(tmp_path))
    probe = tmp_path / "probe.html"
    measure = """<script>window.addEventListener('load', () => {
      const cells = [...document.querySelectorAll('td.add, td.del')];
      const one = parseFloat(getComputedStyle(cells[0]).lineHeight);
      const wrapped = cells.filter(c => c.innerText.length < %d && c.getBoundingClientRect().height > 1.5 * one);
      document.body.setAttribute('data-changed', cells.length);
      document.body.setAttribute('data-wrapped', wrapped.map(c => c.innerText).join(' / '));
      document.body.setAttribute('data-overflow', document.documentElement.scrollWidth > window.innerWidth);
    });</script>""" % shorter_than
    probe.write_text(open(page).read().replace("</body>", measure + "</body>"))
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = dict(re.findall(r'data-(changed|wrapped|overflow)="([^"]*)"', dom))
    assert int(found["changed"]) >= 2 and found["wrapped"] == "" and found["overflow"] == "false", found
