"""The stages of a run as functions, each resumable from what the :class:`RunFolder` holds.

1. :func:`load_skills`: the forget, retain and general skills, each split into a probe half
   (for fitting) and a held-out half (for scoring), by the config's seed.
2. :func:`probe`: **one** forward pass per probed skill collecting everything the run needs
   (``hook_pre`` statistics, last-prompt key vectors, Selective Pruning importances;
   :func:`mechunlearn.collect` with ``what=``).
3. :func:`analyze`: the four analyses, their tables and figures (captions:
   :func:`mechunlearn.report.caption`).
4. :func:`fit_methods`: every method of ``config.methods`` on the probe halves.
5. :func:`evaluate_methods`: scores on the held-out halves, with intervals.
6. :func:`attack_table`: one attack family on a finished run's fitted methods
   (:func:`mechunlearn.pipeline.attack`).

:func:`mechunlearn.pipeline.run` chains them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import distributed
from ..analysis import convexity, gaussian_fit, hypercube, separation
from ..io import DamagedFileError, write_json, write_text
from ..report import caption
from .config import PipelineError, RunConfig
from .folder import CALIBRATION, RunFolder, method_file, probe_jobs, stats_file


@dataclass
class Skills:
    """The run's skills by role, each split into ``(probe, held_out)``.

    Attributes:
        forget: the forget skill's halves.
        retain: ``{name: halves}`` of the skills to keep.
        general: the general-knowledge skill's halves, or None.
    """

    forget: tuple[Any, Any]
    retain: dict[str, tuple[Any, Any]]
    general: tuple[Any, Any] | None = None

    def probed(self) -> dict[str, Any]:
        """``{role key: probe half}``: ``forget``, ``retain:<name>``..., ``general``."""
        out = {"forget": self.forget[0]}
        out.update({f"retain:{n}": s[0] for n, s in self.retain.items()})
        if self.general is not None:
            out["general"] = self.general[0]
        return out

    def held_out(self) -> tuple[dict[str, Any], dict[str, str]]:
        """``({skill name: held-out half}, {skill name: role})``, the skills to score."""
        skills = {self.forget[1].name: self.forget[1]}
        roles = {self.forget[1].name: "forget"}
        for s in self.retain.values():
            skills[s[1].name], roles[s[1].name] = s[1], "retain"
        if self.general is not None:
            skills[self.general[1].name], roles[self.general[1].name] = self.general[1], "general"
        return skills, roles

    @property
    def first_retain(self) -> str:
        return next(iter(self.retain))


def load_skills(config: RunConfig) -> Skills:
    """Load each skill with ``2 n`` examples and split it in halves (seeded).

    Raises:
        PipelineError: an unknown skill, or too few examples for ``n`` (the message says the
            largest ``n`` that fits).
    """
    from ..data import load_skill

    def halves(name: str):
        kwargs = {"n": 2 * config.n, "seed": config.seed, "data_dir": config.data_dir}
        if name.split(":")[0].strip().lower() == "mmlu":
            kwargs["answer_format"] = config.mmlu_format
        try:
            skill = load_skill(name, **kwargs)
        except ValueError as err:
            if "larger than" in str(err) or "only" in str(err):
                try:
                    whole = load_skill(name, data_dir=config.data_dir)
                    fits = len(whole) // 2
                except Exception:  # noqa: BLE001 - the first message is the useful one
                    raise PipelineError(_one_line(err)) from None
                raise PipelineError(
                    f"--n {config.n} needs {2 * config.n} examples of {name!r}, which has only "
                    f"{len(whole)}: use --n {fits} or less."
                ) from None
            raise PipelineError(_one_line(err)) from None
        except LookupError as err:
            raise PipelineError(_one_line(err)) from None
        return skill.split(0.5, seed=config.seed)

    retain = {name: halves(name) for name in config.retain}
    general = halves(config.general) if config.general else None
    return Skills(forget=halves(config.forget), retain=retain, general=general)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:6]) or type(err).__name__


@dataclass
class Probes:
    """What :func:`probe` collected per probed role (``forget``, ``retain:<name>``, ``general``,
    and ``calibration``: the keys of :func:`mechunlearn.calibration_skill` when a detector runs).

    Attributes:
        pre: NeuronStats of ``hook_pre`` (forget and retain skills).
        keys: KeyVectors (every role).
        importance: Importance (forget and retain skills).
    """

    pre: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)
    importance: dict[str, Any] = field(default_factory=dict)

    def negatives(self):
        """The detectors' negatives: key vectors of every probed role but the forget skill
        (retain and general skills, and the shipped calibration questions when collected)."""
        from ..stats import KeyVectors

        return KeyVectors.concat_all([k for r, k in self.keys.items() if r != "forget"])


def probe(
    config: RunConfig, model, skills: Skills, folder: RunFolder, analyses: bool = True
) -> Probes:
    """One forward pass per probed skill: statistics, key vectors and importances (resumable).

    Without ``analyses``, only what ``config``'s methods fit on (:func:`probe_jobs`).
    """
    from ..collect import collect
    from ..stats import Importance, KeyVectors, NeuronStats

    kinds = {"pre": NeuronStats, "keys": KeyVectors, "importance": Importance}
    out = Probes()
    skill_of = dict(skills.probed())
    jobs = probe_jobs(config, analyses)
    if CALIBRATION in jobs:
        from ..data import calibration_skill

        skill_of[CALIBRATION] = calibration_skill()
    for role, wanted in jobs.items():
        skill = skill_of[role]
        paths = {w: stats_file(role, w) for w in wanted}
        loaded: dict[str, Any] = {}
        for w, rel in paths.items():
            path = folder.path(rel)
            if path.exists():
                try:
                    got = kinds[w].load(path)
                except (DamagedFileError, ValueError) as err:
                    warnings.warn(f"{path} is damaged ({err}); collecting it again.", stacklevel=2)
                    continue
                found = got.meta.get("skill")
                if found is not None and found != skill.name:  # e.g. another role's file copied
                    warnings.warn(
                        f"{path} holds statistics of the skill {found!r}, not {skill.name!r} "
                        f"({role}): it is damaged; collecting it again.",
                        stacklevel=2,
                    )
                    continue
                loaded[w] = got
                folder.record(rel)  # listed if a run of an older mechunlearn left it unlisted
        missing = tuple(w for w in wanted if w not in loaded)
        if missing:
            with folder.timer(f"collect {role}"):
                got = collect(
                    model, skill, what=missing, batch_size=config.batch_size, seed=config.seed,
                    quiet=config.quiet,
                )  # fmt: skip
            for w in missing:
                loaded[w] = got[w]
                folder.write(paths[w], lambda p, obj=got[w]: obj.save(p))
        for w, value in loaded.items():
            getattr(out, w)[role] = value
    return out


@dataclass
class _Section:
    """What one analysis makes: its result, its tables ``(name, frame, write the index)`` and
    its figures ``(name, make the figure, caption)``, in the order they are written."""

    result: Any
    tables: list[tuple[str, Any, bool]]
    figures: list[tuple[str, Callable[[], Any], str]]


def _others(probes: Probes, skills: Skills) -> dict[str, Any]:
    """``{skill name: key vectors}`` of every probed skill but the forget skill (calibration
    questions left out)."""
    return {
        skills.probed()[r].name: k
        for r, k in probes.keys.items()
        if r not in ("forget", CALIBRATION)
    }


def _gaussian_section(config: RunConfig, probes: Probes, skills: Skills) -> _Section:
    """The normality checks of the forget skill's ``hook_pre`` values, with the Gaussian rule
    against the first retain skill (:func:`~mechunlearn.analysis.gaussian_fit`)."""
    from .. import plots  # matplotlib: imported on first use

    fit = gaussian_fit(probes.pre["forget"], other=probes.pre[f"retain:{skills.first_retain}"])
    return _Section(
        fit,
        [("gaussian_by_layer", fit.by_layer, True)],
        [(
            "gaussian_summary",
            lambda: plots.plot_gaussian_summary(fit),
            caption("gaussian_summary", skill=skills.forget[0].name),
        )],
    )  # fmt: skip


def _separation_section(config: RunConfig, probes: Probes, skills: Skills) -> _Section:
    """The neurons that separate the forget skill from the first retain skill
    (:func:`~mechunlearn.analysis.separation`)."""
    from .. import plots  # matplotlib: imported on first use

    na_ratio = config.setting("NA", "ratio")
    retain = probes.pre[f"retain:{skills.first_retain}"]
    sep = separation(probes.pre["forget"], retain, metric=config.separation_metric)
    metric = config.separation_metric
    return _Section(
        sep,
        [
            ("separation_top200", sep.top(k=200), False),
            ("separation_by_layer", sep.layer_summary(), True),
        ],
        [
            (
                "separation_histograms",
                lambda: plots.plot_separation_histograms(sep, k=6),
                caption("separation_histograms", metric=metric),
            ),
            (
                "separation_by_layer",
                lambda: plots.plot_separation_by_layer(sep, ratio=na_ratio),
                caption("separation_by_layer", ratio=na_ratio),
            ),
        ],
    )


def _hypercube_section(config: RunConfig, probes: Probes, skills: Skills) -> _Section:
    """The forget skill's key hypercube against every other probed skill
    (:func:`~mechunlearn.analysis.hypercube`)."""
    from .. import plots  # matplotlib: imported on first use

    cube = hypercube(probes.keys["forget"], _others(probes, skills), seed=config.seed)
    n = len(cube.layers)
    chosen = sorted({cube.layers[0], cube.layers[n // 2], cube.layers[-1]})
    return _Section(
        cube,
        [
            ("hypercube_by_layer", cube.per_layer, True),
            ("hypercube_centres", cube.per_other, True),
            ("hypercube_trends", cube.trends, True),
        ],
        [
            (
                "hypercube_inclusion",
                lambda: plots.plot_inclusion_curves(cube, layers=chosen),
                caption("hypercube_inclusion"),
            ),
            (
                "hypercube_geometry",
                lambda: plots.plot_hypercube_layers(cube),
                caption("hypercube_geometry"),
            ),
        ],
    )


def _convexity_section(config: RunConfig, probes: Probes, skills: Skills) -> _Section:
    """Convexity and linear separability of the forget skill's key region
    (:func:`~mechunlearn.analysis.convexity`)."""
    from .. import plots  # matplotlib: imported on first use

    conv = convexity(probes.keys["forget"], _others(probes, skills), seed=config.seed)
    return _Section(
        conv,
        [
            ("convexity_by_layer", conv.per_layer, True),
            ("linear_separability", conv.separability, False),
        ],
        [("convexity", lambda: plots.plot_convexity(conv), caption("convexity"))],
    )


_SECTIONS: dict[str, Callable[[RunConfig, Probes, Skills], _Section]] = {
    "gaussian": _gaussian_section,
    "separation": _separation_section,
    "hypercube": _hypercube_section,
    "convexity": _convexity_section,
}
"""The analyses in the order they run, by the name of their timer."""


def _write_section(folder: RunFolder, section: _Section) -> list[tuple[str, str]]:
    """Write a section's tables (CSV) and figures (PNG + SVG, each closed once saved);
    returns the figures' ``(path, caption)``."""
    from .. import plots

    for name, frame, index in section.tables:
        folder.write(
            f"tables/{name}.csv", lambda p, f=frame, i=index: write_text(p, f.to_csv(index=i))
        )
    written = []
    for name, make, text in section.figures:
        fig = make()
        folder.write(
            f"figures/{name}.png",
            lambda p, fig=fig: plots.save_figure(fig, p.with_suffix("")),
            also=(f"figures/{name}.svg",),
        )
        written.append((f"figures/{name}.png", text))
        plots.close(fig)
    return written


