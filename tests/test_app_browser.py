"""The app end to end in a browser: `streamlit run` on localhost, Debian's Chromium via Selenium."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the app's extra: pip install -e .[app]")
from ldm.app.browser import AppDriver, browser_missing, chrome, serve  # noqa: E402


@pytest.fixture
def app(tmp_path: Path):
    """The served app in a headless browser; a screenshot is kept when the test fails."""
    problem = browser_missing()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test cannot run: {problem}")
        pytest.skip(problem)
    with serve(tmp_path / "streamlit.log") as url:
        driver = chrome()
        try:
            yield AppDriver(driver, url)
        except BaseException:
            raise
        finally:
            driver.quit()


def test_slider_and_a_short_generation_in_the_browser(app: AppDriver, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    try:
        assert any(h.text == "Forward process" for h in app.css("h1"))
        before = app.slider_value("t")
        after = app.press_slider("t", "\ue014", 5)  # ARROW_RIGHT
        assert int(after) == int(before) + 5
        assert len(app.css('[data-testid="stImage"] img')) >= 4
        app.page("Generation")
        app.type_number("Steps", 3)
        app.click_button("Generate")
        app.wait.until(lambda d: "final image" in app.captions())
        final = app.css('[data-testid="stImage"] img')
        assert final and all(img.get_attribute("src") for img in final)
        assert not app.css('[data-testid="stException"]')
    except BaseException:
        shot = Path(os.environ.get("LDM_TEST_ARTIFACTS", tmp_path)) / f"{request.node.name}.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        app.driver.save_screenshot(str(shot))
        print(f"screenshot of the failure: {shot}")
        raise
