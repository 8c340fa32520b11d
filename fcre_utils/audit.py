"""Audit a diffusers DDPM checkpoint for membership leakage on the owner's own images.

:func:`audit` is what ``python -m fcre_utils audit`` runs. It takes a model folder and two image
sources: the **members** (images used in training) and the **non-members** (images not used).

1. The model is loaded from a DDPMPipeline folder, or a UNet2DModel folder and a scheduler config
   (:func:`fcre_utils.models.load_checkpoint`).
2. The images are read and converted to the model's channels and size
   (:mod:`fcre_utils.image_files`); every step is recorded.
3. Each set is split into a calibration and an evaluation part by a seeded ranking of the image
   contents (:func:`fcre_utils.data.seeded_order`, the ranking the project's own runs use).
4. :func:`fcre_utils.suite.run_suite` scores every image with every attack, choosing each
   attack's setting on the calibration part, and :func:`fcre_utils.metrics.attack_table`
   measures the evaluation part with thresholds from the calibration part.
5. The report directory is written: see :func:`write_report` for its files.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from . import audit_report, plotting
from .attacks import FCRE_METRICS, PROTOCOLS
from .data import check_manifest, content_hashes, file_sha256, seeded_order
from .image_files import ImageSet, Preprocessing, read_image_set, summarise_steps, to_model_input
from .metrics import attack_table, format_table, roc, threshold_at_fpr
from .models import load_checkpoint
from .presets import Params, params_to_dict, resolve_params
from .runs import atomic_write_text, environment_record, load_run, load_source_images, new_run_dir, write_table
from .suite import BASELINES, run_suite

log = logging.getLogger(__name__)

ATTACK_NAMES = (*BASELINES, *(f"fcre_{metric}_{protocol}" for protocol in PROTOCOLS for metric in FCRE_METRICS))
# Parameters the audit sets from the model and the image sets; overrides of them are ignored.
DERIVED_PARAMETERS = ("image_size", "source_size", "n_members", "n_nonmembers", "calibration_fraction",
                      "num_train_timesteps", "beta_start", "beta_end")
IMAGE_PACKAGES = ("pillow", "pydicom", "nibabel", "mistune")
MIN_SPLIT_SIZE = 2  # images per set and split that the bootstrap intervals need


@dataclass
class AuditReport:
    """Results of one audit and the folder of its report."""

    out_dir: Path
    summary: str  # plain-language risk summary, markdown
    table: pd.DataFrame  # metrics.attack_table of the requested attacks
    scores: pd.DataFrame  # one row per image and attack: image_id, file, member, split, attack, setting, nfe, score
    selection: pd.DataFrame  # calibration metrics of every candidate setting of the requested attacks
    manifest: pd.DataFrame  # one row per image: image_id, file, sha256, member, split, preprocessing
    exposed: pd.DataFrame  # the member images with the highest scores under the strongest attack
    preprocessing: list[str]  # each distinct conversion step with its image count
    params: Params


def audit(
    model: str | os.PathLike,
    members: str | os.PathLike,
    nonmembers: str | os.PathLike,
    *,
    calibration_fraction: float = 0.25,
    attacks: list[str] | None = None,
    out: str | os.PathLike | None = None,
    scheduler: str | os.PathLike | None = None,
    preset: str = "paper",
    overrides: dict[str, Any] | None = None,
    nifti_axis: int = 2,
    window: str = "minmax",
    resize: str = "auto",
    skip_unreadable: bool = False,
    device: str = "cpu",
    n_exposed: int = 16,
) -> AuditReport:
    """Attack ``model`` with every attack on its members and non-members, and write a report.

    Args:
        model: a DDPMPipeline folder, or a UNet2DModel folder (then see ``scheduler``).
        members, nonmembers: folders (read recursively) or files of images; see
            :mod:`fcre_utils.image_files` for the formats.
        calibration_fraction: share of each set, in (0, 1), used to choose attack settings and
            thresholds; the rest gives the reported numbers.
        attacks: attack names or shell-style patterns (``"fcre_*"``) to report; all when None.
            Every attack still runs, because they share network passes.
        out: new or empty report directory; ``outputs/audit-<UTC time>`` when None.
        scheduler: the model's ``scheduler_config.json`` or its folder, for a UNet2DModel folder.
        preset, overrides: attack settings (timesteps, bands, cutoffs, bootstrap resamples, seed)
            from :mod:`fcre_utils.presets`. The parameters in :data:`DERIVED_PARAMETERS` come
            from the model and the image sets; overrides of them are ignored with a warning.
        nifti_axis, window, resize, skip_unreadable: reading and conversion options of
            :mod:`fcre_utils.image_files`.
        device: torch device that runs the model.
        n_exposed: number of member images in the most-exposed grid.

    Raises:
        FileExistsError: ``out`` exists and is not empty.
        FileNotFoundError, ValueError: a missing or unusable model, image or setting; the
            message names it.
    """
    started = time.perf_counter()
    check_out_dir(out)
    requested = select_attacks(attacks)
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction={calibration_fraction} must be in (0, 1): both splits need images")

    unet, noise_scheduler, model_paths = load_checkpoint(model, scheduler, device)
    preprocessing = model_preprocessing(unet, window, resize)
    sets = {is_member: read_image_set(source, nifti_axis=nifti_axis, skip_unreadable=skip_unreadable)
            for is_member, source in ((True, members), (False, nonmembers))}
    params = audit_params(preset, overrides, preprocessing, noise_scheduler, sets, calibration_fraction)
    manifest, images, steps = build_manifest(sets, preprocessing, calibration_fraction, params.seed)
    log.info("auditing %s with %d members and %d non-members", model, len(sets[True].images), len(sets[False].images))

    result = run_suite(unet, noise_scheduler.alphas_cumprod, images, manifest, params)
    scores = result.scores[result.scores.attack.isin(requested)].reset_index(drop=True)
    scores.insert(1, "file", scores.image_id.map(manifest.set_index("image_id").file))
    table = attack_table(scores, params.bootstrap_resamples, params.seed)
    selection = result.selection[result.selection.attack.isin(requested)].reset_index(drop=True)

    out_dir = create_out_dir(out)
    report = AuditReport(
        out_dir=out_dir,
        summary=audit_report.risk_summary(table, int(((manifest.split == "calibration") & ~manifest.member).sum())),
        table=table,
        scores=scores,
        selection=selection,
        manifest=manifest,
        exposed=most_exposed(scores, table, n_exposed),
        preprocessing=summarise_steps(steps),
        params=params,
    )
    record = inputs_record(model, model_paths, noise_scheduler, sets, report, preset, overrides, attacks, device)
    write_report(report, images, record, preprocessing, time.perf_counter() - started)
    log.info("wrote the audit report to %s in %.0f s", out_dir, time.perf_counter() - started)
    return report


def check_out_dir(out: str | os.PathLike | None) -> None:
    """Raise FileExistsError if ``out`` is a file or a non-empty folder; earlier reports are kept."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file; give a new or empty folder for the report")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"report folder {str(out)!r} is not empty and is kept as it is; give a new --out folder, "
            "or leave it out to get a fresh one under outputs/"
        )


