"""The report folder's ``index.html``: figures with captions, the relative-performance table,
the settings and the timings, in one self-contained page (images are relative links).

The figures' captions (:data:`FIGURE_CAPTIONS`, filled in by :func:`caption`) live here too:
the pipeline's analyze stage makes the figures and writes what :func:`caption` says of them.

Example:
    >>> caption("separation_by_layer", ratio=0.03)[-50:]
    'how many of the top 3.0% neurons each layer holds.'
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .io import write_text

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; font-size: 1.25rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .92rem; }
th, td { border-bottom: 1px solid #ddd; padding: .35rem .7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f6; }
td.good { background: #e3f4e6; } td.bad { background: #fbe4e4; }
.warn { color: #a5281b; font-size: .8rem; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: .92rem; margin-top: .3rem; }
code { background: #f4f4f6; padding: 0 .25rem; border-radius: 3px; }
.grid { display: grid; grid-template-columns: max-content auto; gap: .2rem 1.2rem; }
"""

FIGURE_CAPTIONS = {
    "gaussian_summary": (
        "Share of {skill} neurons whose hook_pre values pass the normality tests, by layer, and "
        "how often the Gaussian rule p_F >= p_R picks the right skill. The tests treat the "
        "reservoir's tokens as independent although tokens of one text are correlated, so they "
        "reject more often than for independent draws."
    ),
    "separation_histograms": (
        "Forget vs retain hook_pre values of the most separated neurons ({metric}), with the "
        "fitted Gaussians (the paper's Figure 3)."
    ),
    "separation_by_layer": (
        "Where the separating neurons are: the separation metric by layer, and how many of the "
        "top {ratio:.1%} neurons each layer holds."
    ),
    "hypercube_inclusion": (
        "Share of queries inside the forget skill's hypercube mu_F +- alpha*sigma_F as alpha "
        "grows: fit queries, held-out forget queries, and other skills (Figure 5)."
    ),
    "hypercube_geometry": (
        "Normalised log-volume of the forget cube and distance between skill centres (in sigma "
        "units) across layers (Figure 6)."
    ),
    "convexity": (
        "Is the forget region convex? Segment points nearest a forget key, held-out accuracy of "
        "a linear classifier, and false positives of one box vs k boxes."
    ),
}
"""``{figure name: caption}``: templates whose fields (``{skill}``, the forget skill's name;
``{metric}``, the separation metric; ``{ratio}``, Neuron Adjust's ratio) :func:`caption` fills."""


def caption(figure: str, **fields: Any) -> str:
    """The one-line caption of the analyses' figure ``figure`` (a key of
    :data:`FIGURE_CAPTIONS`), its fields filled in from ``fields``.

    Raises:
        ValueError: an unknown figure, or a field its caption needs is missing.
    """
    if figure not in FIGURE_CAPTIONS:
        raise ValueError(f"no caption for figure {figure!r}: known {', '.join(FIGURE_CAPTIONS)}.")
    try:
        return FIGURE_CAPTIONS[figure].format(**fields)
    except KeyError as err:
        raise ValueError(f"the caption of {figure!r} needs {err.args[0]}=.") from None


def _cell_interval(row: pd.Series, value: str, low: str, high: str) -> str:
    v, lo, hi = row.get(value), row.get(low), row.get(high)
    if v is None or pd.isna(v):
        return "&mdash;"
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return f"{v:.2f}"
    return f"{v:.2f} <small>[{lo:.2f}, {hi:.2f}]</small>"


