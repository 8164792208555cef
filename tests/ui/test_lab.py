"""A real browser drives JupyterLab through a chapter (`make test-ui`).

Starts JupyterLab on loopback, opens chapter 01 in Chromium (Debian's, driven
by Playwright), runs every cell, moves the "N ranks" slider and checks that
the picture of every rank's data changed. Saves a screenshot to ui-artifacts/.
Skips, saying why, where there is no Playwright or no Chromium.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "ui-artifacts"
NOTEBOOK = "notebooks/01_collectives.ipynb"
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make test-ui installs it)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium on this machine: `apt-get install chromium` (make test-ui does it on Debian)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    settings = tmp_path_factory.mktemp("lab-settings")
    # No "Jupyter news" toast over the notebook.
    news = settings / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    # Render every cell (no virtual scrolling), so the widget is on the page to click.
    tracker = settings / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    # Lab autosaves, and Jupytext would rewrite the paired .py: serve a copy.
    workdir = tmp_path_factory.mktemp("course")
    shutil.copytree(ROOT / "notebooks", workdir / "notebooks")
    docmanager = settings / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    port, token = free_port(), "course-ui-test"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workdir}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={settings}", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path_factory.mktemp("lab-log") / "lab.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "JupyterLab exited at start-up"
                assert time.monotonic() < deadline, "JupyterLab did not answer within 60 s"
                time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def wait_until(page, js, timeout=60.0, arg=None):
    """Poll a JavaScript predicate from Python (page.wait_for_function stalled here)."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(js, arg)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for: {js[:200]}"
        time.sleep(0.5)


def slider_picture(page):
    """The PNG currently shown under the widget controls (its data URL)."""
    return page.evaluate("""() => {
        const imgs = [...document.querySelectorAll('.jp-OutputArea-output img')];
        const out = imgs.filter(img => img.closest('.widget-output'));
        return out.length ? out[out.length - 1].src : null;
    }""")


def test_run_chapter_and_move_widget(lab):
    base, token = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=BROWSER_FLAGS,
            viewport={"width": 1400, "height": 1000})
        page = context.pages[0] if context.pages else context.new_page()
        try:
            page.goto(f"{base}/lab?token={token}", timeout=60_000)
            wait_until(page, "() => !!window.jupyterapp && !!window.jupyterapp.commands")
            # Open the chapter, wait for its kernel, run every cell (the command's
            # promise settles when the last cell has run).
            page.evaluate("""async (path) => {
                const app = window.jupyterapp;
                await app.restored;
                const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
                await panel.context.ready;
                await panel.sessionContext.ready;
                await app.commands.execute('notebook:run-all-cells');
            }""", NOTEBOOK)
            wait_until(page, """() => {
                const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
            }""", timeout=240)
            tracebacks = page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
            assert tracebacks.count() == 0, tracebacks.first.inner_text()[:2000]

            slider = page.locator(".widget-slider", has_text="N ranks").first
            slider.scroll_into_view_if_needed()
            before = slider_picture(page)
            assert before, "the widget's picture is not on the page"
            label_before = slider.locator(".widget-readout").inner_text()
            slider.locator(".noUi-handle, .ui-slider-handle").first.focus()
            page.keyboard.press("ArrowLeft")
            wait_until(page, """(old) => {
                const imgs = [...document.querySelectorAll('.widget-output img')];
                return imgs.length > 0 && imgs[imgs.length - 1].src !== old;
            }""", arg=before)
            label_after = slider.locator(".widget-readout").inner_text()
            assert label_after != label_before, (label_before, label_after)
            assert slider_picture(page) != before
            page.screenshot(path=str(ARTIFACTS / "lab-01_collectives.png"), full_page=False)
        finally:
            context.close()
