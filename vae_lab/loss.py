"""Kept for checkpoints written before objectives.py: their configs name vae_lab.loss.VAELoss.

VAELoss(reconstruction, alpha) was recon + alpha * KL(q || N(0, I)) with one z: the ELBO objective.
"""
from vae_lab.objectives import ELBO


class VAELoss(ELBO):
    """The ELBO objective under its old name (no free bits)."""

    def __init__(self, reconstruction: str = "bce", alpha: float = 1.0):
        super().__init__(reconstruction=reconstruction, alpha=alpha)
