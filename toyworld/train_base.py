"""Train the toy base model: SDXL's architecture at toy size, on base-concept toy-world scenes only.

python -m toyworld.train_base --out toyworld/model --vae-minutes 12 --unet-minutes 45
python -m toyworld.train_base --resume toyworld/model --out toyworld/model --unet-minutes 30  # train on

Stage 1 trains the small VAE (reconstruction + a light KL term) on 64 px scenes; stage 2 trains both CLIP text
encoders and the UNet jointly with the epsilon-prediction loss on VAE latents, with 10% empty captions for
classifier-free guidance and an EMA of the weights. Withheld combinations (toyworld.combos) never appear.
Both stages run for a time budget; the script writes a diffusers-layout StableDiffusionXLPipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from composer.backbones import sdxl
from toyworld import IMAGE_SIZE, combos, scenes

log = logging.getLogger("toyworld.train_base")

IMAGE = IMAGE_SIZE
LATENT = IMAGE // 4
# SDXL's block layout (DownBlock2D, CrossAttnDownBlock2D x2 / CrossAttnUpBlock2D x2, UpBlock2D): up_blocks.0
# has attentions.0 and .1, the B-LoRA content and style blocks. Widths sized for a CPU training budget.
UNET = dict(
    sdxl.TINY_UNET,
    sample_size=LATENT,
    block_out_channels=(48, 96, 96),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(3, 6, 6),  # heads per level: 16-channel heads
    cross_attention_dim=128,  # text_encoder.hidden (64) + text_encoder_2.hidden (64), as SDXL concatenates
    addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=6 * 16 + 64,
    norm_num_groups=16,
)
# A three-level VAE: 64 px images <-> 16 x 16 x 4 latents (SDXL's VAE is 8x; 4x keeps toy textures).
VAE = dict(
    sdxl.TINY_VAE,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    norm_num_groups=8,
    sample_size=IMAGE,
)
TEXT_HIDDEN = 64


def batch_of_scenes(
    rng: np.random.Generator,
    n: int,
    split: str = "base",
    focus: tuple[str, ...] = (),
    focus_share: float = 0.0,
) -> tuple[torch.Tensor, list[str]]:
    """n scenes that avoid withheld combinations: images in [-1, 1] (n, 3, 64, 64) and captions.

    split "base" (what the UNet and text encoders learn from) or "all" (every toy-world concept, held-out ones
    included: images for the VAE decoder only, which sees no text).
    focus: textures that a `focus_share` of the scenes give every object (a codec's hardest textures).
    """
    images, captions = [], []
    while len(images) < n:
        seed = int(rng.integers(0, 2**62))
        fixed = (
            {"texture": focus[int(rng.integers(len(focus)))]}
            if focus and rng.random() < focus_share
            else None
        )
        spec = scenes.sample_scene(seed, split, fixed=fixed)
        if combos.scene_is_withheld(spec):
            continue
        images.append(scenes.render(spec, IMAGE, seed))
        captions.append(spec.caption())
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, captions


def random_crops(x: torch.Tensor, size: int, rng) -> torch.Tensor:
    """One random size x size crop per image: the VAE is convolutional, so crops train it 4x cheaper."""
    if size >= x.shape[-1]:
        return x
    i, j = rng.integers(0, x.shape[-1] - size + 1, 2)
    return x[..., i : i + size, j : j + size]


def edge_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical pixel differences (their edges and fine texture)."""
    dx = F.l1_loss(recon[..., :, 1:] - recon[..., :, :-1], x[..., :, 1:] - x[..., :, :-1])
    dy = F.l1_loss(recon[..., 1:, :] - recon[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])
    return dx + dy


def train_vae(
    vae,
    minutes: float,
    batch: int,
    rng,
    crop: int = 32,
    lr: float = 1e-3,
    decoder_only: bool = False,
    split: str = "base",
    edge_weight: float = 0.0,
    focus: tuple[str, ...] = (),
    focus_share: float = 0.0,
) -> float:
    """Reconstruction (L1 + MSE, plus MSE of 4x-pooled images so flat colours are exact) and a light KL term.

    decoder_only keeps the encoder (and so the latent space a trained UNet works in) and sharpens the decoder.
    split: the scenes it learns from (`batch_of_scenes`).
    edge_weight: weight of an L1 loss on horizontal and vertical pixel differences, which L1/MSE on pixels
    alone lets the codec blur away (the fine zigzag, crosshatched and concentric styles).
    focus, focus_share: a share of the scenes drawn in these textures (`batch_of_scenes`).

    Cosine learning-rate decay over the time budget; the first VAE (constant rate, full images, 8 minutes)
    drifted hues (blue -> purple) enough that the evaluator misread a third of its reconstructions.
    """
    vae.train().requires_grad_(True)
    if decoder_only:
        for m in (vae.encoder, vae.quant_conv):
            m.eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    start, step = time.monotonic(), 0
    budget = minutes * 60
    while (elapsed := time.monotonic() - start) < budget:
        x, _ = batch_of_scenes(rng, batch, split, focus, focus_share)
        x = random_crops(x, crop, rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        pooled = F.mse_loss(F.avg_pool2d(recon, 4), F.avg_pool2d(x, 4))
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 4.0 * pooled + 1e-4 * kl
        if edge_weight:
            loss = loss + edge_weight * edge_loss(recon, x)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            log.info("vae step %d loss %.4f", step, loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x, _ = batch_of_scenes(rng, 64)
        latents = vae.encode(x).latent_dist.mean
        recon_err = (vae.decode(latents).sample - x).abs().mean().item()
        if not decoder_only:  # the latent space is unchanged otherwise, and so is its scale
            vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log.info(
        "vae: %d steps, mean abs reconstruction error %.4f, scaling %.3f",
        step,
        recon_err,
        vae.config.scaling_factor,
    )
    return recon_err


def match_unet_to_vae(pipe) -> bool:
    """Give the UNet the VAE's latent channels: a new conv_in and conv_out (the rest of the UNet keeps what it
    learned) when a VAE with another latent width replaced the one it was trained on. True if it changed."""
    channels = pipe.vae.config.latent_channels
    unet = pipe.unet
    if unet.config.in_channels == channels and unet.config.out_channels == channels:
        return False
    old_in, old_out = unet.conv_in, unet.conv_out
    unet.conv_in = torch.nn.Conv2d(channels, old_in.out_channels, old_in.kernel_size, padding=old_in.padding)
    unet.conv_out = torch.nn.Conv2d(
        old_out.in_channels, channels, old_out.kernel_size, padding=old_out.padding
    )
    torch.nn.init.zeros_(
        unet.conv_out.weight
    )  # starts by predicting zero noise, as a fresh output head should
    torch.nn.init.zeros_(unet.conv_out.bias)
    unet.register_to_config(in_channels=channels, out_channels=channels)
    log.info("unet: conv_in/conv_out rebuilt for %d-channel latents", channels)
    return True


def encode_prompts(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What StableDiffusionXLPipeline.encode_prompt computes (penultimate hidden states, pooled from te2)."""
    embeds, pooled = [], None
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = te(ids, output_hidden_states=True)
        pooled = out[0]  # te2's text_embeds (the loop ends on te2)
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def train_unet(pipe, minutes: float, batch: int, lr: float, rng) -> dict:
    modules = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    sched = pipe.scheduler
    alphas = sched.alphas_cumprod
    time_ids = torch.tensor([[IMAGE, IMAGE, 0, 0, IMAGE, IMAGE]], dtype=torch.float32).repeat(batch, 1)
    scale = pipe.vae.config.scaling_factor
    end, step, losses = time.monotonic() + minutes * 60, 0, []
    while time.monotonic() < end:
        x, captions = batch_of_scenes(rng, batch)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            latents = pipe.vae.encode(x).latent_dist.sample() * scale
        noise = torch.randn_like(latents)
        t = torch.from_numpy(rng.integers(0, sched.config.num_train_timesteps, batch))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        embeds, pooled = encode_prompts(pipe, captions)
        pred = pipe.unet(
            noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        loss = F.mse_loss(pred, noise)
        warm = min(1.0, (step + 1) / 300)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log.info("unet step %d loss %.4f (last 100)", step, float(np.mean(losses[-100:])))
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    for m in modules:
        m.eval().requires_grad_(False)
    return {"steps": step, "final_loss_last_200": float(np.mean(losses[-200:])) if losses else math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("toyworld/model"))
    parser.add_argument(
        "--vae-minutes",
        type=float,
        default=None,
        help="train a fresh VAE for this long (default 12; 0 with --resume keeps the saved VAE); with --vae-from, "
        "train that VAE on (encoder too) for this long",
    )
    parser.add_argument("--vae-from", type=Path, default=None, help="take the VAE of this saved model")
    parser.add_argument(
        "--decoder-minutes",
        type=float,
        default=0.0,
        help="with --resume: sharpen the saved VAE's decoder for this long (encoder and latents unchanged)",
    )
    parser.add_argument(
        "--vae-scenes",
        "--decoder-scenes",
        choices=("base", "all"),
        default="base",
        help="what a fresh VAE or a sharpened decoder learns from: base scenes, or all toy-world scenes "
        "(held-out subjects, styles and backgrounds included: a generic image codec, as SDXL's VAE is; text "
        "never reaches the VAE)",
    )
    parser.add_argument(
        "--vae-channels",
        default=",".join(str(c) for c in VAE["block_out_channels"]),
        help="a fresh VAE's widths per level, e.g. 24,48,48 (default %(default)s)",
    )
    parser.add_argument(
        "--vae-latent-channels",
        type=int,
        default=VAE["latent_channels"],
        help="a fresh VAE's latent channels (SDXL 4, FLUX 16); a UNet trained on another width gets a new conv_in "
        "and conv_out (`match_unet_to_vae`) and must then train on (--unet-minutes)",
    )
    parser.add_argument(
        "--vae-edge-weight",
        type=float,
        default=0.0,
        help="weight of an L1 loss on pixel differences for a fresh VAE or a sharpened decoder (keeps fine "
        "textures; default %(default)s)",
    )
    parser.add_argument(
        "--vae-focus",
        default="",
        help="comma-separated textures that a --vae-focus-share of the VAE's (or sharpened decoder's) training "
        "scenes are drawn in (with --vae-scenes all: e.g. crosshatched,speckled, the styles the VAE loses most)",
    )
    parser.add_argument("--vae-focus-share", type=float, default=0.5)
    parser.add_argument("--unet-minutes", type=float, default=45.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--resume", type=Path, default=None, help="a saved toy model to continue training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    focus = tuple(filter(None, args.vae_focus.split(",")))
    unknown = set(focus) - set(scenes.TEXTURES)
    if unknown:
        parser.error(
            f"--vae-focus: {sorted(unknown)} are not toy-world textures ({', '.join(scenes.TEXTURES)})"
        )
    if not 0.0 <= args.vae_focus_share <= 1.0:
        parser.error(f"--vae-focus-share is a share, 0 to 1, not {args.vae_focus_share}")
    if focus and args.vae_scenes != "all" and set(focus) & scenes.HELD_OUT_NAMES:
        parser.error("--vae-focus on held-out styles needs --vae-scenes all")
    # what every VAE or decoder run below learns from, and how
    vae_scenes = dict(
        split=args.vae_scenes, edge_weight=args.vae_edge_weight, focus=focus, focus_share=args.vae_focus_share
    )
    start = time.monotonic()
    if args.resume:  # continue from a saved model: the UNet and text encoders train on
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(args.resume, local_files_only=True)
    else:
        pipe = sdxl.build_pipeline(UNET, VAE, TEXT_HIDDEN, seed=args.seed)
    recon, vae_s = math.nan, 0.0
    if args.vae_from:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", local_files_only=True)
        if args.vae_minutes:  # continue it, encoder and decoder
            recon = train_vae(
                pipe.vae,
                args.vae_minutes,
                args.batch,
                rng,
                **vae_scenes,
            )
            vae_s = time.monotonic() - start
    else:
        vae_minutes = args.vae_minutes if args.vae_minutes is not None else (0.0 if args.resume else 12.0)
        if vae_minutes > 0:
            from diffusers import AutoencoderKL

            widths = tuple(int(c) for c in args.vae_channels.split(","))
            pipe.vae = AutoencoderKL(
                **{**VAE, "block_out_channels": widths, "latent_channels": args.vae_latent_channels}
            )
            recon = train_vae(
                pipe.vae,
                vae_minutes,
                args.batch,
                rng,
                **vae_scenes,
            )
            vae_s = time.monotonic() - start
    if args.decoder_minutes > 0:
        recon = train_vae(
            pipe.vae,
            args.decoder_minutes,
            args.batch,
            rng,
            decoder_only=True,
            **vae_scenes,
        )
        vae_s = time.monotonic() - start
    rebuilt = match_unet_to_vae(pipe)
    if rebuilt and args.unet_minutes <= 0:
        log.warning("the UNet's new conv_in/conv_out are untrained: use this model's VAE only (--vae-from)")
    stats = train_unet(pipe, args.unet_minutes, args.batch, args.lr, rng)
    total = time.monotonic() - start
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out)
    n_params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    record = {
        "hardware": "cuda"
        if torch.cuda.is_available()
        else f"cpu x{os.cpu_count()} ({torch.get_num_threads()} threads)",
        "vae_seconds": round(vae_s, 1),
        "total_seconds": round(total, 1),
        "vae_mean_abs_error": round(recon, 4),
        "batch": args.batch,
        "image_size": IMAGE,
        "params": n_params,
        **stats,
        "command": "python -m toyworld.train_base "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    history_file = (args.resume or args.out) / "training.json"
    history = json.loads(history_file.read_text()) if args.resume and history_file.is_file() else {"runs": []}
    history["runs"].append(record)
    (args.out / "training.json").write_text(json.dumps(history, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
