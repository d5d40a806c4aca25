"""The denoising loss of each backbone family, on cached latents and text embeddings.

SDXL: DDPM noise at a uniform timestep; the UNet predicts epsilon (or v, by the scheduler's config).
FLUX: rectified flow; x_t = (1 - t) x0 + t noise and the transformer predicts noise - x0 on packed 2x2 latent
patches (diffusers' FLUX trainer's target). t = sigmoid(N(0, 1)) (logit-normal, kohya sd-scripts' "sigmoid"
sampling; diffusers defaults to uniform). Guided FLUX models get the backbone's guidance (3.5 for FLUX.1-dev)
and T5 sees 512 tokens, as FluxPipeline renders.

Min-SNR-gamma (Hang et al., ICCV 2023; kohya's and diffusers' `snr_gamma`) weights each SDXL sample's loss by
min(SNR(t), gamma) / SNR(t) for epsilon prediction (/ (SNR(t) + 1) for v): nearly-clean timesteps, which
only refine detail, stop dominating the gradient, and the shape-forming noisy ones get their share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from composer.errors import StudioError


@dataclass
class Conditioning:
    """Text conditioning of one caption, computed once (text encoders are frozen)."""

    embeds: torch.Tensor  # (1, seq, dim)
    pooled: torch.Tensor  # (1, dim)
    text_ids: torch.Tensor | None = None  # FLUX only


class Objective:
    """Encodes images and captions for one pipeline and computes the training loss of a batch."""

    def __init__(self, pipe, family: str, size: int, guidance: float = 3.5, snr_gamma: float | None = None):
        self.pipe, self.family, self.size, self.guidance = pipe, family, size, guidance
        self.snr_gamma = snr_gamma
        if snr_gamma is not None and family != "sdxl":
            raise StudioError(
                f"snr_gamma weights DDPM timesteps (SDXL); {family} trains by rectified flow, leave it unset"
            )
        if family == "sdxl":
            from diffusers import DDPMScheduler

            self.noise = DDPMScheduler.from_config(pipe.scheduler.config)
            if self.noise.config.prediction_type not in ("epsilon", "v_prediction"):
                raise StudioError(
                    f"cannot train a model predicting {self.noise.config.prediction_type!r} (epsilon, v_prediction)"
                )
        elif family != "flux":
            raise StudioError(f"training on a {family} backbone is not supported (sdxl, flux)")

    @property
    def denoiser(self):
        return self.pipe.unet if self.family == "sdxl" else self.pipe.transformer

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
        if self.family == "sdxl":
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                caption, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return Conditioning(embeds.float(), pooled.float())
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            caption, prompt_2=None, device=device, max_sequence_length=512
        )
        return Conditioning(embeds.float(), pooled.float(), text_ids)

    def loss(
        self, x0: torch.Tensor, cond: list[Conditioning], generator: torch.Generator, dtype: torch.dtype
    ) -> torch.Tensor:
        """Mean squared error of the denoiser's prediction on a batch of latents x0 (B, C, h, w)."""
        if self.family == "sdxl":
            return self._sdxl(x0, cond, generator, dtype)
        return self._flux(x0, cond, generator, dtype)

    def _sdxl(self, x0, cond, generator, dtype) -> torch.Tensor:
        b, device = x0.shape[0], x0.device
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        steps = self.noise.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=generator).to(device)
        noisy = self.noise.add_noise(x0, noise, t)
        kind = self.noise.config.prediction_type
        target = noise if kind == "epsilon" else self.noise.get_velocity(x0, noise, t)
        h = w = self.size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=dtype).repeat(b, 1)
        embeds = torch.cat([c.embeds for c in cond]).to(device, dtype)
        pooled = torch.cat([c.pooled for c in cond]).to(device, dtype)
        pred = self.pipe.unet(
            noisy.to(dtype),
            t,
            embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        if self.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * self.snr_weights(t).to(per_sample)).mean()

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weight of each timestep in `t` (1 where SNR <= gamma for epsilon prediction)."""
        alphas = self.noise.alphas_cumprod.to(t.device)[t].double()
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        if self.noise.config.prediction_type == "v_prediction":
            return (clipped / (snr + 1)).float()
        return (clipped / snr).float()

    def _flux(self, x0, cond, generator, dtype) -> torch.Tensor:
        pipe = self.pipe
        b, c, h, w = x0.shape
        device = x0.device
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.sigmoid(torch.randn((b,), generator=generator)).to(x0)
        tb = t.view(-1, 1, 1, 1)
        noisy = (1 - tb) * x0 + tb * noise
        pack = pipe._pack_latents
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        transformer = pipe.transformer
        guidance = (
            torch.full((b,), self.guidance, device=device, dtype=torch.float32)
            if getattr(transformer.config, "guidance_embeds", False)
            else None
        )
        pred = transformer(
            hidden_states=pack(noisy, b, c, h, w).to(dtype),
            timestep=t.to(dtype),
            guidance=guidance,
            pooled_projections=torch.cat([k.pooled for k in cond]).to(device, dtype),
            encoder_hidden_states=torch.cat([k.embeds for k in cond]).to(device, dtype),
            txt_ids=cond[0].text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        target = pack(noise - x0, b, c, h, w)
        return F.mse_loss(pred.float(), target.float())
