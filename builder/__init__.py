"""Datastore builder: corpus → tokens → keys → shards + manifest (see builder/build.py)."""
