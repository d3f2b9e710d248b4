"""The web page in a real browser: `python -m ei2.app` in a subprocess on a free port, driven by headless Chromium
(the system's, through Playwright; never `playwright install`). Upload the demo clip, run at reduced steps, see the
edit and the exact metrics, re-edit the run with a second prompt, cancel a run, and a bad upload gives the CLI's
one-line error while the server keeps working. EI2_APP_SCREENSHOT=docs/app.png keeps the page's screenshot."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ei2.app.jobs import DEMO_CLIP, metrics_line
from ei2.config import load_config
from ei2.tuned import read_tuned_metadata

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("EI2_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the test extra's playwright")
pytest.importorskip("gradio", reason="the web page needs the app extra (gradio)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium; .ci/run "
                                                          "does it)")
DEMO = load_config(ROOT / "configs" / "demo.yaml")
EDIT = DEMO.edit_prompts[0]  # the page starts with the demo's settings and prompt
REEDIT = "a green triangle moving right on a white background"
TIMEOUT = 240_000  # ms, for one job on a loaded 2-core CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free local port, its runs in a temporary folder; (url, runs folder, process)."""
    runs = tmp_path_factory.mktemp("runs")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "1", "PYTHONUNBUFFERED": "1",
           # the ei2 of this checkout (not whichever the editable install points at)
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.Popen([sys.executable, "-m", "ei2.app", "--port", str(port), "--runs", str(runs)], cwd=runs,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if line.startswith("ei2 app: http://"):
            break
    else:
        proc.kill()
    assert lines and lines[-1].startswith(f"ei2 app: http://127.0.0.1:{port}"), "".join(lines[-20:])
    yield f"http://127.0.0.1:{port}", runs, proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(TIMEOUT)
        pg.goto(server[0])
        pg.wait_for_selector("#run")
        yield pg
        browser.close()


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").input_value()


def wait_text(page, elem_id: str, needle: str, timeout: float = TIMEOUT) -> str:
    page.wait_for_function("([id, needle]) => (document.querySelector('#' + id + ' textarea') || {value: ''})"
                           ".value.includes(needle)", arg=[elem_id, needle], timeout=timeout)
    return text_of(page, elem_id)


def upload(page, path: Path) -> None:
    """Replace the clip of the Tune tab (the File component) by `path`."""
    clear = page.locator("#clip button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator("#clip input[type=file]").set_input_files(str(path))


def test_tune_reedit_cancel_and_bad_upload_in_a_browser(server, page, tmp_path):
    try:
        scenario(server, page, tmp_path)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        print(f"the page at the failure: {tmp_path / 'failure.png'}")
        raise


def scenario(server, page, tmp_path):
    url, runs, proc = server
    t0 = time.monotonic()
    upload(page, DEMO_CLIP)
    assert wait_text(page, "status", "clip ok").startswith("clip ok: ")
    for elem_id, value in (("steps", "4"), ("ddim-steps", "6")):
        page.locator(f"#{elem_id} input").fill(value)
    page.click("#run")

    # the edit as a playable video, then the exact metrics: those of the run's edits.json, in the CLI's run folder
    page.wait_for_selector("#edit-video video[src]")
    metrics = wait_text(page, "metrics", "edited attribute match")
    status = wait_text(page, "status", "done: ")
    run = runs / "app-demo"
    assert "tuning: step 4/4, loss " in status and "DDIM inversion" in status, status
    cfg = load_config(run / "config.yaml")
    assert (cfg.steps, cfg.inference_steps, cfg.inversion_steps, cfg.edit_prompts) == (4, 6, 6, [EDIT])
    assert int(read_tuned_metadata(run / "tuned.safetensors")["steps"]) == 4
    edits = json.loads((run / "edits.json").read_text())
    assert metrics == metrics_line(EDIT, edits[0]["mini_metrics"])
    assert "00-a-red-square" in page.locator("#edit-video video").get_attribute("src")
    page.wait_for_selector("#comparison-video video[src]")
    page.wait_for_selector("#grid img[src]")
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("EI2_APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["EI2_APP_SCREENSHOT"])

    print(f"run done after {time.monotonic() - t0:.0f} s")

    # re-edit the run with a second prompt: a second video, listed in edits.json and in the gallery
    page.get_by_role("tab", name="Re-edit").click()
    page.locator("#reedit-prompt textarea").fill("a panda on the moon")
    page.wait_for_function("document.querySelector('#reedit-vocab').innerText.includes(\"'panda', 'the', 'moon'\")")
    assert "the words it knows: and, on, background, red" in page.locator("#reedit-vocab").inner_text()
    page.locator("#reedit-prompt textarea").fill(REEDIT)
    page.locator("#reedit-guidance input").fill("5")
    page.locator("#run-list input").click()
    page.get_by_role("option", name=str(run)).click()
    page.click("#render")
    page.wait_for_selector("#reedit-video video[src*='01-a-green-triangle']")
    assert "done: " in wait_text(page, "reedit-status", "done: ")
    edits = json.loads((run / "edits.json").read_text())
    assert [(e["prompt"], e["guidance"]) for e in edits] == [(EDIT, DEMO.guidance), (REEDIT, 5)]
    page.wait_for_function("([a, b]) => [...document.querySelectorAll('#gallery img')].map(i => i.alt).join('|') "
                           "=== a + '|' + b", arg=[EDIT, REEDIT])

    print(f"re-edit done after {time.monotonic() - t0:.0f} s")

    # cancel: tuning stops after the step in progress with a resumable checkpoint
    page.get_by_role("tab", name="Tune").click()
    page.locator("#steps input").fill("500")
    page.locator("#run-name textarea").fill("cancelled")
    page.click("#run")
    wait_text(page, "status", "/500")  # this run's tuning has started
    page.click("#cancel")
    status = wait_text(page, "status", "cancelled: ")
    last = status.splitlines()[-1]
    assert last.startswith("cancelled: stopped at step ") and "--resume" in last, status
    step = int(read_tuned_metadata(runs / "cancelled" / "checkpoints" / "last.safetensors")["step"])
    assert 1 <= step < 500 and f"step {step} of 500" in last
    # ... and the page resumes it (here to the step it reached: inversion and the edit follow)
    page.locator("#steps input").fill(str(step))
    page.get_by_label("resume the interrupted run of this name").check()
    page.click("#run")
    status = wait_text(page, "status", "done: ")
    assert status.splitlines()[-1] == f"done: {runs / 'cancelled'}", status
    log = json.loads((runs / "cancelled" / "log.json").read_text())
    assert len(log["loss"]) == step and load_config(runs / "cancelled" / "config.yaml").steps == step

    print(f"cancel done after {time.monotonic() - t0:.0f} s")

    # a bad upload: the one-line error, and the server still serves the next upload
    bad = tmp_path / "broken.gif"
    bad.write_bytes(b"GIF89a not really")
    upload(page, bad)
    error = wait_text(page, "status", "error: ", timeout=60_000)  # no job: seconds
    assert error.startswith("error: could not read video broken.gif") and "\n" not in error, error
    upload(page, DEMO_CLIP)
    assert wait_text(page, "status", "clip ok").startswith("clip ok: ")
    assert proc.poll() is None
