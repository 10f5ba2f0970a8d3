"""The dashboard's pages, run by ``st.navigation`` from their paths."""
