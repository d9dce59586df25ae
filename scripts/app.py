"""Diffusion at work in the browser: `streamlit run scripts/app.py` (`pip install -e .[app]`)."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # run from a checkout without install; Streamlit reruns this file
    sys.path.insert(0, ROOT)

from ldm.app.main import run  # noqa: E402

run()
