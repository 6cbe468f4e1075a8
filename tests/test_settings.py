from dataclasses import dataclass

import pytest

from dgpo.settings import check_known_keys


@dataclass
class _Settings:
    r: int = 1
    alpha: float = 2.0


def test_check_known_keys_names_the_unknown_and_the_valid_keys():
    check_known_keys(_Settings, {"r": 3}, "lora")  # known keys pass
    with pytest.raises(ValueError) as error:
        check_known_keys(_Settings, {"rank": 3, "r": 1, "beta": 0}, "lora")
    assert str(error.value) == ("unknown lora settings ['beta', 'rank']; "
                                "valid settings: ['r', 'alpha']")
    with pytest.raises(ValueError, match=r"^unknown benchmark fields \['x'\]; valid fields: "):
        check_known_keys(_Settings, {"x": 1}, "benchmark", noun="fields")
