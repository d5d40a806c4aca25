"""The studio's LoRA search as the page runs it, with small and large catalogs: the time from a search request to
its answer (picker choices, the matches table and up to 50 LoRA cards with their preview thumbnails), through
gradio_client against live servers (the whole web app, as `serve` builds it), one per catalog size, timed
round-robin. Every LoRA has a 1024 px preview (what an SDXL LoRA's preview is), so the cards' thumbnails matter.

python -m bench.ui_search [--sizes 30,300] [--repeat 9]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from PIL import Image

from app.settings import Settings
from app.studio import Studio
from app.web import create_web_app
from bench.api import live_server
from bench.common import emit, random_lora, spread
from composer.backbones import get_backbone
from composer.formats import write_kohya


def catalog_of(root: Path, n: int, unet, targets: list[str], preview: Path) -> Studio:
    studio = Studio.open(Settings(data_dir=root, backbone="sdxl", model="tiny", bundled=False))
    folder = root / "in"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lora, _ = random_lora(unet, i, 1, targets)
        path = folder / f"lora{i:04d}.safetensors"
        write_kohya(lora, path, trigger_words=[f"trig{i:04d}"])
        studio.library.import_file(path)
        studio.library.set_preview(f"lora{i:04d}", preview)
    return studio


def main() -> None:
    from gradio_client import Client

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="30,300", help="catalog sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    pipe = get_backbone("sdxl").build_tiny(0)
    targets = [n for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q")][:4]
    queries = {"all": "", "one trigger word": "trig0007"}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        preview = Path(tmp) / "preview.png"
        Image.new("RGB", (1024, 1024), (200, 120, 40)).save(preview)
        clients = {}
        for n in sizes:
            studio = catalog_of(Path(tmp) / f"c{n}", n, pipe.unet, targets, preview)
            url = stack.enter_context(live_server(create_web_app(studio)))
            clients[n] = Client(
                f"{url}/", verbose=False, download_files=False
            )  # a browser fetches cards lazily
        times: dict[tuple[int, str], list[float]] = {(n, q): [] for n in sizes for q in queries}
        for n, q in times:  # warm: thumbnails made, Gradio's caches filled
            clients[n].predict(queries[q], [], api_name="/search_loras")
        for _ in range(args.repeat):
            for (n, q), out in times.items():  # round-robin over sizes and queries
                t = time.perf_counter()
                _, matches, cards = clients[n].predict(queries[q], [], api_name="/search_loras")
                out.append(time.perf_counter() - t)
                expected = min(n, 50) if q == "all" else 1
                assert len(cards) == expected, (n, q, len(cards))
    figures = {f"{n} LoRAs, {q}: ms": spread(v, 1000, 1) for (n, q), v in times.items()}
    emit("ui_search", figures, {}, {"repeat": args.repeat, "cards_at_most": 50})


if __name__ == "__main__":
    main()
