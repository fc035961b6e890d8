"""Neo4j graph store for pathway records: server lifecycle, loading, named queries, safe Cypher.

Never imports torch: records are read through the ``records`` package (numpy/pyarrow only).
"""
