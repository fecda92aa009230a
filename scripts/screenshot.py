"""Take docs/img/dashboard.png: a real TensorBoard showing what WeightDecayMonitor logged.

1. Train a short run (examples.models.TinyGPT on the text under examples/data, four param groups in four decay
   modes) with WeightDecayMonitor and a TensorBoardLogger into a temporary folder, or take ``--logdir`` of runs
   that already exist (e.g. ``runs`` after ``bash scripts/demo.sh``).
2. Start ``tensorboard`` on 127.0.0.1 on a free port and wait until it serves the ``decay/...`` scalars.
3. Screenshot the custom-scalars tab (one chart per metric, every group in it) with headless Chromium. With
   chromedriver, driven over plain WebDriver HTTP calls, the pointer rests on the effective_decay chart first, so the
   picture includes TensorBoard's tooltip naming every group; without it, Chromium's own ``--screenshot``.
4. Stop TensorBoard, chromedriver and Chromium; every wait is bounded by a timeout.

Needs Chromium, and chromedriver for the tooltip (Debian/Ubuntu: ``sudo apt-get install -y chromium
chromium-driver``). Without a browser, ``scripts/plot_dashboards.py`` draws the same charts from the event files with
matplotlib (the healthy and broken dashboards of docs/monitoring.md). Run from the repository root::

    .venv/bin/python scripts/screenshot.py                 # train a short run, then take the picture
    .venv/bin/python scripts/screenshot.py --logdir runs   # picture of runs that already exist
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, help="existing TensorBoard runs to show (default: train a short run)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png", help="PNG to write")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the short run")
    parser.add_argument("--tab", default="custom_scalars", choices=("custom_scalars", "scalars"))
    parser.add_argument("--width", type=int, default=1600, help="browser window width (default %(default)s)")
    parser.add_argument("--height", type=int, default=1000, help="browser window height (default %(default)s)")
    parser.add_argument(
        "--hover",
        default="649,560",
        help="X,Y in the page where the pointer rests before the picture (default: the effective_decay chart of the "
        "default window size), or 'none'",
    )
    parser.add_argument("--settle", type=float, default=8.0, help="seconds the page gets to draw before the picture")
    parser.add_argument("--chromium", help="browser executable (default: the first of chromium, google-chrome on PATH)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed to TensorBoard and Chromium")
    return parser.parse_args(argv)


def train_short_run(logdir: Path, steps: int) -> None:
    """A character-level TinyGPT whose groups use four different modes, so every chart has something to show."""
    sys.path.insert(0, str(ROOT))
    import lightning as L
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, Dataset

    import lit_decay
    from examples.models import TinyGPT

    # One thread: the model is tiny, and on a busy machine more threads only fight over the cores.
    torch.set_num_threads(1)
    text = (ROOT / "examples" / "data" / "kjv_genesis_exodus.txt").read_text(encoding="utf-8")
    vocabulary = sorted(set(text))
    tokens = torch.tensor([vocabulary.index(c) for c in text], dtype=torch.long)
    block, batch_size = 64, 16

    class Windows(Dataset):
        def __init__(self, length: int) -> None:
            self.starts = torch.randint(0, len(tokens) - block - 1, (length,))

        def __len__(self) -> int:
            return len(self.starts)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            start = int(self.starts[index])
            return tokens[start : start + block], tokens[start + 1 : start + block + 1]

    class CharModel(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = TinyGPT(vocab_size=len(vocabulary), block_size=block, n_layer=2, n_head=4, n_embd=64)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return lit_decay.configure_adam(
                self,
                lr=3e-3,
                weight_decay=0.1,
                mode="decoupled",
                overrides=[
                    {"pattern": "*emb.weight", "name": "embeddings", "mode": "l2"},
                    {"pattern": "model.blocks.*.mlp.*.weight", "name": "mlp", "mode": "decoupled_l1"},
                ],
            )

    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps,
        logger=TensorBoardLogger(str(logdir), name="tinygpt", default_hp_metric=False),
        callbacks=[lit_decay.WeightDecayMonitor()],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(CharModel(), DataLoader(Windows(steps * batch_size), batch_size=batch_size))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def serves_decay_scalars(base: str) -> bool:
    """True once TensorBoard has read the event files: the scalars plugin lists ``decay/...`` tags."""
    try:
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        plugins = get_json(f"{base}/data/plugins_listing")
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return False
    assert isinstance(tags, dict) and isinstance(plugins, dict)
    has_tags = any(tag.startswith("decay/") for run in tags.values() for tag in run)
    return has_tags and bool(plugins.get("custom_scalars", {}).get("enabled"))


@contextlib.contextmanager
def tensorboard(logdir: Path, timeout: float) -> Iterator[str]:
    port = free_port()
    # Run from the folder above, so that TensorBoard's sidebar shows the folder's name rather than a temporary path.
    logdir = logdir.resolve()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir.name]
    command += ["--host", "127.0.0.1", "--port", str(port), "--load_fast", "false", "--reload_interval", "1"]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=logdir.parent)
        try:
            deadline = time.monotonic() + timeout
            while not serves_decay_scalars(base):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode(errors="replace")[-2000:]
                    raise SystemExit(f"TensorBoard did not serve decay/... scalars from {logdir}:\n{output}")
                time.sleep(0.5)
            yield base
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def find_chromium(explicit: str | None) -> str:
    for name in (explicit,) if explicit else CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(
        "No Chromium found. On Debian/Ubuntu: sudo apt-get install -y chromium chromium-driver (or pass --chromium "
        "PATH to a Chrome/Chromium executable); scripts/plot_dashboards.py draws the charts without a browser."
    )


def browser_flags(profile: str, width: int, height: int) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ]


def plain_screenshot(browser: str, url: str, out: Path, width: int, height: int, timeout: float) -> None:
    """Chromium's own ``--screenshot``: no pointer, so no tooltip."""
    with tempfile.TemporaryDirectory() as profile:
        target = Path(profile) / "shot.png"
        command = [browser, *browser_flags(profile, width, height)]
        # Virtual time lets TensorBoard's requests and chart drawing finish before the picture is taken.
        command += ["--virtual-time-budget=20000", f"--screenshot={target}", url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0 or not target.exists():
            raise SystemExit(f"Chromium failed ({result.returncode}):\n{result.stderr[-2000:]}")
        shutil.copyfile(target, out)


class WebDriver:
    """The few W3C WebDriver calls needed, as plain HTTP requests to a chromedriver this process starts."""

    def __init__(self, driver: str, browser: str, flags: list[str], timeout: float) -> None:
        self.timeout = timeout
        self.base = f"http://127.0.0.1:{free_port()}"
        port = self.base.rsplit(":", 1)[1]
        command = [driver, f"--port={port}"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.session: str | None = None
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit("chromedriver did not start")
            time.sleep(0.2)
        options = {"binary": browser, "args": flags}
        capabilities = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        try:
            self.session = self.call("POST", "/session", capabilities)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/status", timeout=2) as response:
                return bool(json.load(response)["value"].get("ready"))
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return False

    def call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.load(response)["value"]

    def in_session(self, method: str, path: str, body: object = None) -> Any:
        return self.call(method, f"/session/{self.session}{path}", body)

    def close(self) -> None:
        try:
            if self.session is not None:
                self.call("DELETE", f"/session/{self.session}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        finally:
            stop(self.process)


def hover_screenshot(
    driver: str, browser: str, url: str, out: Path, args: argparse.Namespace, point: tuple[int, int]
) -> None:
    """Open the page, rest the pointer on ``point`` (TensorBoard then shows the tooltip of that chart), and save."""
    with tempfile.TemporaryDirectory() as profile:
        webdriver = WebDriver(driver, browser, browser_flags(profile, args.width, args.height), args.timeout)
        try:
            webdriver.in_session("POST", "/url", {"url": url})
            time.sleep(args.settle)
            move = {"type": "pointerMove", "duration": 100, "origin": "viewport", "x": point[0], "y": point[1]}
            mouse = {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": [move]}
            webdriver.in_session("POST", "/actions", {"actions": [mouse]})
            time.sleep(1.5)
            out.write_bytes(base64.b64decode(webdriver.in_session("GET", "/screenshot")))
        finally:
            webdriver.close()


def parse_point(text: str) -> tuple[int, int] | None:
    if text.lower() == "none":
        return None
    x, _, y = text.partition(",")
    return int(x), int(y)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    browser = find_chromium(args.chromium)
    point = parse_point(args.hover)
    driver = shutil.which("chromedriver")
    if point is not None and driver is None:
        print("chromedriver not found (apt-get install -y chromium-driver): the picture will have no tooltip")
    with tempfile.TemporaryDirectory(prefix="lit_decay_shot_") as scratch:
        logdir = args.logdir
        if logdir is None:
            logdir = Path(scratch) / "runs"
            train_short_run(logdir, args.steps)
        if not logdir.is_dir():
            raise SystemExit(f"--logdir {logdir} is not a folder")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tensorboard(logdir, args.timeout) as base:
            url = f"{base}/#{args.tab}"
            if point is not None and driver is not None:
                hover_screenshot(driver, browser, url, args.out, args, point)
            else:
                plain_screenshot(browser, url, args.out, args.width, args.height, args.timeout)
    how = "with the pointer on a chart" if point is not None and driver is not None else "without a tooltip"
    print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes) from TensorBoard's {args.tab} tab, {how}")


if __name__ == "__main__":
    main()
