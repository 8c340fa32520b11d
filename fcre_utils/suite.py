"""Score a run's images with every attack, choosing each attack's settings on the calibration split.

Every attack has settings an attacker would tune: the timestep t, the low-pass cutoff of the
frequency-filter variants, and FCRE's band. :func:`run_suite` scores every candidate setting,
measures it on the calibration split only, keeps the best per attack (highest AUC, then highest
TPR at 1% and at 0.1% FPR, then fewest NFE), and returns the chosen settings' scores for every
image. The evaluation split never influences a choice.

Network passes are shared: one prediction ``eps_theta(x0, 0)`` serves PIA and PIAN at every t
(taken from the DDIM inversion when the reconstructions have it), one noised batch serves the
naive attack with and without its low-pass filter, and SecMI-stat and FCRE read the cached DDIM
trajectories of :func:`fcre_utils.reconstruction.reconstruct`.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from diffusers import UNet2DModel

from .attacks import (
    FCRE_METRICS, PROTOCOLS, balance_l2_weight, band_similarity, check_attack_inputs, gaussian_rescale, lowpass_name, naive_error, pia_distance,
    pia_start, secmi_error, sima_norm,
)
from .metrics import attack_metrics, check_labels
from .presets import Params
from .reconstruction import Reconstructions, forward_noise, predict_noise, protocol_nfe, reconstruct, reconstruction_passes

log = logging.getLogger(__name__)

BASELINES = ("naive_loss", "naive_loss_lowpass", "secmi_stat", "secmi_stat_lowpass", "pia", "pia_lowpass", "pian", "sima")  # table order
RANKING = (["auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "nfe"], [False, False, False, True])


@dataclass
class SuiteResult:
    """Scores of the chosen settings and the calibration measurements behind the choice."""

    scores: pd.DataFrame  # image_id, member, split, attack, setting, nfe, score (chosen settings)
    selection: pd.DataFrame  # one row per candidate setting: calibration metrics, ``selected``
    baseline_passes: float  # network passes per image run for the baselines (all candidates)
    reconstruction_passes: int  # network passes per image behind the cached reconstructions


def protocol_pair(recon: Reconstructions, protocol: str, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the two tensors a protocol compares at timestep t: (original, reconstruction)."""
    if protocol == "x0":
        return recon.x0, recon.x0_recon[t]
    if protocol == "residual":
        return recon.x_t[t], recon.x_t_roundtrip[t]
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def fcre_all_metrics(original: torch.Tensor, reconstruction: torch.Tensor, band: tuple[float, float], fit: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """SSIM, L2 and L2+SSIM scores for one band; the L2 weight is fit on the rows ``fit``.

    Returns:
        ``{metric: scores (N,)}`` and the L2 weight used by ``"l2_ssim"``.
    """
    ssim, l2 = band_similarity(original, reconstruction, *band)
    weight = balance_l2_weight(ssim[fit], l2[fit])
    return {"ssim": ssim, "l2": l2, "l2_ssim": ssim + weight * l2}, weight


def band_text(low: float, high: float) -> str:
    """Format a band as ``[low, high)``."""
    return f"[{low:g}, {high:g})"


@dataclass
class Candidate:
    """One setting of one attack and its scores for the images it was run on."""

    attack: str
    setting: str
    nfe: int
    t: int
    low: float
    high: float
    scores: np.ndarray


def calibration_labels(manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Return the calibration row mask and its member labels; both classes must be present."""
    check_labels(manifest, ("member", "split"), "manifest")
    calibration = manifest.split.to_numpy() == "calibration"
    labels = manifest.member.to_numpy(dtype=bool)[calibration]
    if labels.all() or not labels.any():
        raise ValueError(
            f"the calibration split has {int(labels.sum())} members and {int((~labels).sum())} non-members but needs both; "
            "raise calibration_fraction"
        )
    return calibration, labels


def rank_candidates(candidates: list[Candidate], labels: np.ndarray, rows: np.ndarray | None = None) -> pd.DataFrame:
    """Measure each candidate on the calibration labels and mark the best of each attack.

    Args:
        candidates: settings to compare.
        labels: calibration member flags.
        rows: mask selecting the calibration rows of each candidate's scores; ``None`` when the
            scores cover the calibration images only.

    Returns:
        One row per candidate: attack, setting, nfe, t, low, high, the calibration metrics and
        ``selected``.
    """
    table = pd.DataFrame([
        {"attack": c.attack, "setting": c.setting, "nfe": c.nfe, "t": c.t, "low": c.low, "high": c.high,
         **attack_metrics(labels, c.scores if rows is None else c.scores[rows])}
        for c in candidates
    ])
    columns, ascending = RANKING
    best = table.sort_values(columns, ascending=ascending, kind="stable").groupby("attack", sort=False).head(1).index
    table["selected"] = table.index.isin(best)
    return table


def select_fcre_settings(recon: Reconstructions, manifest: pd.DataFrame, timesteps: list[int], bands: list[list[float]], stride: int) -> pd.DataFrame:
    """Measure FCRE for every (protocol, t, band, metric) on the calibration split.

    Args:
        recon: reconstructions of the manifest's images, in manifest order.
        manifest: columns ``member`` and ``split``.
        timesteps: candidate t, each cached in ``recon``.
        bands: candidate ``[low, high]`` bands.
        stride: DDIM stride the reconstructions used.

    Returns:
        The table of :func:`rank_candidates`, attacks named ``fcre_<metric>_<protocol>``.
    """
    calibration, labels = calibration_labels(manifest)
    missing = sorted(set(timesteps) - set(recon.x0_recon))
    if missing:
        raise ValueError(f"timesteps {missing} are not in the cached reconstructions {sorted(recon.x0_recon)}; reconstruct them first")

    candidates = []
    for protocol, t, band in itertools.product(PROTOCOLS, sorted(timesteps), bands):
        original, reconstruction = protocol_pair(recon, protocol, t)
        low, high = float(band[0]), float(band[1])
        scores, _ = fcre_all_metrics(original[calibration], reconstruction[calibration], (low, high), np.ones(len(labels), bool))
        nfe = protocol_nfe(protocol, t, stride)
        for metric in FCRE_METRICS:
            candidates.append(Candidate(f"fcre_{metric}_{protocol}", f"t={t} band={band_text(low, high)}", nfe, t, low, high, scores[metric]))
    table = rank_candidates(candidates, labels)
    log.info("compared %d FCRE settings on %d calibration images", len(table), len(labels))
    return table


REFERENCE_METRICS = ("ssim", "l2")


def reference_candidates(recon: Reconstructions, reference: Reconstructions, rows: np.ndarray, timesteps: list[int], bands: list[list[float]],
                         stride: int) -> list[Candidate]:
    """Difficulty-calibrated FCRE: the target model's score minus a reference model's, per image.

    The reference model never saw the images, so its score measures how well any model of this
    data reconstructs the image. Subtracting it removes the part of the score that follows image
    difficulty. This is calibration with one reference model, as in LiRA, under protocol ``x0``.

    Args:
        recon, reference: the target's and the reference model's reconstructions of the same images.
        rows: mask of the images to score.
        timesteps, bands, stride: candidate settings, as in :func:`select_fcre_settings`.
    """
    if len(reference.x0) != len(recon.x0) or not torch.equal(reference.x0, recon.x0):
        raise ValueError("the reference reconstructions are of other images; reconstruct the manifest's images with the reference model")
    missing = sorted(set(timesteps) - set(reference.x0_recon))
    if missing:
        raise ValueError(f"timesteps {missing} are not in the reference model's reconstructions {sorted(reference.x0_recon)}; reconstruct them first")
    candidates = []
    for t, band in itertools.product(sorted(timesteps), bands):
        low, high = float(band[0]), float(band[1])
        target = band_similarity(recon.x0[rows], recon.x0_recon[t][rows], low, high)
        baseline = band_similarity(reference.x0[rows], reference.x0_recon[t][rows], low, high)
        nfe = 2 * protocol_nfe("x0", t, stride)  # the reference model reconstructs the image too
        for metric, target_scores, reference_scores in zip(REFERENCE_METRICS, target, baseline):
            candidates.append(Candidate(f"fcre_{metric}_calibrated", f"t={t} band={band_text(low, high)}", nfe, t, low, high,
                                        target_scores - reference_scores))
    return candidates


def reference_scores_table(recon: Reconstructions, reference: Reconstructions, manifest: pd.DataFrame, selection: pd.DataFrame,
                           stride: int) -> pd.DataFrame:
    """Score every image with each selected difficulty-calibrated setting."""
    tables = []
    everything = np.ones(len(manifest), dtype=bool)
    for row in selection[selection.selected].itertuples():
        chosen = [c for c in reference_candidates(recon, reference, everything, [row.t], [[row.low, row.high]], stride) if c.attack == row.attack]
        tables.append(score_table(manifest, row.attack, row.setting, row.nfe, chosen[0].scores))
    return pd.concat(tables, ignore_index=True)


def fcre_scores_table(recon: Reconstructions, manifest: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """Score every image with each selected FCRE setting; L2 weights come from calibration.

    Returns:
        A tidy score table: image_id, member, split, attack, setting, nfe, score.
    """
    calibration = manifest.split.to_numpy() == "calibration"
    tables = []
    chosen = selection[selection.selected].set_index("attack")
    for protocol, metric in itertools.product(PROTOCOLS, FCRE_METRICS):
        if f"fcre_{metric}_{protocol}" not in chosen.index:
            continue
        row = chosen.loc[f"fcre_{metric}_{protocol}"]
        original, reconstruction = protocol_pair(recon, protocol, row.t)
        scores, _ = fcre_all_metrics(original, reconstruction, (row.low, row.high), calibration)
        tables.append(score_table(manifest, row.name, row.setting, row.nfe, scores[metric]))
    return pd.concat(tables, ignore_index=True)


def baseline_candidates(
    unet: UNet2DModel,
    alphas_cumprod: torch.Tensor,
    images: torch.Tensor,
    recon: Reconstructions,
    timesteps: dict[str, list[int]],
    cutoffs: list[float],
    draws: int,
    stride: int,
    seed: int = 0,
    batch_size: int = 256,
    first_image: int = 0,
) -> tuple[list[Candidate], float]:
    """Score every image with every baseline at every candidate setting.

    Args:
        unet, alphas_cumprod: the model under attack and its cumulative schedule.
        images: every image of the manifest (N, C, H, W), in manifest order, or one shard of them.
        recon: reconstructions of the same images; SecMI-stat reads its states at t, and PIA
            its ``eps_0`` when present.
        timesteps: candidate t per attack family: keys ``naive``, ``secmi``, ``pia``, ``sima``.
        cutoffs: low-pass cutoffs of the frequency-filter variants.
        draws: noise draws of the naive attack.
        stride: DDIM stride of ``recon`` (SecMI's k).
        seed: seed of the naive attack's noise; each t draws the same sequence as
            :class:`fcre_utils.attacks.NaiveLossAttack` with this seed.
        first_image: position of ``images[0]`` in the full image set, a multiple of
            ``batch_size``. The naive attack first draws and discards the noise of the images
            before it, so a shard gets the noise it would get in one run over the full set.

    Returns:
        The candidates, and the network passes per image that this function ran.
    """
    device = next(unet.parameters()).device
    filters = [None, *cutoffs]
    naive = {(t, c): [] for t in timesteps["naive"] for c in filters}
    pia = {(t, normalized, c): [] for t in timesteps["pia"] for normalized in (False, True) for c in (filters if not normalized else [None])}
    sima = {t: [] for t in timesteps["sima"]}
    if first_image % batch_size:
        raise ValueError(f"first_image={first_image} must be a multiple of batch_size={batch_size}, so each shard starts a batch")
    generators = {t: torch.Generator().manual_seed(seed) for t in timesteps["naive"]}
    for generator in generators.values():
        _skip_noise(generator, first_image, images.shape[1:], images.dtype, batch_size, draws)
    passes = 0

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        nonlocal passes
        passes += len(x)
        return predict_noise(unet, x, t)

    with torch.inference_mode():
        for begin in range(0, len(images), batch_size):
            x0 = images[begin : begin + batch_size].to(device)
            for t in timesteps["naive"]:
                totals = {c: np.zeros(len(x0)) for c in filters}
                for _ in range(draws):
                    x_t, noise = forward_noise(x0, t, alphas_cumprod, generators[t])
                    prediction = eps(x_t, t)
                    for c in filters:
                        totals[c] += naive_error(noise, prediction, c)
                for c in filters:
                    naive[t, c].append(totals[c] / draws)

            if timesteps["pia"]:
                eps_0 = eps(x0, 0) if recon.eps_0 is None else recon.eps_0[begin : begin + batch_size].to(device)
                starts = {False: eps_0, True: gaussian_rescale(eps_0)}  # PIA, PIAN
                for t in timesteps["pia"]:
                    for normalized, start in starts.items():
                        prediction = eps(pia_start(x0, start, t, alphas_cumprod), t)
                        for c in [None] if normalized else filters:
                            pia[t, normalized, c].append(pia_distance(start, prediction, c))

            for t in timesteps["sima"]:
                sima[t].append(sima_norm(eps(x0, t)))

    candidates = []
    for (t, c), parts in naive.items():
        candidates.append(Candidate(lowpass_name("naive_loss", c), f"t={t} draws={draws}" + _band(c), draws, t, *_edges(c), -np.concatenate(parts)))
    for t in timesteps["secmi"]:
        for c in filters:
            error = secmi_error(recon.x_t[t], recon.x_t_roundtrip[t], c)
            candidates.append(Candidate(lowpass_name("secmi_stat", c), f"t={t} k={stride}" + _band(c), protocol_nfe("residual", t, stride), t, *_edges(c), -error))
    for (t, normalized, c), parts in pia.items():
        name = lowpass_name("pian" if normalized else "pia", c)
        candidates.append(Candidate(name, f"t={t}" + _band(c), 2, t, *_edges(c), -np.concatenate(parts)))
    for t, parts in sima.items():
        candidates.append(Candidate("sima", f"t={t}", 1, t, np.nan, np.nan, -np.concatenate(parts)))
    return candidates, passes / len(images)


def _skip_noise(generator: torch.Generator, n_images: int, shape: torch.Size, dtype: torch.dtype, batch_size: int, draws: int) -> None:
    """Draw and discard the naive attack's noise for ``n_images`` images, batch by batch as the loop draws it."""
    for begin in range(0, n_images, batch_size):
        for _ in range(draws):
            torch.randn((min(batch_size, n_images - begin), *shape), generator=generator, dtype=dtype)


def _band(cutoff: float | None) -> str:
    return "" if cutoff is None else f" band={band_text(0.0, cutoff)}"


def _edges(cutoff: float | None) -> tuple[float, float]:
    return (np.nan, np.nan) if cutoff is None else (0.0, float(cutoff))


def suite_candidates(params: Params) -> tuple[dict[str, list[int]], list[float], list[int], list[list[float]]]:
    """Return the candidate settings the parameters allow.

    With ``select_on_calibration`` every attack tries every t of ``timesteps``, every low-pass
    cutoff and every FCRE band. Without it, each attack has one setting chosen by hand.

    Returns:
        Baseline timesteps per family, low-pass cutoffs, FCRE timesteps and FCRE bands.
    """
    if params.select_on_calibration:
        every = sorted(set(params.timesteps))
        families = {"naive": every, "secmi": every, "pia": every, "sima": every}
        cutoffs = sorted(set(params.lowpass_cutoffs))
        bands = [list(b) for b in dict.fromkeys(tuple(b) for b in params.band_candidates)]
        return families, cutoffs, every, bands
    families = {"naive": [params.naive_t], "secmi": [params.secmi_t], "pia": [params.pia_t], "sima": [params.sima_t]}
    return families, [params.lowpass_cutoff], [params.fcre_t], [[params.band_low, params.band_high]]


def run_suite(unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor, manifest: pd.DataFrame, params: Params,
              recon: Reconstructions | None = None, reference: Reconstructions | None = None,
              baselines: tuple[list[Candidate], float] | None = None) -> SuiteResult:
    """Run every attack on every image of the manifest with settings chosen on calibration.

    Args:
        unet, alphas_cumprod: the model under attack and its cumulative schedule.
        images: the manifest's images (N, C, H, W) in [-1, 1], in manifest order.
        manifest: columns ``image_id``, ``member`` and ``split``.
        params: candidate settings, stride, naive draws, seed and batch size.
        recon: cached reconstructions of ``images`` with this model; computed when ``None``.
        reference: reconstructions of ``images`` by a reference model trained on other images of
            the same kind; adds the difficulty-calibrated attacks ``fcre_*_calibrated``.
        baselines: the output of :func:`baseline_candidates` for these images, for example
            gathered from several processes; computed when ``None``.
    """
    if len(images) != len(manifest):
        raise ValueError(f"{len(images)} images for a manifest of {len(manifest)} rows; pass the manifest's images in order")
    calibration, labels = calibration_labels(manifest)
    families, cutoffs, fcre_timesteps, bands = suite_candidates(params)
    check_attack_inputs(unet, alphas_cumprod, images, max(max(ts) for ts in families.values()), params.score_batch_size)
    if recon is None:
        recon = reconstruct(unet, images, params.timesteps, params.ddim_stride, alphas_cumprod, params.score_batch_size, params.progress)
    if len(recon.x0) != len(images):
        raise ValueError(f"the reconstructions hold {len(recon.x0)} images but {len(images)} were given; reconstruct these images")

    if baselines is None:
        baselines = baseline_candidates(unet, alphas_cumprod, images, recon, families, cutoffs, params.naive_draws,
                                        params.ddim_stride, params.seed, params.score_batch_size)
    baselines, passes = baselines
    baseline_table = rank_candidates(baselines, labels, calibration)
    fcre_table = select_fcre_settings(recon, manifest, fcre_timesteps, bands, params.ddim_stride)
    tables = [baseline_table, fcre_table]
    if reference is not None:
        reference_table = rank_candidates(reference_candidates(recon, reference, calibration, fcre_timesteps, bands, params.ddim_stride), labels)
        tables.append(reference_table)
    selection = pd.concat(tables, ignore_index=True)

    chosen = sorted((c for c, selected in zip(baselines, baseline_table.selected) if selected), key=lambda c: BASELINES.index(c.attack))
    scores = pd.concat(
        [score_table(manifest, c.attack, c.setting, c.nfe, c.scores) for c in chosen]
        + [fcre_scores_table(recon, manifest, fcre_table)]
        + ([reference_scores_table(recon, reference, manifest, reference_table, params.ddim_stride)] if reference is not None else []),
        ignore_index=True,
    )
    log.info("scored %d images with %d attacks (%d candidate settings)", len(images), scores.attack.nunique(), len(selection))
    return SuiteResult(scores, selection, passes, reconstruction_passes(list(recon.nfe), params.ddim_stride))


def score_table(manifest: pd.DataFrame, attack: str, setting: str, nfe: int, scores: np.ndarray) -> pd.DataFrame:
    """Tidy rows for one attack: image_id, member, split, attack, setting, nfe, score."""
    return pd.DataFrame({
        "image_id": manifest.image_id.to_numpy(),
        "member": manifest.member.to_numpy(),
        "split": manifest.split.to_numpy(),
        "attack": attack,
        "setting": setting,
        "nfe": nfe,
        "score": scores,
    })


def summarise(table: pd.DataFrame) -> str:
    """Describe an attack table in two or three sentences: the strongest attacks at low FPR, the weakest."""
    ranked = table.sort_values(["tpr_at_0_1pct_fpr", "tpr_at_1pct_fpr", "auc", "nfe"], ascending=[False, False, False, True])
    best, worst = ranked.iloc[0], ranked.iloc[-1]
    text = (
        f"At the calibrated 0.1% FPR threshold, {best.attack} ({best.setting}, {best.nfe} NFE) finds "
        f"{best.tpr_at_0_1pct_fpr:.1%} of the members [{best.tpr_at_0_1pct_fpr_low:.1%}, {best.tpr_at_0_1pct_fpr_high:.1%}], "
        f"with AUC {best.auc:.3f}."
    )
    tied = ranked[(ranked.tpr_at_0_1pct_fpr == best.tpr_at_0_1pct_fpr) & (ranked.attack != best.attack)]
    if len(tied):
        text += f" {', '.join(tied.attack)} find as many, so this split cannot rank them."
    return text + (
        f" The weakest, {worst.attack}, finds {worst.tpr_at_0_1pct_fpr:.1%} "
        f"with AUC {worst.auc:.3f} [{worst.auc_low:.3f}, {worst.auc_high:.3f}]."
    )


def control_outliers(table: pd.DataFrame) -> pd.DataFrame:
    """Return the rows of a control-model table whose AUC interval excludes 0.5.

    A model that never saw the members gives no attack a real signal, so such a row points to
    leakage between the splits or a scoring bug (or, at a 95% level, a chance excursion).
    """
    return table[(table.auc_low > 0.5) | (table.auc_high < 0.5)]
