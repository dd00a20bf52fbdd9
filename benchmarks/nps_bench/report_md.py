"""BENCHMARKS.md from the results JSON: ``render(results) -> markdown`` (+ PNG figures).

Everything printed is computed from ``results`` (what :mod:`.run` wrote): tables, the "Defaults
chosen" section (chosen on *calibration* means; test means are shown beside them) and the "Where
NPS does not win" list. The code lives in one module per job; this module gathers them (and keeps
every name it held before the split importable from here):

* :mod:`.report_common` - standard errors, number formats, the markdown table, result lookups;
* :mod:`.report_tables` - the per-experiment sections (suite, pruning, fusion, compression, ...);
* :mod:`.report_studies` - "Defaults chosen", the σ0 and generations studies, the losses list;
* :mod:`.report_figures` - the PNG figures;
* :mod:`.report_doc` - :func:`render`, the document.
"""
from __future__ import annotations

from .report_common import (FUSION_LABELS, FUSION_ORDER, METHOD_LABELS, _curve_row, _defaults,  # noqa: F401
                            _grid, _lam, _task_names, _test_rows, _variant_label, f4, mean_se, pm, se, table)
from .report_doc import render  # noqa: F401
from .report_figures import (_finish, _plt, fig_compression, fig_generations, fig_pruning,  # noqa: F401
                             fig_search)
from .report_studies import (_above_two, _long_rows, _paired, defaults_section, generations_study,  # noqa: F401
                             losses_section, sigma0_study)
from .report_tables import (_compression_section, _fusion_rows, _fusion_section, _pruning_section,  # noqa: F401
                            _scale_table, _settings, _short_json, _speed_section, _suite_table,
                            _timing_section, _transfer_section)
