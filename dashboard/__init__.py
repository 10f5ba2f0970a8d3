"""The Streamlit dashboard (``stadsbeeld dashboard``); pages in ``views/``."""
