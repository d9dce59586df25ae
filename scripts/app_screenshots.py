"""Screenshots of every app page in docs/app_*.png, made in Debian's headless Chromium.

    python scripts/app_screenshots.py [--out docs] [--pages forward generation ...]

Serves `streamlit run scripts/app.py` on a free localhost port (embedded model), drives each
page as a user would (a 25-step generation and a guidance sweep, a prompt interpolation, 200
training steps, an img2img edit, a shape repainted in a painted mask) and saves the whole page.
Needs the app extra and selenium, /usr/bin/chromium and chromedriver.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from ldm.app.browser import AppDriver, browser_missing, chrome, serve  # noqa: E402


def forward(app: AppDriver) -> None:
    """t moved to 300, zero-terminal-SNR schedules shown too."""
    app.press_slider("t", "\ue014", 50)  # ARROW_RIGHT
    app.click_label("Also zero terminal SNR")


def generation(app: AppDriver) -> None:
    """A 25-step generation (seed 1) and a guidance sweep."""
    app.type_number("Steps", 25)
    app.type_number("Seed", 1)
    app.click_button("Generate")
    app.wait.until(lambda d: "final image" in app.captions())
    app.click_button("Run sweep")
    app.wait.until(lambda d: any(c.startswith("guidance") for c in app.captions()))


def latent(app: AppDriver) -> None:
    """A prompt interpolation."""
    app.click_label("Prompts (seed A)")
    app.click_button("Interpolate")
    app.wait.until(lambda d: any(c.startswith("w = ") for c in app.captions()))


def train(app: AppDriver) -> None:
    """200 steps of the 2-D toy."""
    app.type_number("Steps", 200)
    app.click_button("Start / continue")
    app.wait.until(lambda d: "200 / 200 steps" in d.page_source)
    app.settle()


def editing(app: AppDriver) -> None:
    """An img2img edit at strength 0.6."""
    app.click_button("Run")
    app.wait.until(lambda d: any(c.startswith("img2img") for c in app.captions()))


def inpaint(app: AppDriver) -> None:
    """The square painted over (a wide brush, three strokes) and repainted from noise as a
    circle."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    app.click_label("inpaint")
    app.click_label("Draw")
    app.press_slider("Brush", "\ue014", 36)  # ARROW_RIGHT: 24 -> 60 pixels
    app.wait.until(lambda d: app.css("iframe"))
    app.driver.switch_to.frame(app.css("iframe")[0])
    canvas = app.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "canvas"))[-1]
    for dy in (-60, -10, 40):  # offsets from the canvas centre, in screen pixels
        ActionChains(app.driver).move_to_element_with_offset(canvas, -45, dy).click_and_hold() \
            .move_by_offset(50, 0).move_by_offset(50, 0).release().perform()
    app.driver.switch_to.default_content()
    app.settle()
    app.type_text("Prompt", "a red circle on a blue background")
    app.press_slider("Strength", "\ue014", 8)  # 0.6 -> 1.0: from noise inside the mask
    app.click_button("Run")
    app.wait.until(lambda d: any(c.startswith("inpaint") for c in app.captions()))


PAGES = {"forward": ("Forward process", forward), "generation": ("Generation", generation),
         "latent": ("Latent space", latent), "score": ("Score view", None),
         "train": ("Train a tiny denoiser", train), "editing": ("Editing", editing),
         "inpaint": ("Editing", inpaint)}


def main(argv: list[str] | None = None) -> int:
    """Write one PNG per page; 1 with a message when the browser is missing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for app_*.png")
    parser.add_argument("--pages", nargs="+", choices=list(PAGES), default=list(PAGES),
                        help="only these pages")
    args = parser.parse_args(argv)
    problem = browser_missing()
    if problem:
        print(f"app_screenshots: {problem}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp) / "streamlit.log") as url:
        driver = chrome()
        try:
            app = AppDriver(driver, url)
            for slug in args.pages:
                title, action = PAGES[slug]
                driver.set_window_size(1400, 1000)
                app.page(title)
                if action is not None:
                    action(app)
                app.screenshot(args.out / f"app_{slug}.png")
                print(f"wrote {args.out / f'app_{slug}.png'}")
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