def _relative_html(table: pd.DataFrame) -> str:
    """The relative-performance table: one row per held-out skill (its role, base score with its
    interval and chance level), one column per method (relative performance with its interval)."""
    methods = [m for m in dict.fromkeys(table["method"]) if m != "base"]
    skills = list(dict.fromkeys(table["skill"]))
    t = table.set_index(["skill", "method"])
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    rows = []
    for skill in skills:
        base = t.loc[(skill, "base")]
        role = base.get("role") if "role" in t.columns else None
        role = role if isinstance(role, str) else ""
        informative = bool(base.get("informative", True))
        chance = base.get("chance", float("nan"))
        flag = (
            ""
            if informative
            else " <span class='warn'>uninformative: base score not above chance</span>"
        )
        label = (
            f"<td>{html.escape(skill)} <small>({html.escape(role or 'no role')})</small>{flag}</td>"
            f"<td>{_cell_interval(base, 'score', 'score_low', 'score_high')}</td>"
            f"<td>{'' if pd.isna(chance) else f'{chance:.3g}'}</td>"
        )
        cells = []
        for m in methods:
            row = t.loc[(skill, m)]
            rel = row["relative"]
            cls = ""
            if pd.notna(rel) and role in ("forget", "retain", "general"):
                good = rel <= 0.5 if role == "forget" else rel >= 0.9
                cls = " class='good'" if good else " class='bad'"
            abst = row.get("abstention_rate", 0.0) or 0.0
            extra = f"<br><small>abstains {abst:.0%}</small>" if abst else ""
            cells.append(
                f"<td{cls}>{_cell_interval(row, 'relative', 'relative_low', 'relative_high')}"
                f"{extra}</td>"
            )
        rows.append(f"<tr>{label}{''.join(cells)}</tr>")
    return (
        "<table><thead><tr><th>skill (held-out)</th><th>base score [95% CI]</th><th>chance</th>"
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _robustness_html(prompts: pd.DataFrame | None) -> str:
    """The prompt attacks' section: one row per wrapper, one column per method; each cell the
    forget skill's relative score under that wrapper (method / base under the same wrapper) with
    its interval, and the worst kept skill's."""
    if prompts is None or not len(prompts):
        return ""
    methods = list(dict.fromkeys(prompts["method"]))
    rows = []
    for attack, part in prompts.groupby("attack", sort=False):
        cells = []
        for m in methods:
            own = part[part["method"] == m]
            forget = own[own["role"] == "forget"]
            kept = own[own["role"] != "forget"]["relative"]
            text = (
                _cell_interval(forget.iloc[0], "relative", "relative_low", "relative_high")
                if len(forget)
                else "&ndash;"
            )
            if kept.notna().any():
                text += f"<br><small>kept &ge; {kept.min():.2f}</small>"
            cells.append(f"<td>{text}</td>")
        rows.append(f"<tr><td><code>{html.escape(str(attack))}</code></td>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    return f"""<h2>Robustness: prompt attacks</h2>
<p>The held-out skills rewritten by each wrapper (<code>mechunlearn attack</code>; <code>none</code>
is the unwrapped prompt): each cell is the forget skill's relative score under that wrapper
(method / base model under the same wrapper) with its 95 % interval, and the lowest relative score
of a kept skill under it. A forget score well above its <code>none</code> row came back; a wrapper
that lowers the kept skills too is not an attack. Full table:
<code>tables/attacks_prompts.csv</code>; the attacks: docs/attacks.md.</p>
<table><thead><tr><th>wrapper</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>
"""


def write_report(
    out: str | Path,
    settings: dict[str, Any],
    table: pd.DataFrame,
    figures: Sequence[tuple[str, str]],
    environment: dict[str, str] | None = None,
    timings: dict[str, float] | None = None,
    methods: dict[str, str] | None = None,
    robustness: pd.DataFrame | None = None,
) -> Path:
    """Write ``out/index.html`` and return its path.

    Args:
        out: the report folder (figures are linked relative to it).
        settings: the run's settings (model, skills, n, seed, ...).
        table: :func:`mechunlearn.evaluate`'s DataFrame.
        figures: ``(relative path, one-line caption)`` pairs.
        environment: package versions and machine.
        timings: seconds per stage.
        methods: one line per fitted method (its ``repr``: for the detectors, the
            false-positive rate alpha was calibrated for and the rate measured on held-out
            negatives).
        robustness: the prompt attacks' table (:func:`mechunlearn.attacks.prompt_attacks`),
            shown as a section after the relative performance; None for none.
    """
    out = Path(out)
    timings = dict(timings or {})
    metric = str(table["metric"].iloc[0]) if len(table) else "teacher_forced"
    metric_text = (
        "teacher-forced top-1 accuracy on the reference answer tokens"
        if metric == "teacher_forced"
        else "the paper's generation protocols"
    )
    figs = "\n".join(
        f"<figure><img src='{html.escape(src)}' alt='{html.escape(cap)}'>"
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        for src, cap in figures
    )

    def grid(d: dict[str, Any]) -> str:
        return (
            "<div class='grid'>"
            + "".join(
                f"<div>{html.escape(str(k))}</div><div><code>{html.escape(str(v))}</code></div>"
                for k, v in d.items()
            )
            + "</div>"
        )

    total = sum(float(v) for v in timings.values())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>mechunlearn report: forget {html.escape(str(settings.get("forget")))}</title>
<style>{_CSS}</style></head><body>
<h1>Skill unlearning report: forget <code>{html.escape(str(settings.get("forget")))}</code></h1>
<p class="sub">{html.escape(str(settings.get("model")))} &middot; retain
{html.escape(", ".join(settings.get("retain", [])))} &middot; general
{html.escape(str(settings.get("general")))}</p>

<h2>Relative performance (after / before)</h2>
<p>Scored on held-out examples never used for fitting, with {metric_text}; an abstention
counts as wrong. Each cell is after / before with its 95 % paired-bootstrap interval over
examples. Green meets the goal (forget &le; 0.5, others &ge; 0.9), red does not. A skill whose
base score is not above its chance level says nothing about forgetting and is flagged.
Selective Pruning is the baseline; the methods' full names are kept in every table (a CSV
reader would take "NA" for a missing value).</p>
{_relative_html(table)}
{_robustness_html(robustness)}
<h2>Diagnostics</h2>
<p class="sub">Statistics exclude the BOS token (its activations are outliers of their own) and
padding. The normality tests treat the reservoir's tokens as independent, although tokens of
one text are correlated: they reject more often than they would for independent draws.</p>
{figs or "<p>No figures (run <code>mechunlearn analyze</code>).</p>"}

<h2>Fitted methods</h2>
{grid(methods or {})}
<h2>Settings</h2>
{grid(settings)}
<h2>Timings ({total:.0f} s in all)</h2>
{grid({k: f"{float(v):.1f} s" for k, v in timings.items()})}
<h2>Environment</h2>
{grid(environment or {})}
<p class="sub">Tables: <code>tables/*.csv</code> and <code>*.json</code>; statistics:
<code>stats/</code>; fitted interventions: <code>interventions/</code>.</p>
</body></html>
"""
    return write_text(out / "index.html", page)
