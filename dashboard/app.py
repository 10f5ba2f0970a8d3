"""Stadsbeeld dashboard: Amsterdam's 100 m Leefbaarometer grid, models and imagery coverage.

Started by ``make demo`` (``streamlit run dashboard/app.py``). Reads a data root
(``STADSBEELD_DATA``, default the demo city). Pages only read files and the job database; they
never import torch, and training runs in a separate worker process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # `streamlit run` puts only dashboard/ on the path

import streamlit as st  # noqa: E402

from dashboard import retrain  # noqa: E402
from dashboard.data import data_root  # noqa: E402

PAGES = [
    st.Page("views/city_map.py", title="City map", icon=":material/map:", default=True),
    st.Page("views/predicted.py", title="Predicted vs true", icon=":material/scatter_plot:"),
    st.Page("views/sources.py", title="GSV vs Flickr", icon=":material/compare:"),
    st.Page("views/coverage.py", title="Coverage gaps", icon=":material/photo_library:"),
    st.Page("views/neighbours.py", title="Embedding neighbours", icon=":material/hub:"),
    st.Page("views/runs.py", title="Runs", icon=":material/folder_open:"),
]

st.set_page_config(page_title="Stadsbeeld", page_icon=":material/location_city:", layout="wide")
page = st.navigation(PAGES)
with st.sidebar:
    st.caption(f"Data root: `{data_root()}`")
    retrain.panel(str(data_root()))
page.run()
