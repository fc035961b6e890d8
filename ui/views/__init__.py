"""Pages (views) of the Streamlit app (run as scripts by ``st.navigation``)."""
