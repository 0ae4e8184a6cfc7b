"""Retrieval over a built datastore: sharded index servers, the top-k router and its client.

    from retriever import Retriever
    r = Retriever.connect("s3://bucket/wiki")            # servers started by `knnlm serve`
    dist, ids, values = r.search(queries, k=1024, nprobe=32)

The names below load their module when first used, so that importing a light module of this
package (retriever.config, which the command line's parser reads) does not load numpy, faiss or Ray.
"""
from __future__ import annotations

import importlib

EXPORTS = {"merge_topk": "retriever.merge",
           "Retriever": "retriever.router", "RetrieverError": "retriever.router", "SearchResult": "retriever.router",
           "LocalRetriever": "retriever.local",
           "find_servers": "retriever.router", "server_status": "retriever.router", "controller_status": "retriever.router",
           "start_servers": "retriever.router", "stop_servers": "retriever.router",
           "RequestError": "retriever.server", "ServerError": "retriever.server", "ShardServer": "retriever.server"}
__all__ = list(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'retriever' has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)
