"""The demo's data: a training set and a test survey, synthetic with a known truth, generated once under
``$ASTRA_HOME/data`` and re-used by later runs; and the training table The Cannon is trained on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astra_provider.demo.console import format_seconds

#: Test survey: stars, visits per star, per-visit S/N range (log-uniform), seed.
DEFAULT_STARS = 200
DEFAULT_VISITS = 2
SURVEY_SNR = (20.0, 200.0)
SURVEY_SEED = 2
#: Training set: stars (apStar only, one visit), S/N, seed. 1,000-2,000 stars make a good Cannon model.
DEFAULT_TRAINING_STARS = 2000
SCIENCE_TRAINING_STARS = 1000
TRAINING_SNR = 150.0
TRAINING_SEED = 1


@dataclass
class Surveys:
    training_root: Path
    training_table: Path
    survey_root: Path
    training: Any  # SurveyTruth
    survey: Any  # SurveyTruth


def prepare_surveys(
    data: Path,
    *,
    stars: int,
    visits: int,
    training_stars: int,
    say: Callable[[str], None],
    truth_model: str = "quadratic",
) -> Surveys:
    """The training set and the test survey under ``data``: read if there, else generated from the truth
    model ``truth_model`` (``"quadratic"`` or ``"independent"``,
    :func:`~astra_provider.synthetic.truth_model.make_truth_model`)."""
    from astra_provider.synthetic.survey import TRUTH_FILENAME, SurveyTruth, generate_survey
    from astra_provider.synthetic.truth_model import make_truth_model

    suffix = "" if truth_model == "quadratic" else f"-{truth_model}"
    training_root = data / f"training-{training_stars}stars-seed{TRAINING_SEED}{suffix}"
    survey_root = data / f"survey-{stars}stars-{visits}visits-seed{SURVEY_SEED}{suffix}"
    model = None if truth_model == "quadratic" else make_truth_model(truth_model)
    say(f"\n==> Synthetic surveys (known truth: the {truth_model} truth model)")
    if training_stars < SCIENCE_TRAINING_STARS:
        say(
            f"  note: {training_stars} training stars is a small training set; a good Cannon "
            f"model needs {SCIENCE_TRAINING_STARS:,}-2,000"
        )
    specs = [
        (
            "training set",
            training_root,
            {
                "n_stars": training_stars,
                "visits_per_star": 1,
                "snr": (TRAINING_SNR, TRAINING_SNR),
                "seed": TRAINING_SEED,
                "filetypes": ("apStar",),
            },
        ),
        (
            "test survey",
            survey_root,
            {
                "n_stars": stars,
                "visits_per_star": visits,
                "snr": SURVEY_SNR,
                "seed": SURVEY_SEED,
                "filetypes": ("apStar", "apVisit"),
            },
        ),
    ]
    truths = []
    for label, root, kwargs in specs:
        truth_path = root / TRUTH_FILENAME
        if truth_path.exists():
            truth = SurveyTruth.read(truth_path)
            counts = ", ".join(f"{n} {ft}" for ft, n in sorted(truth.counts().items()))
            say(f"  {label:<13} re-using {counts} under {root}")
        else:
            say(f"  {label:<13} generating {kwargs['n_stars']} stars under {root} ...")
            truth = generate_survey(root, boss_visits_per_star=0, overwrite=True, model=model, **kwargs)
            counts = ", ".join(f"{n} {ft}" for ft, n in sorted(truth.counts().items()))
            snr = kwargs["snr"]
            snr_text = f"S/N {snr[0]:g}" if snr[0] == snr[1] else f"visit S/N {snr[0]:g}-{snr[1]:g}"
            say(f"  {'':<13} wrote {counts} ({snr_text}) in {format_seconds(truth.seconds)}")
        truths.append(truth)
    training, survey = truths
    table = training_root / "training.csv"
    if not table.exists():
        rows = [
            f"{r['path']},{r['teff']!r},{r['logg']!r},{r['fe_h']!r}" for r in training.of_filetype("apStar")
        ]
        table.write_text("\n".join(["path,teff,logg,fe_h", *rows]) + "\n")
    return Surveys(training_root, table, survey_root, training, survey)
