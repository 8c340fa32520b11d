"""Frequency-Calibrated Reconstruction Error (FCRE) membership inference for diffusion models.

The package contains the logic behind the notebooks in ``notebooks/``: data loading and splits
(:mod:`fcre_utils.data`), DDPM building and training (:mod:`fcre_utils.models`,
:mod:`fcre_utils.training`), DDIM inversion and reconstruction
(:mod:`fcre_utils.reconstruction`), frequency bands (:mod:`fcre_utils.frequency`), membership
attacks (:mod:`fcre_utils.attacks`), metrics (:mod:`fcre_utils.metrics`), figures
(:mod:`fcre_utils.plotting`), run directories (:mod:`fcre_utils.runs`), named parameter sets
(:mod:`fcre_utils.presets`), the notebook runner (``python -m fcre_utils run``), and the audit of any
DDPM checkpoint on its owner's images (:mod:`fcre_utils.audit`, :mod:`fcre_utils.image_files`,
``python -m fcre_utils audit``).
"""

__version__ = "0.1.0"
