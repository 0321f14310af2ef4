"""`cxr serve` in a real browser: headless Chromium driven by selenium over the real server.

Screens real CXRs with the tiny models, starts uvicorn on a free loopback port in a thread (the
app exactly as `cxr serve` builds it, Host check included), then filters the table, opens a case,
checks the full image, the lung mask overlay, the lung box and the similar cases, follows a
similar case and checks what it shows. Screenshots go to $CXR_ARTIFACTS (else tmp_path).

Needs the Debian packages chromium and chromium-driver (.ci/install-browser); skips without them.
"""

from __future__ import annotations

import os
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import copy_images, dev_images, screen_at_median

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs chromium and chromedriver on PATH "
    "(Debian: apt-get install chromium chromium-driver; CI runs .ci/install-browser)",
)
WAIT_S = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def screened(tmp_path_factory, tiny_models_dir) -> Path:
    root = tmp_path_factory.mktemp("serve-browser")
    real = dev_images(15)
    src = copy_images(root / "in", real[:14])
    with tarfile.open(src / "archive.tar", "w") as tar:
        tar.add(real[14], arcname=f"scans/{real[14].name}")
    (src / "broken.png").write_text("not an image\n")

    # the untrained models' probabilities bunch up: a threshold at their median makes both
    # decisions occur, so the decision filter has something to show
    return screen_at_median(src, root, tiny_models_dir, shard_size=8)


