"""The Streamlit app that shows diffusion at work (`streamlit run scripts/app.py`): one module per page."""
