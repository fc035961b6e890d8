"""Pathway Explorer's Streamlit entry point: ``pathx ui`` serves it."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="Pathway Explorer", layout="wide")
pages = [
    st.Page(str(HERE / "views" / "overview.py"), title="Overview", default=True, url_path="overview"),
    st.Page(str(HERE / "views" / "image.py"), title="Image", url_path="image"),
    st.Page(str(HERE / "views" / "compare.py"), title="Compare classes", url_path="compare"),
    st.Page(str(HERE / "views" / "adversarial.py"), title="Adversarial", url_path="adversarial"),
    st.Page(str(HERE / "views" / "variants.py"), title="Variants", url_path="variants"),
    st.Page(str(HERE / "views" / "cypher.py"), title="Cypher", url_path="cypher"),
]
st.navigation(pages).run()
