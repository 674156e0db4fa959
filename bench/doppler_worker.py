"""Run D. Nidever's Doppler (PyPI ``thedoppler`` 1.1.32) on SDSS spectrum files, for comparison.

Executed by ``bench/bench_real_spectra.py`` with the interpreter of a separate venv (Doppler needs
numpy < 2 and pandas), so it imports only Doppler and its dependencies, never astra_provider.

Usage: ``python doppler_worker.py FILE [FILE ...]``. Doppler's barycentric correction would look the
observatory up on the network (``EarthLocation.of_site``): the correction is set from the header instead
(``BC`` for apVisit files; 0 for BOSS spec files, whose wavelengths are already heliocentric). One JSON line
per file goes to stdout: the file name, vrel, vrelerr, vhelio, the labels and the seconds the fit took.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time

from astropy.io import fits


def main(paths: list[str]) -> None:
    import doppler

    for path in paths:
        header = fits.getheader(path, 0)
        with contextlib.redirect_stdout(io.StringIO()):
            spectrum = doppler.read(path)
            spectrum.bc = float(header.get("BC", 0.0)) if "apVisit" in path else 0.0
            start = time.perf_counter()
            out, _, _ = doppler.rv.fit(spectrum)
            seconds = time.perf_counter() - start
        row = {name: float(out[name][0]) for name in ("vrel", "vrelerr", "vhelio", "teff", "logg", "feh")}
        print(json.dumps({"file": path.rsplit("/", 1)[-1], "seconds": seconds, **row}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
