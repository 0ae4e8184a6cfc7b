"""Retrieval over a built datastore: sharded index servers, the top-k router and its client.

    from retriever import Retriever
    r = Retriever.connect("s3://bucket/wiki")            # servers started by `knnlm serve`
    dist, ids, values = r.search(queries, k=1024, nprobe=32)
"""
from retriever.merge import merge_topk
from retriever.router import (
                              Retriever,
                              RetrieverError,
                              SearchResult,
                              find_servers,
                              server_status,
                              start_servers,
                              stop_servers,
)
from retriever.server import RequestError, ServerError, ShardServer

__all__ = ["Retriever", "RetrieverError", "SearchResult", "RequestError", "ServerError", "ShardServer", "merge_topk",
           "find_servers", "server_status", "start_servers", "stop_servers"]
