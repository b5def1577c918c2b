"""Small shared helpers (rest_dense.utils)."""
import warnings

import pytest

from rest_dense.utils import env_var


def test_env_var_one_prefix_and_the_deprecated_spelling(monkeypatch):
    monkeypatch.delenv("REST_DENSE_TOY_ROOT", raising=False)
    monkeypatch.delenv("RESTDENSE_TOY_ROOT", raising=False)
    assert env_var("TOY_ROOT") is None and env_var("TOY_ROOT", "data/toy") == "data/toy"
    monkeypatch.setenv("RESTDENSE_TOY_ROOT", "/old")
    with pytest.warns(DeprecationWarning, match="RESTDENSE_TOY_ROOT is deprecated; set "
                                                "REST_DENSE_TOY_ROOT"):
        assert env_var("TOY_ROOT", "data/toy") == "/old"
    monkeypatch.setenv("REST_DENSE_TOY_ROOT", "/new")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling wins, silently
        assert env_var("TOY_ROOT") == "/new" and env_var("REST_DENSE_TOY_ROOT") == "/new"

