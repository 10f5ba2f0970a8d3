"""Stadsbeeld dashboard: Amsterdam's 100 m Leefbaarometer grid, models and imagery coverage.

Started by ``stadsbeeld dashboard`` (``make demo``), or ``streamlit run dashboard/app.py`` with
the package installed. Reads a data root
(``STADSBEELD_DATA``, default the demo city). Pages only read files and the job database; they
never import torch, and training runs in a separate worker process.
"""

from __future__ import annotations

import streamlit as st

from dashboard import retrain
from dashboard.data import data_root, is_data_root, skipped_runs

PAGES = [
    st.Page("views/city_map.py", title="City map", icon=":material/map:", default=True),
    st.Page("views/predicted.py", title="Predicted vs true", icon=":material/scatter_plot:"),
    st.Page("views/sources.py", title="Sources compared", icon=":material/compare:"),
    st.Page("views/coverage.py", title="Coverage gaps", icon=":material/photo_library:"),
    st.Page("views/monitor.py", title="Monitor", icon=":material/trending_up:"),
    st.Page("views/neighbours.py", title="Embedding neighbours", icon=":material/hub:"),
    st.Page("views/runs.py", title="Runs", icon=":material/folder_open:"),
]

st.set_page_config(page_title="Stadsbeeld", page_icon=":material/location_city:", layout="wide")
page = st.navigation(PAGES)
with st.sidebar:
    st.caption(f"Data root: `{data_root()}`")
    if is_data_root(data_root()):
        for note in skipped_runs(str(data_root())):
            st.warning(note, icon=":material/warning:")
    retrain.panel(str(data_root()))
page.run()
