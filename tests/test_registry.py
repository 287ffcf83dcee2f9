"""Meta-tests: every registered family and pass is covered by the tests, derived from the registries."""

from moe_compile.cli import main
from moe_compile.models import FAMILIES
from moe_compile.passes import PASSES

from conftest import VARIANTS
from test_passes import LOWERING_OPS


def test_every_family_has_a_tiny_config_in_the_parity_matrix():
    for name, spec in FAMILIES.items():
        assert spec.tiny_config.get("model_type") == name
        assert name in VARIANTS


def test_every_pass_has_a_test():
    assert set(PASSES) == set(LOWERING_OPS)


def test_cli_lists_families(capsys):
    assert main(["families"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == set(FAMILIES)
