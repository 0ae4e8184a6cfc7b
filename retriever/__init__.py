"""Retrieval over a built datastore: sharded index servers, the top-k router and the kNN-LM client (in progress)."""
