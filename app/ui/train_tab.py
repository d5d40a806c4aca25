"""The Training tab: upload images, choose the adapter type, name, prompt and steps; the trainer runs in a
worker thread while the tab shows progress and the loss curve; the result links to its catalog page."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path, PurePath
from urllib.parse import quote

import gradio as gr
import pandas as pd

from app.facade import StudioFacade
from app.ui.common import count, user_errors
from composer.errors import StudioError

POLL_SECONDS = 0.5


class TrainingStopped(StudioError):
    """The user pressed Stop: the run ends at its next step and nothing enters the catalog."""


def loss_frame(losses: list[tuple[int, float]]) -> pd.DataFrame:
    return pd.DataFrame(losses, columns=["step", "loss"])


def copy_uploads(files: list[str], folder: Path) -> None:
    """Copy uploaded images into `folder` under their own base names (a client's path parts are dropped)."""
    for i, src in enumerate(files):
        name = PurePath(str(src).replace("\\", "/")).name or f"image_{i}.png"
        target = folder / name
        if target.exists():
            target = folder / f"{i}_{name}"
        shutil.copyfile(src, target)


def build_train_tab(studio: StudioFacade) -> None:
    """The tab's components and events (call inside `gr.Tab`)."""
    with gr.Row():
        with gr.Column():
            images = gr.File(
                label="Training images", file_count="multiple", file_types=["image"], elem_id="train-images"
            )
            kind = gr.Dropdown(
                label="Adapter type", choices=list(studio.adapter_types()), value="lora", elem_id="train-kind"
            )
            name = gr.Textbox(label="Catalog name", elem_id="train-name")
            prompt = gr.Textbox(
                label="Instance prompt", placeholder="a photo of sks dog", elem_id="train-prompt"
            )
            triggers = gr.Textbox(label="Trigger words (comma-separated)", elem_id="train-triggers")
            steps = gr.Number(
                label="Steps (0: the type's recipe)", value=0, precision=0, elem_id="train-steps"
            )
            with gr.Row():
                go = gr.Button("Train", variant="primary", elem_id="train")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        with gr.Column():
            curve = gr.LinePlot(x="step", y="loss", title="Training loss", elem_id="loss-curve")
            status = gr.Markdown(elem_id="train-status")

    stopping = threading.Event()  # one training run at a time (concurrency "gpu", limit 1)
    owner: dict[str, str | None] = {"user": None}  # who started the run under way (None: no login)

    def train(files, kind_, name_, prompt_, triggers_, steps_, request: gr.Request, progress=gr.Progress()):
        stopping.clear()
        owner["user"] = request.username
        with user_errors():
            if not files:
                raise StudioError("upload at least one training image")
            if not (name_ or "").strip():
                raise StudioError("give the new adapter a catalog name")
        losses: list[tuple[int, float]] = []
        total = [count(steps_) or 0]
        outcome: dict = {}
        studio.settings.root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=studio.settings.root, prefix=".train-upload-"))

        def on_step(done: int, steps_total: int, loss: float) -> None:
            total[0] = steps_total
            losses.append((done, float(loss)))
            if stopping.is_set() and done < steps_total:
                raise TrainingStopped(f"stopped at step {done} of {steps_total}")

        def run() -> None:
            try:
                copy_uploads(files, folder)
                outcome["result"] = studio.train_adapter(
                    images=folder,
                    name=name_.strip(),
                    kind=kind_,
                    prompt=prompt_,
                    steps=count(steps_),
                    trigger_words=[w.strip() for w in (triggers_ or "").split(",") if w.strip()],
                    progress=on_step,
                )
            except BaseException as exc:  # handed to the event below, which reports it
                outcome["error"] = exc
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        worker = threading.Thread(target=run, name=f"train-{name_}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            if losses:
                done = losses[-1][0]
                progress((done, total[0]), desc=f"training, loss {losses[-1][1]:.4f}", unit="steps")
                yield loss_frame(list(losses)), f"step {done} of {total[0]}"
        if isinstance(outcome.get("error"), TrainingStopped):
            yield (
                loss_frame(list(losses)),
                f"Training {outcome['error']}; nothing was added to the catalog. Its checkpoints stay in the "
                f"data dir's `training/{name_.strip()}` folder: `lora-studio train ... --resume` continues "
                "it there; delete that folder to train this name again from the start.",
            )
            return
        with user_errors():
            if "error" in outcome:
                raise outcome["error"]
        result = outcome["result"]
        info = result.adapter
        yield (
            loss_frame(list(losses)),
            f"Trained **{info.name}** ({info.adapter_type}, {result.steps} steps in {result.seconds:.0f} s, "
            f"final loss {result.final_loss:.4f}): [open it in the catalog](/admin/loras/{quote(info.name)})",
        )

    def stop_training(request: gr.Request) -> str:
        """Only the user who started a run may stop it (without a login, the one local user may)."""
        if owner["user"] is not None and request.username != owner["user"]:
            return f"The training under way was started by {owner['user']}; only they can stop it."
        stopping.set()
        return "Stopping after the current step..."

    stop.click(stop_training, None, status, api_name="stop_training", concurrency_limit=None)
    go.click(
        train,
        [images, kind, name, prompt, triggers, steps],
        [curve, status],
        api_name="train",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
