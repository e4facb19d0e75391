"""A JSON number is refused (422) exactly when PostgreSQL cannot store it: the service's check
(json_values) against PostgreSQL's own jsonb input, for numbers of every shape, the
exponents numeric's input and Python's Decimal cannot read included."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from simplejson import RawJSON

from workflows.entrypoints.json_values import check_data

digits = st.text("0123456789", min_size=1, max_size=25)
wholes = st.one_of(st.just("0"), digits.filter(lambda d: d[0] != "0"))
fractions = st.one_of(st.just(""), digits.map(lambda d: "." + d))
limits = [16383, 16384, 131071, 131072, 1073741822, 1073741823, 2**31, 2**63, 10**18, 10**19]
exponent_values = st.one_of(
    st.integers(-400, 400),
    st.sampled_from(limits).flatmap(lambda n: st.sampled_from([n - 25, n - 1, n, n + 1, n + 25])),
    st.integers(-(10**25), 10**25),
)
exponents = st.one_of(
    st.just(""),
    st.builds(
        lambda e, value, plus, zeros: (
            e + ("-" if value < 0 else "+" if plus else "") + "0" * zeros + str(abs(value))
        ),
        st.sampled_from("eE"),
        exponent_values,
        st.booleans(),
        st.sampled_from([0, 0, 0, 1, 20]),
    ),
)
numbers = st.builds(
    lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
    st.sampled_from(["", "-"]),
    wholes,
    fractions,
    exponents,
)


@pytest.fixture(scope="module")
def conn(postgres_server_url: str) -> Iterator[psycopg.Connection]:
    try:
        connection = psycopg.connect(postgres_server_url, autocommit=True)
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL is not reachable: {error}")
    with connection:
        yield connection


def stored_by_postgresql(conn: psycopg.Connection, number: str) -> bool:
    try:
        conn.execute("SELECT %s::jsonb", ('{"n":' + number + "}",))
    except psycopg.errors.NumericValueOutOfRange:
        return False
    return True


def refused_by_the_service(number: str) -> bool:
    problems: list[dict[str, str]] = []
    check_data({"n": RawJSON(number)}, problems)
    return bool(problems)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(number=numbers)
@example(number="0e1073741822")
@example(number="0e1073741823")
@example(number="-0.0E-1073741823")
@example(number="1e99999999999999999999")
@example(number="1e0000000000000000000005")
@example(number="9.9e131071")
@example(number="0e-16384")
def test_a_number_is_refused_exactly_when_postgresql_cannot_store_it(
    conn: psycopg.Connection, number: str
) -> None:
    assert refused_by_the_service(number) == (not stored_by_postgresql(conn, number)), number
