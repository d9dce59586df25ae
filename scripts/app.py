"""Diffusion at work, in the browser: `streamlit run scripts/app.py` (needs `pip install -e .[app]`)."""
from ldm.app.main import run

run()
