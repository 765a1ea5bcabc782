"""The gallery store and its upgrade: the step of FCT that runs in production, without images.

* :mod:`~fct_jax.gallery.store`: versioned, checksummed, resumable TensorStore/zarr store of ids, embeddings and
  side-information with a JSON manifest.
* :mod:`~fct_jax.gallery.build`: embed a data set with φ_old and ψ into a store (old time).
* :mod:`~fct_jax.gallery.upgrade`: stream a store through h (and g) into a new version, overlapped and sharded.
* :mod:`~fct_jax.gallery.backfill`: FastFill: re-embed items with φ_new a budget at a time, most uncertain first,
  into versions that share unchanged chunks.
* :mod:`~fct_jax.gallery.search`: top-k ids and distances of queries against a store.
* :mod:`~fct_jax.gallery.cost`: per-example MACs and storage of backfilling, BCT and FCT (the paper's Figure 3).

CLI: ``python -m fct_jax.gallery {build,upgrade,backfill,search,cost,precision,info} --help``.
"""
