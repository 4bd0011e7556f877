"""Synthetic paired abdominal CT phantom: four-phase DICOM series with organ labels and known motion.

Run ``python -m data_prep.phantom --out DIR --cases N --seed S``; see ``docs/data_contracts.md`` §1.
"""

from data_prep.phantom.cases import PHASES, Case, generate, synthesize_case

__all__ = ['PHASES', 'Case', 'generate', 'synthesize_case']
