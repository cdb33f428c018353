"""Property tests of the sync's two pure decisions: version order and the outbound plan."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from handlers.decisions import FIELD_GROUPS, Version, is_newer, plan_update

BASE = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
times = st.integers(min_value=0, max_value=10_000).map(lambda ms: BASE + timedelta(milliseconds=ms))
keys = st.sampled_from(["ck-a", "ck-b", "ck-c", "ck-d"])
versions = st.builds(Version, times, keys)


@given(versions, versions)
def test_of_two_different_versions_with_different_times_exactly_one_is_newer(
    a: Version, b: Version
) -> None:
    """Different timestamps: exactly one way round is newer, the later one."""
    if a.last_modified != b.last_modified:
        assert is_newer(a, b) != is_newer(b, a)
        assert is_newer(a, b) == (b.last_modified > a.last_modified)


@given(versions)
def test_the_same_version_is_never_newer_and_anything_beats_nothing(v: Version) -> None:
    """Refetching the stored version writes nothing; an unstored event is always new."""
    assert not is_newer(v, v)
    assert is_newer(None, v)


@given(times, keys, keys)
def test_on_an_equal_timestamp_a_different_change_key_wins(t: datetime, a: str, b: str) -> None:
    """Equal lastModifiedDateTime: the later fetch wins exactly when its changeKey differs."""
    assert is_newer(Version(t, a), Version(t, b)) == (a != b)


class StoreMachine(RuleBasedStateMachine):
    """Fetches of an event arrive in any order (replays included); the store, applying
    ``is_newer``, always ends on the newest timestamp it has seen and never goes back."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: Version | None = None
        self.newest: datetime | None = None

    @rule(fetched=versions)
    def fetch(self, fetched: Version) -> None:
        before = self.stored
        if is_newer(self.stored, fetched):
            self.stored = fetched
        if self.newest is None or fetched.last_modified > self.newest:
            self.newest = fetched.last_modified
        if before is not None:
            assert self.stored is not None
            assert self.stored.last_modified >= before.last_modified

    @invariant()
    def holds_the_newest_time(self) -> None:
        if self.stored is not None:
            assert self.stored.last_modified == self.newest


TestStoreMachine = StoreMachine.TestCase


def _normalise(fields: Mapping[str, Any]) -> dict[str, Any]:
    return dict(fields)


FIELDS = sorted(n for names in FIELD_GROUPS.values() for n in names)
values = st.sampled_from(["x", "y", "z"])
states = st.fixed_dictionaries({}, optional=dict.fromkeys(FIELDS, values))


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    base = draw(st.fixed_dictionaries(dict.fromkeys(FIELDS, values)))
    outlook = {**base, **draw(states)}
    wanted = draw(states)
    changed_at = draw(st.none() | times)
    wanted_at = draw(times)
    return {
        "outlook": outlook,
        "last_written": base,
        "wanted": wanted,
        "outlook_changed_at": changed_at,
        "wanted_at": wanted_at,
    }


def _plan(s: Mapping[str, Any]) -> Any:
    return plan_update(**s, groups=FIELD_GROUPS, normalise=_normalise)


@given(scenarios())
def test_the_patch_holds_only_fields_that_differ_from_outlook(s: dict[str, Any]) -> None:
    """Every field in the PATCH is one 1Relation sent with a value Outlook does not show."""
    plan = _plan(s)
    for name, value in plan.patch.items():
        assert s["wanted"][name] == value
        assert s["outlook"].get(name) != value


@given(scenarios())
def test_without_an_outlook_change_every_differing_field_is_written(s: dict[str, Any]) -> None:
    """No change in Outlook since our last write: nothing loses, and after the PATCH
    Outlook shows exactly what 1Relation wanted."""
    s = {**s, "outlook_changed_at": None}
    plan = _plan(s)
    assert plan.lost_groups == ()
    after = {**s["outlook"], **plan.patch}
    assert all(after[n] == v for n, v in s["wanted"].items())


@given(scenarios())
def test_a_group_loses_only_to_a_newer_outlook_change_of_that_group(s: dict[str, Any]) -> None:
    """A lost group is one Outlook changed since our write, later than 1Relation's change;
    none of its fields are written, and every other group is applied in full."""
    plan = _plan(s)
    for group, names in FIELD_GROUPS.items():
        outlook_changed = any(
            s["outlook"].get(n) != s["last_written"].get(n) for n in names if n in s["wanted"]
        )
        if group in plan.lost_groups:
            assert s["outlook_changed_at"] is not None
            assert s["outlook_changed_at"] > s["wanted_at"]
            assert outlook_changed
            assert not set(plan.patch) & names
        else:
            for n in names & set(s["wanted"]):
                assert {**s["outlook"], **plan.patch}[n] == s["wanted"][n]


@given(scenarios())
def test_wanting_what_outlook_shows_plans_no_request(s: dict[str, Any]) -> None:
    """A revision equal to Outlook's state yields an empty PATCH and no conflict."""
    s = {**s, "wanted": {n: s["outlook"][n] for n in s["wanted"]}}
    plan = _plan(s)
    assert plan.patch == {}
    assert plan.lost_groups == ()