@pytest.fixture(scope="module")
def server(screened) -> Iterator[str]:
    import uvicorn

    from engine.serve.cli import build_app

    port = free_port()
    app = build_app(
        screened, models=None, report=None, host="127.0.0.1", port=port, max_upload_mb=8
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True, name="cxr-serve-test")
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[object]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium-manager download anything
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1440,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def artifacts(tmp_path: Path) -> Path:
    d = Path(os.environ.get("CXR_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def wait_for(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        lambda d: condition(d), message=message
    )


def api(driver, path: str):
    """GET a JSON endpoint from inside the page (same origin, same Host check)."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.json()).then(done, e => done({error: String(e)}));",
        path,
    )


def table_keys(driver) -> list[str]:
    # read in one script: the rows are replaced while the page updates
    return driver.execute_script(
        "return [...document.querySelectorAll('#rows tr')].map(r => r.dataset.key)"
    )


def test_review_flow_in_chromium(browser, server, screened, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(f"{server}/#/images")
    everything = api(d, "/api/images?limit=500")
    wait_for(d, lambda d: len(table_keys(d)) == everything["total"], "table did not fill")
    assert "UNTRAINED" in d.find_element(By.ID, "untrained").text

    # filter: positives only, then sort by probability ascending (second click on the header)
    Select(d.find_element(By.ID, "f-decision")).select_by_value("positive")
    positives = api(d, "/api/images?decision=positive&sort=prob&desc=true&limit=500")
    assert 0 < positives["total"] < everything["total"]
    want = [r["key"] for r in positives["rows"]]
    wait_for(d, lambda d: table_keys(d) == want, "decision filter not applied")
    tags = d.find_elements(By.CSS_SELECTOR, "#rows .tag")
    assert {t.text for t in tags} == {"positive"}
    d.find_element(By.CSS_SELECTOR, "#table th[data-sort=prob]").click()
    ascending = api(d, "/api/images?decision=positive&sort=prob&desc=false&limit=500")
    want = [r["key"] for r in ascending["rows"]]
    wait_for(d, lambda d: table_keys(d) == want, "sort by probability not applied")
    assert f"of {positives['total']} images" in d.find_element(By.ID, "page-info").text
    d.save_screenshot(str(artifacts(tmp_path) / "serve-table.png"))

    # free text: the one image inside the tar
    Select(d.find_element(By.ID, "f-decision")).select_by_value("")
    d.find_element(By.ID, "f-q").send_keys("scans/")
    wait_for(d, lambda d: len(table_keys(d)) == 1, "text search not applied")
    key = table_keys(d)[0]
    row = api(d, f"/api/case/{key}")
    assert row["member"].startswith("scans/")

    # open the case
    d.find_element(By.CSS_SELECTOR, "#rows tr td a.name").click()
    wait_for(d, lambda d: d.current_url.endswith(f"#/case/{key}"), "case did not open")
    check_case(d, row)
    similar = d.find_elements(By.CSS_SELECTOR, "#similar a.similar-case")
    ok = sum(r["status"] == "ok" for r in everything["rows"])
    assert len(similar) == min(8, ok - 1)
    assert key not in [a.get_attribute("data-key") for a in similar]
    for card in similar:  # every thumbnail decoded
        img = card.find_element(By.TAG_NAME, "img")
        assert d.execute_script("return arguments[0].naturalWidth", img) > 0
    shot = artifacts(tmp_path) / "serve-case.png"
    d.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    # the mask toggle hides the overlay
    d.find_element(By.ID, "show-mask").click()
    assert not d.find_element(By.ID, "case-mask").is_displayed()
    d.find_element(By.ID, "show-mask").click()
    assert d.find_element(By.ID, "case-mask").is_displayed()

    # follow the most similar case
    first = similar[0]
    next_key = first.get_attribute("data-key")
    first.click()
    wait_for(d, lambda d: d.current_url.endswith(f"#/case/{next_key}"), "similar case not followed")
    next_row = api(d, f"/api/case/{next_key}")
    check_case(d, next_row)
    assert d.find_element(By.ID, "case-prob").text == f"p = {next_row['prob']:.3f}"
    shot2 = artifacts(tmp_path) / "serve-similar-case.png"
    d.save_screenshot(str(shot2))
    print(f"screenshot: {shot2}")

    # a new image through the upload form: a screened image finds itself first
    d.get(f"{server}/#/query")
    upload = screened.parent / "in" / dev_images(1)[0].name
    d.find_element(By.ID, "query-file").send_keys(str(upload))
    d.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#query-similar a"), "no query result")
    cards = d.find_elements(By.CSS_SELECTOR, "#query-similar a.similar-case")
    top = api(d, f"/api/case/{cards[0].get_attribute('data-key')}")
    assert top["source"] == str(upload)
    assert "sim 1.000" in cards[0].text

    # summary: counts and the histogram drawn from the server's bins
    d.get(f"{server}/#/summary")
    summary = api(d, "/api/summary")
    wait_for(
        d, lambda d: d.find_elements(By.CSS_SELECTOR, "#histogram-svg rect.bar"), "no histogram"
    )
    bars = d.find_elements(By.CSS_SELECTOR, "#histogram-svg rect.bar")
    assert [int(b.get_attribute("data-count")) for b in bars] == summary["histogram"]["counts"]
    ok_card = d.find_element(By.CSS_SELECTOR, "#counts [data-count=ok] b")
    assert ok_card.text == str(summary["counts"]["ok"])
    d.save_screenshot(str(artifacts(tmp_path) / "serve-summary.png"))


def check_case(d, row) -> None:
    """The case view shows this row: full image, mask over it, box at the recorded place."""
    from selenium.webdriver.common.by import By

    wait_for(d, lambda d: d.find_element(By.ID, "case-title").text == row["name"], "wrong case")
    image = d.find_element(By.ID, "case-image")
    wait_for(d, lambda d: image.get_attribute("data-loaded") == "full", "full image not loaded")
    natural = d.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image
    )
    assert natural == [row["width"], row["height"]]
    mask = d.find_element(By.ID, "case-mask")
    wait_for(d, lambda d: mask.is_displayed(), "lung mask overlay not shown")
    assert d.execute_script("return arguments[0].naturalWidth", mask) > 0
    img_rect = image.rect
    mask_rect = mask.rect
    for k in ("x", "y", "width", "height"):  # stretched over the whole image
        assert abs(img_rect[k] - mask_rect[k]) <= 1, k
    box = d.find_element(By.ID, "case-box")
    assert box.is_displayed()
    x0, y0, x1, y1 = row["lung_bbox"]
    scale = img_rect["width"] / row["width"]
    assert abs(box.rect["x"] - (img_rect["x"] + x0 * scale)) <= 2
    assert abs(box.rect["width"] - (x1 - x0) * scale) <= 3
    assert abs(box.rect["height"] - (y1 - y0) * img_rect["height"] / row["height"]) <= 3
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#similar a.similar-case"), "no similar")