def analyze(config: RunConfig, probes: Probes, skills: Skills, folder: RunFolder) -> dict:
    """The four analyses: tables (CSV/JSON) and figures (PNG + SVG) with captions.

    Returns:
        ``{"figures": [(path, caption)], "summary": {...}}`` (also written to
        ``tables/figures.json`` and ``tables/analysis_summary.json``).
    """
    figures: list[tuple[str, str]] = []
    results = {}
    for name, compute in _SECTIONS.items():
        with folder.timer(f"analyze {name}"):
            section = compute(config, probes, skills)
            figures += _write_section(folder, section)
            results[name] = section.result
    summary = {
        "share_gaussian": float(results["gaussian"].share_gaussian),
        "hypercube": results["hypercube"].summary(),
    }
    folder.write("tables/analysis_summary.json", lambda p: write_json(p, summary))
    folder.write("tables/figures.json", lambda p: write_json(p, figures))
    return {"figures": figures, "summary": summary}


def fit_method(config: RunConfig, method: str, model, skills: Skills, probes: Probes) -> Any:
    """Fit one registered method on the probe halves, as its registration says (``fits_on``):
    :func:`fit_estimator` on the estimator :meth:`RunConfig.make` makes.

    Returns:
        The fitted estimator.
    """
    return fit_estimator(
        config.make(method), config.spec(method), model, skills, probes, config.batch_size
    )


