"""The demo in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium; nothing downloaded) opens the page served on 127.0.0.1, uploads an image, types class
names, runs, and checks the overlay image, the legend's class names and a bad upload's message.
A screenshot is kept (its path is printed and recorded as the test's ``screenshot`` property)."""
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sed_fast.api
from sed_fast.serve.app import Segmenter, build_app, launch_kwargs

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1800"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing = " and ".join(n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None)
        reason = f"{missing} not installed (apt-get install chromium chromium-driver): the browser test cannot run"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = sed_fast.api.build_sed("b", impl="fast", device="cpu", clip_resolution=64)
    segmenter = Segmenter(model, random_weights=True)
    app = build_app(segmenter, examples_dir=tmp_path_factory.mktemp("examples"))
    _, url, _ = app.launch(prevent_thread_lock=True, **launch_kwargs("127.0.0.1", _free_port()))
    yield url
    app.close()


def _wait(driver, condition, timeout: float, what: str):
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = condition(driver)
            if found:
                return found
        except WebDriverException:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _upload(driver, elem_id: str, path: Path) -> None:
    from selenium.webdriver.common.by import By

    field = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]"), 60,
                  f"the file input of #{elem_id}")
    field.send_keys(str(path))
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} td.filename[aria-label='{path.name}'] ~ "
                                                         "td a.download-link"), 60, f"{path.name} to be uploaded")


def _type(driver, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)


def test_upload_type_classes_and_see_overlay_and_legend(browser, server, tmp_path, tmp_path_factory,
                                                       record_property):
    from selenium.webdriver.common.by import By

    image = tmp_path / "upload.png"
    rng = np.random.default_rng(1)
    pixels = np.zeros((96, 128, 3), np.uint8)
    pixels[:48] = (90, 150, 230)
    pixels[48:] = (70, 150, 60)
    pixels[30:80, 40:90] = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)

    browser.get(server)
    banner = _wait(browser, lambda d: d.find_element(By.ID, "sed-random-weights"), 60, "the page")
    assert "RANDOM WEIGHTS" in banner.text
    _upload(browser, "sed-image-file", image)
    _type(browser, "sed-classes", 'sky, "grass, lawn", tree')
    browser.find_element(By.ID, "sed-run").click()

    names = _wait(browser, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#sed-legend .sed-legend-name")],
                  240, "the legend")
    assert names and set(names) <= {"sky", "grass", "tree"}, names
    overlay = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#sed-overlay img"), 60, "the overlay image")
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                              overlay), 60, "the overlay image to load")
    width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay)
    assert width > 128 and height > 96, (width, height)  # the image, its legend panel and the banner
    table = browser.find_element(By.ID, "sed-table").text
    assert all(name in table for name in names), table
    assert "Time by stage" in browser.find_element(By.ID, "sed-timing").text

    screenshot = tmp_path_factory.getbasetemp() / "artifacts" / "serve_browser.png"
    screenshot.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(screenshot))
    record_property("screenshot", str(screenshot))
    print(f"screenshot of the demo page: {screenshot}")
    assert screenshot.stat().st_size > 10_000

    # A file that is not an image: a message on the page, no traceback.
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    browser.find_element(By.CSS_SELECTOR, "#sed-image-file button[aria-label='Clear']").click()
    _upload(browser, "sed-image-file", notes)
    browser.find_element(By.ID, "sed-run").click()
    message = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#sed-legend .sed-error").text, 120,
                    "the error message")
    assert "notes.png is not an image" in message and "Traceback" not in browser.page_source


def test_video_tab_segments_a_clip(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from video_clips import write_clip

    clip = write_clip(tmp_path / "clip.mp4", frames=4)
    browser.get(server)
    tab = _wait(browser, lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                    if b.text.strip() == "Video"], 60, "the Video tab")[0]
    tab.click()
    _upload(browser, "sed-clip-file", clip)
    _type(browser, "sed-clip-classes", "sky, grass")
    browser.find_element(By.ID, "sed-clip-run").click()
    video = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#sed-clip-video video"), 240, "the overlay video")
    assert video.get_attribute("src"), "the overlay video has no source"
    timing = _wait(browser, lambda d: d.find_element(By.ID, "sed-clip-timing").text, 60, "the clip's timing")
    assert "4 frames (96x64" in timing and "ms per frame" in timing, timing
