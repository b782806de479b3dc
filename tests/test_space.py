"""The PS search space and its recipes: decoding, the default merge, refused parameters and
methods, round trips through YAML and JSON."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from evomerge.groups import Granularity
from evomerge.methods import UnknownMethodError
from evomerge.dims import SpaceError
from evomerge.exporter import load_recipe_dict
from evomerge.kinds import RecipeError, recipe_from_dict
from evomerge.kinds.ps.config import ParamRange
from tests.helpers import tiny_space


def test_space_decodes_params_and_defaults_to_the_methods_values(tiny_world):
    assert len(tiny_space(tiny_world).dims) == 2 * 5 + 5  # weights per model and group, plus global lambda
    space = tiny_space(tiny_world, parameters={"weight": ParamRange(0.0, 2.0)})
    assert len(space.dims) == 2 * 5  # two models x (embed, 3 layers, head)
    params = {d.key: 0.25 + 0.1 * i for i, d in enumerate(space.dims)}
    recipe = space.decode(params)
    assert recipe.per_model["weight"]["a"][0] == pytest.approx(0.25)
    assert space.to_unit(params) == pytest.approx([(v - 0) / 2 for v in params.values()])
    default = space.default_recipe()
    assert set(default.per_model["weight"]["b"]) == {space.method.param("weight").default}
    # ties with every parameter evolved: its default merge, stored as JSON (as a trial stores it) and
    # read back, is the same recipe, and holds the method's default for every parameter and group
    ties = tiny_space(tiny_world, method="ties")
    stored = json.loads(json.dumps(ties.default_recipe().to_dict()))
    assert recipe_from_dict(stored) == ties.default_recipe()
    assert set(stored["parameters"]) == {spec.name for spec in ties.method.params}
    for spec in ties.method.params:
        values = stored["parameters"][spec.name]
        flat = [v for by_model in values.values() for v in by_model] if spec.per_model else values
        assert len(flat) == (2 if spec.per_model else 1) * 5 and set(flat) == {spec.default}, spec.name


def test_space_rejects_bad_parameters(tiny_world):
    with pytest.raises(SpaceError, match="no parameter 'densty'"):
        tiny_space(tiny_world, parameters={"densty": ParamRange()})
    with pytest.raises(SpaceError, match="range"):
        tiny_space(tiny_world, parameters={"weight": ParamRange(low=-100.0, high=1.0)})
    with pytest.raises(SpaceError, match="both evolved and fixed"):
        tiny_space(tiny_world, method="ties", parameters={"weight": ParamRange()}, fixed={"weight": 1.0})


def test_unknown_method_is_rejected(tiny_world):
    with pytest.raises(UnknownMethodError, match="linear"):
        tiny_space(tiny_world, method="frankenmerge")


def test_recipe_yaml_round_trip(tiny_world, tmp_path):
    space = tiny_space(tiny_world, method="dare_ties", granularity=Granularity("groups", num_groups=2))
    recipe = space.decode({d.key: 0.3 for d in space.dims})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    again = recipe_from_dict(load_recipe_dict(tmp_path / "r.yaml"))
    assert again.to_dict() == recipe.to_dict()
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe_dict(tmp_path / "none.yaml")


def test_recipe_with_wrong_group_count_is_rejected(tiny_world):
    recipe = tiny_space(tiny_world).default_recipe()
    d = recipe.to_dict()
    d["parameters"]["weight"]["a"] = d["parameters"]["weight"]["a"][:2]
    with pytest.raises(RecipeError, match="one per group"):
        recipe_from_dict(d)


@pytest.mark.parametrize("field, value, named", [
    ("granularity", {"kind": "bogus"}, "Granularity is malformed (kind:"),
    ("sources", [{"name": "a", "path": "/a", "revision": 3}, {"name": "b", "path": "/b"}], "revision:"),
    ("num_layers", "many", "recipe is malformed"),
])
def test_a_malformed_recipe_field_is_a_recipe_error_naming_it(tiny_world, field, value, named):
    d = tiny_space(tiny_world).default_recipe().to_dict()
    d[field] = value
    with pytest.raises(RecipeError, match=re.escape(named)):
        recipe_from_dict(d)
