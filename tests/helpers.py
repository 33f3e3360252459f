"""Test data: random volumes on oblique, flipped grids, and tiny datasets on disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medpipe.io import Geometry, Volume, write_image


def oblique_geometry(seed: int = 0, flipped: bool = False) -> Geometry:
    """Anisotropic spacing, a rotation about all three axes, optionally a left-handed frame."""
    rng = np.random.default_rng(seed)
    matrix = Rotation.from_euler("xyz", rng.uniform(-40, 40, 3), degrees=True).as_matrix()
    if flipped:
        matrix[:, 1] *= -1
    return Geometry(
        spacing=tuple(float(v) for v in rng.uniform(0.5, 3.0, 3)),
        origin=tuple(float(v) for v in rng.uniform(-100, 100, 3)),
        direction=tuple(float(v) for v in matrix.ravel()),
    )


def random_volume(
    shape=(9, 8, 7), dtype=np.float32, seed: int = 0, geometry: Geometry | None = None
) -> Volume:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)
    else:
        array = rng.normal(100.0, 30.0, shape).astype(dtype)
    return Volume(array, geometry or oblique_geometry(seed))


def make_dataset(
    root: Path,
    n_cases: int = 3,
    n_channels: int = 1,
    shape=(10, 9, 8),
    file_ending: str = ".nii.gz",
    n_test: int = 0,
) -> Path:
    """A small, valid nnU-Net v2 dataset: labels 0..2, oblique geometry shared per case."""
    rng = np.random.default_rng(7)
    for index in range(n_cases + n_test):
        case_id = f"case_{index:03d}"
        images, labels = ("imagesTr", "labelsTr") if index < n_cases else ("imagesTs", "labelsTs")
        geometry = oblique_geometry(index)
        label = np.zeros(shape, np.uint8)
        label[2:6, 2:6, 2:6] = 1
        label[5:8, 3:7, 4:7] = 2
        for channel in range(n_channels):
            image = (rng.normal(0, 1, shape) + 3 * label).astype(np.float32)
            write_image(
                Volume(image, geometry), root / images / f"{case_id}_{channel:04d}{file_ending}"
            )
        write_image(Volume(label, geometry), root / labels / f"{case_id}{file_ending}")
    spec = {
        "channel_names": {str(c): f"MR{c}" for c in range(n_channels)},
        "labels": {"background": 0, "one": 1, "two": 2},
        "numTraining": n_cases,
        "file_ending": file_ending,
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, to prove a command changed nothing."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _chromium(*arguments: str) -> subprocess.CompletedProcess:
    """Headless Chromium run with ARGUMENTS. A missing browser fails the test where
    MEDPIPE_REQUIRE_BROWSER is set (CI installs one), else skips it."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("MEDPIPE_REQUIRE_BROWSER"):
            pytest.fail("no chromium to look at the page with (apt-get install chromium)")
        pytest.skip("no chromium: the page is not looked at")
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                             "--hide-scrollbars", *arguments],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def browser_screenshot(page: Path | str, name: str, width: int = 1200, height: int = 2400,
                       wait_ms: int | None = None):
    """PAGE (a file, or an address) as headless Chromium draws it, after WAIT_MS of the
    page's own time for its scripts, kept as test-artifacts/NAME (RGB array back)."""
    from PIL import Image

    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / name
    address = page if isinstance(page, str) else page.resolve().as_uri()
    waiting = [f"--virtual-time-budget={wait_ms}"] if wait_ms else []
    _chromium(f"--window-size={width},{height}", *waiting, f"--screenshot={target}", address)
    assert target.is_file()
    return np.asarray(Image.open(target).convert("RGB"))


def browser_dom(address: str, wait_ms: int = 15000, width: int = 1600) -> str:
    """The page at ADDRESS as its scripts have built it after WAIT_MS (its rendered DOM)."""
    return _chromium(f"--window-size={width},1000", f"--virtual-time-budget={wait_ms}",
                     "--dump-dom", address).stdout


def run_medpipe(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`medpipe ARGS` as a user runs it, in a process of its own, its output as UTF-8."""
    return subprocess.run([sys.executable, "-m", "medpipe.cli", *args], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(port: int, root: Path, store: str | None = None) -> subprocess.Popen:
    """A real `mlflow server` on loopback (its URL as `.url`), its store (by default a new
    sqlite file) and artifacts in ROOT, in its own process group; returns once it answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", store or f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    stop_server(server, signal.SIGKILL)
    pytest.fail("mlflow server did not start within 120 s")


def stop_server(server: subprocess.Popen, how: int = signal.SIGTERM) -> None:
    """The server and its workers (its own process group): nothing left on the port."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, how)
    server.wait(timeout=30)


REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def as_user(folder: Path):
    """A runner of commands in FOLDER with the environment's medpipe and snakemake first on
    PATH and no inherited MLflow store: each must exit 0 without a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}:{env['PATH']}"

    def run(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True,
                                encoding="utf-8", errors="replace", timeout=1800)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
        assert "Traceback" not in result.stdout + result.stderr
        return result

    return run


def run_workflow(run, config: str = "config.yaml") -> None:
    """`snakemake all` as the README says, on 2 cores, with RUN (`as_user`)."""
    run(str(BIN / "snakemake"), "all", "-s", str(REPO / "Snakefile"), "--directory", ".",
        "--profile", str(REPO / "configs" / "profiles" / "local"), "--configfile", config,
        "--cores", "2")


def assert_no_traceback_in_logs(results: Path) -> None:
    for log in (results / "logs").rglob("*.log"):
        assert "Traceback" not in log.read_text(encoding="utf-8", errors="replace"), log