def fit_estimator(
    estimator, spec, model, skills: Skills, probes: Probes, batch_size: int = 16
) -> Any:
    """Fit a made estimator of a registered method on the probe halves (``spec.fits_on``).

    ``"pre"`` and ``"importance"`` methods fit on the forget skill's and the first retain
    skill's statistics; ``"keys"`` methods on the forget skill's key vectors with every other
    probed skill's (and the calibration questions') as negatives, or alone for a detector whose
    settings fix its region (``takes_negatives`` False); ``"model"`` methods on the
    model and the probe halves (every retain skill and the general skill where the method takes
    several kept skills, else the first retain skill), with ``batch_size`` where ``fit`` takes
    one, and ``general=None`` where it takes a default general text of its own (LUNAR's: the run
    gives its general skill among the kept ones, or has none). The fit of a study that tunes a
    setting (:func:`mechunlearn.tune`'s ``fit``).

    Returns:
        The fitted estimator.
    """
    from ..interventions import Detector

    retain = f"retain:{skills.first_retain}"
    fixed_region = isinstance(estimator, Detector) and not estimator.takes_negatives
    if spec.fits_on == "keys" and fixed_region:
        return estimator.fit(probes.keys["forget"])
    if spec.fits_on == "pre":
        return estimator.fit(probes.pre["forget"], probes.pre[retain])
    if spec.fits_on == "importance":
        return estimator.fit(probes.importance["forget"], probes.importance[retain])
    if spec.fits_on == "keys":
        return estimator.fit(probes.keys["forget"], probes.negatives())
    kept = [halves[0] for halves in skills.retain.values()]
    takes = inspect.signature(estimator.fit).parameters
    kwargs: dict[str, Any] = {}
    if spec.multi_retain and skills.general is not None:
        kept.append(skills.general[0])  # general text as one more floor
    if "general" in takes:  # the run's general skill (above, or none), not the method's default
        kwargs["general"] = None
    if "batch_size" in takes:
        kwargs["batch_size"] = batch_size
    return estimator.fit(model, skills.forget[0], kept if spec.multi_retain else kept[0], **kwargs)


