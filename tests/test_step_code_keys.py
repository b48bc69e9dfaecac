"""Stage III and IV key by the code that computes them (`pipelines.steps.code_digest`): a study
rerun after the analysis math changed recomputes its answer instead of reading back the one the
old math wrote (the Student-t replicate scale once changed the shares and kept the key)."""

from __future__ import annotations

import pytest

from components.storage import location
from pipelines.analysis import plan
from pipelines.config import PipelineConfig
from pipelines.steps import code_digest


def _module(folder, name: str, text: str) -> str:
    (folder / f"{name}.py").write_text(text)
    code_digest.cache_clear()
    return name


BODY = '"""What it computes."""\n\n\ndef share(x):\n    """Why."""\n    return x / 2  # halved\n'


def test_the_digest_follows_the_code_not_its_comments_or_docstrings(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    first = code_digest(_module(tmp_path, "mathmod", BODY))
    words = BODY.replace("What it computes.", "Another docstring.").replace("# halved", "# a half")
    assert code_digest(_module(tmp_path, "mathmod", words)) == first
    assert code_digest(_module(tmp_path, "mathmod", BODY.replace("x / 2", "x / 3"))) != first
    with pytest.raises(ValueError, match="no_such_module"):
        code_digest("no_such_module")


def test_new_analysis_code_is_a_new_affinity_and_taxonomy_step(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "losses").mkdir()
    cfg = PipelineConfig(storage_root=str(tmp_path / "root"))
    losses = location(tmp_path / "losses")

    def keys(text: str) -> tuple[str, str]:
        _module(tmp_path, "mathmod", text)
        affinity = plan.affinity_step(cfg, "k", losses).key
        return affinity, plan.taxonomy_step(cfg, affinity).key

    monkeypatch.setattr(plan, "AFFINITY_CODE", ("mathmod",))
    monkeypatch.setattr(plan, "TAXONOMY_CODE", ())
    before = keys(BODY)
    assert keys(BODY.replace("# halved", "# comment")) == before
    after = keys(BODY.replace("x / 2", "x / 3"))
    assert after[0] != before[0] and after[1] != before[1]  # the taxonomy reads the new affinity
    monkeypatch.setattr(plan, "AFFINITY_CODE", ())
    monkeypatch.setattr(plan, "TAXONOMY_CODE", ("mathmod",))
    affinity = plan.affinity_step(cfg, "k", losses).key
    taxonomy = plan.taxonomy_step(cfg, affinity).key
    _module(tmp_path, "mathmod", BODY)
    assert plan.taxonomy_step(cfg, affinity).key != taxonomy  # Stage IV's own code


def test_the_shipped_analysis_modules_are_found():
    from pipelines.position.run import POSITION_CODE

    for modules in (plan.AFFINITY_CODE, plan.TAXONOMY_CODE, POSITION_CODE):
        assert len(code_digest(*modules)) == 64
