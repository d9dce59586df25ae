"""The Streamlit app showing diffusion at work (`streamlit run scripts/app.py`), a module a page."""
