"""The offline geocoder behind `{place}`: nearest on the sphere, unknown far from any town."""

from __future__ import annotations

import pytest

from autocaption.places import Geocoder, Place, Places


@pytest.fixture(scope="module")
def geocoder() -> Geocoder:
    return Places().geocoder()


def test_known_positions_get_their_town_region_and_country(geocoder: Geocoder) -> None:
    # Positions read off a map, one per continent, with the town each lies in.
    found = geocoder.near([(60.3930, 5.3242), (48.8584, 2.2945), (-33.8568, 151.2153), (40.7580, -73.9855),
                           (35.6586, 139.7454), (-22.9519, -43.2105), (64.1466, -21.9426)])  # fmt: skip
    assert [(p.city, p.country) for p in found] == [
        ("Bergen", "Norway"), ("Paris", "France"), ("Sydney", "Australia"), ("New York City", "United States"),
        ("Tokyo", "Japan"), ("Rio de Janeiro", "Brazil"), ("Reykjavík", "Iceland"),
    ]  # fmt: skip
    assert found[0].region == "Vestland" and found[3].region == "New York"


def test_a_big_citys_ground_is_the_citys_not_the_nearest_suburbs(geocoder: Geocoder) -> None:
    # The Eiffel Tower is nearer GeoNames' point of Neuilly-sur-Seine than of Paris (Notre-Dame), Tokyo Tower
    # nearer Shibakōen's than Tokyo's; a person names the city.
    assert [place.city for place in geocoder.near([(48.8584, 2.2945), (35.6586, 139.7454)])] == ["Paris", "Tokyo"]


def test_nearest_is_measured_on_the_sphere(geocoder: Geocoder) -> None:
    # Far north a degree of longitude is short: 78.2 N between Longyearbyen (15.6 E) and Barentsburg (14.2 E),
    # a point at 78.30 N, 15.40 E is 13 km from Longyearbyen and 27 km from Barentsburg; in raw degrees the
    # two would be nearly equal, latitude counting as much as longitude.
    assert geocoder.near([(78.30, 15.40)])[0].city == "Longyearbyen"


def test_far_from_any_town_is_unknown(geocoder: Geocoder) -> None:
    atlantic, svalbard_coast = geocoder.near([(0.0, -30.0), (78.9, 18.0)])
    assert atlantic == Place() and atlantic.values() == dict.fromkeys(("place", "city", "region", "country"))
    assert svalbard_coast.city is None  # more than 50 km from any town: no city, still its region and country
    assert (svalbard_coast.region, svalbard_coast.country) == ("Svalbard", "Svalbard and Jan Mayen")


def test_a_persons_place_is_completed_only_where_it_agrees() -> None:
    gps = Place("Arezzo", "Tuscany", "Italy")
    assert Place().completed(gps) == gps
    assert Place(city="Arezzo").completed(gps) == gps
    assert Place(city="Cortona").completed(gps) == Place("Cortona", None, "Italy")  # another town: no region
    assert Place(region="Bavaria").completed(gps) == Place(None, "Bavaria", "Italy")  # another region: no town
    assert Place(country="France").completed(gps) == Place(country="France")
    assert Place(country="Italia").completed(gps) == Place(country="Italia")  # (names are not translated)
    assert Place(sublocation="Piazza Grande").completed(gps).named == "Piazza Grande, Arezzo, Tuscany, Italy"


def test_an_enclave_keeps_its_own_country_and_no_position_names_nothing(geocoder: Geocoder) -> None:
    vatican, nan, beyond = geocoder.near([(41.9029, 12.4534), (float("nan"), 12.0), (91.0, 0.0)])
    assert vatican.country == "Holy See (Vatican City State)"  # not Rome's, though Rome's ground covers it
    assert nan == beyond == Place()