def fit_methods(
    config: RunConfig,
    model,
    skills: Skills,
    probes: Probes,
    folder: RunFolder,
    skills_for: Mapping[str, Skills] | None = None,
) -> dict[str, Any]:
    """Fit every method of ``config.methods`` on the probe halves (resumable).

    Args:
        config, model, skills, probes, folder: the run's.
        skills_for: ``{registered method name: Skills}`` for methods that train on other
            halves than the run's (a study that drops prompts too long for SIMU).

    Returns:
        ``{table name: fitted intervention}`` (the registration's ``full_name``, e.g.
        ``"NeuronAdjust"``).
    """
    fitted = {}
    for method in config.methods:
        spec = config.spec(method)
        name = config.table_name(method)
        fitted[name] = folder.load_or_make(
            method_file(name),
            spec.cls.load,
            lambda method=method, spec=spec: fit_method(
                config, method, model, (skills_for or {}).get(spec.name, skills), probes
            ),
            lambda obj, p: obj.save(p),
            timer=f"fit {name}",
        )
    return fitted


def evaluate_methods(
    config: RunConfig, model, skills: Skills, fitted: Mapping[str, Any], folder: RunFolder
):
    """Score the held-out halves with each method; ``tables/evaluation.csv`` and
    ``relative_performance.csv`` (with intervals)."""
    from ..evaluation import evaluate, relative_table

    held, roles = skills.held_out()
    with folder.timer("evaluate"):
        table = evaluate(
            model, held, fitted, batch_size=config.batch_size, quiet=config.quiet, roles=roles,
            n_boot=config.n_boot, seed=config.seed,
        )  # fmt: skip
    folder.write("tables/evaluation.csv", lambda p: write_text(p, table.to_csv(index=False)))
    folder.write(
        "tables/evaluation.json",
        lambda p: write_text(p, table.to_json(orient="records", indent=2)),
    )
    rel = relative_table(table)
    cells = relative_table(table, interval=True)
    both = rel.join(cells.add_suffix(" [95% CI]"))
    folder.write("tables/relative_performance.csv", lambda p: write_text(p, both.to_csv()))
    return table


