"""The text and figures of an audit report: a plain-language risk summary, markdown and HTML.

:func:`risk_summary` explains the strongest attack's TPR at 1% FPR for a reader who is not a
machine learning specialist. :func:`render_markdown` writes the whole report from an
:class:`fcre_utils.audit.AuditReport`, and :func:`render_html` renders it with mistune.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import mistune
import pandas as pd
import torch

from .metrics import format_table
from .plotting import MEMBER_COLOURS
from .suite import summarise

if TYPE_CHECKING:
    from .audit import AuditReport

CHANCE_TPR = 0.01  # TPR at 1% FPR of an attack that reads nothing (random guessing)
THRESHOLD_IMAGES = 100  # non-members a threshold needs before it can allow 1% false positives
HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 75rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }}
table {{ border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }}
img {{ max-width: 100%; }}
code {{ background: #f4f4f4; padding: 0 0.2rem; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def strongest_attack(table: pd.DataFrame) -> pd.Series:
    """Return the attack table's row with the highest TPR at 1% FPR (ties: 0.1% FPR, AUC, then fewest NFE)."""
    ranked = table.sort_values(["tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "auc", "nfe"],
                               ascending=[False, False, False, True], kind="stable")
    return ranked.iloc[0]


def risk_summary(table: pd.DataFrame, calibration_nonmembers: int) -> str:
    """Describe the membership risk in plain language, as markdown paragraphs.

    An attack that reads nothing flags members as often as non-members, so the chance level of
    the calibrated 1% FPR threshold is the FPR it reached on the evaluation split, and at least
    1%. The verdict is "leaks" when the lower end of the strongest attack's 95% interval of TPR
    exceeds that chance level. Otherwise it is "separates on average" when some attack's AUC
    interval lies above 0.5, and "no leak found" when none does.

    Args:
        table: attack table of :func:`fcre_utils.metrics.attack_table`.
        calibration_nonmembers: non-member images in the calibration split, which set the thresholds.
    """
    best = strongest_attack(table)
    chance = max(CHANCE_TPR, float(best.fpr_at_1pct_threshold))
    above_half = table[table.auc_low > 0.5]
    if best.tpr_at_1pct_fpr_low > chance:
        verdict = ("**The model leaks membership.** An attack recognises images that were used in training "
                   "clearly more often than chance, at a threshold that rarely accuses an image that was not.")
    elif len(above_half):
        top = above_half.sort_values("auc", ascending=False).iloc[0]
        verdict = (f"**The model leaks membership on average, but this audit found no leak at a 1% false positive "
                   f"rate.** `{top.attack}` ranks members above non-members more often than chance (AUC "
                   f"{top.auc:.3f} [{top.auc_low:.3f}, {top.auc_high:.3f}]), but no attack recognised training images "
                   "clearly more often than chance at a threshold that rarely accuses an image that was not.")
    else:
        verdict = ("**This audit found no membership leak.** No attack recognised training images more often "
                   "than chance, neither on average (no AUC interval lies above 0.5) nor at a 1% false positive rate.")

    measurement = (
        f"The strongest of the {len(table)} attacks at a 1% false positive rate (FPR) is `{best.attack}` "
        f"({best.setting}, {best.nfe} network evaluations per image). Its threshold was set on the calibration split "
        f"to flag at most 1 in 100 of the images that were not used in training. On the evaluation split "
        f"({best.n_members} members, {best.n_nonmembers} non-members) it flagged **{best.tpr_at_1pct_fpr:.1%} of the "
        f"members** (95% interval {best.tpr_at_1pct_fpr_low:.1%} to {best.tpr_at_1pct_fpr_high:.1%}) and "
        f"{best.fpr_at_1pct_threshold:.1%} of the non-members. Its AUC is {best.auc:.3f} "
        f"[{best.auc_low:.3f}, {best.auc_high:.3f}]; an AUC of 0.5 means that no threshold tells members from "
        "non-members."
    )

    accused = "about 1 in 100" if best.fpr_at_1pct_threshold <= CHANCE_TPR else f"{best.fpr_at_1pct_threshold:.1%}"
    patient = (
        f"What this means for a patient: someone who holds a patient's image and this model, and accepts wrongly "
        f"accusing {accused} of the people whose images were not used, would correctly conclude for about "
        f"{round(100 * best.tpr_at_1pct_fpr)} in 100 patients whose images were used that they were in the training "
        f"data. Random guessing with as many false accusations would find {chance:.1%} of them."
    )
    if best.tpr_at_1pct_fpr_low > chance:
        patient += f" The attack does about {best.tpr_at_1pct_fpr / chance:.0f} times better than guessing."
    else:
        patient += (" The interval includes that chance level. An audit can show a leak but not its absence: a "
                    "stronger attack, or more images, may still find one.")

    caveats = ["The rates count images, not patients: a patient with several images in the training set is exposed "
               "through each of them."]
    if calibration_nonmembers < THRESHOLD_IMAGES:
        caveats.insert(0, (
            f"The calibration split has {calibration_nonmembers} non-members, fewer than the {THRESHOLD_IMAGES} a "
            "threshold needs to allow one false positive in 100, so the threshold sits above all of them. The FPR "
            f"it reached on the evaluation split ({best.fpr_at_1pct_threshold:.1%}) shows where it landed."
        ))
    return "\n\n".join([verdict, measurement, patient, " ".join(caveats)])


def exposed_grid(images: torch.Tensor, titles: list[str], flagged: list[bool], columns: int = 8) -> plt.Figure:
    """Draw model-ready images (N, C, H, W) in [-1, 1] with titles; flagged images get a red frame."""
    columns = max(1, min(columns, len(images)))
    n_rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(n_rows, columns, figsize=(1.7 * columns, 2.1 * n_rows + 0.3), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for ax, image, title, is_flagged in zip(axes.flat, images, titles, flagged):
        pixels = ((image.detach().cpu().float() + 1) / 2).clamp(0, 1)
        if pixels.shape[0] == 3:
            ax.imshow(pixels.permute(1, 2, 0).numpy())
        else:
            ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
        if is_flagged:
            ax.set_frame_on(True)
            for spine in ax.spines.values():
                spine.set_edgecolor(MEMBER_COLOURS[True])
                spine.set_linewidth(3)
    fig.suptitle("red frame: flagged at the 1% FPR threshold chosen on the calibration split", fontsize=8)
    return fig


def render_markdown(report: AuditReport, context: dict[str, Any]) -> str:
    """Write the whole report as markdown; figures are linked relative to the report folder.

    Args:
        report: the audit's results.
        context: ``record`` (the inputs record of :func:`fcre_utils.audit.inputs_record`),
            ``preprocessing`` (the :class:`fcre_utils.image_files.Preprocessing`), ``seconds``
            (wall time) and ``finished`` (UTC time stamp).
    """
    record = context["record"]
    parts = [
        "# Membership inference audit",
        f"Model `{record['model']['path']}` · members `{record['members']['source']}` "
        f"({record['members']['images']} images) · non-members `{record['nonmembers']['source']}` "
        f"({record['nonmembers']['images']} images) · finished {context['finished']} after {context['seconds']:.0f} s",
        "## Summary",
        report.summary,
        *_results_section(report),
        *_method_section(report, record),
        *_preprocessing_section(report, context["preprocessing"]),
        *_inputs_section(record),
        "## Files in this folder",
        _bullets([
            "`report.md`, `report.html`: this report",
            "`metrics.csv` (`metrics.md` as text): the attack table with every column",
            "`scores.csv`: one row per image and attack, with the file name; higher scores mean 'more likely a member'",
            "`selection.csv`: calibration metrics of every candidate setting",
            "`manifest.csv`: every image with its SHA-256, set, split and preprocessing steps",
            "`most_exposed.csv`: the member images with the highest scores",
            "`preprocessing.yaml`, `inputs.yaml`: conversion steps; input files with SHA-256, parameters and versions",
            "`figures/`: ROC curves, score histograms, most exposed images",
        ]),
    ]
    return "\n\n".join(parts) + "\n"


def _results_section(report: AuditReport) -> list[str]:
    exposed = report.exposed.assign(file=report.exposed.file.str.replace("|", "\\|", regex=False))
    best = strongest_attack(report.table)
    return [
        "## Attack results",
        "`AUC` is the area under the ROC curve. `ASR` (attack success rate) is the balanced accuracy at the threshold "
        "that was best on the calibration split. `TPR@1%FPR` is the share of members found at the threshold that "
        "flagged at most 1% of the calibration non-members, and the FPR that threshold reached on the evaluation split "
        "is listed next to it. Brackets hold 95% bootstrap intervals, which resample both splits, so they include the "
        "threshold's uncertainty. The `oracle` column reads TPR off the evaluation ROC itself, which tunes the threshold "
        "on the evaluation labels; it is shown only for comparison with published tables.",
        format_table(report.table).to_markdown(index=False),
        summarise(report.table),
        "![ROC curves of every attack on the evaluation split](figures/roc.png)",
        "ROC curves on log axes, evaluation split. Each dot is the operating point of the 1% FPR threshold chosen on the "
        "calibration split; a dot right of the dashed 1% line flagged more non-members than intended.",
        "![Member and non-member score histograms](figures/score_histograms.png)",
        "Score histograms, evaluation split. The less the member and non-member histograms overlap, the fewer "
        "non-members an attacker must accuse to find the members.",
        "## Most exposed member images",
        f"The member images with the highest scores under `{best.attack}` ({best.setting}), from both splits. A "
        "flagged image reaches the attack's 1% FPR threshold: an attacker holding it would conclude that it was "
        "used in training.",
        "![Most exposed member images](figures/most_exposed.png)",
        exposed[["rank", "file", "split", "score", "flagged"]].to_markdown(index=False, floatfmt=".4g"),
    ]


def _method_section(report: AuditReport, record: dict[str, Any]) -> list[str]:
    manifest = report.manifest
    counts = pd.crosstab(manifest.member.map({True: "members", False: "non-members"}), manifest.split)
    counts = counts.reindex(["members", "non-members"])
    params = report.params
    requested = record["attacks_requested"]
    return [
        "## How the audit ran",
        _bullets([
            f"Each set was split by a seeded ranking of the image contents (seed {params.seed}); a share of "
            f"{params.calibration_fraction:g} of each set forms the calibration split.",
            "Every attack tried every candidate setting; the setting with the highest AUC on the calibration split was "
            "kept (ties: TPR at 1% and 0.1% FPR, then fewest network evaluations). The decision thresholds were also "
            "chosen on the calibration split. The evaluation split alone gives the reported numbers.",
            f"Attack settings: preset `{record['preset']}` with overrides {record['overrides'] or 'none'}; candidate "
            f"timesteps {params.timesteps}, DDIM stride {params.ddim_stride}, FCRE bands {params.band_candidates}, "
            f"low-pass cutoffs {params.lowpass_cutoffs}, {params.naive_draws} noise draws for the naive attack, "
            f"{params.bootstrap_resamples} bootstrap resamples.",
            f"Attacks reported: {requested if requested == 'all' else ', '.join(requested)}. Every attack runs "
            "regardless, because the attacks share network passes; the choice only filters the tables and figures.",
            f"Device: {record['environment']['device']}.",
        ]),
        counts.rename_axis(None).rename_axis(None, axis=1).to_markdown(),
    ]


def _preprocessing_section(report: AuditReport, preprocessing) -> list[str]:
    return [
        "## Preprocessing",
        f"Every image was converted to the model's input: {preprocessing.channels} channel(s), "
        f"{preprocessing.height}x{preprocessing.width} px, values in [-1, 1]. Intensity window for images without a "
        f"fixed bit depth: `{preprocessing.window}`; size handling: `{preprocessing.resize}`. Steps, each with the "
        "number of images it applied to (`manifest.csv` lists the steps of every image):",
        _bullets(report.preprocessing),
    ]


def _inputs_section(record: dict[str, Any]) -> list[str]:
    model = record["model"]
    schedule = model["noise_schedule"]
    environment = record["environment"]
    lines = [
        f"Model folder `{model['path']}`: SHA-256 `{model['sha256']}` over {len(model['files'])} files "
        "(each file's digest is in `inputs.yaml`).",
        f"UNet `{model['unet']}`; noise schedule `{model['scheduler_config']}`: {schedule.get('num_train_timesteps')} "
        f"timesteps, beta schedule `{schedule.get('beta_schedule')}`, prediction type `{schedule.get('prediction_type')}`.",
    ]
    for key, label in (("members", "Members"), ("nonmembers", "Non-members")):
        image_set = record[key]
        left_out = image_set["left_out"]
        line = f"{label} `{image_set['source']}`: {image_set['images']} images from {len(image_set['files'])} files"
        if left_out:
            shown = "; ".join(f"`{item['name']}` ({item['reason']})" for item in left_out[:10])
            line += f"; {len(left_out)} left out: {shown}" + (" …" if len(left_out) > 10 else "")
        lines.append(line + ".")
    lines.append(f"fcre_utils commit `{environment['git_commit']}` (uncommitted changes: {environment['git_uncommitted_changes']}), "
                 f"Python {environment['python']}, {environment['platform']}.")
    versions = pd.DataFrame(sorted(environment["packages"].items()), columns=["package", "version"])
    return ["## Inputs and versions", _bullets(lines), versions.to_markdown(index=False)]


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def render_html(markdown_text: str, title: str) -> str:
    """Render the report's markdown as a standalone HTML page (mistune, with tables)."""
    body = mistune.create_markdown(plugins=["table"])(markdown_text)
    return HTML_PAGE.format(title=title, body=body)
