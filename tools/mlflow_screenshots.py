"""Refresh the README's MLflow screenshots: docs/mlflow_parent_run.png, mlflow_target_run.png,
mlflow_models.png and mlflow_logged_model.png.

    .venv/bin/python tools/mlflow_screenshots.py [--out docs] [--tracking-uri URL --run-url URL]

Starts `mlflow server` on 127.0.0.1 (SQLite and artifacts in a temporary folder), runs a tiny study
tracked to it (2-4 min on 2 cores), then opens the parent run, the experiment's Models tab and one
logged model in headless Chromium (Debian: `apt-get install chromium`) through the DevTools
protocol, waiting for each page's content to render; and one target's `transfer/<target>` run,
its candidates listed best first. Given `--tracking-uri` and `--run-url` (the
link `taskatlas run` ends with), it only takes the pictures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp  # comes with ray[default]
import requests
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STUDY = {
    "name": "tiny",  # short: the Models tab cuts long registered names (`<name>-<task>`)
    "tasks": ["normal", "reshading", "edge_texture", "depth_euclidean"],
    "data": {"n_train": 64, "n_transfer": 24, "n_test": 24, "size": 32, "rows_per_shard": 16},
    "model": {"encoder": "small", "width": 8, "downsample": 4},
    "train": {"epochs": 3, "num_workers": 1},
    "tune": {"enabled": False},
    "transfer": {"orders": [2], "beams": [2], "epochs": 1, "width": 16},
    "taxonomy": {"budget": 1, "max_order": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds:.0f} s")


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def tiny_study(tmp: Path, tracking_uri: str) -> str:
    """Runs the tiny study tracked to `tracking_uri`; returns the parent run's UI link."""
    config = tmp / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY | {"storage_root": str(tmp / "runs")}, sort_keys=False))
    env = os.environ | {"TASKATLAS_RAY_DASHBOARD": "0"}
    args = [str(BIN / "taskatlas"), "run", "-c", str(config), "--set", f"tracking_uri={tracking_uri}"]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"taskatlas run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return re.search(r"^MLflow run:\s+(http\S+)", done.stdout, re.M).group(1)


class Page:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.id += 1
        await self.ws.send_json({"id": self.id, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self.id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def shot(
        self, url: str, expect: str, out: Path, height: int, width: int = 1400, tidy: str = ""
    ) -> None:
        """Opens `url`, waits until the page shows `expect`, runs `TIDY` and `tidy` (JavaScript),
        and saves a `width`x`height` PNG."""
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while not await self.js(f"document.body && document.body.innerText.includes({json.dumps(expect)})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} never showed {expect!r}")
            await asyncio.sleep(0.5)
        await self.js(TIDY + tidy)
        await asyncio.sleep(3)  # charts and lazy sections settle
        png = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE)
        image.save(out, optimize=True)
        print(f"{out} ({out.stat().st_size // 1024} KB)")


# The "MLflow Assistant" side panel takes a third of the page: close it (it stays closed). Show the
# whole description.
TIDY = """
if (document.body.innerText.includes('MLflow Assistant'))
    document.querySelector('button[aria-label="Close"]')?.click();
document.querySelector('[data-testid="show-comment-toggle"]')?.click();
"""


@contextlib.asynccontextmanager
async def headless_page(tmp: Path):
    """A `Page` of a fresh headless Chromium (Debian: `apt-get install chromium`), its profile in
    `tmp`; the browser stops on leaving."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    port = free_port()
    browser = start(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--remote-debugging-port={port}", f"--user-data-dir={tmp / 'chrome'}", "about:blank"],
        tmp / "chromium.log",
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/json/version")
        pages = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
        target = next(t for t in pages if t["type"] == "page")
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws,
        ):
            yield Page(ws)
    finally:
        stop(browser)


async def screenshots(tracking_uri: str, run_url: str, out: Path, tmp: Path) -> None:
    experiment = re.search(r"/experiments/(\d+)/", run_url).group(1)
    models = requests.post(
        f"{tracking_uri}/api/2.0/mlflow/logged-models/search",
        json={"experiment_ids": [experiment]},
        timeout=30,
    ).json()["models"]
    model = next((m for m in models if m["info"]["name"] == "normal"), models[0])["info"]
    [target_run] = requests.post(
        f"{tracking_uri}/api/2.0/mlflow/runs/search",
        json={
            "experiment_ids": [experiment],
            "filter": "tags.stage = 'transfer_target' and tags.target = 'normal'",
        },
        timeout=30,
    ).json()["runs"]
    view = "?workflowType=machine_learning"
    async with headless_page(tmp) as page:
        await page.shot(run_url, "Duration", out / "mlflow_parent_run.png", 1240)
        base = f"{tracking_uri}/#/experiments/{experiment}"
        target_url = f"{base}/runs/{target_run['info']['run_id']}{view}"
        await page.shot(target_url, "best first", out / "mlflow_target_run.png", 900)
        # Without the sidebar, the metric columns fit.
        sidebar = "document.querySelector('button[aria-label=\"Toggle sidebar\"]')?.click();"
        await page.shot(f"{base}/models{view}", model["name"], out / "mlflow_models.png", 480, 2100, sidebar)
        await page.js(sidebar)
        await page.shot(
            f"{base}/models/{model['model_id']}{view}",
            "test_loss",
            out / "mlflow_logged_model.png",
            1100,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--tracking-uri", help="a running server with a study on it (with --run-url)")
    parser.add_argument("--run-url", help="the parent run's link, as `taskatlas run` prints it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="taskatlas-shots-") as folder:
        tmp = Path(folder)
        if args.tracking_uri and args.run_url:
            asyncio.run(screenshots(args.tracking_uri.rstrip("/"), args.run_url, args.out, tmp))
            return
        port = free_port()
        server = start(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts")],
            tmp / "mlflow-server.log",
            os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        try:
            tracking_uri = f"http://127.0.0.1:{port}"
            wait_http(f"{tracking_uri}/health")
            asyncio.run(screenshots(tracking_uri, tiny_study(tmp, tracking_uri), args.out, tmp))
        finally:
            stop(server)


if __name__ == "__main__":
    main()
