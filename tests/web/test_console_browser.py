"""The console in headless Chromium (Debian's package, driven by Playwright; no browser
download) against a real server on a free loopback port. Screenshots of each page go to
test-artifacts/console/ for a person to look at."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.db.models import Delivery, DeliveryState, Study
from dicomnode.web.server import WebServer
from tests.support.dicom_files import write_op
from tests.support.peers import require_tool, unavailable
from tests.web.conftest import ADMIN_PASSWORD, VIEWER_PASSWORD, Env, make_env

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@contextmanager
def chromium_context(profile: Path, **options: Any) -> Iterator[Any]:
    """Debian's headless Chromium through Playwright, with a fresh profile (nothing carried
    over between runs); `options` go to Playwright (e.g. `ignore_https_errors`)."""
    chromium = require_tool("chromium", "chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            **{"viewport": {"width": 1400, "height": 1000}, **options},
        )
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def browser_context(tmp_path: Path) -> Iterator[Any]:
    with chromium_context(tmp_path / "profile") as context:
        yield context


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Env, str]]:
    env = make_env(tmp_path / "node", web={"port": 0, "host": "127.0.0.1"})
    server = WebServer(env.state, env.settings.web)
    host, port = server.start()
    try:
        yield env, f"http://{host}:{port}"
    finally:
        server.stop()
        env.database.dispose()


def watch(page: Any) -> list[str]:
    """Console errors and uncaught exceptions of a page (a CSP violation shows up here)."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def log_in(page: Any, base: str, name: str, password: str) -> None:
    page.goto(f"{base}/login")
    page.fill("#username", name)
    page.fill("#password", password)
    page.click("#login")
    page.wait_for_url(f"{base}/presets")


def reason(page: Any, model: str) -> str:
    text: str = page.inner_text(f"#toggle-{model} .reason")
    return text


def graph_nodes(page: Any) -> list[str]:
    nodes: list[str] = page.eval_on_selector_all(
        "#graph g.node", "els => els.map(e => e.dataset.model).sort()")
    return nodes


