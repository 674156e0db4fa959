"""Template grids from public spectral models, converted once into this project's Cannon-model format.

* :mod:`~astra_provider.templates.restricted_pickle`: read a pickled grid without running its code.
* :mod:`~astra_provider.templates.annieslasso`: AnniesLasso (``thecannon``) model → :class:`CannonModel`.
* :mod:`~astra_provider.templates.importer`: ``astra templates import PATH``; provenance in the metadata.
* :mod:`~astra_provider.templates.sources`: pinned packages (Doppler's grids, real SDSS files) and the cache.
* :mod:`~astra_provider.templates.install`: ``astra templates install``; apStar and BOSS instrument models.
* :mod:`~astra_provider.templates.cli`: the ``astra templates`` command.
"""
