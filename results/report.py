"""Parquet summaries and one self-contained HTML report of a search (plotly.js embedded: opens offline).

Example::

    python results/report.py runs/capacity

Works on finished, interrupted and resumed searches (an interrupted one is marked partial). Writes
``summary/trials.parquet``, ``summary/epochs.parquet`` and ``report.html`` into the experiment
folder. Exit codes: 0 done, 2 bad input (not an experiment folder), 1 other.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import shutil
import sys
import tempfile
import warnings
import webbrowser
from pathlib import Path
from typing import Any

import pandas as pd

from base import metrics as M
from base import storage
from base.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UserError,
    full_disk,
    full_disk_line,
    told_unwritable,
)
from base.files import check_makeable, write_text
from base.layout import (
    BEST_DIR,
    BEST_METRICS,
    CONFUSION_TABLE,
    GENERATED_GRID,
    META_FILE,
    REPORT_FILE,
    SUMMARY_DIR,
    best_files,
    is_own,
)
from base.verdict import verdict_line
from results.limits import count_refused, describe_limits, pareto_mask, space_limits
from results.study import at_fidelity, load_study
from results.summary import (
    COMPLETED,
    DIVERGED,
    ERRORED,
    FINISHED,
    STOPPED_EARLY,
    SUCCEEDED,
    UNFINISHED,
    Experiment,
    count_outcomes,
    load_experiment,
    write_summaries,
)

TOP_CURVES = 5  # learning curves drawn for this many best trials

# Installed before anything else on the page: records uncaught errors and console.error calls, and
# after load marks how many plots exist and how many drew an SVG (read by tests and by people).
_PAGE_CHECK = """
<script>
window.__reportErrors = [];
window.addEventListener('error', function (e) { window.__reportErrors.push(String(e.message)); });
(function () {
  var orig = console.error;
  console.error = function () {
    window.__reportErrors.push(Array.prototype.join.call(arguments, ' '));
    orig.apply(console, arguments);
  };
})();
window.addEventListener('load', function () {
  setTimeout(function () {
    var plots = document.querySelectorAll('.plotly-graph-div');
    var drawn = 0;
    plots.forEach(function (p) { if (p.querySelector('.main-svg')) { drawn += 1; } });
    document.body.setAttribute('data-plots-expected', plots.length);
    document.body.setAttribute('data-plots-rendered', drawn);
    document.body.setAttribute('data-errors', JSON.stringify(window.__reportErrors));
    document.body.setAttribute('data-report-ready', '1');
  }, 300);
});
</script>
"""

_SORT_JS = """
<script>
function sortTable(th) {
  var table = th.closest('table'), idx = Array.prototype.indexOf.call(th.parentNode.children, th);
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var asc = th.getAttribute('data-sort') !== 'asc';
  rows.sort(function (a, b) {
    var x = a.cells[idx].getAttribute('data-v'), y = b.cells[idx].getAttribute('data-v');
    var nx = parseFloat(x), ny = parseFloat(y);
    var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
    return asc ? c : -c;
  });
  rows.forEach(function (r) { table.tBodies[0].appendChild(r); });
  Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute('data-sort'); });
  th.setAttribute('data-sort', asc ? 'asc' : 'desc');
}
</script>
"""

_CSS = """
<style>
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; cursor: pointer; } td.l, th.l { text-align: left; }
.partial { background: #fff3cd; border: 1px solid #e0b000; padding: 10px; margin: 12px 0; font-weight: 600; }
.verdict { padding: 10px; margin: 12px 0; font-weight: 600; border: 1px solid; }
.verdict.reached { background: #e6f4ea; border-color: #34a853; }
.verdict.below { background: #fce8e6; border-color: #d93025; }
.note { color: #777; font-style: italic; } .grid { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
tr.best td { background: #e8f4e8; }
</style>
"""


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _fig_html(fig, div_id: str) -> str:
    fig.update_layout(margin=dict(l=50, r=20, t=50, b=40))
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def _fidelity(e: Experiment) -> int:
    """The epoch at which Optuna's plots compare trials: the first rung, reached by every trial that did not fail."""
    grace = int(e.meta.get("grace_period") or 0)
    max_epochs = int(e.meta.get("max_epochs") or 0)
    if not e.meta.get("early_stopping", True):
        return max_epochs or grace or 1
    return grace or max_epochs or 1


def _optuna_plots(e: Experiment, real, refused: int) -> list[tuple[str, str]]:
    """Optuna's plots over every trial of the study ``real`` at one stated fidelity (``refused``: settings refused
    over the budget, said in the note); a note instead of a plot where data is too thin."""
    import optuna.visualization as ov  # noqa: PLC0415 - optuna's plots import plotly: only where a figure is drawn

    epoch = _fidelity(e)
    study, n_in, n_out = at_fidelity(e, real, epoch)
    sel = e.selection
    note = f"{sel} at epoch {epoch}, the epoch every compared trial reached ({n_in} trials"
    note += f"; {n_out} left out: they failed or were not run to epoch {epoch}" if n_out else ""
    note += f"; {refused} proposed settings over the budget were refused, not trained)" if refused else ")"
    out = []
    plots = [
        ("Optimization history", lambda: ov.plot_optimization_history(study, target_name=f"{sel} @ epoch {epoch}")),
        ("Parallel coordinates", lambda: ov.plot_parallel_coordinate(study, target_name=f"{sel} @ epoch {epoch}")),
        ("Parameter importances", lambda: ov.plot_param_importances(study, target_name=f"{sel} @ epoch {epoch}")),
        ("Slice", lambda: ov.plot_slice(study, target_name=f"{sel} @ epoch {epoch}")),
    ]
    for i, (title, make) in enumerate(plots):
        try:
            if n_in < (2 if "importances" in title else 1):
                raise ValueError("needs more trials")
            with warnings.catch_warnings(record=True) as said:  # Optuna's caveats go on the page, not the terminal
                warnings.simplefilter("always")
                fig = make()
            fig.update_layout(title=f"{title}: {note}", title_font_size=13)
            caveats = "".join(f"<p class='note'>Optuna: {html.escape(m)}</p>"
                              for m in dict.fromkeys(str(w.message).strip() for w in said))
            out.append((title, _fig_html(fig, f"optuna-{i}") + caveats))
        except Exception as exc:  # Optuna refuses some plots on thin studies
            out.append((title, f"<p class='note'>not drawn: {html.escape(str(exc))}</p>"))
    title = f"Learning curves of every trial ({sel} per epoch; x = stopped by the scheduler)"
    try:
        out.append((title, _fig_html(_all_curves(e), "optuna-curves")))
    except Exception as exc:
        out.append((title, f"<p class='note'>not drawn: {html.escape(str(exc))}</p>"))
    return out


def _all_curves(e: Experiment):
    import plotly.graph_objects as go  # noqa: PLC0415 - plotly only where a figure is drawn: the summaries and the checks need none

    if e.epochs.empty:
        raise ValueError("no trial has reported an epoch yet")
    fig = go.Figure()
    for tid, c in e.epochs.groupby("trial_id"):
        fig.add_trace(go.Scatter(x=c[M.EPOCH], y=c[e.selection], mode="lines", name=tid, opacity=0.6,
                                 line=dict(width=1), showlegend=False))
    stopped = e.trials[e.trials["outcome"] == STOPPED_EARLY]["trial_id"].tolist()
    last = e.epochs.groupby("trial_id").tail(1).set_index("trial_id")
    xs = [int(last.loc[t, M.EPOCH]) for t in stopped if t in last.index]
    ys = [float(last.loc[t, e.selection]) for t in stopped if t in last.index]
    if xs:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="stopped by the scheduler",
                                 marker=dict(symbol="x", size=11, color="crimson")))
    fig.update_layout(showlegend=True, xaxis_title="epoch", yaxis_title=e.selection)
    return fig


def _pareto_plot(e: Experiment, best_id: str | None) -> str:
    """Accuracy versus size: every trial at its last epoch (marked with its epochs); the front from full runs only."""
    import plotly.graph_objects as go  # noqa: PLC0415 - plotly only where a figure is drawn: the summaries and the checks need none

    sel, col = e.selection, e.selected
    t = e.trials[e.trials[col].notna() & e.trials[M.STUDENT_PARAMS].notna()]
    if t.empty:
        return "<p class='note'>no trial has a result yet</p>"
    max_epochs = int(e.meta.get("max_epochs") or t["epochs_run"].max())
    fig = go.Figure()
    for outcome, color in ((COMPLETED, "#1f77b4"), (STOPPED_EARLY, "#aaaaaa"), (UNFINISHED, "#ff7f0e")):
        s = t[t["outcome"] == outcome]
        if len(s):
            fig.add_trace(go.Scatter(
                x=s[M.STUDENT_PARAMS], y=s[col], mode="markers+text", name=f"{outcome} (label: epochs)",
                marker=dict(color=color, size=9), text=[str(int(v)) for v in s["epochs_run"]],
                textposition="top center", textfont=dict(size=9, color=color), customdata=s["trial_id"],
                hovertemplate=f"%{{customdata}}<br>params %{{x:,}}<br>{sel} %{{y:.4f}}<br>epochs %{{text}}<extra></extra>"))
    conf = t[t[f"confirmed_{sel}_mean"].notna()] if f"confirmed_{sel}_mean" in t else t.iloc[:0]
    if len(conf):
        fig.add_trace(go.Scatter(
            x=conf[M.STUDENT_PARAMS], y=conf[f"confirmed_{sel}_mean"], mode="markers", name="confirmed: mean ± std over seeds",
            error_y=dict(type="data", array=conf[f"confirmed_{sel}_std"].fillna(0).tolist(), visible=True),
            marker=dict(symbol="square-open", size=12, color="#2ca02c"), customdata=conf["trial_id"],
            hovertemplate=f"%{{customdata}}<br>params %{{x:,}}<br>mean {sel} %{{y:.4f}}<extra></extra>"))
    full = t[t["epochs_run"] >= max_epochs]
    if len(full):
        front = full[pareto_mask(full[col].tolist(), full[M.PARAM_RATIO].tolist())].sort_values(M.STUDENT_PARAMS)
        fig.add_trace(go.Scatter(x=front[M.STUDENT_PARAMS], y=front[col], mode="lines+markers",
                                 name=f"Pareto front of full runs ({max_epochs} epochs)",
                                 line=dict(color="crimson", dash="dash"),
                                 marker=dict(symbol="diamond-open", size=13, color="crimson")))
    if best_id is not None and best_id in set(t["trial_id"]):
        b = t[t["trial_id"] == best_id].iloc[0]
        mean = b.get(f"confirmed_{sel}_mean")
        y = mean if mean is not None and not pd.isna(mean) else b[col]
        fig.add_trace(go.Scatter(x=[b[M.STUDENT_PARAMS]], y=[y], mode="markers", name="best (confirmed)",
                                 marker=dict(symbol="star", size=18, color="gold", line=dict(color="black", width=1))))
    budget = e.param_budget
    teacher = t[M.TEACHER_PARAMS].dropna()
    if budget and len(teacher):
        fig.add_vline(x=budget * float(teacher.iloc[0]), line_dash="dot", line_color="green",
                      annotation_text=f"budget {budget:.0%}")
    what = "Accuracy" if sel == M.VAL_ACC else "Agreement with the teacher"
    fig.update_layout(title=f"{what} versus student size (each point at its last epoch; labels: epochs run)",
                      xaxis_title="student parameters", yaxis_title=sel, xaxis_type="log")
    return _fig_html(fig, "pareto")


def method_labels(trials: pd.DataFrame) -> pd.Series | None:
    """Each trial's method, with "+ features" where feature alignment was on; None if the method was not searched."""
    if "param.method" not in trials:
        return None
    label = trials["param.method"].astype("string").fillna("?")
    for col in ("param.w_feature", "param.w_feature_adv"):
        if col in trials:
            on = pd.to_numeric(trials[col], errors="coerce").fillna(0) > 0
            label = label.where(~on, label + " + features")
    return label


def _method_plot(e: Experiment) -> str | None:
    """The selection metric by method: every trial at the first rung (one fidelity), full-length runs, confirmed test
    means."""
    import plotly.graph_objects as go  # noqa: PLC0415 - plotly only where a figure is drawn: the summaries and the checks need none

    t = e.trials.copy()
    labels = method_labels(t)
    if labels is None:
        return None
    t["label"] = labels
    at, sel = _fidelity(e), e.selection
    test = M.TEST_ACC if sel == M.VAL_ACC else M.TEST_AGREEMENT
    first = e.epochs[e.epochs[M.EPOCH] == at].set_index("trial_id")[sel]
    t["acc_at"] = t["trial_id"].map(first)
    order = sorted(t["label"].dropna().unique())
    fig = go.Figure()
    s = t[t["acc_at"].notna()]
    fig.add_trace(go.Box(x=s["label"], y=s["acc_at"], name=f"every trial, {sel} at epoch {at}", boxpoints="all",
                         jitter=0.4, pointpos=0, marker=dict(color="#1f77b4", size=7), customdata=s["trial_id"],
                         hovertemplate=f"%{{customdata}}<br>%{{x}}<br>{sel} %{{y:.4f}}<extra></extra>"))
    max_epochs = int(e.meta.get("max_epochs") or 0)
    full = t[(t["epochs_run"] >= max_epochs) & t[e.selected].notna()] if max_epochs else t.iloc[:0]
    if len(full):
        fig.add_trace(go.Scatter(x=full["label"], y=full[e.selected], mode="markers",
                                 name=f"{sel} after all {max_epochs} epochs",
                                 marker=dict(symbol="diamond", size=11, color="crimson"), customdata=full["trial_id"],
                                 hovertemplate=f"%{{customdata}}<br>%{{x}}<br>{sel} %{{y:.4f}}<extra></extra>"))
    conf = t[t[f"confirmed_{test}_mean"].notna()] if f"confirmed_{test}_mean" in t else t.iloc[:0]
    if len(conf):
        fig.add_trace(go.Scatter(
            x=conf["label"], y=conf[f"confirmed_{test}_mean"], mode="markers", name=f"confirmed held-out {test} "
            "(mean ± std over seeds)", error_y=dict(type="data", array=conf[f"confirmed_{test}_std"].fillna(0).tolist()),
            marker=dict(symbol="star", size=15, color="gold", line=dict(color="black", width=1)),
            customdata=conf["trial_id"], hovertemplate=f"%{{customdata}}<br>%{{x}}<br>{test} %{{y:.4f}}<extra></extra>"))
    what = "Accuracy" if sel == M.VAL_ACC else "Agreement with the teacher"
    fig.update_layout(title=f"{what} by method", xaxis_title="method", yaxis_title=what.lower(),
                      xaxis=dict(categoryorder="array", categoryarray=order))
    return _fig_html(fig, "methods")


def _confirm_table(e: Experiment) -> str:
    cands = (e.confirmed or {}).get("candidates") or []
    if not cands:
        return "<p class='note'>no confirmation yet</p>"
    val = e.selection
    test = M.TEST_ACC if val == M.VAL_ACC else M.TEST_AGREEMENT
    rows = []
    for c in cands:
        if not c.get("runs"):
            rows.append((c["trial_id"], "no run finished", "", "", ""))
            continue
        rows.append((("★ " if c["trial_id"] == e.confirmed.get("winner") else "") + c["trial_id"],
                     f"{c['param_ratio']:.2%}",
                     f"{c[f'{val}_mean']:.4f} ± {c[f'{val}_std']:.4f}",
                     f"{c[f'{test}_mean']:.4f} ± {c[f'{test}_std']:.4f}",
                     ", ".join(f"{r['seed']}: {r[test]:.4f}" for r in c["runs"]) + f" ({c['epochs']} epochs each)"))
    head = "".join(f"<th class='l'>{h}</th>" for h in ("candidate", "params", f"{val} mean ± std",
                                                       f"{test} mean ± std", f"{test} by seed"))
    body = "".join("<tr>" + "".join(f"<td class='l'>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return ("<p>The best trials within the budget, each run to max_epochs with several seeds; the winner has the "
            f"highest mean {val}.</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _curves_plot(e: Experiment) -> str:
    import plotly.graph_objects as go  # noqa: PLC0415 - plotly only where a figure is drawn: the summaries and the checks need none

    t = e.trials[e.trials[e.selected].notna()].sort_values(e.selected, ascending=False).head(TOP_CURVES)
    if t.empty:
        return "<p class='note'>no trial has a result yet</p>"
    fig = go.Figure()
    for tid in t["trial_id"]:
        c = e.epochs[e.epochs["trial_id"] == tid]
        fig.add_trace(go.Scatter(x=c[M.EPOCH], y=c[e.selection], mode="lines+markers", name=tid))
    fig.update_layout(title=f"Learning curves of the {len(t)} best trials", xaxis_title="epoch",
                      yaxis_title=e.selection)
    return _fig_html(fig, "curves")


def _confusion_plot(best_dir: Path) -> str:
    import plotly.express as px  # noqa: PLC0415 - plotly only where a figure is drawn: the summaries and the checks need none

    path = best_dir / CONFUSION_TABLE
    if not path.exists():
        return ("<p class='note'>none: the task has no labels</p>" if (best_dir / Path(BEST_METRICS).name).exists()
                else "<p class='note'>no best student yet</p>")
    df = pd.read_csv(path, index_col=0)
    fig = px.imshow(df.values, x=[str(c) for c in df.columns], y=[str(i) for i in df.index], text_auto=True,
                    color_continuous_scale="Blues", labels=dict(x="predicted", y="true", color="count"))
    fig.update_layout(title="Best student on the held-out test split", width=560, height=520)
    return _fig_html(fig, "confusion")


def _image(best_dir: Path) -> str:
    path = best_dir / GENERATED_GRID
    if not path.exists():
        return "<p class='note'>no best student yet</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='generated images' src='data:image/png;base64,{data}' style='image-rendering: pixelated; max-width: 560px'>"


def _trials_table(e: Experiment, best_id: str | None) -> str:
    cols = ["trial_id", "outcome"] + [c for c in e.trials.columns if c.startswith("param.")] + [
        "final_val_agreement", "best_val_agreement", "final_val_acc", "best_val_acc", "final_val_loss", "epochs_run",
        M.STUDENT_PARAMS, M.PARAM_RATIO, "within_budget", "pareto", "stopped_at", "confirmed_val_agreement_mean",
        "confirmed_test_agreement_mean", "confirmed_val_acc_mean", "confirmed_test_acc_mean", "confirmed_test_acc_std",
        "confirmed_seeds", M.WALL_S, "error"]
    unmeasured = "agreement" if e.selection == M.VAL_ACC else ("_acc" if not e.labelled else None)
    cols = [c for c in cols if c in e.trials.columns and not (unmeasured and unmeasured in c)]
    head = "".join(f"<th class='{'l' if c in ('trial_id', 'outcome', 'error') else ''}' onclick='sortTable(this)'>"
                   f"{html.escape(c.removeprefix('param.'))}</th>" for c in cols)
    rows = []
    for _, r in e.trials.sort_values(e.selected, ascending=False, na_position="last").iterrows():
        cells = []
        for c in cols:
            v = r[c]
            raw = "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
            cells.append(f"<td class='{'l' if c in ('trial_id', 'outcome', 'error') else ''}' "
                         f"data-v='{html.escape(str(raw))}'>{html.escape(_fmt(v))}</td>")
        cls = " class='best'" if r["trial_id"] == best_id else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table id='trials'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th class='l'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                               for k, v in rows) + "</table>"


def speed_line(speed: dict | None) -> str:
    """What the trials computed in, how it was chosen, and on which machine (search.json's ``speed``)."""
    if not isinstance(speed, dict) or "precision" not in speed:
        return "not recorded (a search started before speed was measured)"
    name = f"{speed['precision']}{' channels_last' if speed.get('channels_last') else ''}"
    how = speed.get("source", "?")
    if speed.get("speedup"):
        how += f", x{float(speed['speedup']):.2f} against fp32"
    return f"{name} ({how}) on {speed.get('machine') or 'an unrecorded machine'}"


def _best_line(best_id: str | None, m: dict) -> str:
    seeds = m.get("seeds") or []
    if m.get(M.VAL_AGREEMENT) is not None:
        acc = ("no accuracy measured (no labels)" if m.get(M.TEST_ACC) is None
               else f"held-out test_acc {m['test_acc']:.4f} ± {m.get('test_acc_std', 0):.4f}")
        return (f"trial {best_id}: test_agreement {m['test_agreement']:.4f} ± {m.get('test_agreement_std', 0):.4f}, "
                f"val_agreement {m['val_agreement']:.4f} ± {m.get('val_agreement_std', 0):.4f} (agreement with the "
                f"teacher, mean ± std over seeds {seeds}, {m.get('epochs')} epochs each); {acc}")
    if len(seeds) > 1:
        return (f"trial {best_id}: held-out test_acc {m['test_acc']:.4f} ± {m.get('test_acc_std', 0):.4f}, val_acc "
                f"{m['val_acc']:.4f} ± {m.get('val_acc_std', 0):.4f} (mean ± std over seeds {seeds}, "
                f"{m.get('epochs')} epochs each)")
    return (f"trial {best_id}: val_acc {_fmt(m.get('val_acc'))}, held-out test_acc {_fmt(m.get('test_acc'))}"
            + (f" ({m['epochs']} epochs)" if m.get("epochs") else ""))


def _header(e: Experiment, counts: dict[str, int], refused: int, best_id: str | None, best: dict) -> list[tuple[str, str]]:
    """The report's first table: what was searched, how, and what came of it."""
    meta = e.meta
    num_samples = meta.get("num_samples", len(e.trials))
    spent = int(e.trials["epochs_run"].sum()) if len(e.trials) else 0
    full = num_samples * int(meta.get("max_epochs") or 0)
    return [
        ("task", str(meta.get("task", "?"))),
        ("space", str(meta.get("space_file", "?"))),
        ("teacher", f"{meta.get('teacher_arch', '?')}, val_acc {_fmt(meta.get('teacher_val_acc'))}, "
                    f"test_acc {_fmt(meta.get('teacher_test_acc'))}" if e.labelled
         else f"{meta.get('teacher_arch', '?')} (no labelled images: its accuracy was not measured)"),
        ("selected on", "val_acc (validation accuracy)" if e.selection == M.VAL_ACC else
         "val_agreement: the student's agreement with the teacher on held-out unlabelled images"
         + ("" if e.labelled else "; NO ACCURACY WAS MEASURED (the task has no labels)")),
        ("speed", speed_line(meta.get("speed"))),
        ("best student", _best_line(best_id, best) if best else
         ("none: no trial succeeded" if sum(counts[k] for k in SUCCEEDED) == 0 and not e.partial
          else "not evaluated yet")),
        ("parameter ratio", f"{best['param_ratio']:.2%} ({best['student_params']:,} of "
                            f"{best['teacher_params']:,})" if best else ""),
        ("budget", (describe_limits(space_limits(meta.get("space") or {})) or "none")
         + (f"; {refused} proposed settings over it were refused before training" if refused else "")),
        ("trials", f"{counts[COMPLETED]} completed, {counts[STOPPED_EARLY]} stopped early by the scheduler, "
                   f"{counts[DIVERGED]} diverged, {counts[ERRORED]} errored, {counts[UNFINISHED]} unfinished "
                   f"(of {num_samples})"),
        ("generator", _spread(e)),
        ("epochs spent", f"{spent} of {full} for a full-budget search ({spent / full:.0%})" if full else str(spent)),
        ("wall time", f"{best['wall_s']:.0f} s" if best else ""),
    ]


def _spread(e: Experiment) -> str:
    """How the generated images spread over the teacher's classes at each trial's last epoch; collapses named."""
    if M.GEN_CLASSES not in e.epochs or e.epochs[M.GEN_CLASSES].isna().all():
        return "not measured (a search of an earlier version)"
    last = e.epochs.dropna(subset=[M.GEN_CLASSES]).sort_values(M.EPOCH).groupby("trial_id").last()
    spread = (f"the teacher saw the generated images as {last[M.GEN_CLASSES].min():.1f} to "
              f"{last[M.GEN_CLASSES].max():.1f} effective classes at the trials' last epochs")
    gone = sorted(last.index[last[M.GEN_COLLAPSED].fillna(0) > 0])
    if not gone:
        return spread + "; no trial's generator collapsed"
    return (f"COLLAPSED in {len(gone)} trial(s) ({', '.join(gone[:8])}{', ...' if len(gone) > 8 else ''}): their "
            f"images fell into a few of the teacher's classes; {spread}")


def _sizes(e: Experiment, best: dict) -> list[tuple[str, str]]:
    """Teacher and student sizes, and the exported student's measured inference cost."""
    teacher_params = best.get(M.TEACHER_PARAMS) or (
        int(e.trials[M.TEACHER_PARAMS].dropna().iloc[0]) if e.trials[M.TEACHER_PARAMS].notna().any() else None)
    sizes = [("teacher", _fmt(teacher_params))]
    if best:
        sizes.append(("best student", f"{best['student_params']:,} ({best['param_ratio']:.2%})"))
    sp = e.trials[M.STUDENT_PARAMS].dropna()
    if len(sp):
        sizes.append(("smallest / largest student tried", f"{int(sp.min()):,} / {int(sp.max()):,}"))
    if best.get(M.LATENCY_MS) is not None:
        sizes += [
            ("best student: FLOPs per image", f"{best[M.FLOPS]:,}"),
            ("best student: CPU latency, batch 1", f"{best[M.LATENCY_MS]:.3f} ms per image (median; "
                                                   f"{best.get(M.THREADS)} threads)"),
            ("best student: CPU throughput, batch 256", f"{best[M.THROUGHPUT]:,.0f} images/s (median)"),
            ("best student: best/student.pt2 on disk", f"{best[M.SIZE_BYTES]:,} bytes (torch.export; "
                                                       "torch.export.load(path).module() runs it)"),
        ]
    return sizes


def _verdict(best: dict) -> str:
    """Did the distillation work? The winner's share of its teacher and, below the bar, why: first on the page."""
    line = verdict_line(best, "the teacher's held-out accuracy (mean over the seeds)" if best.get(M.TEST_ACC) is not None
                        else "agreement with the teacher on held-out images")
    if not line:
        return ""
    return f"<div class='verdict {html.escape(best[M.VERDICT])}' id='verdict'>{html.escape(line)}</div>"


def _banner(e: Experiment, counts: dict[str, int], in_progress: str | None) -> str:
    """A search still running, or one that was interrupted, says so at the top; "" otherwise."""
    if in_progress:
        return (f"<div class='partial' id='in-progress'>In progress: {html.escape(in_progress)}. This page is "
                "rewritten as trials finish and reloads itself every 30 s.</div>")
    if e.partial:
        done, num_samples = sum(counts[k] for k in FINISHED), e.meta.get("num_samples", len(e.trials))
        return (f"<div class='partial'>Partial: this search was interrupted ({done} of {num_samples} trials "
                "finished). Finish it with run_search.py ... --resume; this report shows what exists so far.</div>")
    return ""


def render(e: Experiment, in_progress: str | None = None) -> str:
    from plotly.offline import get_plotlyjs  # noqa: PLC0415 - plotly only where a figure is drawn: the summaries and the checks need none

    best_dir = e.path / BEST_DIR
    best, best_info = best_files(e.path)
    best_id = best_info.get("trial_id")  # only a confirmed, exported winner is called the best
    counts = count_outcomes(e.trials["outcome"])
    real = load_study(e.path)  # read once: the header's count and Optuna's plots
    refused = count_refused(real)
    parts = [f"<h1>Search report: {html.escape(e.path.name)}</h1>",
             f"<p>{html.escape(str((e.meta.get('space') or {}).get('description', '')))}</p>",
             _banner(e, counts, in_progress), _verdict(best), _kv_table(_header(e, counts, refused, best_id, best))]
    what = "Accuracy" if e.selection == M.VAL_ACC else "Agreement with the teacher"
    parts.append(_section(f"{what} versus student size", _pareto_plot(e, best_id)))
    by_method = _method_plot(e)
    if by_method is not None:
        parts.append(_section(f"{what} by method", by_method))
    parts.append(_section("Confirmation over seeds", _confirm_table(e)))
    parts.append(_section("Learning curves", _curves_plot(e)))
    parts += [_section(title, body) for title, body in _optuna_plots(e, real, refused)]
    parts.append(_section("Best student", "<div class='grid'><div><h3>Generated images</h3>" + _image(best_dir)
                          + "</div><div><h3>Confusion matrix</h3>" + _confusion_plot(best_dir) + "</div></div>"))
    parts.append(_section("Size and inference cost", _kv_table(_sizes(e, best))))
    parts.append(_section("All trials (click a column to sort)", _trials_table(e, best_id)))
    refresh = "<meta http-equiv='refresh' content='30'>" if in_progress else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>AKD search report: {html.escape(e.path.name)}</title>{refresh}{_CSS}{_PAGE_CHECK}"
            f"<script type='text/javascript'>{get_plotlyjs()}</script>{_SORT_JS}</head>\n<body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")


def build_report(path: str | Path, in_progress: str | None = None) -> Path:
    """Write the Parquet summaries and ``report.html`` of the experiment at ``path``; returns the report path.

    ``in_progress`` (e.g. "5 of 16 trials finished"): the search is running; the page says so and
    reloads itself. Both files are replaced atomically, so a reader never sees half of one.
    """
    e = load_experiment(path)
    write_summaries(e)
    out = e.path / REPORT_FILE
    write_text(out, render(e, in_progress))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build Parquet summaries and the HTML report of a search.")
    p.add_argument("run_dir", help="the search: its folder <storage>/<name>, or its URI (s3://bucket/runs/<name>, ...)")
    p.add_argument("--out", metavar="DIR", help="also copy the report and the summaries into DIR")
    p.add_argument("--open", action="store_true", help="open the report in the web browser")
    args = p.parse_args(argv)
    try:
        if args.out:
            check_makeable(args.out, "--out")  # before the summaries are built: one line, nothing written
        out, summaries, report = report_of(args.run_dir, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        code = told_unwritable(e, "the report is written into the search folder (and --out): copy a read-only "
                                  "search somewhere writable (cp -a) and pass the copy, and pass an --out you can write to")
        if code is not None:
            return code
        if full_disk(e) is None:
            raise
        print(f"error: {full_disk_line(e, args.run_dir, 'the same command again')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"summaries: {summaries}\nreport:    {report}")
    if args.out:
        print(f"copied to: {Path(args.out, REPORT_FILE)}")
    if args.open:

        if not webbrowser.open(out.resolve().as_uri()):
            print(f"no web browser found here; open {out} yourself")
    return EXIT_OK


def report_of(run_dir: str, copy_to: str | None = None) -> tuple[Path, str, str]:
    """Build the summaries and the report of the search at ``run_dir`` (a folder, or a URI: read into a working copy,
    and the two written back there); copy both into ``copy_to`` if given. (The report's local file, where the
    summaries are, where the report is.)"""
    if not storage.is_uri(run_dir):
        out = build_report(run_dir)
        where = (str(Path(run_dir) / SUMMARY_DIR), str(out))
    else:
        work = Path(tempfile.mkdtemp(prefix="akdtune-report-"))
        mirror = storage.Mirror(run_dir, work / "search", is_own)
        if not storage.exists(run_dir, META_FILE):
            shutil.rmtree(work)
            raise UserError(f"no search at {run_dir}: it holds no akdtune/search.json; pass <storage>/<name> of a search")
        mirror.pull(checkpoints="none")
        out = build_report(mirror.work)
        mirror.push_changed()  # the summaries and the report, written back beside the search
        where = (storage.join(run_dir, SUMMARY_DIR), storage.join(run_dir, REPORT_FILE))
    if copy_to:
        dest = Path(copy_to).expanduser()
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, dest / REPORT_FILE)
        shutil.copytree(out.parent / SUMMARY_DIR, dest / SUMMARY_DIR, dirs_exist_ok=True)
        out = dest / REPORT_FILE
    return out, *where


if __name__ == "__main__":
    sys.exit(main())
