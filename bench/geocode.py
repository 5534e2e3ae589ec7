"""The offline geocoder behind `{place}` (issue 20): its load, and 10,000 positions named, against the
reverse_geocode package's own lookup (one nearest point in raw degrees) in the same run; and how often the
two name another town, on positions spread over the land (around the table's own towns) and far north.

    .venv/bin/python bench/geocode.py
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

from autocaption.places import Places


def main() -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    started = time.perf_counter()
    geocoder = Places().geocoder()
    loaded = time.perf_counter() - started
    import reverse_geocode

    started = time.perf_counter()
    reverse_geocode.get((0.0, 0.0))
    baseline_loaded = time.perf_counter() - started
    rng = np.random.default_rng(7)
    towns = geocoder.positions
    picks = rng.choice(len(towns), 10_000)
    land = [(towns[i, 0] + rng.normal(0, 0.05), towns[i, 1] + rng.normal(0, 0.05)) for i in picks]
    north = [p for p in land if p[0] > 55][:2000]
    ours, theirs = [], []
    for _ in range(5):
        started = time.perf_counter()
        named = geocoder.near(land)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        found = reverse_geocode.search(land)
        theirs.append(time.perf_counter() - started)
    differ = sum(a.city != b["city"] for a, b in zip(named, found, strict=True) if a.city)
    north_named = geocoder.near(north)
    north_found = reverse_geocode.search(north)
    north_differ = sum(a.city != b["city"] for a, b in zip(north_named, north_found, strict=True) if a.city)
    print(f"load: autocaption {loaded * 1000:.0f} ms, reverse_geocode {baseline_loaded * 1000:.0f} ms")
    print(
        f"10,000 positions near towns, median of 5: autocaption {statistics.median(ours) * 1000:.1f} ms, "
        f"reverse_geocode {statistics.median(theirs) * 1000:.1f} ms "
        f"({statistics.median(ours) / statistics.median(theirs):.2f}x)"
    )
    print(
        f"another town named than the package's nearest point: {differ} of {len(land)} "
        f"({differ / len(land):.1%}); north of 55 degrees: {north_differ} of {len(north)}"
    )


if __name__ == "__main__":
    main()
