"""The service's web page in a real browser: Debian's chromium driven headless by Selenium.

Uploads a photo through the page's file input, waits for the grid and checks that the thumbnails
shown are the API's top k for that photo, in order, with their distances; then clicks a result
and checks the grid shows the API's answer for that item. Uses a cub100 photo when `../shared`
is there, else one of the test collection's photos. `.ci/run` installs chromium and
chromium-driver; without them (or Selenium) the test skips, naming what is missing.
"""

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from conftest import SHARED  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from served_collection import make_collection, running  # noqa: E402

from fdh_jax.serving.service import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CUB_PHOTO = SHARED / "data" / "cub100" / "images" / "Blue_Jay" / "0003.jpg"


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def _shown(driver) -> list[tuple[str, int]]:  # noqa: ANN001
    hits = driver.find_elements(By.CSS_SELECTOR, "#results figure.hit")
    return [(h.get_attribute("data-id"), int(h.get_attribute("data-distance"))) for h in hits]


def _wait_for_results(driver) -> None:  # noqa: ANN001
    WebDriverWait(driver, 60).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "results"
    )


def test_the_page_shows_the_apis_top_k(browser, tmp_path):
    _, photos, collection = make_collection(tmp_path)
    photo = CUB_PHOTO if CUB_PHOTO.is_file() else photos[-1]
    with running(create_app(collection)) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-items")
        )
        assert f"{len(collection)} photos" in browser.find_element(By.ID, "stats").text
        k = int(browser.find_element(By.ID, "k").get_attribute("value"))
        browser.find_element(By.ID, "photo").send_keys(str(Path(photo).resolve()))
        _wait_for_results(browser)
        with open(photo, "rb") as f:
            api = httpx.post(f"{url}/api/search", files={"photo": (photo.name, f)},
                             data={"k": str(k)}, timeout=60).json()  # fmt: skip
        expected = [(hit["id"], hit["distance"]) for hit in api["results"]]
        assert _shown(browser) == expected and len(expected) == min(k, len(collection))
        images = browser.find_elements(By.CSS_SELECTOR, "#results figure.hit img")
        assert all(
            browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
            for i in images
        )  # every thumbnail loaded
        browser.save_screenshot(str(tmp_path / "page.png"))

        second = browser.find_elements(By.CSS_SELECTOR, "#results figure.hit")[1]
        clicked = second.get_attribute("data-id")
        browser.execute_script("document.body.dataset.state = 'clicked'")
        second.click()
        _wait_for_results(browser)
        similar = httpx.get(f"{url}/api/similar", params={"id": clicked, "k": k}).json()
        assert _shown(browser) == [(h["id"], h["distance"]) for h in similar["results"]]
