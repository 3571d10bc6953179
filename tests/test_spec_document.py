"""spec/p2pfed.md is exactly the assembly of the section files, and covers all of them."""

from __future__ import annotations

from p2pfed.spec_document import PARTS, SPEC, render


def test_single_document_is_up_to_date() -> None:
    assert (SPEC / "p2pfed.md").read_text(encoding="utf-8") == render(), (
        "spec/p2pfed.md is stale: run python -m p2pfed.spec_document"
    )


def test_every_section_file_is_a_part() -> None:
    sections = {p.name for p in SPEC.glob("*.md")} - {"p2pfed.md"}
    assert sections == {name for name, _ in PARTS}


def test_document_uses_normative_keywords_and_has_the_schema() -> None:
    text = render()
    for word in ("MUST", "MUST NOT", "SHOULD", "MAY"):
        assert f" {word} " in text
    assert "```cddl" in text and "group-start" in text
