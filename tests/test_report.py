"""`pathx report`: every paper section is produced from the store and the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest

from extractor.sites import hook_count
from graphstore.api import Store
from pathx.report import build_report

pytestmark = [pytest.mark.store, pytest.mark.slow]


def test_report_sections_and_plots(loaded_store: object, demo: tuple, tmp_path: Path) -> None:
    bundle, data = demo
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    path = build_report(bundle, data.x_test, data.y_test, Store(loaded_store), tmp_path,  # type: ignore[arg-type]
                        n_model=12, n_pixel=10)
    text = path.read_text()
    for title in ("logit kept by the pathway", "LeRF / MoRF", "cascading randomisation",
                  "correlation- and precision-selected", "more consistent within a class",
                  "pathway counts separate", "pixel-to-class maps"):
        assert title in text, title
    for png in ("khakzar-logit.png", "khakzar-lerf-morf.png", "khakzar-sanity.png", "lyu-consistency.png",
                "lyu-pixel-class.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "nan" not in text.split("## Lengerich")[1].split("##")[0].lower() or "No correlation" in text
    # the randomisation experiment restores the model exactly
    assert all((before[k] == v).all() for k, v in bundle.model.state_dict().items())
    assert hook_count(bundle.model) == 0
