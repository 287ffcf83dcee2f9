"""Meta-tests: every registered family and pass is covered by the tests, derived from the registries."""

from moe_compile.cli import main
from moe_compile.models import FAMILIES
from moe_compile.passes import PASSES

from conftest import VARIANTS
from test_passes import LOWERING_OPS, OTHER_PASSES


def test_every_family_has_a_tiny_config_in_the_parity_matrix():
    for name, spec in FAMILIES.items():
        assert spec.tiny_config.get("model_type") == name
        assert name in VARIANTS


def test_every_pass_has_a_test():
    assert set(PASSES) == set(LOWERING_OPS) | set(OTHER_PASSES)


def test_cli_lists_families(capsys):
    assert main(["families"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == set(FAMILIES)


def test_docs_tables_are_the_registry(capsys):
    from pathlib import Path

    from moe_compile.models.spec import families_table

    root = Path(__file__).resolve().parent.parent
    table = families_table()
    for doc in ("README.md", "docs/FAMILIES.md"):
        assert table in (root / doc).read_text(), f"{doc}: regenerate with `moe-compile families --markdown`"
    assert main(["families", "--markdown"]) == 0
    assert capsys.readouterr().out == table