def test_admin_edits_a_preset_in_the_console(
    served: tuple[Env, str], browser_context: Any, tmp_path: Path
) -> None:
    env, base = served
    page = browser_context.new_page()
    problems = watch(page)
    page.goto(f"{base}/presets")
    page.wait_for_url(f"{base}/login?next=/presets")
    shot(page, "01-login")
    log_in(page, base, "alice", ADMIN_PASSWORD)
    assert page.inner_text("section.audience >> nth=0").startswith("Ophthalmology")
    shot(page, "02-presets")

    # One click opens a preset: its graph is drawn, required and conflicting models marked.
    page.click("#preset-centres")
    page.wait_for_selector('#graph g.node[data-model="mask-centre"]')
    assert graph_nodes(page) == ["green-quality", "green-seg", "mask-centre"]
    assert reason(page, "green-seg") == "required by mask-centre"
    assert page.is_disabled('#toggle-green-seg-alt input')
    assert reason(page, "green-seg-alt") == "conflicts with green-seg"
    shot(page, "03-preset-centres")

    # Switch off green-seg: its dependant goes, the conflicting alternative becomes selectable.
    page.uncheck('#toggle-green-seg input')
    page.wait_for_selector('#toggle-mask-centre[data-state="unavailable"]')
    assert reason(page, "mask-centre") == "needs green-seg, which was switched off"
    assert graph_nodes(page) == ["green-quality"]
    assert page.is_enabled('#toggle-green-seg-alt input')
    shot(page, "04-green-seg-off")

    # Switch the alternative on: now green-seg is the one disabled, with the reason.
    page.check('#toggle-green-seg-alt input')
    page.wait_for_selector('#graph g.node[data-model="green-seg-alt"]')
    assert graph_nodes(page) == ["green-quality", "green-seg-alt"]
    assert page.is_disabled('#toggle-green-seg input')
    assert reason(page, "green-seg") == "conflicts with green-seg-alt"
    assert page.eval_on_selector_all("#graph path.edge", "els => els.length") == 1
    shot(page, "05-alternative-on")

    # Save: the YAML on disk changes, and the audit page shows the difference.
    page.click("#save")
    page.wait_for_selector("#message.ok")
    saved = yaml.safe_load((env.presets_dir / "centres.yaml").read_text("utf-8"))
    assert saved["models"] == ["green-quality", "green-seg-alt"]
    # A second save from the same page works (its If-Match follows the saved file) ...
    page.fill("#f-priority", "4")
    page.click("#save")
    page.wait_for_selector("#message.ok:has-text('revision 2')")
    assert yaml.safe_load((env.presets_dir / "centres.yaml").read_text("utf-8"))["priority"] == 4

    # Routing tester: a camera file from CAM2 goes to this preset; edited conditions do not.
    dicom = write_op(tmp_path / "upload" / "R.dcm")
    page.set_input_files("#t-files", str(dicom))
    page.fill("#t-calling", "CAM2")
    page.click("#t-run")
    page.wait_for_selector("#t-chosen")
    assert page.inner_text("#t-chosen").startswith("Chosen: centres")
    page.fill("#r-calling_ae", "CAM9")
    page.click("#t-run")
    page.wait_for_selector("#t-chosen:has-text('Not routed')")
    shot(page, "06-route-tester")

    # Save as a new preset for the new camera: a new file appears with the edited routing.
    page.fill("#new-id", "cam9-screening")
    page.fill("#f-name", "CAM9 screening")
    page.click("#save-new")
    page.wait_for_url(f"{base}/presets/cam9-screening")
    created = yaml.safe_load((env.presets_dir / "cam9-screening.yaml").read_text("utf-8"))
    assert created["routing"]["calling_ae"] == ["CAM9"]
    assert created["models"] == ["green-quality", "green-seg-alt"]

    page.goto(f"{base}/audit")
    assert "green-seg-alt" in page.inner_text("pre.diff >> nth=-1")
    shot(page, "07-audit")

    page.goto(f"{base}/models")
    assert page.is_visible("#model-green-seg-alt")
    shot(page, "08-models")

    with env.database.transaction() as session:
        session.add(Study(study_uid="1.2.826.0.1.3680043.8.498.1", state="done",
                          calling_ae="CAM2"))
        session.add(Delivery(path="sr.dcm", sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
                             sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                             study_uid="1.2.826.0.1.3680043.8.498.1", destination="pacs",
                             state=DeliveryState.FAILED, attempts=10,
                             last_error="association rejected"))
    page.goto(f"{base}/studies")
    shot(page, "09-studies")
    with page.expect_navigation():  # to the study page's load: its script binds the button
        page.click("text=1.2.826.0.1.3680043.8.498.1")
    page.click("button.retry")
    page.wait_for_selector("#message:has-text('queued')")
    shot(page, "10-study")
    assert problems == []


def test_viewer_sees_no_edit_controls_and_the_api_refuses(
    served: tuple[Env, str], browser_context: Any
) -> None:
    env, base = served
    before = (env.presets_dir / "centres.yaml").read_bytes()
    page = browser_context.new_page()
    log_in(page, base, "victor", VIEWER_PASSWORD)
    assert page.query_selector("#new-preset") is None
    page.goto(f"{base}/presets/centres")
    page.wait_for_selector('#graph g.node[data-model="mask-centre"]')
    for control in ("#save", "#save-new", "#delete", "#details", "#f-name"):
        assert page.query_selector(control) is None, control
    shot(page, "11-viewer-preset")
    # Even with the page's own CSRF token, the API refuses a viewer's change.
    status = page.evaluate(
        """async (body) => {
             const data = JSON.parse(document.getElementById('page-data').textContent);
             const r = await fetch('/api/presets/centres', {method: 'PUT',
               headers: {'Content-Type': 'application/json', 'X-CSRF-Token': data.csrf},
               body: JSON.stringify(body)});
             return r.status; }""",
        json.loads(json.dumps({**yaml.safe_load(before), "priority": 9})),
    )
    assert status == 403
    assert (env.presets_dir / "centres.yaml").read_bytes() == before


def _send(port: int, calling_ae: str, paths: list[Path]) -> None:
    from pydicom import dcmread
    from pynetdicom import AE

    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


