"""Whole-model FLOPs of the VT-FPN comparison (rest_dense.neck_analysis.analyze_whole_models):
ResTv2-T + UperNet / + semantic FPN / + VT-FPN, the shipped ADE20K configs, counted at a small
size (64x64) so that the test takes seconds; docs/vt_fpn.md and docs/flops.md have the same
table at 512x512 and 512x2048 (tools/vt_fpn_tables.py formats it)."""
import importlib.util

import pytest

from rest_dense import neck_analysis as na

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (64, 64)
#: the neck inside a whole model against the neck counted alone: the same modules on maps of
#: the same sizes, so they agree exactly today; the tolerance leaves room for the counter
#: attributing a functional op (an upsampling) to another scope
NECK_RTOL = 1e-3


@pytest.fixture(scope="module")
def rows():
    return {r.neck_name: r for r in na.analyze_whole_models([SHAPE])}


def test_whole_models_ordering_and_split(rows):
    uper, fpn, vt = rows[None], rows["fpn"], rows["vt_fpn"]
    assert [r.config for r in (uper, fpn, vt)] == [c for _, c in na.WHOLE_MODELS]
    assert vt.total < fpn.total < uper.total
    for r in rows.values():
        assert r.shape == SHAPE and r.backbone_params == uper.backbone_params
        assert r.backbone + (r.neck or 0) + r.head == r.total and r.head > 0
        assert r.backbone == uper.backbone  # the same ResTv2-T in all three
        assert r.result.target == r.config
    assert uper.neck is None and uper.neck_alone is None
    assert fpn.head == vt.head  # the same FPNHead on maps of the same sizes
    assert fpn.params < vt.params < uper.params


@pytest.mark.parametrize("neck", ["fpn", "vt_fpn"])
def test_neck_in_the_model_matches_the_neck_alone(rows, neck):
    r = rows[neck]
    alone = na.analyze_neck(neck, "restv2_tiny", SHAPE).flops.total
    assert r.neck_alone == alone
    assert r.neck == pytest.approx(alone, rel=NECK_RTOL)
    # so the whole-model difference is the necks' difference
    assert rows["fpn"].total - rows["vt_fpn"].total == pytest.approx(
        rows["fpn"].neck_alone - rows["vt_fpn"].neck_alone, rel=NECK_RTOL)


def test_table_tool_formats_the_rows(rows):
    spec = importlib.util.spec_from_file_location("vt_fpn_tables", REPO / "tools" / "vt_fpn_tables.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = tool.whole_models_table(list(rows.values()))
    lines = text.splitlines()
    assert len(lines) == 2 + 3 and "| neck alone |" in lines[0]
    vt_line = next(line for line in lines if line.startswith("| ResTv2-T + VT-FPN |"))
    assert f"| {rows['vt_fpn'].neck / 1e9:.2f} |" in vt_line and "64×64" in vt_line
    doc = "a\n" + tool.WHOLE_BEGIN + "\nold\n" + tool.WHOLE_END + "\nb"
    new, n = tool.replace_sections(doc, {(tool.WHOLE_BEGIN, tool.WHOLE_END): "NEW"})
    assert (new, n) == ("a\nNEW\nb", 1)


def test_a_neck_with_other_settings_is_refused(tmp_path):
    cfg = tmp_path / "vt.py"
    base = REPO / "configs" / "sem_fpn" / "vt-fpn_restv2-t_8xb2-160k_ade20k-512x512.py"
    cfg.write_text(f"_base_ = [{str(base)!r}]\nmodel = dict(neck=dict(num_tokens=4))\n")
    with pytest.raises(ValueError, match="num_tokens=4 differs from the neck-alone default 8"):
        na.analyze_whole_model(str(cfg), SHAPE)
