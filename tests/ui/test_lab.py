"""A real browser drives JupyterLab through every lesson (`make test` where Chromium is installed, `make test-ui`).

Starts JupyterLab on loopback and, in Chromium (Debian's, driven by Playwright),
runs every lesson top to bottom; in each lesson with a slider it moves the first
one and checks that what the widget shows changed, with no traceback. Saves a
screenshot per lesson to ui-artifacts/.
Skips, saying why, where there is no Playwright or no Chromium.
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "ui-artifacts"
BROWSER_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (make test-ui installs it)"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "no Chromium on this machine: `apt-get install chromium` (make test-ui does it on Debian)",
        allow_module_level=True,
    )


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
    planted = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c) for c in ("x = 1", "assert x == 2, 'planted failure'", "x")]
    )
    planted.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(planted, workdir / "notebooks" / PLANTED)
    docmanager = settings / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    port, token = free_port(), "course-ui-test"
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={workdir}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={settings}",
        "--LabApp.expose_app_in_browser=True",
        "--ServerApp.port_retries=0",
    ]
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


def wait_until(page, js, timeout=60.0, arg=None, describe=None):
    """Poll a JavaScript predicate from Python (page.wait_for_function stalled here).

    On time-out the error says what it waited for and, when ``describe`` is given, what
    ``describe(page)`` found (e.g. the cell still running and the last lines it printed)."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(js, arg)
        if value:
            return value
        if time.monotonic() >= deadline:
            found = f"\n{describe(page)}" if describe else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for: {js[:200]}{found}")
        time.sleep(0.5)


def running_cell(page):
    """The first cell not yet run to its end ([*] or [ ]): its number, first lines and last output."""
    return page.evaluate("""() => {
        const cells = [...document.querySelectorAll('.jp-Notebook .jp-Cell')];
        const i = cells.findIndex(c => {
            const p = c.querySelector('.jp-CodeCell .jp-InputPrompt, .jp-InputPrompt');
            return c.classList.contains('jp-CodeCell') && p && !/\\[\\d+\\]/.test(p.textContent);
        });
        if (i < 0) return 'every code cell shows an execution count';
        const cell = cells[i];
        const prompt = cell.querySelector('.jp-InputPrompt').textContent.trim();
        const source = (cell.querySelector('.jp-InputArea-editor') || cell).innerText.split('\\n').slice(0, 6);
        const output = (cell.querySelector('.jp-OutputArea') || {innerText: ''}).innerText.split('\\n');
        return `cell ${i + 1} ${prompt} still waiting:\\n  ` + source.join('\\n  ') +
            '\\n  last output: ' + output.slice(-8).join('\\n  ');
    }""")


def widget_output(page, cell_index):
    """What the widgets of one cell show: the text and pictures of their output areas."""
    return page.evaluate(
        """(i) => {
        const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
        return [...cell.querySelectorAll('.widget-output')].map(o =>
            o.innerText + [...o.querySelectorAll('img')].map(img => img.src).join('|')).join('\\n');
    }""",
        cell_index,
    )


#: Every error output of the open notebooks, read from the notebook model: JupyterLab renders an
#: error with the mime type application/vnd.jupyter.stderr, like any text on stderr, so the
#: page alone cannot tell a raised cell from a warning.
ERRORS_JS = """() => {
    const found = [];
    for (const panel of window.jupyterapp.shell.widgets('main')) {
        const cells = panel.content && panel.content.model && panel.content.model.cells;
        for (let i = 0; cells && i < cells.length; i++) {
            const outputs = cells.get(i).outputs;
            for (let j = 0; outputs && j < outputs.length; j++) {
                if (outputs.get(j).type !== 'error') continue;  // polled twice a second: no copies
                const out = outputs.get(j).toJSON();
                found.push(`cell ${i}: ${out.ename}: ${out.evalue}\\n` + (out.traceback || []).join('\\n'));
            }
        }
    }
    return found.join('\\n\\n');
}"""


def tracebacks(page):
    return re.sub(r"\x1b\[[0-9;]*m", "", page.evaluate(ERRORS_JS))[:2000]


LESSONS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
PLANTED = "zz_a_cell_raises.ipynb"  # served beside the lessons, not one of them