def create_out_dir(out: str | os.PathLike | None) -> Path:
    """Create the report folder: ``out``, or a new ``outputs/audit-<UTC time>``."""
    if out is None:
        return new_run_dir("outputs", prefix="audit")
    check_out_dir(out)
    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(out)


def select_attacks(patterns: list[str] | None) -> list[str]:
    """Return the attack names matched by names or shell-style patterns, in table order; all when None."""
    if not patterns:
        return list(ATTACK_NAMES)
    unmatched = [p for p in patterns if not fnmatch.filter(ATTACK_NAMES, p)]
    if unmatched:
        raise ValueError(f"--attacks {unmatched[0]!r} matches no attack; choose names or patterns from {', '.join(ATTACK_NAMES)}")
    return [name for name in ATTACK_NAMES if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def model_preprocessing(unet, window: str, resize: str) -> Preprocessing:
    """Return the conversion to ``unet``'s input channels and sample size."""
    size = unet.config.sample_size
    if size is None:
        raise ValueError("the UNet config has no sample_size; add \"sample_size\": <pixels> to its config.json")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocessing(unet.config.in_channels, int(height), int(width), window=window, resize=resize)


def audit_params(preset: str, overrides: dict[str, Any] | None, preprocessing: Preprocessing, scheduler,
                 sets: dict[bool, ImageSet], calibration_fraction: float) -> Params:
    """Resolve the attack settings of ``preset`` and ``overrides`` for this model and these sets."""
    overrides = dict(overrides or {})
    ignored = sorted(set(overrides) & set(DERIVED_PARAMETERS))
    if ignored:
        log.warning("ignored the overrides %s: the audit sets them from the model and the image sets", ignored)
    for name, image_set in (("member", sets[True]), ("non-member", sets[False])):
        check_split_sizes(name, len(image_set.images), calibration_fraction)

    config = scheduler.config
    derived = {
        "image_size": preprocessing.height, "source_size": preprocessing.height,
        "n_members": len(sets[True].images), "n_nonmembers": len(sets[False].images),
        "calibration_fraction": calibration_fraction, "num_train_timesteps": int(config.num_train_timesteps),
        "beta_start": float(config.beta_start), "beta_end": float(config.beta_end),
    }
    try:
        # the ablations of notebook 05 are no part of an audit, so their member-set sizes are not checked
        return resolve_params(preset, {**overrides, **derived, "ablation_member_sizes": []})
    except ValueError as error:
        raise ValueError(
            f"{error}; the model's schedule has {config.num_train_timesteps} timesteps, so override the settings named "
            f"here with values below {config.num_train_timesteps} (--set KEY=VALUE on the command line)"
        ) from error


def check_split_sizes(name: str, count: int, calibration_fraction: float) -> None:
    """Raise ValueError unless both splits of a set get at least :data:`MIN_SPLIT_SIZE` images."""
    n_calibration = int(round(calibration_fraction * count))
    if min(n_calibration, count - n_calibration) < MIN_SPLIT_SIZE:
        raise ValueError(
            f"the {name} set has {count} images, and calibration_fraction={calibration_fraction} puts {n_calibration} "
            f"of them in the calibration split and {count - n_calibration} in the evaluation split; each split needs "
            f"at least {MIN_SPLIT_SIZE} (for the bootstrap intervals), so add images or change the calibration fraction"
        )


def build_manifest(sets: dict[bool, ImageSet], preprocessing: Preprocessing, calibration_fraction: float,
                   seed: int) -> tuple[pd.DataFrame, torch.Tensor, list[list[str]]]:
    """Convert both sets and split each into calibration and evaluation parts.

    Rows follow the seeded ranking of :func:`fcre_utils.data.seeded_order` within each set,
    members first, and the first ``round(calibration_fraction * n)`` rows of a set form its
    calibration split. This is the order and split of :func:`fcre_utils.data.make_splits`, so
    auditing the exported images of one of the project's runs with its seed and calibration
    fraction gives that run's manifest.

    Returns:
        The manifest (image_id, file, sha256, member, split, preprocessing), the images
        (N, C, H, W) in [-1, 1] and the conversion steps of each image, both in manifest order.
    """
    tables, tensors, ordered_steps = [], [], []
    for is_member, image_set in sets.items():
        hashes = content_hashes([image.pixels for image in image_set.images])
        names = [image.name for image in image_set.images]
        check_unique(hashes, names, "member" if is_member else "non-member")
        converted, steps = to_model_input(image_set.images, preprocessing)

        order = seeded_order(hashes, seed)
        n_calibration = int(round(calibration_fraction * len(order)))
        tables.append(pd.DataFrame({
            "file": [names[i] for i in order],
            "sha256": hashes[order],
            "member": is_member,
            "split": ["calibration" if position < n_calibration else "evaluation" for position in range(len(order))],
            "preprocessing": ["; ".join(steps[i]) for i in order],
        }))
        tensors.append(converted[torch.from_numpy(order.copy())])
        ordered_steps.extend(steps[i] for i in order)

    check_shared(tables[0], tables[1])
    manifest = pd.concat(tables, ignore_index=True)
    manifest.insert(0, "image_id", np.arange(len(manifest)))
    check_manifest(manifest)
    return manifest, torch.cat(tensors), ordered_steps


def check_unique(hashes: np.ndarray, names: list[str], kind: str) -> None:
    """Raise ValueError naming two files of one set with identical pixels."""
    first_seen = {}
    for digest, name in zip(hashes, names):
        if digest in first_seen:
            raise ValueError(
                f"{first_seen[digest]!r} and {name!r} in the {kind} set have identical pixels; remove one of them, "
                "because a duplicate counts twice in every rate"
            )
        first_seen[digest] = name


def check_shared(member_rows: pd.DataFrame, nonmember_rows: pd.DataFrame) -> None:
    """Raise ValueError naming an image that is in both sets (identical pixels)."""
    shared = member_rows.merge(nonmember_rows, on="sha256", suffixes=("_member", "_nonmember"))
    if len(shared):
        first = shared.iloc[0]
        raise ValueError(
            f"{len(shared)} images are both members and non-members (identical pixels), first the member "
            f"{first.file_member!r} and the non-member {first.file_nonmember!r}; an image was either used in "
            "training or not, so remove it from the wrong set"
        )


def most_exposed(scores: pd.DataFrame, table: pd.DataFrame, count: int) -> pd.DataFrame:
    """Return the ``count`` member images with the highest scores under the strongest attack.

    Returns:
        Columns rank, image_id, file, split, attack, score and ``flagged``: whether the score
        reaches the attack's threshold for 1% FPR, chosen on the calibration split.
    """
    best = audit_report.strongest_attack(table)
    rows = scores[scores.attack == best.attack]
    calibration = rows[rows.split == "calibration"]
    threshold = threshold_at_fpr(calibration.member.to_numpy(), calibration.score.to_numpy(), 0.01)

    exposed = rows[rows.member].sort_values("score", ascending=False, kind="stable").head(count)
    exposed = exposed[["image_id", "file", "split", "attack", "score"]].reset_index(drop=True)
    exposed.insert(0, "rank", np.arange(1, len(exposed) + 1))
    exposed["flagged"] = exposed.score >= threshold
    return exposed


def folder_digest(paths: list[Path], root: Path) -> tuple[str, dict[str, str]]:
    """Hash every file under ``paths`` with SHA-256, and the sorted list of them once more.

    Returns:
        The combined digest (SHA-256 of the ``sha256sum``-style lines "<digest>  <path>") and
        ``{path relative to root: digest}``.
    """
    files = sorted({file for path in paths for file in ([path] if path.is_file() else path.rglob("*")) if file.is_file()})
    digests = {os.path.relpath(file, root): file_sha256(file) for file in files}
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(listing.encode()).hexdigest(), digests


def inputs_record(model, model_paths: dict[str, Path], scheduler, sets: dict[bool, ImageSet], report: AuditReport,
                  preset: str, overrides: dict[str, Any] | None, attacks: list[str] | None, device: str) -> dict[str, Any]:
    """Collect the exact inputs, settings and package versions of an audit as plain values for YAML."""
    model = Path(model)
    digest, files = folder_digest([model, model_paths["scheduler"]], model)
    environment = environment_record(report.params)
    environment["device"] = device
    for package in IMAGE_PACKAGES:
        try:
            environment["packages"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            environment["packages"][package] = "not installed"

    return {
        "model": {
            "path": str(model.resolve()),
            "unet": str(model_paths["unet"].resolve()),
            "scheduler_config": str(model_paths["scheduler"].resolve()),
            "sha256": digest,
            "files": files,
            "noise_schedule": {key: _plain(value) for key, value in dict(scheduler.config).items() if not key.startswith("_")},
        },
        "members": image_set_record(sets[True]),
        "nonmembers": image_set_record(sets[False]),
        "preset": preset,
        "overrides": dict(overrides or {}),
        "attacks_requested": list(attacks) if attacks else "all",
        "parameters": params_to_dict(report.params),
        "environment": environment,
    }


def image_set_record(image_set: ImageSet) -> dict[str, Any]:
    """Return the source, the files with SHA-256, the image count and the left-out files of one image set."""
    root = image_set.source if image_set.source.is_dir() else image_set.source.parent
    return {
        "source": str(image_set.source.resolve()),
        "images": len(image_set.images),
        "files": {file.relative_to(root).as_posix(): file_sha256(file) for file in image_set.files},
        "left_out": [{"name": name, "reason": reason} for name, reason in image_set.skipped],
    }


def _plain(value: Any) -> Any:
    """Return a YAML-safe copy of a config value (tuples and numpy values become lists and numbers)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_report(report: AuditReport, images: torch.Tensor, record: dict[str, Any], preprocessing: Preprocessing,
                 seconds: float) -> None:
    """Write the report directory; no file that exists is overwritten.

    Files: ``report.md`` and ``report.html``; ``metrics.csv`` (``metrics.md`` as text);
    ``scores.csv``, ``selection.csv``, ``manifest.csv`` and ``most_exposed.csv``;
    ``preprocessing.yaml`` and ``inputs.yaml``; ``figures/roc.png``,
    ``figures/score_histograms.png`` and ``figures/most_exposed.png``.
    """
    out = report.out_dir
    write_table(report.table, out / "metrics.csv")
    atomic_write_text(out / "metrics.md", format_table(report.table).to_markdown(index=False) + "\n")
    write_table(report.scores, out / "scores.csv")
    write_table(report.selection, out / "selection.csv")
    write_table(report.manifest, out / "manifest.csv")
    write_table(report.exposed, out / "most_exposed.csv")
    atomic_write_text(out / "preprocessing.yaml", yaml.safe_dump(
        {**preprocessing.describe(), "steps": report.preprocessing}, sort_keys=False))
    atomic_write_text(out / "inputs.yaml", yaml.safe_dump(record, sort_keys=False))

    write_figures(report, images)
    context = {"record": record, "preprocessing": preprocessing, "seconds": seconds,
               "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    text = audit_report.render_markdown(report, context)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", audit_report.render_html(text, "Membership inference audit"))


def write_figures(report: AuditReport, images: torch.Tensor) -> None:
    """Save the ROC curves, the score histograms and the most exposed member images."""
    evaluation = report.scores[report.scores.split == "evaluation"]
    curves, points = {}, {}
    for row in report.table.itertuples():
        group = evaluation[evaluation.attack == row.attack]
        fpr, tpr, _ = roc(group.member.to_numpy(), group.score.to_numpy())
        curves[row.attack] = (fpr, tpr)
        points[row.attack] = (row.fpr_at_1pct_threshold, row.tpr_at_1pct_fpr)
    plotting.save_figure(plotting.roc_curves(curves, points), report.out_dir, "roc")
    plotting.save_figure(plotting.score_histograms(evaluation), report.out_dir, "score_histograms")

    exposed = report.exposed
    titles = [f"{row.rank}. {Path(row.file).name}\nscore {row.score:.3g}" for row in exposed.itertuples()]
    figure = audit_report.exposed_grid(images[torch.tensor(exposed.image_id.to_list())], titles, exposed.flagged.tolist())
    plotting.save_figure(figure, report.out_dir, "most_exposed")


def export_run_images(run_dir: str | os.PathLike, target: str | os.PathLike) -> dict[bool, Path]:
    """Write a run's member and non-member images (both splits) as 8-bit PNG files.

    The images keep their source size (``image_<image_id>.png``), as an outside owner would hold
    them, so an audit of the exported folders converts them as the run did.

    Returns:
        ``{True: members folder, False: non-members folder}`` inside ``target``.

    Raises:
        FileExistsError: a target folder exists and is not empty.
    """
    from PIL import Image

    run_dir, target = Path(run_dir), Path(target)
    manifest = pd.read_csv(run_dir / "manifest.csv")
    check_manifest(manifest)
    source = load_source_images(load_run(run_dir))

    folders = {True: target / "members", False: target / "nonmembers"}
    for is_member, folder in folders.items():
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{str(folder)!r} is not empty and is kept as it is; export into a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        for image_id in manifest.image_id[manifest.member == is_member]:
            Image.fromarray(source[image_id]).save(folder / f"image_{image_id:05d}.png")
    log.info("exported %d members and %d non-members to %s", int(manifest.member.sum()), int((~manifest.member).sum()), target)
    return folders


def compare_with_run(table: pd.DataFrame, run_table: pd.DataFrame) -> pd.DataFrame:
    """Compare an audit's metrics with a run's attack table, attack by attack.

    Returns:
        For each attack in both tables and each calibrated metric: the run's value and 95%
        interval, the audit's value, and ``within``: whether the audit's value lies in the run's
        interval.
    """
    rows = []
    shared = table.merge(run_table, on="attack", suffixes=("", "_run"))
    for row in shared.itertuples():
        for name in ("auc", "asr", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"):
            low, high = getattr(row, f"{name}_low_run"), getattr(row, f"{name}_high_run")
            value = getattr(row, name)
            rows.append({"attack": row.attack, "metric": name, "run": getattr(row, f"{name}_run"),
                         "run_low": low, "run_high": high, "audit": value, "within": low <= value <= high})
    return pd.DataFrame(rows)
