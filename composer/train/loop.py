"""One training loop for every adapter type: DreamBooth-style subjects and B-LoRA single images.

    trainer = Trainer(pipe, backbone, TrainConfig(kind="lora", prompt="a photo of sks dog"), run_dir)
    result = trainer.run(load_images(folder, config.prompt, size))

The pipeline comes back exactly as it was (adapters detached) whether the run ends, fails or is interrupted.
Every `checkpoint_every` steps the adapter, the optimizer and the random generator are saved; `run(...,
resume=True)` continues from the last checkpoint and gives the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from composer.adapters.host import AdapterHost
from composer.backbones.base import Backbone
from composer.formats.model import LoraFile
from composer.train import checkpoint, targets
from composer.train.config import TrainConfig, TrainConfigError, recipe
from composer.train.data import TrainingImage, to_pixels
from composer.train.objectives import Objective

log = logging.getLogger(__name__)
TRAINING = "__training__"  # the resident name of the adapter being trained

Progress = Callable[[int, int, float], None]  # (step done, total steps, loss of that step)


@dataclass
class TrainResult:
    lora: LoraFile
    losses: list[float]
    steps: int
    seconds: float  # this process's training time (a resumed run counts only its own part)
    samples: list  # PIL images rendered with the trained adapter
    parameters: int


class Trainer:
    def __init__(
        self,
        pipe,
        backbone: Backbone,
        config: TrainConfig,
        run_dir: Path,
        progress: Progress | None = None,
        host: AdapterHost | None = None,
    ):
        """`host`: the AdapterHost already on this pipeline, if any (a studio's); the run adds its adapter
        there and removes it at the end, leaving resident LoRAs alone. Without one the trainer makes its own."""
        self.pipe, self.backbone, self.config = pipe, backbone, config.validate()
        self.host = host
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.size = config.resolution or backbone.native_size(pipe)
        problem = backbone.train_size_problem(self.size)
        if problem:
            raise TrainConfigError(problem)
        self.objective = Objective(
            pipe, backbone, self.size, guidance=backbone.default_guidance, snr_gamma=config.snr_gamma
        )
        self.device = self.objective.denoiser.device
        self._scaler: torch.amp.GradScaler | None = None  # fp16 runs: built per run, checkpointed
        self.dtype = self.objective.denoiser.dtype
        if config.mixed_precision != "no" and self.device.type != "cuda":
            raise TrainConfigError(
                f"mixed precision {config.mixed_precision} needs a GPU; this run is on {self.device}"
            )

    # --- public -------------------------------------------------------------------------------------
    def run(
        self,
        images: list[TrainingImage],
        resume: bool = False,
        samples: int = 2,
        sample_steps: int | None = None,
    ) -> TrainResult:
        cfg = self.config
        if len(images) < cfg.min_images:
            raise TrainConfigError(f"{len(images)} image(s); this run needs at least {cfg.min_images}")
        start_ckpt = checkpoint.latest(self.run_dir) if resume else None
        if start_ckpt is None and checkpoint.latest(self.run_dir) is not None:
            raise TrainConfigError(
                f"{self.run_dir} already holds checkpoints of a run: resume it, or delete that folder to "
                "start again"
            )
        if start_ckpt is not None:  # refuse other settings before any work
            checkpoint.check_config(start_ckpt, cfg.to_json())
        generator = torch.Generator().manual_seed(cfg.seed)
        host = self.host or AdapterHost.for_pipeline(self.pipe, self.backbone)
        denoiser = self.objective.denoiser
        previous = dict(host.context.active)
        unfrozen = [p for p in denoiser.parameters() if p.requires_grad]
        checkpointing = bool(getattr(denoiser, "is_gradient_checkpointing", False))
        attached = False
        try:
            host.context.active = {}  # resident LoRAs must not shape the captions, class images or steps
            for p in unfrozen:
                p.requires_grad_(False)
            mean, std, cond = self._encode(images, generator)
            prior = self._prior(generator) if cfg.prior_weight > 0 else None
            keys = targets.target_keys(self.backbone, self.pipe, cfg)
            built = targets.create_all(host.find, keys, cfg, generator)
            targets.check_exportable(built, cfg, self.backbone, self.run_dir)  # fail now, not after training
            host.attach(TRAINING, built)
            attached = True
            host.set_active({TRAINING: 1.0})
            adapters = host.adapter_modules(TRAINING)
            params = self._params(adapters)
            optimizer = torch.optim.AdamW(params, lr=cfg.recipe_lr(), weight_decay=0.0)
            step, losses = 0, []
            self._scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
            if start_ckpt is not None:
                step, losses = self._restore(start_ckpt, adapters, optimizer, generator)
            if cfg.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
                denoiser.enable_gradient_checkpointing()
            began = time.monotonic()
            captions = [img.caption for img in images]
            step, losses = self._loop(
                step, losses, mean, std, cond, captions, prior, params, optimizer, generator, adapters
            )
            seconds = time.monotonic() - began
            sample_images = self._samples(samples, sample_steps) if samples else []
            lora = targets.to_lora_file(adapters, cfg, self.backbone, self._metadata(len(images), step))
            n_params = sum(p.numel() for p in params)
        finally:
            if (
                cfg.gradient_checkpointing
                and not checkpointing
                and hasattr(denoiser, "disable_gradient_checkpointing")
            ):
                denoiser.disable_gradient_checkpointing()
            for p in unfrozen:
                p.requires_grad_(True)
            if self.host is None:
                host.detach()
            else:
                if attached:
                    host.remove(TRAINING)
                host.context.active = previous
        return TrainResult(lora, losses, step, seconds, sample_images, n_params)

    # --- steps --------------------------------------------------------------------------------------
    def _autocast(self):
        precision = self.config.mixed_precision
        if precision == "no":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)

    def _loop(self, step, losses, mean, std, cond, captions, prior, params, optimizer, generator, adapters):
        cfg = self.config
        autocast = self._autocast()
        scaler = self._scaler
        n = mean.shape[0]
        while step < cfg.steps:
            idx = torch.randint(0, n, (cfg.batch_size,), generator=generator)
            x0 = self.objective.latents(mean[idx], std[idx], generator)
            if cfg.flip:
                flip = torch.rand(cfg.batch_size, generator=generator) < 0.5
                x0 = torch.where(flip.view(-1, 1, 1, 1).to(x0.device), x0.flip(-1), x0)
            if cfg.text_encoder:  # the captions through the adapted text encoders, with their graph
                fresh = {
                    captions[i]: self.objective.encode_caption(captions[i], self.device, grad=True)
                    for i in dict.fromkeys(idx.tolist())
                }
                batch_cond = [fresh[captions[i]] for i in idx.tolist()]
            else:
                batch_cond = [cond[i] for i in idx.tolist()]
            with autocast:
                loss = self.objective.loss(x0, batch_cond, generator, self.dtype)
                if prior is not None:
                    p_mean, p_std, p_cond = prior
                    p_idx = torch.randint(0, p_mean.shape[0], (cfg.batch_size,), generator=generator)
                    p_x0 = self.objective.latents(p_mean[p_idx], p_std[p_idx], generator)
                    if cfg.text_encoder:
                        p_cond = self.objective.encode_caption(cfg.class_prompt, self.device, grad=True)
                    loss = loss + cfg.prior_weight * self.objective.loss(
                        p_x0, [p_cond] * cfg.batch_size, generator, self.dtype
                    )
            if not torch.isfinite(loss):
                raise TrainConfigError(
                    f"the loss became {loss.item()} at step {step + 1}: lower the learning rate "
                    f"({cfg.recipe_lr()}); on a GPU with an fp16 model use --mixed-precision bf16 or fp16 "
                    "(adapter weights stay fp32), or load the model in float32"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            losses.append(float(loss.item()))
            if self.progress is not None:
                self.progress(step, cfg.steps, losses[-1])
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self._checkpoint(step, losses, adapters, optimizer, generator)
        return step, losses

    def _params(self, adapters) -> list[torch.nn.Parameter]:
        params = []
        for adapter in adapters.values():
            for p in adapter.parameters():
                p.data = p.data.float()  # trainable weights in fp32 always: AdamW's eps underflows in fp16
                p.requires_grad_(True)
                params.append(p)
        return params

    # --- data ---------------------------------------------------------------------------------------
    def _encode(self, images: list[TrainingImage], generator):
        pixels = []
        for img in images:
            px = img.pixels
            if px.shape[-1] != self.size or px.shape[-2] != self.size:
                px = torch.nn.functional.interpolate(px[None], size=(self.size, self.size), mode="bicubic")[0]
            pixels.append(px.clamp(-1, 1))
        mean, std = self.objective.encode_images(torch.stack(pixels))
        cache: dict[str, object] = {}
        cond = []
        for img in images:
            if img.caption not in cache:
                cache[img.caption] = self.objective.encode_caption(img.caption, self.device)
            cond.append(cache[img.caption])
        return mean, std, cond

    @torch.no_grad()
    def _prior(self, generator):
        """Class images rendered by the base model (cached in the run folder, so a resume reuses them)."""
        from PIL import Image

        cfg = self.config
        folder = self.run_dir / "class_images"
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for i in range(cfg.class_images):
            path = folder / f"{i:04d}.png"
            if not path.is_file():
                g = torch.Generator().manual_seed(cfg.seed * 100_003 + i)
                out = self.pipe(
                    prompt=cfg.class_prompt,
                    height=self.size,
                    width=self.size,
                    num_inference_steps=self.backbone.default_steps,
                    guidance_scale=self.backbone.default_guidance,
                    generator=g,
                )
                out.images[0].save(path)
            with Image.open(path) as img:
                images.append(to_pixels(img, self.size))
        mean, std = self.objective.encode_images(torch.stack(images))
        return mean, std, self.objective.encode_caption(cfg.class_prompt, self.device)

    # --- checkpoints --------------------------------------------------------------------------------
    def _checkpoint(self, step, losses, adapters, optimizer, generator) -> None:
        state = {f"{k}/{n}": p.detach() for k, a in adapters.items() for n, p in a.named_parameters()}
        checkpoint.save(
            self.run_dir,
            checkpoint.Checkpoint(
                step=step,
                adapter=state,
                optimizer=optimizer.state_dict(),
                generator_state=generator.get_state(),
                losses=list(losses),
                config=self.config.to_json(),
                scaler=self._scaler.state_dict() if self._scaler is not None else {},
            ),
        )

    @torch.no_grad()
    def _restore(self, path: Path, adapters, optimizer, generator) -> tuple[int, list[float]]:
        ckpt = checkpoint.load(path)
        for key, adapter in adapters.items():
            for name, p in adapter.named_parameters():
                saved = ckpt.adapter.get(f"{key}/{name}")
                if saved is None or saved.shape != p.shape:
                    raise checkpoint.CheckpointError(
                        f"{path} does not hold {key}/{name} as this run makes it"
                    )
                p.copy_(saved)
        optimizer.load_state_dict(ckpt.optimizer)
        generator.set_state(ckpt.generator_state)
        if self._scaler is not None and ckpt.scaler:  # the fp16 loss scale goes on where it was
            self._scaler.load_state_dict(ckpt.scaler)
        log.info("resumed %s at step %d", self.run_dir, ckpt.step)
        return ckpt.step, ckpt.losses

    # --- results ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _samples(self, count: int, steps: int | None) -> list:
        g = [torch.Generator().manual_seed(self.config.seed + i) for i in range(count)]
        with self._autocast():
            out = self.pipe(
                prompt=[self.config.prompt] * count,
                height=self.size,
                width=self.size,
                num_inference_steps=steps or self.backbone.default_steps,
                guidance_scale=self.backbone.default_guidance,
                generator=g,
            )
        return list(out.images)

    def _metadata(self, n_images: int, steps: int) -> dict[str, str]:
        cfg = self.config
        meta = {
            "ss_learning_rate": str(cfg.recipe_lr()),
            "ss_max_train_steps": str(cfg.steps),
            "ss_steps": str(steps),
            "ss_seed": str(cfg.seed),
            "ss_num_train_images": str(n_images),
            "ss_resolution": f"({self.size}, {self.size})",
            "ss_training_comment": f"lora-studio {cfg.kind}: {cfg.prompt}",
            "modelspec.resolution": f"{self.size}x{self.size}",
        }
        if recipe(cfg.kind).ranked:
            meta["ss_network_dim"] = str(cfg.rank)
            meta["ss_network_alpha"] = str(cfg.alpha if cfg.alpha is not None else cfg.rank)
        return meta
