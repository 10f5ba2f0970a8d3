"""Text queries against a UGE run's cell embeddings ("green street near water in Oost").

Imported only when a query is typed: it loads the run's VLM embedder (torch), which the map
pages never need.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from core.runs import load_run


@st.cache_resource(show_spinner="Loading the run's text encoder ...", max_entries=2)
def _embedder(run_path: str):
    from core.models.uge_run import restore

    embedder, _ = restore(load_run(run_path), stage=1)
    return embedder


def text_vector(run_path: str, query: str) -> np.ndarray:
    """The query's embedding in the run's space (the caption side of its training pairs)."""
    import torch

    from core.models.uge import TEXT_TASK

    with torch.no_grad():
        return _embedder(run_path).embed_texts([query], TEXT_TASK)[0].float().cpu().numpy()
