"""MongoDB repositories, one per concern; :class:`processor.store.Store` builds them together."""
