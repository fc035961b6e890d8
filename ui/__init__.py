"""Streamlit UI: one file per page under ``ui/views``; reads only through ``graphstore.api``."""
