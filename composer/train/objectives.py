"""The training objective on cached latents and text embeddings: the VAE and caption encoding every family
shares, and the loss of the backbone's family (`Backbone.training_noise`, `encode_caption`, `training_loss`:
SDXL's DDPM epsilon/v loss, FLUX's rectified flow on packed patches).

Min-SNR-gamma (Hang et al., ICCV 2023; kohya's and diffusers' `snr_gamma`) weights each DDPM sample's loss by
min(SNR(t), gamma) / SNR(t) for epsilon prediction (/ (SNR(t) + 1) for v): nearly-clean timesteps, which
only refine detail, stop dominating the gradient, and the shape-forming noisy ones get their share. Families
that do not train by DDPM refuse it.
"""

from __future__ import annotations

import torch

from composer.backbones.base import Backbone, Conditioning
from composer.errors import StudioError


class Objective:
    """Encodes images and captions for one pipeline and computes the training loss of a batch."""

    def __init__(
        self,
        pipe,
        backbone: Backbone,
        size: int,
        guidance: float | None = None,
        snr_gamma: float | None = None,
    ):
        """`guidance`: what guided denoisers are given while training (default: the backbone's)."""
        self.pipe, self.backbone, self.size = pipe, backbone, size
        self.guidance = backbone.default_guidance if guidance is None else guidance
        self.snr_gamma = snr_gamma
        self.noise = backbone.training_noise(pipe, snr_gamma)

    @property
    def denoiser(self):
        return getattr(self.pipe, self.backbone.denoiser)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of (N, 3, H, W) pixels, a few at a time; sampled afresh each step.

        A VAE that asks for it (`force_upcast`, SDXL's fp16 overflow) encodes in float32.
        """
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        original = vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            means, stds = [], []
            for start in range(0, pixels.shape[0], chunk):
                dist = vae.encode(pixels[start : start + chunk].to(vae.device, dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        finally:
            if upcast:
                vae.to(original)
        mean, std = torch.cat(means), torch.cat(stds)
        if not torch.isfinite(mean).all():
            raise StudioError(
                "the VAE gave non-finite latents for the training images; load the model in float32"
            )
        return mean, std

    def latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cfg = self.pipe.vae.config
        x = mean + std * torch.randn(mean.shape, generator=generator).to(mean)
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (x - shift) * cfg.scaling_factor

    def encode_caption(self, caption: str, device, grad: bool = False) -> Conditioning:
        """The caption's conditioning; `grad`: keep the graph (text-encoder adapters are training)."""
        with torch.set_grad_enabled(grad):
            return self._encode_caption(caption, device)

    def _encode_caption(self, caption: str, device) -> Conditioning:
        return self.backbone.encode_caption(self.pipe, caption, device)

    def loss(
        self, x0: torch.Tensor, cond: list[Conditioning], generator: torch.Generator, dtype: torch.dtype
    ) -> torch.Tensor:
        """Mean squared error of the denoiser's prediction on a batch of latents x0 (B, C, h, w)."""
        return self.backbone.training_loss(self, x0, cond, generator, dtype)

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weight of each timestep in `t` (1 where SNR <= gamma for epsilon prediction)."""
        alphas = self.noise.alphas_cumprod.to(t.device)[t].double()
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        if self.noise.config.prediction_type == "v_prediction":
            return (clipped / (snr + 1)).float()
        return (clipped / snr).float()