@pytest.fixture(scope="module")
def browser(lab):
    with playwright_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=BROWSER_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        page = context.pages[0] if context.pages else context.new_page()
        base, token = lab
        page.goto(f"{base}/lab?token={token}", timeout=60_000)
        wait_until(page, "() => !!window.jupyterapp && !!window.jupyterapp.commands")
        try:
            yield page
        finally:
            context.close()


def test_a_cell_that_raises_is_reported_not_waited_out(browser):
    """A raised cell ends the wait at once with its error (JupyterLab draws an error like any
    text on stderr, so it is read from the notebook model, not the page)."""
    with pytest.raises(AssertionError, match=r"(?s)a cell raised:.*planted failure"):
        run_lesson(browser, PLANTED)


#: Half the lessons here, half in test_lab_second_half.py: the two modules run on the two
#: pytest workers, each with its own JupyterLab and browser (one module would run every
#: lesson on one worker, one after another).
FIRST_HALF = LESSONS[0::2]


@pytest.mark.parametrize("lesson", FIRST_HALF)
def test_lesson_runs_top_to_bottom_and_its_widget_answers(browser, lesson):
    """Run All in JupyterLab: every cell runs, none raises; the first slider of the lesson, moved
    one step, changes what its widget shows and raises nothing. A screenshot per lesson."""
    run_lesson(browser, lesson)


def run_lesson(page, lesson):
    """The body of the test above, for either half of the lessons."""
    ARTIFACTS.mkdir(exist_ok=True)
    # Open the lesson alone, wait for its kernel, run every cell (the command's promise
    # settles when the last cell has run).
    page.evaluate(
        """async (path) => {
        const app = window.jupyterapp;
        await app.restored;
        for (const widget of [...app.shell.widgets('main')]) {  // no "save changes?" dialog
            if (widget.context) widget.context.model.dirty = false;
            widget.dispose();
        }
        const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
        await panel.context.ready;
        await panel.sessionContext.ready;
        await app.commands.execute('notebook:run-all-cells');
    }""",
        f"notebooks/{lesson}",
    )
    wait_until(
        page,
        """() => {
        const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
        return !!("""
        + ERRORS_JS
        + """)() ||
            (prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent)));
    }""",
        timeout=420,
        describe=running_cell,
    )  # a cell that raises stops Run All: stop waiting there and show its error below
    assert not tracebacks(page), f"{lesson}: a cell raised:\n{tracebacks(page)}"

    cell = page.evaluate("""() => [...document.querySelectorAll('.jp-Notebook .jp-Cell')]
        .findIndex(c => [...c.querySelectorAll('.widget-slider')].some(s => s.offsetParent !== null))""")
    if cell >= 0:
        slider = page.locator(".jp-Notebook .jp-Cell").nth(cell).locator(".widget-slider:visible").first
        slider.scroll_into_view_if_needed()
        wait_until(
            page,
            "(i) => document.querySelectorAll('.jp-Notebook .jp-Cell')[i]"
            ".querySelector('.widget-output') !== null",
            arg=cell,
        )
        before = widget_output(page, cell)
        readout = slider.locator(".widget-readout").inner_text()
        handle = slider.locator(".noUi-handle, .ui-slider-handle").first
        handle.focus()
        page.keyboard.press("ArrowRight")
        if slider.locator(".widget-readout").inner_text() == readout:  # at its maximum: go the other way
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("ArrowLeft")
        assert slider.locator(".widget-readout").inner_text() != readout, f"{lesson}: the slider did not move"
        wait_until(
            page,
            "([i, old]) => { const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];"
            " const now = [...cell.querySelectorAll('.widget-output')].map(o => o.innerText +"
            " [...o.querySelectorAll('img')].map(img => img.src).join('|')).join('\\n');"
            " return now !== old; }",
            arg=[cell, before],
            timeout=90,
        )
        time.sleep(1.0)  # let the callback finish drawing
        after = widget_output(page, cell)
        assert after != before, f"{lesson}: moving the slider changed nothing"
        assert "Traceback" not in after and "Error" not in after.split("\n")[0], (
            f"{lesson}: the widget raised:\n{after[:2000]}"
        )
        assert not tracebacks(page), f"{lesson}: the widget raised:\n{tracebacks(page)}"
        slider.scroll_into_view_if_needed()  # the screenshot shows the widget
    page.screenshot(path=str(ARTIFACTS / f"lab-{lesson.removesuffix('.ipynb')}.png"), full_page=False)