def test_new_camera_preset_from_the_console_runs_the_next_study(
    tmp_path: Path, browser_context: Any
) -> None:
    """DESIGN's 'done when': a preset for a new camera made in the console alone, and the next
    study from that camera runs the selected structure (in a real node, no restart)."""
    import time

    from sqlalchemy import select

    from dicomnode.app import Node
    from dicomnode.db.models import Job, JobState, Result
    from dicomnode.graph import ResolvedGraph
    from dicomnode.settings import load_settings
    from tests.support.dicom_files import write_study
    from tests.support.peers import free_port

    env = make_env(tmp_path / "node", web={"port": free_port(), "host": "127.0.0.1"})
    env.database.dispose()
    config = yaml.safe_load((tmp_path / "node" / "dicomnode.yaml").read_text("utf-8"))
    config.update(
        node={"host": "127.0.0.1", "port": free_port(), "shutdown_grace_seconds": 1},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.3},
        completeness={"quiet_seconds": 1, "sweep_seconds": 1},
    )
    (tmp_path / "node" / "node.yaml").write_text(yaml.safe_dump(config), "utf-8")
    settings = load_settings(tmp_path / "node" / "node.yaml")
    node = Node(settings)
    node.start()
    try:
        assert node.web is not None and node.web.address is not None
        base = "http://{}:{}".format(*node.web.address)
        page = browser_context.new_page()
        problems = watch(page)
        log_in(page, base, "alice", ADMIN_PASSWORD)
        page.click("#new-preset")
        page.wait_for_selector("#toggle-mask-fraction input")
        assert graph_nodes(page) == []
        assert reason(page, "mask-fraction") == "can be added; brings green-quality, green-seg"
        page.check("#toggle-mask-fraction input")
        page.wait_for_selector('#graph g.node[data-model="mask-fraction"]')
        assert graph_nodes(page) == ["green-quality", "green-seg", "mask-fraction"]
        page.fill("#f-id", "cam9-clinic")
        page.fill("#f-name", "Camera 9 clinic")
        page.fill("#f-audience", "Eye clinic")
        page.fill("#f-description", "The new camera in room 9")
        page.fill("#r-calling_ae", "CAM9")
        page.fill("#f-priority", "20")
        shot(page, "12-new-camera-preset")
        page.click("#save-new")
        page.wait_for_url(f"{base}/presets/cam9-clinic")

        study_uid, paths = write_study(tmp_path / "study")
        assert settings.node.port is not None  # the plain listener is on
        _send(settings.node.port, "CAM9", paths)
        deadline = time.monotonic() + 90
        job = None
        while time.monotonic() < deadline:
            with node.database.transaction() as session:  # type: ignore[union-attr]
                job = session.scalars(select(Job).where(Job.preset == "cam9-clinic")).first()
            if job is not None and job.state in JobState.FINISHED:
                break
            time.sleep(0.3)
        assert job is not None, "no job for the new preset"
        graph = ResolvedGraph.from_dict(json.loads(job.graph_json))
        assert graph.stages == (("green-quality",), ("green-seg",), ("mask-fraction",))
        assert job.state in JobState.FINISHED, job.state

        # The study page: its images with the SEG overlays (toggleable) and the SR findings.
        deadline = time.monotonic() + 60
        kinds: set[str] = set()
        while time.monotonic() < deadline and not {"sr", "seg"} <= kinds:
            with node.database.transaction() as session:  # type: ignore[union-attr]
                kinds = set(session.scalars(
                    select(Result.kind).where(Result.study_uid == study_uid)))
            time.sleep(0.3)
        assert {"sr", "seg"} <= kinds, kinds
        page.goto(f"{base}/studies/{study_uid}")
        # The page's CSP forbids eval, so poll from here instead of wait_for_function.
        loaded = "() => [...document.querySelectorAll('.stack img')]" \
            ".every(i => i.complete && i.naturalWidth > 0)"
        deadline = time.monotonic() + 15
        while not page.evaluate(loaded) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert page.evaluate(loaded), "images or overlays did not load"
        assert page.eval_on_selector_all("figure.image", "els => els.length") == 2
        overlays = page.query_selector_all("img.overlay")
        assert len(overlays) == 2
        findings = page.inner_text("table.findings")
        assert "Mask area fraction" in findings, findings
        page.uncheck(".seg-toggle input >> nth=0")
        assert page.is_hidden("img.overlay >> nth=0")
        page.check(".seg-toggle input >> nth=0")
        shot(page, "13-study-results")
        assert problems == []
    finally:
        node.stop()