def load_model_for(config: RunConfig, folder: RunFolder | None = None):
    """The config's model, on its device and dtype (under torchrun: this rank's GPU)."""
    from ..models import load_model

    device = config.device or distributed.rank_device()

    def make():
        return load_model(config.model, device=device, dtype=config.dtype, quiet=config.quiet)

    if folder is None:
        return make()
    with folder.timer("load model"):
        return make()


# ----------------------------------------------------------------------------------- attacks
ATTACKS = ("prompts", "relearning", "quantization", "residual")
"""The attack families of ``mechunlearn attack`` (:mod:`mechunlearn.attacks`)."""


def load_fitted(config: RunConfig, folder: RunFolder) -> dict[str, Any]:
    """The fitted methods a finished run of ``config`` saved in ``folder`` (nothing is fitted).

    Returns:
        ``{table name: fitted intervention}``, named as :func:`fit_methods` names them (the
        registration's ``full_name``, or the label of a labelled variant).

    Raises:
        PipelineError: a method of ``config.methods`` the run did not save.
    """
    fitted, missing = {}, []
    for method in config.methods:
        spec = config.spec(method)
        name = config.table_name(method)
        path = folder.path(method_file(name))
        if path.is_file():
            fitted[name] = spec.cls.load(path)
        else:
            missing.append(spec.name)
    if missing:
        raise PipelineError(
            f"{folder.out} holds no fitted {', '.join(missing)}: finish the run first "
            f"(mechunlearn unlearn --out {folder.out} with the run's settings)."
        )
    return fitted


def attack_table(
    family: str,
    config: RunConfig,
    model,
    fitted: Mapping[str, Any],
    skills: Skills,
    steps: Sequence[int] | None = None,
    store: MutableMapping[str, Any] | None = None,
):
    """One attack family of :data:`ATTACKS` on the fitted methods: its table.

    The held-out halves are scored; the probe halves are the few-shot examples, the relearning
    attack's training set (the control fine-tunes on the general skill's probe half, else the
    first kept skill's) and the linear probes' training set.

    Args:
        family: one of :data:`ATTACKS`.
        config, model, fitted, skills: the run's.
        steps: the relearning attack's step counts (default :data:`mechunlearn.attacks.STEPS`).
        store: where the relearning attack keeps its finished runs (resume after a kill).

    Returns:
        The family's DataFrame (:mod:`mechunlearn.attacks`).
    """
    from .. import attacks as atk

    held, roles = skills.held_out()
    forget_probe, forget_held = skills.forget
    first = skills.retain[skills.first_retain]
    kept = {name: s for name, s in held.items() if roles[name] != "forget"}
    control = skills.general[0] if skills.general is not None else first[0]
    common = {"quiet": config.quiet}
    boot = {"n_boot": config.n_boot, "seed": config.seed}
    if family == "prompts":
        return atk.prompt_attacks(
            model, fitted, forget_held, kept, shots=forget_probe, roles=roles,
            batch_size=config.batch_size, **common, **boot,
        )  # fmt: skip
    if family == "relearning":
        return atk.relearning(
            model, fitted, forget_probe, held, roles, control=control,
            steps=steps or atk.STEPS, store=store, **common, **boot,
        )  # fmt: skip
    if family == "quantization":
        return atk.requantization(
            model, fitted, held, roles, batch_size=config.batch_size, **common, **boot
        )
    if family == "residual":
        return atk.residual_knowledge(
            model, fitted, forget_probe, first[0], forget_held, first[1],
            batch_size=config.batch_size, **common,
        )  # fmt: skip
    raise PipelineError(f"Unknown attack {family!r}: choose among {', '.join(ATTACKS)}.")
