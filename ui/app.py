"""Pathway Explorer's Streamlit entry point: ``pathx ui`` serves it."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ui.serve import PAGES

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="Pathway Explorer", layout="wide")
# every page has its own URL, the root included (it opens the overview)
pages = [st.Page(str(HERE / "views" / p.file), title=p.title, url_path=p.path) for p in PAGES]


def _home() -> None:
    st.switch_page(pages[0])


st.navigation([st.Page(_home, title="Pathway Explorer", default=True, visibility="hidden"), *pages]).run()
