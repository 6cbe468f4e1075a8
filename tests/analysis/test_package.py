import dgpo.analysis


def test_analysis_exports_resolve_lazily():
    assert sorted(dgpo.analysis.__all__) == sorted(dgpo.analysis._EXPORTS)
    for name in dgpo.analysis.__all__:
        assert getattr(dgpo.analysis, name) is not None
    assert set(dgpo.analysis.__all__) <= set(dir(dgpo.analysis))
