"""The bottom layer: the datastore and what it stands on (storage, the Ray helpers, corpus, keys,
key shards, manifest, index training and add). Imports nothing from retriever/ or cluster/."""
