"""Pathway Explorer's Streamlit entry point: ``pathx ui`` serves it."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="Pathway Explorer", layout="wide")
# (file, title, URL path): every page has its own URL, the root included (it opens the overview).
PAGES = (("overview.py", "Overview", "overview"), ("image.py", "Image", "image"),
         ("compare.py", "Compare classes", "compare"), ("adversarial.py", "Adversarial", "adversarial"),
         ("variants.py", "Variants", "variants"), ("cypher.py", "Cypher", "cypher"))
pages = [st.Page(str(HERE / "views" / f), title=t, url_path=u) for f, t, u in PAGES]


def _home() -> None:
    st.switch_page(pages[0])


st.navigation([st.Page(_home, title="Pathway Explorer", default=True, visibility="hidden"), *pages]).run()
