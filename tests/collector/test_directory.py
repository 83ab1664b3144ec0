"""collector.directory: departments and watchlists from CSV and LDIF exports."""

from __future__ import annotations

import base64

import pytest

from collector.directory import load_directory
from collector.errors import ConfigError


def test_csv_with_watchlists(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text("User,Department,Watchlists\nalice,finance,departing;priority\nbob,legal,\n")
    d = load_directory(path)
    assert d.departments == {"alice": "finance", "bob": "legal"}
    assert d.watchlists == {"alice": frozenset({"departing", "priority"})}


def test_csv_without_the_needed_columns_is_refused(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text("name,team\nalice,finance\n")
    with pytest.raises(ConfigError, match="user and department"):
        load_directory(path)


def test_ldif_folded_lines_base64_and_non_people(tmp_path):
    dept = base64.b64encode("Recherche & Développement".encode()).decode()
    path = tmp_path / "export.ldif"
    path.write_text(
        "version: 1\n\n"
        "dn: ou=people,dc=example,dc=org\nobjectClass: organizationalUnit\nou: people\n\n"
        "dn: uid=alice,ou=people,dc=example,dc=org\nuid: alice\ndepartment: Fin\n ance\n"
        "exfilwatchWatchlist: departing\n\n"
        f"# a comment\ndn: uid=bob,ou=people,dc=example,dc=org\nsAMAccountName: bob\n"
        f"department:: {dept}\n",
        encoding="utf-8",
    )
    d = load_directory(path)
    assert d.departments == {"alice": "Finance", "bob": "Recherche & Développement"}
    assert d.watchlists == {"alice": frozenset({"departing"})}


def test_ldif_garbage_names_the_line(tmp_path):
    path = tmp_path / "bad.ldif"
    path.write_text("dn: uid=a\nuid a\n")
    with pytest.raises(ConfigError, match=r"bad.ldif:2"):
        load_directory(path)
